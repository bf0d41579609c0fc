"""Model compression stages: pruning (and, next, quantization)."""
