"""The report's figures: Pareto fronts, the board's arena, per-mode sweep plots, confusions."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from fallopt.config import KIB, TargetConfig
from fallopt.plots import draw_confusion, save_figure, style_axes
from fallopt.report.select import arena_budget
from fallopt.target import kib

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
    _label(ax, best, x)
    style_axes(ax, xlabel, _ACCURACY, title)
    return save_figure(fig, path)


def _label(ax: plt.Axes, runs: pd.DataFrame, x: str) -> None:
    """Name each run's point by its model, pruning and mode."""
    for _, row in runs.iterrows():
        ax.annotate(row["label"], (row[x], row["test_accuracy"]), textcoords="offset points",
                    xytext=(6, -10), fontsize=7)  # fmt: skip


def arena_png(
    table: pd.DataFrame, front: pd.Series, path: Path, target: TargetConfig | None
) -> Path:
    """Accuracy against TFLM's arena; the Pareto-optimal runs labelled.

    With a board, its arena budget is a vertical line and the runs that fit it (`fits`,
    from `select.judge`) are green, the others red crosses. Runs without an arena figure
    cannot be placed: the title counts them.
    """
    fig, ax = plt.subplots(figsize=(8, 5.5))
    measured = table[table["arena_kb"].notna()]
    if target is None:
        groups = [(measured, "run", "tab:blue", "o")]
    else:
        fits = measured["fits"].eq(True)
        groups = [(measured[fits], f"fits {target.name}", "tab:green", "o"),
                  (measured[~fits], f"does not fit {target.name}", "tab:red", "x")]  # fmt: skip
        budget = arena_budget(target)
        if budget is not None:
            ax.axvline(budget / KIB, color="tab:red", linestyle="--",
                       label=f"{target.name} arena budget ({kib(budget)})")  # fmt: skip
    for runs, name, color, marker in groups:  # empty ones too: the legend keys the markers
        ax.scatter(runs["arena_kb"], runs["test_accuracy"], color=color, marker=marker, s=50,
                   label=name)  # fmt: skip
    _label(ax, measured[front.loc[measured.index]], "arena_kb")
    title = "accuracy against TFLM arena RAM"
    if missing := len(table) - len(measured):
        title += f" ({missing} of {len(table)} runs have no arena figure, not shown)"
    style_axes(ax, "TFLM tensor arena (KiB, minimal)", _ACCURACY, title)
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
