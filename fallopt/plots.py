"""Figures logged with every run: confusion-matrix heatmap and training curves."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402


def style_axes(ax: plt.Axes, xlabel: str, ylabel: str, title: str) -> None:
    """Label the axes (with units), title, grid and legend: every fallopt plot looks alike."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()


def save_figure(fig: plt.Figure, path: Path) -> Path:
    """Write the figure as a PNG and free it."""
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def draw_confusion(
    ax: plt.Axes,
    confusion: np.ndarray,
    class_names: Sequence[str],
    title: str,
    fontsize: int = 9,
    rotation: int = 45,
    label_size: int | None = None,
    title_size: int = 10,
) -> None:
    """Heatmap of counts on `ax`, each cell also showing its share of the true class.

    `fontsize` is the cells'; labels keep matplotlib's size unless `label_size` is given.
    """
    n = len(class_names)
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
                fontsize=fontsize,
            )
    labels = {"fontsize": label_size} if label_size else {}
    ax.set_xticks(range(n), class_names, rotation=rotation, ha="right", **labels)
    ax.set_yticks(range(n), class_names, **labels)
    ax.set_xlabel("predicted class", **labels)
    ax.set_ylabel("true class", **labels)
    ax.set_title(title, fontsize=title_size, wrap=True)


def confusion_matrix_png(
    confusion: np.ndarray, class_names: Sequence[str], path: Path, title: str
) -> Path:
    """One confusion matrix as a PNG (see `draw_confusion`)."""
    n = len(class_names)
    fig, ax = plt.subplots(figsize=(max(1.2 * n + 2.5, 5.5), 1.1 * n + 2.4))
    draw_confusion(ax, confusion, class_names, title)
    return save_figure(fig, path)


def training_curves_png(
    history: dict[str, list[float]], path: Path, phases: dict[str, int] | None = None
) -> Path:
    """Loss and accuracy per epoch, train against validation.

    `phases` marks where each fine-tune starts: its label and its first epoch (1-based).
    """
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    epochs = np.arange(1, len(history["loss"]) + 1)
    for ax, metric in zip(axes, ("loss", "accuracy"), strict=True):
        ax.plot(epochs, history[metric], "o-", label="train")
        if f"val_{metric}" in history:
            ax.plot(epochs, history[f"val_{metric}"], "s--", label="validation")
        ax.set_xticks(epochs)
        for (label, first), style in zip((phases or {}).items(), (":", "-."), strict=False):
            ax.axvline(first - 0.5, color="grey", linestyle=style, label=f"{label} starts")
        ylabel = "cross-entropy loss" if metric == "loss" else "accuracy (fraction correct)"
        style_axes(ax, "epoch", ylabel, f"{metric} per epoch")
    return save_figure(fig, path)


_SPARSITY_AXIS = "target sparsity (fraction of pruned weights set to zero)"


def sweep_plots(table: pd.DataFrame, out_dir: Path) -> list[Path]:
    """The lab's two sweep plots: accuracy and gzipped model size against target sparsity.

    `table` has one row per finished run (columns as in `fallopt.sweep_summary.COLUMNS`).
    """
    x = table["prune.sparsity"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for column, label, style in (
        ("train_accuracy", "train", "o-"),
        ("val_accuracy", "validation", "s--"),
        ("test_accuracy", "test", "^-."),
    ):
        ax.plot(x, table[column], style, label=label)
    style_axes(ax, _SPARSITY_AXIS, "accuracy (fraction correct)", "accuracy against sparsity")
    accuracy = save_figure(fig, out_dir / "accuracy_vs_sparsity.png")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(x, table["keras_gzip_bytes"] / 1024, "o-", label="pruned model (gzipped .keras)")
    baseline = table["baseline_keras_gzip_bytes"].dropna()
    if not baseline.empty:
        ax.axhline(baseline.iloc[0] / 1024, color="grey", linestyle=":", label="baseline")
    ax.set_ylim(bottom=0)
    title = "gzipped size against sparsity (model.keras, no optimizer state)"
    style_axes(ax, _SPARSITY_AXIS, "gzipped model file (KiB)", title)
    size = save_figure(fig, out_dir / "gzip_size_vs_sparsity.png")
    return [accuracy, size]
