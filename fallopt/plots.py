"""Figures logged with every run: confusion-matrix heatmap and training curves."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def confusion_matrix_png(
    confusion: np.ndarray, class_names: Sequence[str], path: Path, title: str
) -> Path:
    """Heatmap of counts, each cell also showing its share of the true class."""
    n = len(class_names)
    fig, ax = plt.subplots(figsize=(max(1.2 * n + 2.5, 5.5), 1.1 * n + 2.4))
    ax.imshow(confusion, cmap="Blues")
    row_totals = confusion.sum(axis=1, keepdims=True).clip(min=1)
    for i in range(n):
        for j in range(n):
            dark = confusion[i, j] > confusion.max() / 2
            ax.text(
                j,
                i,
                f"{confusion[i, j]}\n{confusion[i, j] / row_totals[i, 0]:.0%}",
                ha="center",
                va="center",
                color="white" if dark else "black",
                fontsize=9,
            )
    ax.set_xticks(range(n), class_names, rotation=45, ha="right")
    ax.set_yticks(range(n), class_names)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title, fontsize=10, wrap=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def training_curves_png(history: dict[str, list[float]], path: Path) -> Path:
    """Loss and accuracy per epoch, train against validation."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    epochs = np.arange(1, len(history["loss"]) + 1)
    for ax, metric in zip(axes, ("loss", "accuracy"), strict=True):
        ax.plot(epochs, history[metric], "o-", label="train")
        if f"val_{metric}" in history:
            ax.plot(epochs, history[f"val_{metric}"], "s--", label="validation")
        ax.set_xlabel("epoch")
        ax.set_xticks(epochs)
        ax.set_ylabel("cross-entropy loss" if metric == "loss" else "accuracy (fraction correct)")
        ax.set_title(f"{metric} per epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
