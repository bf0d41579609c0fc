"""Magnitude pruning with tfmot: select layers, fine-tune under a schedule, strip, verify.

tfmot's `prune_low_magnitude` wraps the *same* layer objects it is given, so pruning a model
you still hold prunes it too. Here pruning always starts from a fresh model loaded from the
baseline's file, and the stripped result is checked: every pruned kernel must reach its
target within one point, and the stripped model, saved and loaded back, must predict what
the pruned model predicted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fallopt.backend import keras
from fallopt.compress.schedule import Schedule
from fallopt.config import PruneConfig, PruneMethod, TrainConfig
from fallopt.data import UNIT, InputRule, Split
from fallopt.errors import ConfigError, FalloptError
from fallopt.size import save_model
from fallopt.train import EpochHook, batches, fit

if TYPE_CHECKING:
    import tf_keras

TOLERANCE = 0.01  # one point of sparsity


class PruningError(FalloptError):
    """Pruning did not produce what was asked for."""


@dataclass(frozen=True)
class LayerSparsity:
    """Zeros in one pruned kernel."""

    layer: str
    shape: tuple[int, ...]
    params: int
    zeros: int
    target: float

    @property
    def sparsity(self) -> float:
        """Fraction of the kernel that is exactly zero."""
        return self.zeros / self.params


def _kind(layer: tf_keras.layers.Layer) -> str | None:
    layers = keras().layers
    if isinstance(layer, layers.Dense):
        return "dense"
    if isinstance(layer, layers.Conv2D):
        return "conv"
    return None


def select_layers(model: tf_keras.Model, scope: str) -> list[str]:
    """Names of the layers `scope` prunes: `dense`, `conv`, `all`, or a name pattern.

    Raises:
        ConfigError: when the scope matches no prunable (Dense or Conv2D) layer.
    """
    prunable = [(layer.name, _kind(layer)) for layer in model.layers if _kind(layer)]
    if scope == "all":
        chosen = [name for name, _ in prunable]
    elif scope in ("dense", "conv"):
        chosen = [name for name, kind in prunable if kind == scope]
    else:
        chosen = [name for name, _ in prunable if re.fullmatch(scope, name)]
    if not chosen:
        raise ConfigError(
            f"prune.scope={scope!r} matches no prunable layer of model {model.name!r}; "
            f"its Dense and Conv2D layers are {[name for name, _ in prunable]}"
        )
    return chosen


def check_m_by_n(model: tf_keras.Model, layer_names: list[str], m_by_n: list[int]) -> None:
    """Refuse, before training, an m:n pattern a selected layer cannot take whole.

    tfmot groups each kernel's weights n at a time along the input axis and pads a short
    last group with zeros, which then count among the m it removes: a conv over 3 image
    channels pruned 2:4 ends a third sparse, not half.

    Raises:
        ConfigError: naming the first such layer, its input size and the fix.
    """
    n = m_by_n[1]
    for name in layer_names:
        inputs = model.get_layer(name).kernel.shape[-2]
        if inputs % n:
            fits = [x for x in layer_names if model.get_layer(x).kernel.shape[-2] % n == 0]
            raise ConfigError(
                f"prune.m_by_n={list(m_by_n)} groups weights {n} at a time along each layer's "
                f"inputs, but layer {name} has {inputs} inputs, not a multiple of {n}. Leave "
                f"it out of prune.scope (layers that fit: {fits or 'none'})"
            )


def _tfmot_schedule(schedule: Schedule):  # noqa: ANN202 (tfmot has no type stubs)
    import tensorflow_model_optimization as tfmot

    sparsity = tfmot.sparsity.keras
    if schedule.method is PruneMethod.polynomial:
        return sparsity.PolynomialDecay(
            initial_sparsity=schedule.initial,
            final_sparsity=schedule.target,
            begin_step=schedule.begin_step,
            end_step=schedule.end_step,
            power=schedule.power,
            frequency=schedule.frequency,
        )
    return sparsity.ConstantSparsity(
        schedule.target,
        begin_step=schedule.begin_step,
        end_step=-1 if schedule.end_step is None else schedule.end_step,
        frequency=schedule.frequency,
    )


def wrap_for_pruning(
    model: tf_keras.Model, layer_names: list[str], schedule: Schedule, m_by_n: list[int] | None
) -> tf_keras.Model:
    """Wrap the selected layers of `model` with `prune_low_magnitude`.

    The wrappers share `model`'s layer objects, so `model` is pruned along with the result:
    pass a copy you will not use again (here: a model just loaded from the baseline file).
    """
    import tensorflow_model_optimization as tfmot

    prune_low_magnitude = tfmot.sparsity.keras.prune_low_magnitude
    kwargs = {"pruning_schedule": _tfmot_schedule(schedule)}
    if m_by_n is not None:
        kwargs["sparsity_m_by_n"] = tuple(m_by_n)
    chosen = set(layer_names)
    return keras().models.clone_model(
        model,
        clone_function=lambda layer: (
            prune_low_magnitude(layer, **kwargs) if layer.name in chosen else layer
        ),
    )


def measure_sparsity(
    model: tf_keras.Model, layer_names: list[str], target: float
) -> list[LayerSparsity]:
    """Zeros in the kernel of each named layer of a stripped model."""
    out = []
    for name in layer_names:
        kernel = model.get_layer(name).kernel.numpy()
        out.append(LayerSparsity(name, kernel.shape, kernel.size, int((kernel == 0).sum()), target))
    return out


def overall_sparsity(layers: list[LayerSparsity]) -> float:
    """Zeros over all pruned kernels together."""
    return sum(layer.zeros for layer in layers) / sum(layer.params for layer in layers)


def check_sparsity(layers: list[LayerSparsity], tolerance: float = TOLERANCE) -> None:
    """Raise if a pruned kernel misses its target by more than `tolerance` (or one weight).

    A kernel of n weights can only be k/n sparse: a 32-weight layer pruned to 0.8 keeps 26
    zeros (0.8125), which is on target. So the allowance is max(tolerance * n, 1) weights.
    """
    missed = [
        layer
        for layer in layers
        if abs(layer.zeros - layer.target * layer.params) > max(tolerance * layer.params, 1)
    ]
    if missed:
        detail = ", ".join(f"{layer.layer} {layer.sparsity:.3f}" for layer in missed)
        raise PruningError(
            f"pruned layers missed their target sparsity {missed[0].target:.3f} by more than "
            f"{tolerance * 100:g} point(s): {detail}. Check prune.frequency, prune.begin and "
            "prune.end"
        )


def check_structure(model: tf_keras.Model, layer_names: list[str], m_by_n: list[int]) -> None:
    """Raise unless every group of n consecutive input weights keeps at most m non-zeros."""
    m, n = m_by_n
    for name in layer_names:
        kernel = model.get_layer(name).kernel.numpy()
        # tfmot groups along the input-channel axis (the second to last).
        groups = np.moveaxis(kernel, -2, -1).reshape(-1, kernel.shape[-2])
        usable = groups[:, : groups.shape[1] // n * n].reshape(-1, n)
        if (np.count_nonzero(usable, axis=1) > m).any():
            raise PruningError(f"layer {name} is not {m}:{n} sparse after pruning")


@dataclass(frozen=True)
class PruneResult:
    """The stripped model, its fine-tune history and the measured sparsity."""

    model: tf_keras.Model
    history: dict[str, list[float]]
    layers: list[LayerSparsity]


def prune_and_fine_tune(
    baseline_file: Path,
    train: Split,
    val: Split,
    prune: PruneConfig,
    schedule: Schedule,
    train_cfg: TrainConfig,
    seed: int,
    out_file: Path,
    on_epoch_end: EpochHook | None = None,
    rule: InputRule = UNIT,
) -> PruneResult:
    """Prune a fresh copy of the baseline during a fine-tune, strip it and verify it.

    The stripped model is saved to `out_file` (no optimizer state), loaded back and checked
    to predict exactly what the pruned model predicted on the validation set.

    Raises:
        PruningError: a pruned kernel missed its target, the 2:4 structure is broken, or the
            stripped model predicts differently.
    """
    import tensorflow_model_optimization as tfmot

    k = keras()
    baseline = k.models.load_model(baseline_file, compile=False)
    names = select_layers(baseline, prune.scope)
    wrapped = wrap_for_pruning(baseline, names, schedule, prune.m_by_n)
    history = fit(
        wrapped,
        train,
        val,
        train_cfg,
        prune.fine_tune_epochs,
        seed,
        on_epoch_end,
        [tfmot.sparsity.keras.UpdatePruningStep()],
        rule,
    )
    stripped = tfmot.sparsity.keras.strip_pruning(wrapped)
    target = 1 - prune.m_by_n[0] / prune.m_by_n[1] if prune.m_by_n else prune.sparsity
    layers = measure_sparsity(stripped, names, target)
    check_sparsity(layers)
    if prune.m_by_n:
        check_structure(stripped, names, prune.m_by_n)

    save_model(stripped, out_file)
    reloaded = k.models.load_model(out_file, compile=False)
    pruned_probs = wrapped.predict(batches(val, 256, rule=rule), verbose=0)
    reloaded_probs = reloaded.predict(batches(val, 256, rule=rule), verbose=0)
    if not np.array_equal(pruned_probs.argmax(1), reloaded_probs.argmax(1)) or not np.allclose(
        pruned_probs, reloaded_probs, rtol=0, atol=1e-6
    ):
        diff = float(np.abs(pruned_probs - reloaded_probs).max())
        raise PruningError(
            f"the stripped model saved to {out_file} predicts differently from the pruned "
            f"model (max probability difference {diff:.2e})"
        )
    return PruneResult(reloaded, history, layers)
