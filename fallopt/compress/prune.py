"""Magnitude pruning with tfmot: select layers, fine-tune under a schedule, strip, verify.

tfmot's `prune_low_magnitude` wraps the *same* layer objects it is given, so pruning a model
you still hold prunes it too. Here pruning always starts from a fresh model loaded from the
baseline's file, and the stripped result is checked: every pruned kernel must reach its
target within one point, and the stripped model, saved and loaded back, must predict what
the pruned model predicted.

Nested models (a Keras application inside a Sequential or Functional model) are pruned layer
by layer. Measured with tfmot 0.8.1: `clone_model` with a `clone_function`, which wraps the
chosen layers, sees a nested model as one layer; `prune_low_magnitude` of a whole model does
enter it but wraps every layer; and tfmot's quantization refuses nested models. So the model
is first flattened into one Functional model with copies of the same layers. A layer keeps
its own name (`block1_conv1`) unless another layer of the tree has it too; then it is named
by its path of model names (`vgg16/block1_conv1`).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from fallopt.backend import keras
from fallopt.compress.outcome import Outcome
from fallopt.compress.schedule import Schedule
from fallopt.config import PruneConfig, PruneMethod, TrainConfig
from fallopt.data import UNIT, InputRule, Split
from fallopt.errors import ConfigError, FalloptError
from fallopt.models import FIXED_PREFIX
from fallopt.size import load_saved, save_model
from fallopt.timing import timed
from fallopt.train import EpochHook, batches, fit

if TYPE_CHECKING:
    import tf_keras

TOLERANCE = 0.01  # one point of sparsity
FLATTEN_PROBE = 32  # validation images on which a flattened model must predict as the nested


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
    # DepthwiseConv2D is not a Conv2D, and tfmot 0.8.1 registers it with no prunable weights.
    layers = keras().layers
    if isinstance(layer, layers.Dense):
        return "dense"
    if isinstance(layer, layers.Conv2D):
        return "conv"
    return None


def _wrappable(layer: tf_keras.layers.Layer) -> bool:
    """Whether `prune_low_magnitude` accepts `layer` (its own test, without wrapping it)."""
    from tensorflow_model_optimization.python.core.sparsity.keras import prune_registry

    return prune_registry.PruneRegistry.supports(layer) or hasattr(layer, "get_prunable_weights")


def _is_graph(layer: tf_keras.layers.Layer) -> bool:
    """Whether `layer` is a Sequential or Functional model whose layers can be reached."""
    return isinstance(layer, keras().Model) and getattr(layer, "_is_graph_network", False)


class _Leaf(NamedTuple):
    """A layer of a model tree that is not itself a model."""

    name: str  # unique in the tree: the layer's name, or its path if another layer has it
    path: str  # the names of the enclosing models and the layer's, joined by "/"
    layer: tf_keras.layers.Layer


def _walk(model: tf_keras.Model, prefix: str = "") -> Iterator[tuple[str, tf_keras.layers.Layer]]:
    for layer in model.layers:
        if _is_graph(layer):
            yield from _walk(layer, f"{prefix}{layer.name}/")
        elif not isinstance(layer, keras().layers.InputLayer):
            yield f"{prefix}{layer.name}", layer


def _leaves(model: tf_keras.Model) -> list[_Leaf]:
    """The layers of `model` and of the models nested in it, depth first, input layers left out."""
    found: dict[int, tuple[str, tf_keras.layers.Layer]] = {}
    for path, layer in _walk(model):
        found.setdefault(id(layer), (path, layer))  # a shared layer counts once
    counts: dict[str, int] = {}
    for _, layer in found.values():
        counts[layer.name] = counts.get(layer.name, 0) + 1
    return [
        _Leaf(layer.name if counts[layer.name] == 1 else path, path, layer)
        for path, layer in found.values()
    ]


def _layers_named(model: tf_keras.Model, names: list[str]) -> list[tf_keras.layers.Layer]:
    """The layers of the tree with these unique names, in that order."""
    by_name = {leaf.name: leaf.layer for leaf in _leaves(model)}
    return [by_name[name] for name in names]


def select_layers(model: tf_keras.Model, scope: str, key: str = "prune.scope") -> list[str]:
    """Names of the layers `scope` selects: `dense`, `conv`, `all`, or a name pattern.

    `key` is the config key the scope came from (`cluster.scope`, `sensitivity.scope`), as
    errors name it.

    Layers of nested models count as the model's own. A pattern must match a layer's whole
    unique name (`block1_conv1`) or its path (`vgg16/block1_conv1`), so `vgg16/.*` selects a
    whole backbone. DepthwiseConv2D layers are never selected: tfmot 0.8.1 cannot prune them.
    Nor are layers named `fixed_*`: fixed preprocessing a model source builds into the model
    (e.g. VGG's colour conversion), whose weights are not learned.

    Raises:
        ConfigError: when the scope matches no prunable (Dense or Conv2D) layer, or a selected
            layer is one tfmot cannot wrap (a subclass it does not know), naming it.
    """
    prunable = [
        (leaf, _kind(leaf.layer))
        for leaf in _leaves(model)
        if _kind(leaf.layer) and not leaf.name.startswith(FIXED_PREFIX)
    ]
    if scope == "all":
        chosen = [leaf for leaf, _ in prunable]
    elif scope in ("dense", "conv"):
        chosen = [leaf for leaf, kind in prunable if kind == scope]
    else:
        pattern = re.compile(scope)
        chosen = [
            leaf
            for leaf, _ in prunable
            if pattern.fullmatch(leaf.name) or pattern.fullmatch(leaf.path)
        ]
    if not chosen:
        raise ConfigError(
            f"{key}={scope!r} matches no Dense or Conv2D layer of model {model.name!r}; "
            f"its Dense and Conv2D layers are {[leaf.name for leaf, _ in prunable]}"
        )
    refused = [leaf for leaf in chosen if not _wrappable(leaf.layer)]
    if refused:
        detail = ", ".join(f"{leaf.name} ({type(leaf.layer).__name__})" for leaf in refused)
        raise ConfigError(
            f"tfmot cannot wrap layer(s) {detail} selected by {key}={scope!r}: their classes "
            f"are neither built-in Keras layers nor define get_prunable_weights. Leave them "
            f"out of {key}"
        )
    return [leaf.name for leaf in chosen]


def flatten_model(model: tf_keras.Model) -> tf_keras.Model:
    """One Functional model computing what `model` computes, with no model nested in it.

    Every layer of the tree is copied (config and weights) under its unique name, so `model`
    is neither changed nor shares a layer with the result: pruning the result leaves `model`
    alone. A nested model called with `training=...` passes it to its layers, as Keras does.
    Returns `model` itself when nothing is nested in it.
    """
    if not any(_is_graph(layer) for layer in model.layers):
        return model
    k = keras()
    copies: dict[int, tuple[tf_keras.layers.Layer, tf_keras.layers.Layer]] = {}
    for leaf in _leaves(model):
        config = leaf.layer.get_config() | {"name": leaf.name}
        copies[id(leaf.layer)] = (leaf.layer, type(leaf.layer).from_config(config))
    inputs = [
        k.Input(type_spec=x.type_spec, name=name)
        for x, name in zip(model.inputs, model.input_names, strict=True)
    ]
    flat = k.Model(inputs, _inline(model, inputs, copies, None), name=model.name)
    for layer, copy in copies.values():  # the copies are built now, by the calls in _inline
        copy.set_weights(layer.get_weights())
    return flat


def _inline(
    model: tf_keras.Model,
    inputs: object,
    copies: dict[int, tuple[tf_keras.layers.Layer, tf_keras.layers.Layer]],
    training: bool | None,
) -> object:
    """Call the copies of `model`'s layers on `inputs` node by node, entering nested models.

    This is Keras's own `Functional._run_internal_graph`, except that a nested model's node
    recurses instead of calling the model as one layer.
    """
    import tensorflow as tf

    refs = zip(model.inputs, tf.nest.flatten(inputs), strict=True)
    tensors = {str(id(ref)): x for ref, x in refs}
    by_depth = model._nodes_by_depth  # noqa: SLF001 (Keras has no public graph API)
    for depth in sorted(by_depth, reverse=True):
        for node in by_depth[depth]:
            if node.is_input or any(ref not in tensors for ref in node.flat_input_ids):
                continue
            args, kwargs = tf.nest.map_structure(
                lambda x: tensors.get(str(id(x)), x), (node.call_args, node.call_kwargs)
            )
            if training is not None and kwargs.get("training") is None:
                kwargs["training"] = training  # Keras drops it for layers without the argument
            if _is_graph(node.layer):
                outputs = _inline(node.layer, args[0], copies, kwargs.get("training"))
            else:
                outputs = copies[id(node.layer)][1](*args, **kwargs)
            for ref, x in zip(node.flat_output_ids, tf.nest.flatten(outputs), strict=True):
                tensors[ref] = x
    outputs = [tensors[str(id(ref))] for ref in model.outputs]
    return tf.nest.pack_sequence_as(model._nested_outputs, outputs)  # noqa: SLF001


def layer_targets(model: tf_keras.Model, prune: PruneConfig) -> dict[str, float]:
    """Each layer magnitude pruning prunes, and the sparsity it must reach.

    `prune.per_layer` names the layers and their sparsities; otherwise `prune.scope` selects
    them at `prune.sparsity` (at 1 - m/n with `prune.m_by_n`).

    Raises:
        ConfigError: the scope selects nothing, or the map names a layer the model lacks or
            one that cannot be pruned, listing the ones that can.
    """
    if prune.per_layer:
        prunable = select_layers(model, "all")
        unknown = [name for name in prune.per_layer if name not in prunable]
        if unknown:
            raise ConfigError(
                f"prune.per_layer names {', '.join(unknown)}, which model {model.name!r} has no "
                f"prunable layer called; its prunable layers: {', '.join(prunable)}"
            )
        return dict(prune.per_layer)
    target = 1 - prune.m_by_n[0] / prune.m_by_n[1] if prune.m_by_n else prune.sparsity
    return dict.fromkeys(select_layers(model, prune.scope), target)


def check_m_by_n(model: tf_keras.Model, layer_names: list[str], m_by_n: list[int]) -> None:
    """Refuse, before training, an m:n pattern a selected layer cannot take whole.

    tfmot groups each kernel's weights n at a time along the input axis and pads a short
    last group with zeros, which then count among the m it removes: a conv over 3 image
    channels pruned 2:4 ends a third sparse, not half.

    Raises:
        ConfigError: naming the first such layer, its input size and the fix.
    """
    n = m_by_n[1]
    inputs_of = {
        name: layer.kernel.shape[-2]
        for name, layer in zip(layer_names, _layers_named(model, layer_names), strict=True)
    }
    for name, inputs in inputs_of.items():
        if inputs % n:
            fits = [x for x, size in inputs_of.items() if size % n == 0]
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


@timed("train")  # tfmot's part of the pruning fine-tune, as in the lab's flow
def wrap_for_pruning(
    model: tf_keras.Model,
    targets: dict[str, float],
    schedule: Schedule,
    m_by_n: list[int] | None,
) -> tf_keras.Model:
    """Wrap the layers named in `targets` with `prune_low_magnitude`, each to its sparsity.

    Every layer follows `schedule`'s steps towards its own target.

    The wrappers share `model`'s layer objects, so `model` is pruned along with the result:
    pass a copy you will not use again (here: a model just loaded from the baseline file).
    `clone_model` does not enter nested models: flatten them first (`flatten_model`).

    Raises:
        PruningError: naming a layer tfmot refuses to wrap, or one `model` does not hold.
    """
    import tensorflow_model_optimization as tfmot

    prune_low_magnitude = tfmot.sparsity.keras.prune_low_magnitude
    kwargs = {} if m_by_n is None else {"sparsity_m_by_n": tuple(m_by_n)}
    chosen = set(targets)

    def wrap(layer: tf_keras.layers.Layer) -> tf_keras.layers.Layer:
        if layer.name not in chosen:
            return layer
        chosen.remove(layer.name)
        own = dataclasses.replace(schedule, target=targets[layer.name])
        try:
            return prune_low_magnitude(layer, pruning_schedule=_tfmot_schedule(own), **kwargs)
        except ValueError as e:  # tfmot's message names the class, not the layer
            raise PruningError(
                f"tfmot cannot prune layer {layer.name} ({type(layer).__name__}): {e}"
            ) from e

    wrapped = keras().models.clone_model(model, clone_function=wrap)
    if chosen:
        raise PruningError(
            f"layers {sorted(chosen)} are not top-level layers of model {model.name!r} and "
            "would not be pruned: flatten nested models first"
        )
    return wrapped


def measure_sparsity(model: tf_keras.Model, targets: dict[str, float]) -> list[LayerSparsity]:
    """Zeros in the kernel of each named layer of a stripped model, against its target."""
    out = []
    for name, layer in zip(targets, _layers_named(model, list(targets)), strict=True):
        kernel = layer.kernel.numpy()
        zeros = int((kernel == 0).sum())
        out.append(LayerSparsity(name, kernel.shape, kernel.size, zeros, targets[name]))
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
        detail = ", ".join(
            f"{layer.layer} {layer.sparsity:.3f} (target {layer.target:.3f})" for layer in missed
        )
        raise PruningError(
            f"pruned layers missed their target sparsity by more than {tolerance * 100:g} "
            f"point(s): {detail}. Check prune.frequency, prune.begin and prune.end"
        )


def check_structure(model: tf_keras.Model, layer_names: list[str], m_by_n: list[int]) -> None:
    """Raise unless every group of n consecutive input weights keeps at most m non-zeros."""
    m, n = m_by_n
    for name, layer in zip(layer_names, _layers_named(model, layer_names), strict=True):
        kernel = layer.kernel.numpy()
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

    def outcome(self) -> Outcome:
        """What every run using this stage logs: `sparsity_<layer>`, `sparsity_per_layer.csv`."""
        achieved = overall_sparsity(self.layers)
        metrics = {"sparsity_achieved": achieved}
        metrics.update({f"sparsity_{x.layer}": x.sparsity for x in self.layers})
        rows = [
            {"layer": x.layer, "kernel_shape": "x".join(map(str, x.shape)), "params": x.params,
             "zeros": x.zeros, "sparsity": round(x.sparsity, 6), "target": round(x.target, 6)}
            for x in self.layers
        ]  # fmt: skip
        detail = ", ".join(f"{x.layer} {x.sparsity:.3f}/{x.target:.3f}" for x in self.layers)
        summary = f"sparsity {achieved:.3f} overall; achieved/target: {detail}"
        return Outcome(self.history, metrics, rows, summary)


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

    A baseline with nested models is flattened first (`flatten_model`), so the result is one
    Functional model that predicts what the nested one would. The stripped model is saved to
    `out_file` (no optimizer state), loaded back and checked to predict exactly what the
    pruned model predicted on the validation set.

    Raises:
        ConfigError: `prune.scope` selects nothing, or a layer tfmot cannot prune.
        PruningError: a pruned kernel missed its target, the 2:4 structure is broken, or the
            flattened or stripped model predicts differently.
    """
    import tensorflow_model_optimization as tfmot

    k = keras()
    baseline = k.models.load_model(baseline_file, compile=False)
    targets = layer_targets(baseline, prune)
    flat = flatten_model(baseline)
    if flat is not baseline:  # a few images show a wrongly rewired graph
        probe = Split(val.x[:FLATTEN_PROBE], val.y[:FLATTEN_PROBE])
        check_same_predictions(baseline, flat, probe, rule, "the flattened baseline")
    wrapped = wrap_for_pruning(flat, targets, schedule, prune.m_by_n)
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
    stripped = strip(wrapped)
    layers = measure_sparsity(stripped, targets)
    check_sparsity(layers)
    if prune.m_by_n:
        check_structure(stripped, list(targets), prune.m_by_n)

    save_model(stripped, out_file)
    reloaded = load_saved(out_file)
    check_same_predictions(wrapped, reloaded, val, rule, f"the stripped model saved to {out_file}")
    return PruneResult(reloaded, history, layers)


@timed("train")  # tfmot's part of the pruning fine-tune, as in the lab's flow
def strip(wrapped: tf_keras.Model) -> tf_keras.Model:
    """The fine-tuned model without tfmot's pruning wrappers."""
    import tensorflow_model_optimization as tfmot

    return tfmot.sparsity.keras.strip_pruning(wrapped)


@timed("inference")
def check_same_predictions(
    expected: tf_keras.Model, actual: tf_keras.Model, split: Split, rule: InputRule, what: str
) -> None:
    """Raise unless `actual` predicts `expected`'s classes and probabilities (to 1e-6)."""
    want = expected.predict(batches(split, 256, rule=rule), verbose=0)
    got = actual.predict(batches(split, 256, rule=rule), verbose=0)
    if not np.array_equal(want.argmax(1), got.argmax(1)) or not np.allclose(
        want, got, rtol=0, atol=1e-6
    ):
        raise PruningError(
            f"{what} predicts differently from the model it was made from (max probability "
            f"difference {float(np.abs(want - got).max()):.2e})"
        )
