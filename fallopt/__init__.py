"""fallopt: shrink a CNN for an embedded device and measure what it costs in accuracy."""

import os

# tfmot works only with Keras 2 (tf-keras). TensorFlow reads this when `tf.keras` is first
# touched, so it must be set before any fallopt module imports TensorFlow: here, whichever
# entry point (CLI, tests, notebooks) imports the package first.
os.environ["TF_USE_LEGACY_KERAS"] = "1"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

__version__ = "0.1.0"
