"""The report's figures: Pareto fronts, the lab's per-mode sweep plots, confusion matrices."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from fallopt.plots import draw_confusion, save_figure, style_axes

_ACCURACY = "test accuracy of the .tflite (fraction correct)"
_SPARSITY = "target sparsity (fraction of weights pruned)"


def pareto_png(
    table: pd.DataFrame, x: str, xlabel: str, front: pd.Series, path: Path, title: str
) -> Path:
    """Accuracy against a cost; the Pareto-optimal runs labelled and joined, the rest grey."""
    fig, ax = plt.subplots(figsize=(8, 5.5))
    dominated = table[~front]
    ax.scatter(dominated[x], dominated["test_accuracy"], color="lightgrey",
               edgecolor="grey", label="dominated run")  # fmt: skip
    best = table[front].sort_values(x)
    ax.step(best[x], best["test_accuracy"], where="post", color="tab:blue", alpha=0.5)
    ax.scatter(best[x], best["test_accuracy"], color="tab:blue", s=60, zorder=3,
               label="Pareto-optimal run")  # fmt: skip
    for _, row in best.iterrows():
        ax.annotate(row["label"], (row[x], row["test_accuracy"]), textcoords="offset points",
                    xytext=(6, -10), fontsize=7)  # fmt: skip
    style_axes(ax, xlabel, _ACCURACY, title)
    return save_figure(fig, path)


def per_mode_png(table: pd.DataFrame, y: str, ylabel: str, path: Path, title: str) -> Path:
    """The lab's plot: a metric against sparsity, one line per quantization mode."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (mode, model), group in table.groupby(["quant.mode", "label_model"], sort=True):
        group = group.sort_values("prune.sparsity")
        ax.plot(group["prune.sparsity"], group[y], "o-", label=f"{mode} ({model})")
    style_axes(ax, _SPARSITY, ylabel, title)
    return save_figure(fig, path)


def confusion_grid_png(matrices: dict[str, np.ndarray], class_names: list[str], path: Path) -> Path:
    """Confusion matrices side by side (rows: true class; cells: count and share of row)."""
    n = len(matrices)
    fig, axes = plt.subplots(1, n, figsize=(3.6 * n + 0.5, 3.9), squeeze=False)
    for ax, (title, cm) in zip(axes[0], matrices.items(), strict=True):
        draw_confusion(ax, cm, class_names, title, 8, rotation=30, label_size=8, title_size=8)
    return save_figure(fig, path)
