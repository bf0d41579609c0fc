"""Figures logged with every run: confusion-matrix heatmap and training curves."""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from fallopt.identity import file_digest  # noqa: E402
from fallopt.memo import Memo  # noqa: E402


def style_axes(ax: plt.Axes, xlabel: str, ylabel: str, title: str) -> None:
    """Label the axes (with units), title, grid and legend: every fallopt plot looks alike."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()


def save_figure(fig: plt.Figure, path: Path, tight: bool = True) -> Path:
    """Write the figure as a PNG and free it.

    `tight` fits the layout to the labels, which costs matplotlib a second pass over the
    figure; the figures drawn for every run set their margins instead and are drawn once.
    """
    if tight:
        fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


_CHAR_INCHES = 0.075  # a tick label character at matplotlib's default 10 pt, generously


def _margins(fig: plt.Figure, left: float, bottom: float, top: float, right: float = 0.25) -> None:
    """Fixed margins in inches, so the figure needs no layout pass (see `save_figure`)."""
    width, height = fig.get_size_inches()
    fig.subplots_adjust(
        left=left / width, right=1 - right / width, bottom=bottom / height, top=1 - top / height
    )


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


# PNGs drawn in this process, by what they show: a figure already drawn is copied, not drawn
# again. A prune x quant grid's runs share their pruned model, so its confusion matrix and
# curves (0.1 s each to draw) are drawn once per pruned model instead of once per run.
_drawn: Memo[str, tuple[Path, str]] = Memo(256)  # what a figure shows -> its file, bytes' hash


def _once(path: Path, content: object, draw: Callable[[], Path]) -> Path:
    """Draw a figure into `path` unless one showing `content` was drawn; then copy that.

    The earlier file is copied only while it still holds what was drawn into it.
    """
    key = hashlib.sha256(repr(content).encode()).hexdigest()
    earlier, drawn = _drawn.peek(key) or (None, "")
    if earlier is not None and earlier.is_file() and file_digest(earlier) == drawn:
        if earlier.resolve() != path.resolve():
            shutil.copyfile(earlier, path)
        return path
    _drawn.put(key, lambda: (draw(), file_digest(path)))
    return path


def confusion_matrix_png(
    confusion: np.ndarray, class_names: Sequence[str], path: Path, title: str
) -> Path:
    """One confusion matrix as a PNG (see `draw_confusion`)."""
    return _once(path, ("confusion", confusion.tolist(), list(class_names), title),
                 lambda: _confusion_png(confusion, class_names, path, title))  # fmt: skip


def _confusion_png(
    confusion: np.ndarray, class_names: Sequence[str], path: Path, title: str
) -> Path:
    n = len(class_names)
    label = _CHAR_INCHES * max(len(name) for name in class_names)
    fig, ax = plt.subplots(figsize=(max(1.2 * n + 2.5, 5.5) + label, 1.1 * n + 2.4 + 0.7 * label))
    draw_confusion(ax, confusion, class_names, title)
    _margins(fig, left=0.75 + label, bottom=0.75 + 0.71 * label, top=0.75)  # labels at 45°
    return save_figure(fig, path, tight=False)


def training_curves_png(
    history: dict[str, list[float]], path: Path, phases: dict[str, int] | None = None
) -> Path:
    """Loss and accuracy per epoch, train against validation.

    `phases` marks where each fine-tune starts: its label and its first epoch (1-based).
    """
    return _once(path, ("curves", history, phases),
                 lambda: _curves_png(history, path, phases))  # fmt: skip


def _curves_png(history: dict[str, list[float]], path: Path, phases: dict[str, int] | None) -> Path:
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
    _margins(fig, left=0.75, bottom=0.55, top=0.4)
    fig.subplots_adjust(wspace=0.3)
    return save_figure(fig, path, tight=False)


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
