"""Per-layer pruning sensitivity: each layer magnitude-pruned alone, without fine-tuning.

Each chosen layer's kernel is masked in place with numpy, to the zeros tfmot's magnitude
pruning would make (the smallest |w|), the model is evaluated on a split, and the kernel is
put back bit for bit before the next layer. tfmot's own route (wrap, one training step at
learning rate 0, strip) makes the same mask but is about 250x slower, and its training step
moves the BatchNorm moving statistics, so it does not measure the kernel alone (research
notes of issue 17, section E).

One evaluation is one pass over the split through one traced `tf.function`: setting weights
needs no retrace. On the lab CNN (96x96) a pass over 400 images took 0.7-0.8 s, so 5 layers
x 6 sparsities cost about 25 s.

Accuracy moves in steps of 1/n on a split of n images, and the drop of one pruned layer is a
difference of two such accuracies: drops within a few times 1/n (about 0.03 on 300 images)
are noise. Use the whole validation split, and read small or negative drops as "no loss".
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fallopt.compress.prune import flatten_model
from fallopt.data import UNIT, InputRule, Split
from fallopt.errors import ConfigError
from fallopt.timing import timed

if TYPE_CHECKING:
    import tf_keras

log = logging.getLogger(__name__)

BATCH_SIZE = 256
# Accuracies are multiples of 1/n; their difference may miss max_drop by a rounding error.
_SLACK = 1e-9
COLUMNS = ("layer", "params", "sparsity", "val_accuracy", "drop")


@dataclass(frozen=True)
class LayerDrop:
    """One layer pruned alone to `sparsity`: the accuracy it leaves and the drop from baseline.

    `params` is the size of the masked kernel; `drop` is baseline accuracy minus `accuracy`
    (positive: worse; negative: noise, see the module's note).
    """

    layer: str
    params: int
    sparsity: float
    accuracy: float
    drop: float


def magnitude_mask(kernel: np.ndarray, sparsity: float) -> np.ndarray:
    """A copy of `kernel` with its round(sparsity * n) smallest |w| set to zero.

    Ties are broken by position (a stable sort), so the count is exact. These are the zeros
    tfmot's magnitude pruning makes at that sparsity (research E: identical masks).
    """
    flat = kernel.reshape(-1).copy()
    order = np.argsort(np.abs(flat), kind="stable")
    flat[order[: round(sparsity * flat.size)]] = 0
    return flat.reshape(kernel.shape)


def _kernel(layer: tf_keras.layers.Layer) -> tf_keras.Variable:
    for attribute in ("kernel", "depthwise_kernel"):
        variable = getattr(layer, attribute, None)
        if variable is not None:
            return variable
    raise ConfigError(
        f"layer {layer.name} ({type(layer).__name__}) has no kernel to prune: choose Conv2D "
        "or Dense layers"
    )


def _accuracy_fn(model: tf_keras.Model, split: Split, rule: InputRule, batch_size: int):  # noqa: ANN202
    """A function returning the model's accuracy on `split` with its current weights."""
    import tensorflow as tf

    spec = tf.TensorSpec((None, *split.x.shape[1:]), tf.float32)
    run = tf.function(lambda x: model(x, training=False), input_signature=[spec])

    def accuracy() -> float:
        correct = 0
        for start in range(0, len(split), batch_size):
            x = rule.apply(split.x[start : start + batch_size])
            predicted = run(tf.constant(x)).numpy().argmax(axis=1)
            correct += int((predicted == split.y[start : start + batch_size]).sum())
        return correct / len(split)

    return accuracy


@timed("inference")
def weight_sensitivity(
    model: tf_keras.Model,
    split: Split,
    layers: list[str],
    sparsities: list[float],
    rule: InputRule = UNIT,
    batch_size: int = BATCH_SIZE,
) -> tuple[float, list[LayerDrop]]:
    """The baseline accuracy on `split`, and each layer's accuracy pruned alone to each sparsity.

    `layers` are names as `prune.select_layers` gives them (a nested model is flattened into
    a copy whose layers carry those names). `model`'s weights are changed while this runs
    and restored exactly: each layer's weights are checked bit for bit after its turn.

    Returns:
        The baseline accuracy and one row per (layer, sparsity), in the order given.

    Raises:
        ConfigError: a name the model lacks, or a layer without a kernel, naming it; an
            empty split.
        RuntimeError: if a layer's weights could not be restored exactly.
    """
    if not len(split):
        raise ConfigError("pruning sensitivity needs images to evaluate on: the split is empty")
    flat = flatten_model(model)
    known = [layer.name for layer in flat.layers]
    missing = [name for name in layers if name not in known]
    if missing:
        raise ConfigError(
            f"sensitivity names layer(s) {', '.join(missing)}, which model {model.name!r} "
            f"lacks; its layers: {', '.join(known)}"
        )
    accuracy = _accuracy_fn(flat, split, rule, batch_size)
    baseline = accuracy()
    log.info("[sensitivity] baseline accuracy %.3f on %d images (one image: %.4f)",
             baseline, len(split), 1 / len(split))  # fmt: skip
    rows = []
    for name in layers:
        layer = flat.get_layer(name)
        kernel = _kernel(layer)
        saved_kernel = kernel.numpy()
        saved = layer.get_weights()
        found = []
        try:
            for sparsity in sparsities:
                kernel.assign(magnitude_mask(saved_kernel, sparsity))
                pruned = accuracy()
                found.append(
                    LayerDrop(name, saved_kernel.size, sparsity, pruned, baseline - pruned)
                )
        finally:
            kernel.assign(saved_kernel)
        restored = layer.get_weights()
        if len(restored) != len(saved) or not all(
            np.array_equal(a, b) for a, b in zip(restored, saved, strict=True)
        ):
            raise RuntimeError(f"the weights of layer {name} were not restored exactly")
        log.info("[sensitivity] %s: %s", name,
                 ", ".join(f"{row.sparsity:g} {row.drop:+.3f}" for row in found))  # fmt: skip
        rows += found
    return baseline, rows


def propose_per_layer(rows: list[LayerDrop], max_drop: float) -> dict[str, float]:
    """Per layer, the highest sparsity whose drop and every lower tested sparsity's are small.

    A layer gets sparsity s when every tested sparsity <= s dropped accuracy by at most
    `max_drop`: a layer that lost too much at 0.5 is not proposed 0.8 because 0.8 happened to
    do better. Layers whose lowest tested sparsity already drops too much are left out.
    Drops within about 1/n of a split of n images are noise (see the module's note), so a
    `max_drop` below a few times 1/n proposes by chance.
    """
    by_layer: dict[str, list[LayerDrop]] = {}
    for row in rows:
        by_layer.setdefault(row.layer, []).append(row)
    proposed = {}
    for name, found in by_layer.items():
        best = None
        for row in sorted(found, key=lambda r: r.sparsity):
            if row.drop > max_drop + _SLACK:
                break
            best = row.sparsity
        if best is not None:
            proposed[name] = best
    return proposed


def sensitivity_table(rows: list[LayerDrop], path: Path) -> Path:
    """The rows as CSV: layer, params, sparsity, val_accuracy, drop."""
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        writer.writerows((r.layer, r.params, r.sparsity, r.accuracy, r.drop) for r in rows)
    return path


def heatmap_png(rows: list[LayerDrop], path: Path, title: str) -> Path:
    """Layers (rows) by sparsities (columns), coloured by accuracy drop, each cell's value shown.

    Red is a loss, blue a gain (noise), white none; an untested cell stays blank.
    """
    from fallopt.plots import plt, save_figure

    layers = list(dict.fromkeys(r.layer for r in rows))
    params = {r.layer: r.params for r in rows}
    sparsities = sorted({r.sparsity for r in rows})
    drops = np.full((len(layers), len(sparsities)), np.nan)
    for r in rows:
        drops[layers.index(r.layer), sparsities.index(r.sparsity)] = r.drop
    limit = max(float(np.nanmax(np.abs(drops))), 1e-3) if rows else 1.0
    fig, ax = plt.subplots(figsize=(1.0 * len(sparsities) + 3.5, 0.5 * len(layers) + 2.2))
    image = ax.imshow(drops, cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto")
    for i in range(len(layers)):
        for j in range(len(sparsities)):
            if not np.isnan(drops[i, j]):
                dark = abs(drops[i, j]) > limit * 0.6
                ax.text(j, i, f"{drops[i, j]:+.3f}", ha="center", va="center", fontsize=9,
                        color="white" if dark else "black")  # fmt: skip
    ax.set_xticks(range(len(sparsities)), [f"{s:g}" for s in sparsities])
    ax.set_yticks(range(len(layers)), [f"{name} ({params[name]:,} w)" for name in layers])
    ax.set_xlabel("sparsity (fraction of the layer's weights set to zero)")
    ax.set_ylabel("layer pruned alone (kernel weights)")
    ax.set_title(title, fontsize=10, wrap=True)
    fig.colorbar(image, ax=ax, label="accuracy drop (baseline - pruned)")
    return save_figure(fig, path)
