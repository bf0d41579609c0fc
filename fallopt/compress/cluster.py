"""Weight clustering with tfmot: select layers, wrap, fine-tune the centroids, strip, verify.

k-means clustering leaves each chosen kernel with at most `clusters` distinct values (per
output channel with `per_channel`, Conv2D only), so the file gzips, or palettes on a device,
much smaller; its raw size does not change. Measured with tfmot 0.8.1:

- `cluster_weights` wraps the *same* layer objects it is given, and wrapping them a second
  time fails with a bare `StopIteration`: clustering always starts from a fresh model loaded
  from the previous stage's file.
- It skips layers without saying so: a Conv2D with too few weights keeps all its values with
  only a `warnings.warn`, and a Dense with fewer weights than k crashes kmeans++ inside
  `clone_model`. So `select_clusterable` refuses such layers before any training, and the
  stripped model is counted afterwards: a kernel with more than k values fails the stage.
- `preserve_sparsity` pins the centroid nearest 0 to 0, so pruned zeros stay zero (and an
  unpruned kernel gains some zeros). Each zero of the input is checked to still be zero.

Biases and BatchNorm are never clustered: only kernels are counted. In a `.tflite` file the
"at most k" holds per output channel, not per tensor: the converter folds BatchNorm into the
conv kernel (a different scale per channel) and int8 files are quantized per channel, conv
and fully connected alike. `tflite_clusters` and `verify_tflite` count per output channel.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fallopt.backend import keras
from fallopt.compress.outcome import Outcome
from fallopt.compress.prune import (
    FLATTEN_PROBE,
    PruningError,
    check_same_predictions,
    flatten_model,
    select_layers,
)
from fallopt.config import ClusterConfig, TrainConfig
from fallopt.data import UNIT, InputRule, Split
from fallopt.errors import ConfigError, FalloptError
from fallopt.size import load_saved, save_model
from fallopt.tflite_graph import KERAS_WEIGHT_OP_STEMS, WEIGHT_OPS, Graph
from fallopt.timing import timed
from fallopt.train import EpochHook, fit

if TYPE_CHECKING:
    import tf_keras

# fallopt's `cluster.init` names that are not tfmot's CentroidInitialization names lower-cased.
_TFMOT_INITS = {"density": "DENSITY_BASED"}


class ClusterError(FalloptError):
    """Clustering did not produce what was asked for, or a file lost it."""


def max_distinct(kernel: np.ndarray, axis: int | None = None) -> int:
    """Distinct values in `kernel` (`axis` None), or the most in one slice along `axis`.

    `axis` is the output-channel axis: -1 for a Keras kernel, 0 for a TFLite weight tensor.
    """
    if kernel.size == 0:
        return 0
    if axis is None:
        return len(np.unique(kernel))
    rows = np.sort(np.moveaxis(kernel, axis, 0).reshape(kernel.shape[axis], -1), axis=1)
    return int((1 + (np.diff(rows, axis=1) != 0).sum(axis=1)).max())


def _per_channel(layer: tf_keras.layers.Layer, cfg: ClusterConfig) -> bool:
    """Whether tfmot clusters this layer per output channel (`isinstance(layer, Conv2D)`)."""
    return cfg.per_channel and isinstance(layer, keras().layers.Conv2D)


def select_clusterable(model: tf_keras.Model, cfg: ClusterConfig) -> list[str]:
    """Names of the layers `cfg.scope` clusters, checked before any training.

    The scope works as `prune.scope` does (`dense`, `conv`, `all` or a name pattern; layers
    of nested models count as the model's own); DepthwiseConv2D layers (tfmot wraps but does
    not cluster them) and fixed `fixed_*` layers are never selected.

    The output layer is selected like any other (`all` and `dense` include it), so that a
    scope means what it means for `prune.scope`. tfmot's examples cluster whole models, and
    the tiny research model clustered whole to k=8 (output included) kept its accuracy after
    one fine-tune epoch (docs/issue17-research.md, A). The output kernel is often the
    smallest (units x classes), so it is the first refused below when k is large: leave it
    out with a pattern such as `conv.*|dense1`.

    Raises:
        ConfigError: the scope matches no Conv2D or Dense layer; or a selected kernel has too
            few weights for `cfg.clusters` (tfmot would silently skip a Conv2D and crash on a
            Dense under kmeans_plus_plus): it must have more than k weights, per output
            channel (`kh*kw*in`) with `per_channel`. Names the layer, its kernel and the fix.
    """
    names = select_layers(model, cfg.scope, "cluster.scope")
    _refuse_small_kernels(flatten_model(model), names, cfg)
    return names


def _refuse_small_kernels(flat: tf_keras.Model, names: list[str], cfg: ClusterConfig) -> None:
    """Raise the ConfigError `select_clusterable` describes; `flat` holds the named layers."""
    k = cfg.clusters
    small = []
    for name in names:
        layer = flat.get_layer(name)
        shape = tuple(layer.kernel.shape)
        size = int(np.prod(shape))
        per_channel = _per_channel(layer, cfg)
        weights = size // shape[-1] if per_channel else size
        if weights <= k:
            what = f"{weights} weights per output channel" if per_channel else f"{size} weights"
            small.append((name, shape, what))
    if small:
        detail = ", ".join(
            f"{name} (kernel {'x'.join(map(str, shape))}: {what})" for name, shape, what in small
        )
        large = [name for name in names if name not in {s[0] for s in small}]
        raise ConfigError(
            f"cluster.clusters={k} needs more than {k} weights in each clustered kernel"
            f"{' (per output channel: kh*kw*in)' if cfg.per_channel else ''}, but "
            f"cluster.scope={cfg.scope!r} selects {detail}. Lower cluster.clusters, or leave "
            f"{'it' if len(small) == 1 else 'them'} out of cluster.scope (layers that fit: "
            f"{large or 'none'})"
        )


def _centroid_init(name: str):  # noqa: ANN202 (tfmot has no type stubs)
    import tensorflow_model_optimization as tfmot

    inits = tfmot.clustering.keras.CentroidInitialization
    return inits[_TFMOT_INITS.get(name, name.upper())]  # a string is refused by tfmot


@timed("train")  # tfmot's part of the clustering fine-tune
def strip_clusters(wrapped: tf_keras.Model) -> tf_keras.Model:
    """The fine-tuned model without tfmot's clustering wrappers."""
    import tensorflow_model_optimization as tfmot

    return tfmot.clustering.keras.strip_clustering(wrapped)


@timed("train")  # tfmot's part of the clustering fine-tune
def wrap_for_clustering(
    model: tf_keras.Model, layer_names: list[str], cfg: ClusterConfig
) -> tf_keras.Model:
    """Wrap the named layers of `model` with `cluster_weights`, the others left as they are.

    The wrappers share `model`'s layer objects: pass a model you will not use again. Wrapping
    happens here, not at the first training step: the centroids are initialised by this call.

    Raises:
        ClusterError: a named layer tfmot refuses or skips, or one `model` does not hold
            (a nested model's layer: flatten first).
    """
    import tensorflow_model_optimization as tfmot

    cluster_weights = tfmot.clustering.keras.cluster_weights
    kwargs = {
        "number_of_clusters": int(cfg.clusters),  # tfmot refuses 8.0
        "cluster_centroids_init": _centroid_init(cfg.init),
        "cluster_per_channel": cfg.per_channel,
        "preserve_sparsity": cfg.preserve_sparsity,
    }
    chosen = set(layer_names)

    def wrap(layer: tf_keras.layers.Layer) -> tf_keras.layers.Layer:
        if layer.name not in chosen:
            return layer
        chosen.remove(layer.name)
        try:
            wrapped = cluster_weights(layer, **kwargs)
        except ValueError as e:  # tfmot's message names the class, not the layer
            raise ClusterError(
                f"tfmot cannot cluster layer {layer.name} ({type(layer).__name__}): {e}"
            ) from e
        if wrapped is layer:  # tfmot's silent skip (a Conv2D with too few weights)
            raise ClusterError(f"tfmot did not cluster layer {layer.name}: too few weights")
        return wrapped

    wrapped = keras().models.clone_model(model, clone_function=wrap)
    if chosen:
        raise ClusterError(
            f"layers {sorted(chosen)} are not top-level layers of model {model.name!r} and "
            "would not be clustered: flatten nested models first"
        )
    return wrapped


@dataclass(frozen=True)
class LayerClusters:
    """One clustered kernel before and after clustering."""

    layer: str
    shape: tuple[int, ...]
    per_channel: bool  # counted per output channel (a Conv2D clustered with per_channel)
    distinct: int  # distinct values in the whole kernel
    distinct_max_per_channel: int  # the most in one output channel
    zeros_before: int
    zeros_after: int
    zeros_lost: int  # zeros of the input that are no longer zero

    @property
    def clusters(self) -> int:
        """The count that must not exceed k: per tensor, or per channel with per_channel."""
        return self.distinct_max_per_channel if self.per_channel else self.distinct


def measure_clusters(
    before: dict[str, np.ndarray], model: tf_keras.Model, cfg: ClusterConfig
) -> list[LayerClusters]:
    """Count the values and zeros of each clustered kernel of the stripped `model`.

    `before` maps each clustered layer's name to its kernel before clustering.
    """
    out = []
    for name, old in before.items():
        layer = model.get_layer(name)
        kernel = layer.kernel.numpy()
        out.append(
            LayerClusters(
                layer=name,
                shape=tuple(kernel.shape),
                per_channel=_per_channel(layer, cfg),
                distinct=max_distinct(kernel),
                distinct_max_per_channel=max_distinct(kernel, -1),
                zeros_before=int((old == 0).sum()),
                zeros_after=int((kernel == 0).sum()),
                zeros_lost=int(((old == 0) & (kernel != 0)).sum()),
            )
        )
    return out


def check_clusters(layers: list[LayerClusters], cfg: ClusterConfig) -> None:
    """Raise unless every kernel has at most k values and, with preserve_sparsity, its zeros.

    Raises:
        ClusterError: naming each failing layer and its numbers.
    """
    k = cfg.clusters
    over = [layer for layer in layers if layer.clusters > k]
    if over:
        detail = ", ".join(
            f"{layer.layer} {layer.clusters}{' per channel' if layer.per_channel else ''}"
            for layer in over
        )
        raise ClusterError(
            f"clustered kernels have more than cluster.clusters={k} distinct values: {detail}"
        )
    if cfg.preserve_sparsity:
        lost = [layer for layer in layers if layer.zeros_lost]
        if lost:
            detail = ", ".join(
                f"{layer.layer} {layer.zeros_lost} of {layer.zeros_before}" for layer in lost
            )
            raise ClusterError(
                f"cluster.preserve_sparsity=true, but clustering made zeros non-zero: {detail}"
            )


def _summary(layers: list[LayerClusters], cfg: ClusterConfig) -> str:
    per = "per channel" if cfg.per_channel else "per tensor"
    counts = ", ".join(f"{layer.layer} {layer.clusters}" for layer in layers)
    line = f"k-means {cfg.clusters} ({cfg.init}, {per}): {counts} values"
    before = sum(layer.zeros_before for layer in layers)
    if cfg.preserve_sparsity:
        line += f"; zeros kept ({before:,})" if before else "; zeros kept"
    elif before:
        kept = before - sum(layer.zeros_lost for layer in layers)
        line += f"; {kept:,} of {before:,} zeros left (cluster.preserve_sparsity=false)"
    return line


def _outcome(
    history: dict[str, list[float]], layers: list[LayerClusters], cfg: ClusterConfig
) -> Outcome:
    metrics = {f"clusters_{layer.layer}": float(layer.clusters) for layer in layers}
    metrics["clusters_achieved"] = float(max(layer.clusters for layer in layers))
    rows: list[dict[str, Any]] = [
        {
            "layer": layer.layer,
            "kernel_shape": "x".join(map(str, layer.shape)),
            "clusters": cfg.clusters,  # asked (per output channel with per_channel)
            "distinct_values": layer.distinct,
            "distinct_max_per_channel": layer.distinct_max_per_channel,
            "zeros_before": layer.zeros_before,
            "zeros_after": layer.zeros_after,
        }
        for layer in layers
    ]
    return Outcome(history, metrics, rows, _summary(layers, cfg))


def cluster_and_fine_tune(
    model_file: Path,
    train: Split,
    val: Split,
    cfg: ClusterConfig,
    train_cfg: TrainConfig,
    seed: int,
    out_file: Path,
    on_epoch_end: EpochHook | None = None,
    rule: InputRule = UNIT,
) -> Outcome:
    """Cluster a fresh copy of the model in `model_file`, fine-tune the centroids, verify, save.

    A model with nested models is flattened first (`prune.flatten_model`). The fine-tune
    runs `cfg.fine_tune_epochs` epochs (0: the clusters as k-means made them). The stripped
    model is counted (`check_clusters`), saved to `out_file` without optimizer state, loaded
    back and checked to predict what the clustered model predicted on the validation set.

    Returns the stage's outcome: metrics `clusters_<layer>` (the most distinct values in that
    kernel: per tensor, or in one output channel with per_channel) and `clusters_achieved`
    (the most of any layer); one row per clustered layer; a summary line.

    Raises:
        ConfigError: as `select_clusterable`.
        ClusterError: a kernel with more than k values, a lost zero with preserve_sparsity,
            or a flattened or saved model that predicts differently.
    """
    k = keras()
    source = k.models.load_model(model_file, compile=False)  # fresh: tfmot reuses layers
    names = select_layers(source, cfg.scope, "cluster.scope")
    flat = flatten_model(source)
    _refuse_small_kernels(flat, names, cfg)  # a thinner model (prune=channels) is checked again
    try:
        if flat is not source:  # a few images show a wrongly rewired graph
            probe = Split(val.x[:FLATTEN_PROBE], val.y[:FLATTEN_PROBE])
            check_same_predictions(source, flat, probe, rule, "the flattened model")
        before = {name: flat.get_layer(name).kernel.numpy() for name in names}
        wrapped = wrap_for_clustering(flat, names, cfg)
        history: dict[str, list[float]] = {}
        if cfg.fine_tune_epochs:
            history = fit(
                wrapped, train, val, train_cfg, cfg.fine_tune_epochs, seed, on_epoch_end, rule=rule
            )
        stripped = strip_clusters(wrapped)
        layers = measure_clusters(before, stripped, cfg)
        check_clusters(layers, cfg)
        save_model(stripped, out_file)
        reloaded = load_saved(out_file)
        check_same_predictions(
            wrapped, reloaded, val, rule, f"the clustered model saved to {out_file}"
        )
    except PruningError as e:  # check_same_predictions speaks for pruning
        raise ClusterError(str(e)) from e
    return _outcome(history, layers, cfg)


def _weight_tensors(content: bytes) -> list[tuple[str, np.ndarray]]:
    """(op output tensor name, weights) of each conv, depthwise and fully connected op.

    Float16 weights are read behind their DEQUANTIZE op. Weights in TFLite's sparse storage
    (`quant.sparse_weights`) are read from their DENSIFY op's output, which LiteRT computes
    once, at the first invoke (here on a zero input). Output channels are on axis 0.

    Raises:
        ClusterError: the weights of an op are computed in some other way.
    """
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    from fallopt.backend import native_logs_filtered

    graph = Graph.from_bytes(content)
    # The built-in kernels: XNNPACK cannot take sparse weights.
    interpreter = Interpreter(
        model_content=content,
        experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
    )
    with native_logs_filtered():
        interpreter.allocate_tensors()
    made_by = {out: op for op in graph.ops for out in op.outputs}
    found = []
    for op in graph.ops:
        if op.name not in WEIGHT_OPS:  # input 1: the weights
            continue
        index = op.inputs[1]
        while index in made_by and made_by[index].name == "DEQUANTIZE":
            index = made_by[index].inputs[0]
        maker = made_by[index].name if index in made_by else None
        if not graph.tensors[index].constant and maker != "DENSIFY":
            raise ClusterError(
                f"the weights of {op.name} op {graph.tensors[op.outputs[0]].name!r} are computed "
                f"by a {maker or 'graph input'}, not stored in the file: their clusters cannot "
                "be counted"
            )
        found.append((graph.tensors[op.outputs[0]].name, index))
    if any(made_by.get(index) and made_by[index].name == "DENSIFY" for _, index in found):
        for detail in interpreter.get_input_details():
            interpreter.set_tensor(detail["index"], np.zeros(detail["shape"], detail["dtype"]))
        interpreter.invoke()
    return [(name, interpreter.get_tensor(index)) for name, index in found]


def _layer_pattern(layer: str) -> re.Pattern[str]:
    """Finds the layer's own weight op in an op's output name.

    Names look like `t/conv1/Conv2D` or `t/quant_dense1/MatMul;...`. A fused op's name also
    holds the layers folded into it (`t/relu1/Relu;t/bn1/FusedBatchNormV3;t/conv1/Conv2D`),
    so the layer must be followed by an op that a conv or dense layer computes.
    """
    ops = "|".join(KERAS_WEIGHT_OP_STEMS)
    return re.compile(rf"(?:^|[/;])(?:quant_)?{re.escape(layer)}/(?:{ops})")


def _tensors_of(content: bytes, layers: list[str]) -> dict[str, list[np.ndarray]]:
    weights = _weight_tensors(content)
    found: dict[str, list[np.ndarray]] = {}
    for layer in layers:
        pattern = _layer_pattern(layer)
        found[layer] = [w for name, w in weights if pattern.search(name)]
    missing = [layer for layer, tensors in found.items() if not tensors]
    if missing:
        raise ClusterError(
            f"layer(s) {missing} have no conv or fully connected op in the .tflite file (its "
            f"ops write {[name for name, _ in weights]})"
        )
    return found


def tflite_clusters(content: bytes, layers: list[str]) -> dict[str, int]:
    """The most distinct values in one output channel of each named layer's `.tflite` weights.

    The weights are those of the layer's conv or fully connected op, float32, float16 or int8.

    Per output channel (TFLite axis 0) because BatchNorm folding and int8's per-channel
    scales give every channel its own values: a kernel clustered to k values can hold many
    more per tensor while each channel holds at most k.

    Raises:
        ClusterError: a named layer has no conv or fully connected op in the file.
    """
    found = _tensors_of(content, layers)
    return {layer: max(max_distinct(w, 0) for w in tensors) for layer, tensors in found.items()}


def _tflite_layout(kernel: np.ndarray) -> np.ndarray:
    """A Keras kernel as TFLite stores it: conv `[out, kh, kw, in]`, dense `[units, in]`."""
    return kernel.transpose(3, 0, 1, 2) if kernel.ndim == 4 else kernel.T


def verify_tflite(
    content: bytes, model: tf_keras.Model, layers: list[str], clusters: int, keep_zeros: bool
) -> dict[str, int]:
    """Check that a `.tflite` file kept the clusters (and zeros) of `model`'s clustered layers.

    Each named layer's weight tensor must hold at most `clusters` distinct values per output
    channel. With `keep_zeros`, every zero of the layer's kernel in `model` must be zero in
    the file too. `model` is the clustered Keras model (the cluster stage's file), also when
    the file was converted from a quantization-aware model made from it: the aware model's
    wrapped kernels cannot be read as arrays. Returns `tflite_clusters`' counts.

    Raises:
        ClusterError: naming each layer over `clusters` or with lost zeros, and its numbers.
    """
    found = _tensors_of(content, layers)
    counts = {layer: max(max_distinct(w, 0) for w in tensors) for layer, tensors in found.items()}
    over = {layer: n for layer, n in counts.items() if n > clusters}
    if over:
        detail = ", ".join(f"{layer} {n}" for layer, n in over.items())
        raise ClusterError(
            f"the .tflite file has more than {clusters} distinct weights in one output channel "
            f"of clustered layers: {detail}"
        )
    if keep_zeros:
        lost = []
        for layer, tensors in found.items():
            zero = _tflite_layout(model.get_layer(layer).kernel.numpy()) == 0
            for w in tensors:
                if w.shape != zero.shape:
                    raise ClusterError(
                        f"layer {layer}'s weights have shape {list(w.shape)} in the .tflite "
                        f"file, but its kernel is {list(zero.shape)} in TFLite layout"
                    )
                n = int((w[zero] != 0).sum())
                if n:
                    lost.append(f"{layer} {n} of {int(zero.sum())}")
        if lost:
            raise ClusterError(
                f"the .tflite file lost zeros of clustered layers: {', '.join(lost)} are no "
                "longer zero"
            )
    return counts
