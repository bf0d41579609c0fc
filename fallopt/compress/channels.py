"""Channel (structured) pruning: remove whole filters and units by rebuilding a thinner model.

Magnitude pruning leaves the zeros in the kernels: the file gzips smaller, but the model does
as much work. Removing whole output channels of Conv2D and Dense layers makes every layer
that reads them smaller too, so parameters, MACs and activation memory all shrink (the lab
CNN at half width: 4x fewer parameters, 3.2x fewer MACs). The thinner model is rebuilt from
the model's config with fewer `filters` / `units`, and the kept weights are copied into it.

The steps (docs/issue17-research.md, section C):

1. `plan`: walk the graph and find, for every tensor, the producers (Conv2D or Dense, by exact
   type) whose channels it carries. Add, Multiply and the other element-wise joins tie their
   inputs' producers into one group that must keep the same channels. A group is frozen
   (keeps every channel) when it feeds a model output, meets the model input, holds a fixed
   `fixed_*` layer or feeds a layer that mixes channels (softmax). A layer the rebuild has no
   rule for is refused, naming it, before anything is trained.
2. `choose`: score the channels (`CRITERIA`), sum the scores over a group, keep the best.
3. `flow`: the original indices of every layer's input and output channels.
4. `thin`: rebuild and copy the kept slices. `zero_removed` instead zeroes, in place, the
   weights that `thin` would drop: the zeroed model then computes what the thin one does,
   which is how every thinning is checked, and how sensitivity is measured without a rebuild.
"""

from __future__ import annotations

import functools
import logging
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from fallopt.backend import keras
from fallopt.compress.outcome import Outcome
from fallopt.compress.prune import (
    PruningError,
    check_same_predictions,
    flatten_model,
    select_layers,
)
from fallopt.config import PruneConfig, TrainConfig
from fallopt.data import UNIT, InputRule, Split
from fallopt.errors import ConfigError
from fallopt.models import FIXED_PREFIX
from fallopt.size import load_saved, save_model
from fallopt.train import EpochHook, batches, fit

if TYPE_CHECKING:
    import tf_keras

log = logging.getLogger(__name__)

PROBE = 32  # validation images on which the thin model must predict as the zeroed baseline
# Thin vs zeroed differ only by float summation order (measured up to 3e-7 on MobileNetV2);
# a slicing bug moves outputs by orders of magnitude more. Relative to the outputs' scale,
# so that a model ending in logits is held to the same standard as one ending in softmax.
EXACT_TOLERANCE = 1e-5
_FIX = "leave it out of the model or use prune=constant"

Keep = Mapping[str, np.ndarray]  # producer name -> sorted original indices of kept channels


# --- the graph -------------------------------------------------------------------------------


class _Step(NamedTuple):
    """One call of a layer in the model's graph, in topological order."""

    layer: tf_keras.layers.Layer
    inputs: tuple[str, ...]  # the layers whose outputs it takes, in call order
    in_shapes: tuple[tuple[int | None, ...], ...]
    out_shape: tuple[int | None, ...]

    @property
    def name(self) -> str:
        return self.layer.name

    @property
    def cls(self) -> str:
        return type(self.layer).__name__


def _graph(model: tf_keras.Model) -> list[_Step]:
    """The model's layer calls, inputs first, read from the model's own nodes.

    `model.layers` would not do: a Sequential leaves its InputLayer out, and a layer's
    `inbound_nodes` may hold calls from other graphs (a Sequential loaded from a file).
    """
    import tensorflow as tf

    if not getattr(model, "_is_graph_network", False):
        raise ConfigError(
            f"channel pruning needs the graph of model {model.name!r} ({type(model).__name__}), "
            "but it has none: a subclassed model, or a Sequential never built on an input "
            "shape. Build it on keras.Input (or save and load it) or use prune=constant"
        )
    steps, calls = [], Counter()
    by_depth = model._nodes_by_depth  # noqa: SLF001 (Keras has no public graph API)
    for depth in sorted(by_depth, reverse=True):  # deeper = nearer the inputs
        for node in by_depth[depth]:
            calls[node.layer.name] += 1
            ins = [] if node.is_input else list(node.keras_inputs)
            outs = tf.nest.flatten(node.outputs)
            steps.append(
                _Step(
                    node.layer,
                    tuple(t._keras_history.layer.name for t in ins),  # noqa: SLF001
                    tuple(tuple(t.shape) for t in ins),
                    tuple(outs[0].shape),
                )
            )
    shared = {name: n for name, n in calls.items() if n > 1}
    if shared:
        name, n = next(iter(shared.items()))
        layer = model.get_layer(name)
        raise ConfigError(
            f"channel pruning cannot rebuild layer {name} ({type(layer).__name__}): it is called "
            f"{n} times in model {model.name!r}, and each call may need other channels. Use "
            "each layer once or use prune=constant"
        )
    return steps


# What a layer does to channels, by exact type: a subclass may compute something else.
_PASS_NAMES = (
    "ReLU", "LeakyReLU", "ELU", "Activation", "MaxPooling2D", "AveragePooling2D",
    "GlobalAveragePooling2D", "GlobalMaxPooling2D", "Dropout", "SpatialDropout2D",
    "GaussianNoise", "GaussianDropout", "ZeroPadding2D", "Cropping2D", "UpSampling2D",
)  # fmt: skip
_JOIN_NAMES = ("Add", "Subtract", "Multiply", "Average", "Maximum", "Minimum")
_MIXING = ("softmax", "log_softmax")  # activations over the channel axis


@functools.cache
def _roles() -> dict[type, str]:
    layers = keras().layers
    roles = {getattr(layers, name): "pass" for name in _PASS_NAMES}
    roles |= {getattr(layers, name): "join" for name in _JOIN_NAMES}
    roles |= {
        layers.InputLayer: "input",
        layers.Conv2D: "producer",  # exact: Conv2DTranspose is a subclass with another kernel
        layers.Dense: "producer",
        layers.DepthwiseConv2D: "depthwise",  # channels follow its input, times the multiplier
        layers.BatchNormalization: "norm",
        layers.Flatten: "flatten",
        layers.Concatenate: "concat",
        layers.Softmax: "mixing",
    }
    return roles


def _activation(layer: tf_keras.layers.Layer) -> str:
    return getattr(getattr(layer, "activation", None), "__name__", "")


def _refuse(step: _Step, detail: str = "", fix: str = _FIX) -> ConfigError:
    return ConfigError(
        f"channel pruning cannot rebuild layer {step.name} ({step.cls}){detail}: {fix}"
    )


def _role(step: _Step) -> str:
    """What `step`'s layer does to channels; raise for a layer the rebuild has no rule for."""
    layer = step.layer
    role = _roles().get(type(layer))
    if role is None:
        if isinstance(layer, keras().Model):
            raise _refuse(
                step,
                ", a model nested in the model",
                "flatten it first with fallopt.compress.prune.flatten_model (prune_channels does)",
            )
        raise _refuse(step)
    data_format = getattr(layer, "data_format", None)
    if data_format not in (None, "channels_last"):
        raise _refuse(step, f" with data_format={data_format}", "use a channels-last model")
    if role == "producer" and getattr(layer, "groups", 1) != 1:
        raise _refuse(step, f" with groups={layer.groups}")
    if role in ("norm", "concat"):
        rank = len(step.in_shapes[0])
        axes = [layer.axis] if isinstance(layer.axis, int) else list(layer.axis)
        if [a % rank for a in axes] != [rank - 1]:
            raise _refuse(step, f" over axis {axes}", "only the channel axis (-1) is supported")
    if role == "flatten" and None in step.in_shapes[0][1:]:
        raise _refuse(step, f" on input {step.in_shapes[0]}", "it needs a fixed input size")
    if role == "pass" and _activation(layer) in _MIXING:
        return "mixing"
    return role


# --- the plan --------------------------------------------------------------------------------


class _UnionFind:
    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def find(self, a: str) -> str:
        root = self.parent.setdefault(a, a)
        while root != self.parent[root]:
            root = self.parent[root]
        self.parent[a] = root
        return root

    def union(self, a: str, b: str) -> None:
        self.parent[self.find(a)] = self.find(b)


@dataclass(frozen=True)
class Group:
    """Producers that must keep the same channels, because a join adds (or multiplies...) them.

    Most groups hold one layer. `frozen` says why a group keeps all its channels (it feeds
    the model output, ...); empty when it can be pruned.
    """

    members: tuple[str, ...]  # in model order
    joins: tuple[str, ...]  # the join layers that tie them
    channels: int
    frozen: tuple[str, ...]

    @property
    def prunable(self) -> bool:
        """Whether channel pruning may remove channels of this group."""
        return not self.frozen


@dataclass(frozen=True)
class Plan:
    """What channel pruning may remove in a model: its producers and their groups."""

    groups: tuple[Group, ...]
    producers: tuple[str, ...]  # every Conv2D and Dense, in model order
    classes: Mapping[str, str] = field(compare=False)  # every layer's class name
    sources: Mapping[str, frozenset[str]] = field(compare=False)  # producers a layer carries

    def group_of(self, layer: str) -> Group:
        """The group of producer `layer`."""
        for group in self.groups:
            if layer in group.members:
                return group
        raise KeyError(f"{layer} is not a Conv2D or Dense layer of the model")

    @property
    def prunable(self) -> list[str]:
        """The producers of prunable groups, in model order."""
        return [p for p in self.producers if self.group_of(p).prunable]

    def describe(self, layers: Iterable[str]) -> str:
        """`name (Class)` for each layer, comma separated."""
        return ", ".join(f"{name} ({self.classes[name]})" for name in layers)


def plan(model: tf_keras.Model) -> Plan:
    """Group the producers of `model` and say which groups must keep all their channels.

    Raises:
        ConfigError: for a layer the rebuild has no rule for (Reshape, Rescaling, a lambda,
            a nested model: flatten it first), naming the layer, its class and the fix.
    """
    return _plan(model, _graph(model))


def _plan(model: tf_keras.Model, steps: list[_Step]) -> Plan:
    sets = _UnionFind()
    carries: dict[str, frozenset[str]] = {}  # the sources whose channels a layer's output holds
    # Whether those channels are one source's, one for one: a Concatenate stacks several, a
    # Flatten spreads each over rows, a depth multiplier > 1 repeats each.
    aligned: dict[str, bool] = {}
    frozen: defaultdict[str, list[str]] = defaultdict(list)  # source -> why
    joins: list[tuple[str, str]] = []  # (join layer, one source it ties)
    producers: list[_Step] = []
    outputs = {t._keras_history.layer.name for t in model.outputs}  # noqa: SLF001
    for step in steps:
        role, name = _role(step), step.name
        everything = frozenset().union(*(carries[i] for i in step.inputs))
        straight = all(aligned[i] for i in step.inputs)
        if role == "input":  # a pseudo-source: channels tied to it cannot be removed
            source = f"@{name}"
            sets.find(source)
            frozen[source].append(f"is joined with the model input {name}")
            everything, straight = frozenset({source}), True
        elif role == "producer":
            producers.append(step)
            sets.find(name)
            everything, straight = frozenset({name}), True
            if name.startswith(FIXED_PREFIX):
                frozen[name].append(f"is fixed preprocessing ({FIXED_PREFIX}*)")
        elif role == "join" and straight:
            first, *others = (next(iter(carries[i])) for i in step.inputs)
            for other in others:
                sets.union(first, other)
            joins.append((name, first))
        elif role == "join":  # channels that line up with no single source's
            for source in everything:
                frozen[source].append(
                    f"is joined by {name} ({step.cls}) after its channels were stacked, "
                    "flattened or multiplied"
                )
        elif role == "mixing":
            for source in everything:
                frozen[source].append(f"feeds {name} ({step.cls}), which mixes channels")
        elif role == "concat":
            straight = False
        elif role == "flatten":
            straight = straight and int(np.prod(step.in_shapes[0][1:-1])) == 1
        elif role == "depthwise":
            straight = straight and step.layer.depth_multiplier == 1
        carries[name], aligned[name] = everything, straight
        if name in outputs:
            for source in everything:
                why = "is the model's output" if source == name else f"feeds the output {name}"
                frozen[source].append(why)
        if role == "producer" and _activation(step.layer) in _MIXING:
            frozen[name].append(f"has a {_activation(step.layer)} activation, which mixes channels")

    members: defaultdict[str, list[str]] = defaultdict(list)
    for step in producers:
        members[sets.find(step.name)].append(step.name)
    tied: defaultdict[str, list[str]] = defaultdict(list)
    for join, source in joins:
        tied[sets.find(source)].append(join)
    reasons: defaultdict[str, list[str]] = defaultdict(list)
    for source, why in frozen.items():
        reasons[sets.find(source)] += why
    channels = {step.name: step.out_shape[-1] for step in producers}
    groups = tuple(
        Group(
            tuple(names), tuple(tied[root]), channels[names[0]], tuple(dict.fromkeys(reasons[root]))
        )
        for root, names in members.items()
    )
    return Plan(
        groups,
        tuple(step.name for step in producers),
        {step.name: step.cls for step in steps},
        {step.name: frozenset(s for s in carries[step.name] if not s.startswith("@"))
         for step in steps},
    )  # fmt: skip


# --- scores and choice -----------------------------------------------------------------------

Criterion = Callable[["tf_keras.Model"], dict[str, np.ndarray]]


def l1_scores(model: tf_keras.Model) -> dict[str, np.ndarray]:
    """Each output channel's L1 norm of its filter (unit) weights, for every producer.

    A filter whose weights are all small contributes little to any input; the cheapest
    proxy, and the one that needs no BatchNorm.
    """
    scores = {}
    for step in _graph(model):
        if _roles().get(type(step.layer)) == "producer":
            kernel = step.layer.get_weights()[0]
            scores[step.name] = np.abs(kernel).reshape(-1, kernel.shape[-1]).sum(0)
    return scores


def bn_gamma_scores(model: tf_keras.Model) -> dict[str, np.ndarray]:
    """|gamma| of the BatchNormalization each producer feeds; L1 for producers without one.

    BatchNorm scales each channel by gamma, so a small |gamma| says the channel's output
    hardly matters, whatever the size of its filter (network slimming). The BatchNorm may
    follow the producer directly or through ReLU/Activation (either block order). A
    producer with no such BatchNorm (or one with `scale=False`) falls back to `l1_scores`:
    its scores are then on another scale than its group partners'.
    """
    steps = _graph(model)
    by_name = {step.name: step for step in steps}
    scores = l1_scores(model)
    from_gamma: set[str] = set()
    elementwise = {keras().layers.ReLU, keras().layers.Activation}
    for step in steps:
        if _roles().get(type(step.layer)) != "norm" or not step.layer.scale:
            continue
        feed = by_name[step.inputs[0]]
        while type(feed.layer) in elementwise and _activation(feed.layer) not in _MIXING:
            feed = by_name[feed.inputs[0]]
        if feed.name in scores and feed.name not in from_gamma:
            scores[feed.name] = np.abs(step.layer.get_weights()[0])
            from_gamma.add(feed.name)
    return scores


# Keys: config.CHANNEL_CRITERIA, which validates prune.criterion before TensorFlow loads.
CRITERIA: dict[str, Criterion] = {"l1": l1_scores, "bn_gamma": bn_gamma_scores}


def _kept(channels: int, ratio: float, min_keep: int) -> int:
    """Channels to keep: the nearest to `channels * (1 - ratio)`, halves up, >= min_keep."""
    return min(channels, max(min_keep, int(np.floor(channels * (1 - ratio) + 0.5))))


def _whole_groups(p: Plan, names: Iterable[str], what: str) -> list[Group]:
    """The groups of `names`; raise if `names` holds only part of one."""
    chosen = set(names)
    groups = [g for g in p.groups if chosen & set(g.members)]
    for g in groups:
        missing = [m for m in g.members if m not in chosen]
        if missing:
            picked = [m for m in g.members if m in chosen]
            pattern = "|".join(g.members)
            raise ConfigError(
                f"{what} selects {p.describe(picked)} but not {p.describe(missing)}, whose "
                f"channels {p.describe(g.joins)} joins with them: they can only lose the same "
                f"channels. Select all of {list(g.members)} (e.g. prune.scope='{pattern}') "
                "or none of them"
            )
    return groups


def choose(
    model: tf_keras.Model,
    ratio: float,
    criterion: str = "l1",
    min_keep: int = 1,
    layers: Iterable[str] | None = None,
) -> dict[str, np.ndarray]:
    """The channels each pruned producer keeps: the best `1 - ratio` of each group.

    A group's scores are the sum of its members' (`CRITERIA[criterion]`), so all members
    keep the same channels. Each group keeps `round(channels * (1 - ratio))` (halves up), at
    least `min_keep` and at most all of them; ties go to the lower index. `layers`: the
    producers to prune (whole groups; `check_prunable` names them for a scope); None: every
    prunable group.

    Returns:
        {producer: sorted original indices of its kept channels}, for the pruned producers.

    Raises:
        ConfigError: a bad ratio, criterion or min_keep; a named layer that is not a
            prunable producer, or only part of a group.
    """
    if not 0 <= ratio < 1:
        raise ConfigError(f"prune.sparsity={ratio!r} is invalid: channel pruning needs 0 <= it < 1")
    if criterion not in CRITERIA:
        raise ConfigError(f"prune.criterion={criterion!r} is invalid: choose from {list(CRITERIA)}")
    if min_keep < 1:
        raise ConfigError(f"prune.min_channels={min_keep!r} is invalid: must be >= 1")
    p = plan(model)
    if layers is None:
        groups = [g for g in p.groups if g.prunable]
    else:
        names = list(layers)
        for name in names:
            if name not in p.producers:
                raise ConfigError(
                    f"layer {name} is not a Conv2D or Dense layer of model {model.name!r}: "
                    f"channel pruning can prune {p.prunable}"
                )
            if not p.group_of(name).prunable:
                why = "; ".join(p.group_of(name).frozen)
                raise ConfigError(
                    f"layer {p.describe([name])} must keep all its channels: it {why}. "
                    f"Leave it out (prunable: {p.prunable})"
                )
        groups = _whole_groups(p, names, f"layers {names}")
    scores = CRITERIA[criterion](model)
    keep = {}
    for g in groups:
        total = np.sum([scores[m] for m in g.members], axis=0)
        best = np.argsort(-total, kind="stable")[: _kept(g.channels, ratio, min_keep)]
        for member in g.members:
            keep[member] = np.sort(best)
    return keep


# --- scope -----------------------------------------------------------------------------------


def check_prunable(model: tf_keras.Model, scope: str) -> list[str]:
    """The producers `scope` selects that channel pruning will prune; the preflight check.

    Runs before any training: plans the model (flattened first when models are nested), so a
    layer the rebuild cannot handle is refused at once. Frozen layers in scope (the output
    layer, `fixed_*`) are left out without a word, as `prune.scope=all` includes the output.

    Raises:
        ConfigError: a layer the rebuild has no rule for; a scope that matches nothing, or
            only frozen layers; or a scope selecting part of a group (an Add's inputs).
    """
    return _prunable(model, plan(flatten_model(model)), scope)[0]


def _prunable(model: tf_keras.Model, p: Plan, scope: str) -> tuple[list[str], dict[str, str]]:
    """(the producers to prune, {selected frozen producer: why}); see check_prunable."""
    selected = set(select_layers(model, scope))  # same names as in the flattened model
    in_scope = [name for name in p.producers if name in selected]
    chosen = [name for name in in_scope if p.group_of(name).prunable]
    held = {name: "; ".join(p.group_of(name).frozen) for name in in_scope if name not in chosen}
    if not chosen:
        detail = ", ".join(f"{p.describe([name])}: {why}" for name, why in held.items())
        raise ConfigError(
            f"prune.scope={scope!r} selects only layers that must keep all their channels "
            f"({detail}). Layers channel pruning can prune: {p.prunable or 'none'}"
        )
    _whole_groups(p, chosen, f"prune.scope={scope!r}")
    return chosen, held


# --- channel flow, rebuild, zeroing ----------------------------------------------------------


def flow(model: tf_keras.Model, keep: Keep) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The original indices of every layer's input and output channels once `keep` is applied.

    Returns:
        (in_idx, out_idx) by layer name; in_idx is that of the first input (joins' inputs
        agree). A Flatten's output indices are rows `(h*W + w)*C + c` (channels last), a
        DepthwiseConv2D's `c*m + j` (m: depth multiplier), a Concatenate's each part's
        indices plus its offset.

    Raises:
        ConfigError: `keep` names a layer that is not a prunable producer, holds bad indices,
            or makes a join (Add, ...) combine channels its inputs keep differently.
    """
    steps = _graph(model)
    return _flow(model, steps, keep)


def _checked_keep(model: tf_keras.Model, p: Plan, keep: Keep) -> dict[str, np.ndarray]:
    checked = {}
    for name, indices in keep.items():
        if name not in p.producers:
            raise ConfigError(
                f"cannot keep channels of {name}: it is not a Conv2D or Dense layer of model "
                f"{model.name!r} (prunable: {p.prunable})"
            )
        group = p.group_of(name)
        if not group.prunable:
            raise ConfigError(
                f"layer {p.describe([name])} must keep all its channels: it "
                f"{'; '.join(group.frozen)}. Leave it out (prunable: {p.prunable})"
            )
        idx = np.asarray(indices)
        ok = (
            idx.ndim == 1
            and idx.size >= 1
            and np.issubdtype(idx.dtype, np.integer)
            and (np.diff(idx) > 0).all()
            and idx[0] >= 0
            and idx[-1] < group.channels
        )
        if not ok:
            raise ConfigError(
                f"channels kept for layer {name} must be increasing indices in "
                f"0..{group.channels - 1}, at least one; got {indices!r}"
            )
        checked[name] = idx.astype(np.int64)
    return checked


def _flow(
    model: tf_keras.Model, steps: list[_Step], keep: Keep
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    p = _plan(model, steps)
    keep = _checked_keep(model, p, keep)
    in_idx: dict[str, np.ndarray] = {}
    out_idx: dict[str, np.ndarray] = {}
    for step in steps:
        role, name = _role(step), step.name
        if not step.inputs:
            out_idx[name] = np.arange(step.out_shape[-1])
            continue
        first = in_idx[name] = out_idx[step.inputs[0]]
        if role == "producer":
            out = keep.get(name, np.arange(step.out_shape[-1]))
        elif role == "concat":
            offsets = np.cumsum([0] + [shape[-1] for shape in step.in_shapes[:-1]])
            out = np.concatenate(
                [out_idx[i] + o for i, o in zip(step.inputs, offsets, strict=True)]
            )
        elif role == "join":
            if any(not np.array_equal(first, out_idx[i]) for i in step.inputs[1:]):
                sources = sorted(frozenset().union(*(p.sources[i] for i in step.inputs)))
                raise ConfigError(
                    f"{step.name} ({step.cls}) joins channels that {p.describe(sources)} keep "
                    "differently: its inputs must lose the same channels. Prune them as one "
                    "group (channels.choose does) or leave them all out of prune.scope"
                )
            out = first
        elif role == "flatten":  # channels last: row (h*W + w)*C + c
            cells, c = int(np.prod(step.in_shapes[0][1:-1])), step.in_shapes[0][-1]
            out = (np.arange(cells)[:, None] * c + first[None, :]).reshape(-1)
        elif role == "depthwise":
            m = step.layer.depth_multiplier
            out = (first[:, None] * m + np.arange(m)[None, :]).reshape(-1)
        else:
            out = first
        out_idx[name] = out
    return in_idx, out_idx


def thin(model: tf_keras.Model, keep: Keep) -> tf_keras.Model:
    """A new model like `model` with only the kept channels, and the kept weights.

    Rebuilt from the config (Sequential or Functional, names and wiring as they were) with
    fewer `filters` / `units`; each layer with weights gets its slice: Conv2D kernel
    `[:, :, in][..., out]`, Dense `[in][:, out]`, DepthwiseConv2D `[:, :, in, :]`, bias
    `[out]`, BatchNorm gamma, beta, mean and variance `[in]`. The result is uncompiled and
    shares nothing with `model`.

    Raises:
        ConfigError: see `flow`.
    """
    steps = _graph(model)
    in_idx, out_idx = _flow(model, steps, keep)
    by_name = {step.name: step for step in steps}
    config = model.get_config()
    for entry in config["layers"]:
        layer_config = entry["config"]
        # A layer is built by its first call in the rebuilt graph: a stored build shape
        # (the original input's) would build it for the old channels.
        entry.pop("build_config", None)
        name = layer_config["name"]
        if name in keep:
            is_conv = type(by_name[name].layer) is keras().layers.Conv2D
            layer_config["filters" if is_conv else "units"] = len(keep[name])
    thinner = type(model).from_config(config)
    for step in steps:
        if step.layer.weights:
            weights = _sliced(step, in_idx[step.name], out_idx[step.name])
            thinner.get_layer(step.name).set_weights(weights)
    return thinner


def _sliced(step: _Step, i: np.ndarray, o: np.ndarray) -> list[np.ndarray]:
    layers = keras().layers
    w, kind = step.layer.get_weights(), type(step.layer)
    if kind is layers.DepthwiseConv2D:  # before Conv2D, in case a Keras makes it a subclass
        w[0] = w[0][:, :, i, :]
    elif kind is layers.Conv2D:
        w[0] = w[0][:, :, i, :][..., o]
    elif kind is layers.Dense:
        w[0] = w[0][i][:, o]
    elif kind is layers.BatchNormalization:
        return [v[i] for v in w]
    else:  # plan() admits no other layer with weights
        raise _refuse(step, ", which has weights")
    if step.layer.use_bias:
        w[1] = w[1][o]
    return w


def zero_removed(model: tf_keras.Model, keep: Keep) -> None:
    """Zero, in place, every weight `thin(model, keep)` would drop.

    Removed output channels of producers (kernel and bias) and depthwise convs (bias), and
    gamma and beta of BatchNorms on removed channels, so that removed channels output
    exactly 0 (with only the kernel zeroed, conv -> relu -> BN would output
    beta - gamma*mean/sqrt(var+eps)). And the kernel rows reading removed channels in every
    Conv2D, Dense and DepthwiseConv2D, so that a removed channel adds nothing even where
    its value is not 0 (a sigmoid, a BatchNorm with `center=True, scale=False`). The zeroed
    model then computes what the thin one does, up to float summation order.

    Raises:
        ConfigError: see `flow`.
    """
    steps = _graph(model)
    in_idx, out_idx = _flow(model, steps, keep)
    layers = keras().layers
    for step in steps:
        w = step.layer.get_weights()
        if not w:
            continue
        gone_in = np.setdiff1d(np.arange(step.in_shapes[0][-1]), in_idx[step.name])
        gone_out = np.setdiff1d(np.arange(step.out_shape[-1]), out_idx[step.name])
        kind = type(step.layer)
        if kind is layers.BatchNormalization:
            for j in range(int(step.layer.scale) + int(step.layer.center)):  # gamma, beta
                w[j][gone_in] = 0
        else:
            if kind is layers.Dense:
                w[0][gone_in, :] = 0
            else:  # Conv2D, DepthwiseConv2D: [kh, kw, in, out or multiplier]
                w[0][:, :, gone_in, :] = 0
            if kind is not layers.DepthwiseConv2D:
                w[0][..., gone_out] = 0
            if step.layer.use_bias:
                w[1][gone_out] = 0
        step.layer.set_weights(w)


# --- the stage -------------------------------------------------------------------------------


def check_exact(
    zeroed: tf_keras.Model, thinner: tf_keras.Model, split: Split, rule: InputRule = UNIT
) -> float:
    """Raise unless the thin model predicts what the zeroed one does; the max difference.

    Up to `EXACT_TOLERANCE` times the outputs' scale (at least 1): the two differ only by
    float summation order. `prune.check_same_predictions` (1e-6 absolute, same argmax) is for
    identical computations; here the channel counts differ, and with them the order of sums.
    """
    want = zeroed.predict(batches(split, 256, rule=rule), verbose=0)
    got = thinner.predict(batches(split, 256, rule=rule), verbose=0)
    diff = float(np.abs(want - got).max())
    if diff > EXACT_TOLERANCE * max(1.0, float(np.abs(want).max())):
        raise PruningError(
            f"the thin model {thinner.name!r} predicts differently from the baseline with the "
            f"removed channels zeroed (max difference {diff:.2e}): a bug in fallopt's channel "
            "slicing for this architecture. Use prune=constant meanwhile"
        )
    return diff


def prune_channels(
    baseline_file: Path,
    train: Split,
    val: Split,
    prune: PruneConfig,
    train_cfg: TrainConfig,
    seed: int,
    out_file: Path,
    on_epoch_end: EpochHook | None = None,
    rule: InputRule = UNIT,
) -> Outcome:
    """Remove `prune.sparsity` of the channels of the layers in `prune.scope`, then fine-tune.

    A fresh copy of the baseline is loaded and flattened (nested models); channels are
    chosen by `prune.criterion`, keeping at least `prune.min_channels` per group. Before the
    fine-tune, the thin model must predict what the baseline with the removed channels
    zeroed predicts (`check_exact`, on the first `PROBE` validation images). The fine-tuned
    thin model is saved to `out_file` (no optimizer state), loaded back and checked to
    predict what it predicted.

    Returns:
        history of the fine-tune; metrics `channels_<layer>` (kept) for each pruned layer and
        `channels_removed_fraction` (removed over their total); one row per pruned layer
        (layer, class, channels and parameters before and after); a one-line summary.

    Raises:
        ConfigError: see `check_prunable` and `choose`.
        PruningError: the flattened, thin or saved model predicts differently.
    """
    k = keras()
    baseline = k.models.load_model(baseline_file, compile=False)
    probe = Split(val.x[:PROBE], val.y[:PROBE])
    flat = flatten_model(baseline)
    if flat is not baseline:
        check_same_predictions(baseline, flat, probe, rule, "the flattened baseline")
    p = plan(flat)
    names, held = _prunable(baseline, p, prune.scope)
    if held:
        whole = "; ".join(f"{name} ({why})" for name, why in held.items())
        log.info("[prune] in scope but keeping all channels: %s", whole)
    keep = choose(flat, prune.sparsity, prune.criterion, prune.min_channels, names)
    thinner = thin(flat, keep)
    zeroed = k.models.clone_model(flat)  # another rebuild route than thin's from_config
    zeroed.set_weights(flat.get_weights())
    zero_removed(zeroed, keep)
    diff = check_exact(zeroed, thinner, probe, rule)
    rows = [
        {
            "layer": name,
            "class": p.classes[name],
            "channels_before": int(p.group_of(name).channels),
            "channels_after": len(keep[name]),
            "params_before": int(flat.get_layer(name).count_params()),
            "params_after": int(thinner.get_layer(name).count_params()),
        }
        for name in names
    ]
    before, after = flat.count_params(), thinner.count_params()
    summary = (
        f"{prune.criterion}: "
        + ", ".join(f"{r['layer']} {r['channels_before']}->{r['channels_after']}" for r in rows)
        + f"; {before:,} -> {after:,} parameters"
    )
    log.info(
        "[prune] channels %s (thin = zeroed baseline to %.1e on %d images)",
        summary,
        diff,
        len(probe),
    )

    history = fit(
        thinner, train, val, train_cfg, prune.fine_tune_epochs, seed, on_epoch_end, rule=rule
    )
    save_model(thinner, out_file)
    reloaded = load_saved(out_file)
    check_same_predictions(thinner, reloaded, val, rule, f"the thin model saved to {out_file}")

    total = sum(r["channels_before"] for r in rows)
    removed = total - sum(r["channels_after"] for r in rows)
    metrics = {f"channels_{r['layer']}": float(r["channels_after"]) for r in rows}
    metrics["channels_removed_fraction"] = removed / total
    return Outcome(history, metrics, rows, summary)
