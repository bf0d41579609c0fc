"""Typed config schemas, registered in Hydra's ConfigStore, and their validation.

Hydra checks types and keys when it composes the config; `validate` then builds the
dataclasses, whose `__post_init__` checks ranges and combinations. Both happen before
TensorFlow is imported, so a bad value costs a second, not a model build.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import warnings
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, ClassVar

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import ValidationError

from fallopt.errors import ConfigError


def require(ok: bool, key: str, value: Any, rule: str) -> None:
    """Raise a ConfigError naming `key=value` unless `ok`."""
    if not ok:
        raise ConfigError(f"{key}={value!r} is invalid: {rule}")


SEED_RANGE = 2**32  # numpy's and scikit-learn's seeds: 0 <= seed < 2**32


def check_seed(key: str, value: int) -> None:
    """Require a seed numpy and scikit-learn accept."""
    require(0 <= value < SEED_RANGE, key, value, f"must satisfy 0 <= {key} < 2**32")


def check_pattern(key: str, value: str, problem: str) -> None:
    """Require a regular expression that compiles; else `key=value is <problem>: <why>`."""
    try:
        re.compile(value)
    except re.error as e:
        raise ConfigError(f"{key}={value!r} is {problem}: {e}") from None


def check_fraction(key: str, value: float, *, allow_zero: bool) -> None:
    """Require 0 (or 0 <) <= value < 1."""
    lo = "0 <=" if allow_zero else "0 <"
    ok = (value >= 0.0 if allow_zero else value > 0.0) and value < 1.0
    require(ok, key, value, f"must satisfy {lo} {key.split('.')[-1]} < 1")


# --- dataset ---------------------------------------------------------------------------------


@dataclass
class DatasetConfig:
    """Fields every data set has (one module each in `fallopt/data/`).

    `limit` caps the train pool and the test set (smoke runs). `positive_class` is the event
    the recall and false-alarm metrics are about (null: `fall` where there is such a class).
    `split_by_group`: when the data names a group per image (a video, a person), validation
    and test splits keep each group whole, so near-duplicate frames cannot leak across them.
    """

    name: str = MISSING
    limit: int | None = None
    positive_class: str | None = None
    split_by_group: bool = True

    def __post_init__(self) -> None:
        if self.limit is not None:
            require(self.limit >= 2, "dataset.limit", self.limit, "must be >= 2 (or null)")

    def sources(self) -> dict[str, str]:
        """Fingerprints of the data's origin besides these keys: file contents, versions.

        They are part of a run's identity, so changed data is never skipped on resume.
        """
        return {}


RESIZE_FILTERS = ("bilinear", "nearest", "bicubic", "lanczos", "box")


@dataclass
class ImageFilesConfig(DatasetConfig):
    """A data set read from files: images are resized and converted to one shape.

    `image_size: [height, width]` and `channels` (1 or 3) default to the first image's.
    `resize_filter` is Pillow's (`bilinear`, as Keras' image_dataset_from_directory; `box`
    averages areas). `test_split` is used when the files hold no test set of their own.
    """

    image_size: list[int] | None = None
    channels: int | None = None
    resize_filter: str = "bilinear"
    test_split: float = 0.2

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.image_size is not None:
            ok = len(self.image_size) == 2 and min(self.image_size) >= 1
            require(ok, "dataset.image_size", self.image_size, "must be [height, width] >= 1")
        if self.channels is not None:
            require(self.channels in (1, 3), "dataset.channels", self.channels, "must be 1 or 3")
        require(self.resize_filter in RESIZE_FILTERS, "dataset.resize_filter",
                self.resize_filter, f"choose from {list(RESIZE_FILTERS)}")  # fmt: skip
        check_fraction("dataset.test_split", self.test_split, allow_zero=False)

    def ignored(self) -> set[str]:
        """The filter matters only when something is resized to a size given here."""
        return set() if self.image_size is not None else {"resize_filter"}


@dataclass
class EncodedImagesConfig(ImageFilesConfig):
    """Image files (PNG, JPEG, BMP) of a user's, decoded once into `$FALLOPT_CACHE`.

    `class_names` fixes the classes' order or takes a subset (default: all, sorted).
    `skip_bad` skips files that cannot be decoded, and counts them, instead of stopping.
    """

    class_names: list[str] | None = None
    skip_bad: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        names = self.class_names
        if names is not None:
            ok = len(names) >= 2 and len(set(names)) == len(names)
            require(ok, "dataset.class_names", names, "must name at least two distinct classes")


# --- model -----------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    """Fields every model source has (one module each in `fallopt/models/`).

    `input_range: [low, high]` is the one input rule: a uint8 pixel v enters the model as
    `low + v * (high - low) / 255`. A model file does not record it: the lab's own models
    were trained on raw pixels, [0, 255].
    """

    name: str = MISSING
    input_range: list[float] = field(default_factory=lambda: [0.0, 1.0])

    # train.epochs when it is null: an architecture must be trained, a file need not be.
    default_epochs: ClassVar[int] = 5

    def sources(self) -> dict[str, str]:
        """Content fingerprints of files the model comes from (see DatasetConfig.sources)."""
        return {}

    def source_file(self) -> Path | None:
        """The trained model file this model is loaded from, if any."""
        return None

    def __post_init__(self) -> None:
        r = self.input_range
        require(
            len(r) == 2 and r[0] < r[1], "model.input_range", r, "must be [low, high], low < high"
        )


# --- train, prune, quant, tracking -----------------------------------------------------------


class Optimizer(str, Enum):
    """Keras optimizers fallopt trains with."""

    adam = "adam"
    sgd = "sgd"
    rmsprop = "rmsprop"


@dataclass
class TrainConfig:
    """Baseline training: the validation split comes out of the train pool, stratified."""

    # null: the model source's default, 5 to train an architecture, 0 to take a file as it is
    epochs: int | None = None
    batch_size: int = 32
    learning_rate: float = 1e-3
    val_split: float = 0.2
    optimizer: Optimizer = Optimizer.adam
    # Random per-batch changes to training images only (fallopt.augment.AUGMENTATIONS).
    augment: list[str] = field(default_factory=list)
    rotation_degrees: float = 15.0  # `rotate` turns by up to +/- this
    zoom: float = 0.1  # `zoom` scales by up to +/- this fraction

    def ignored(self) -> set[str]:
        """An augmentation's magnitude matters only when it is listed."""
        return {k for k, op in (("rotation_degrees", "rotate"), ("zoom", "zoom"))
                if op not in self.augment}  # fmt: skip

    def __post_init__(self) -> None:
        from fallopt.augment import check_augment

        check_augment(self.augment)
        require(0 < self.rotation_degrees <= 180, "train.rotation_degrees",
                self.rotation_degrees, "must satisfy 0 < degrees <= 180")  # fmt: skip
        require(0 < self.zoom < 1, "train.zoom", self.zoom, "must satisfy 0 < zoom < 1")
        if self.epochs is not None:
            require(self.epochs >= 0, "train.epochs", self.epochs, "must be >= 0")
        require(self.batch_size >= 1, "train.batch_size", self.batch_size, "must be >= 1")
        require(
            0 < self.learning_rate < 10, "train.learning_rate", self.learning_rate, "0 < lr < 10"
        )
        check_fraction("train.val_split", self.val_split, allow_zero=False)


class PruneMethod(str, Enum):
    """How weights are removed.

    none; tfmot's ConstantSparsity or PolynomialDecay (zeros in place); or whole channels,
    which makes a thinner model (`fallopt.compress.channels`).
    """

    none = "none"
    constant = "constant"
    polynomial = "polynomial"
    channels = "channels"

    @property
    def magnitude(self) -> bool:
        """Whether this method zeroes weights in place with a tfmot schedule."""
        return self in (PruneMethod.constant, PruneMethod.polynomial)


class ScheduleUnit(str, Enum):
    """The unit of `prune.begin` and `prune.end`."""

    epochs = "epochs"
    steps = "steps"


PRUNE_SCOPES = ("dense", "conv", "all")
# How channel pruning ranks the filters of a layer (fallopt.compress.channels.CRITERIA).
CHANNEL_CRITERIA = ("l1", "bn_gamma")


def check_scope(key: str, value: str) -> None:
    """Require `dense`, `conv`, `all` or a layer-name pattern that compiles."""
    if value not in PRUNE_SCOPES:
        not_a_scope = f"neither one of {list(PRUNE_SCOPES)} nor a valid layer-name pattern"
        check_pattern(key, value, not_a_scope)


@dataclass
class PruneConfig:
    """Pruning during a fine-tune of the baseline.

    Every option carries `sparsity`, so `prune.sparsity=...` works with the default group;
    0.0 fine-tunes without pruning (the start of the lab's sweep). `scope` is `dense`,
    `conv`, `all` (every prunable layer) or a regular expression over layer names.
    `begin` and `end` are counted in `unit` from the start of the fine-tune; `end` null means
    the end of the fine-tune. `m_by_n: [2, 4]` keeps 2 weights of every 4 (structured 2:4).
    `per_layer: {conv3: 0.5, dense1: 0.9}` prunes exactly these layers to these sparsities
    instead of `scope` at `sparsity` (the map `python -m fallopt.sensitivity` proposes).

    `prune=channels` removes the fraction `sparsity` of the filters (units) of each layer in
    `scope`, lowest `criterion` first (`l1`: the filter's L1 norm; `bn_gamma`: |gamma| of
    the BatchNorm it feeds), keeping at least `min_channels`; the thinner model is then
    fine-tuned for `fine_tune_epochs`.
    """

    method: PruneMethod = PruneMethod.constant
    sparsity: float = 0.0
    initial_sparsity: float = 0.0
    power: float = 3.0
    scope: str = "dense"
    fine_tune_epochs: int = 2
    begin: float = 0.0
    end: float | None = None
    unit: ScheduleUnit = ScheduleUnit.epochs
    # Steps between mask updates. tfmot's default of 100 never fires in a short fine-tune.
    frequency: int = 1
    m_by_n: list[int] | None = None
    # null, not {}: Hydra would refuse new keys in an empty dict (struct mode)
    per_layer: Any = None  # {layer: sparsity}; Any: OmegaConf cannot merge into a typed None
    criterion: str = "l1"
    min_channels: int = 1

    def ignored(self) -> set[str]:
        """Keys the chosen method does not use.

        prune=none uses nothing but its method; constant sparsity has no curve; a per-layer
        map replaces scope and sparsity; channels have no schedule.
        """
        if self.method is PruneMethod.none:
            return {f for f in self.__dataclass_fields__ if f != "method"}
        if self.method is PruneMethod.channels:
            return {"initial_sparsity", "power", "begin", "end", "unit", "frequency", "m_by_n",
                    "per_layer"}  # fmt: skip
        ignored = {"criterion", "min_channels"}
        if self.per_layer:
            ignored |= {"scope", "sparsity"}
        if self.method is PruneMethod.constant:
            ignored |= {"initial_sparsity", "power"}
        return ignored

    def targets(self) -> dict[str, float] | None:
        """Each layer's sparsity when `per_layer` names them; None: `scope` at `sparsity`."""
        return dict(self.per_layer) if self.per_layer else None

    def __post_init__(self) -> None:
        check_fraction("prune.sparsity", self.sparsity, allow_zero=True)
        if self.method is PruneMethod.none:
            if self.sparsity != 0.0:
                raise ConfigError(
                    f"prune.sparsity={self.sparsity} needs a schedule, but prune=none does not "
                    "prune: use prune=constant (the default) or prune=polynomial"
                )
            why = "needs prune=constant or prune=polynomial, but prune=none does not prune"
            require(self.per_layer is None, "prune.per_layer", self.per_layer, why)
            return
        require(self.fine_tune_epochs >= 1, "prune.fine_tune_epochs", self.fine_tune_epochs, ">= 1")
        check_scope("prune.scope", self.scope)
        if self.method is PruneMethod.channels:
            self._check_channels()
            return
        self._check_per_layer()
        check_fraction("prune.initial_sparsity", self.initial_sparsity, allow_zero=True)
        if self.method is PruneMethod.polynomial:
            final = min([self.sparsity] if not self.per_layer else self.per_layer.values())
            require(
                self.initial_sparsity <= final,
                "prune.initial_sparsity",
                self.initial_sparsity,
                f"must not exceed the final sparsity {final} (prune.sparsity or prune.per_layer)",
            )
            require(self.power > 0, "prune.power", self.power, "must be > 0")
        require(self.frequency >= 1, "prune.frequency", self.frequency, "must be >= 1 step")
        require(self.begin >= 0, "prune.begin", self.begin, "must be >= 0")
        if self.end is not None:
            require(self.end > self.begin, "prune.end", self.end, "must be > prune.begin")
        if self.m_by_n is not None:
            require(not self.per_layer, "prune.per_layer", self.per_layer,
                    "cannot be combined with prune.m_by_n, whose sparsity is fixed")  # fmt: skip
            ok = len(self.m_by_n) == 2 and 0 < self.m_by_n[0] < self.m_by_n[1]
            require(ok, "prune.m_by_n", self.m_by_n, "must be [m, n] with 0 < m < n, e.g. [2, 4]")
            implied = 1 - self.m_by_n[0] / self.m_by_n[1]
            require(
                abs(self.sparsity - implied) < 1e-9,
                "prune.sparsity",
                self.sparsity,
                f"prune.m_by_n={self.m_by_n} keeps {self.m_by_n[0]} of {self.m_by_n[1]} weights: "
                f"set prune.sparsity={implied:g}",
            )

    def _check_per_layer(self) -> None:
        per_layer = self.per_layer
        if per_layer is None:
            return
        ok = isinstance(per_layer, dict) and bool(per_layer)
        require(ok, "prune.per_layer", per_layer,
                "must map layer names to sparsities, e.g. {conv3: 0.5, dense1: 0.9}")  # fmt: skip
        for layer, value in per_layer.items():
            key = f"prune.per_layer.{layer}"
            number = isinstance(value, int | float) and not isinstance(value, bool)
            require(number, key, value, "must be a sparsity, 0 <= sparsity < 1")
            check_fraction(key, float(value), allow_zero=True)
        self.per_layer = {str(k): float(v) for k, v in per_layer.items()}

    def _check_channels(self) -> None:
        why = "prune=channels needs the fraction of channels to remove, 0 < sparsity < 1"
        require(self.sparsity > 0, "prune.sparsity", self.sparsity, why)
        require(self.criterion in CHANNEL_CRITERIA, "prune.criterion", self.criterion,
                f"choose from {list(CHANNEL_CRITERIA)}")  # fmt: skip
        require(self.min_channels >= 1, "prune.min_channels", self.min_channels, "must be >= 1")
        require(not self.per_layer, "prune.per_layer", self.per_layer,
                "applies to prune=constant and prune=polynomial, not prune=channels")  # fmt: skip
        require(self.m_by_n is None, "prune.m_by_n", self.m_by_n,
                "applies to magnitude pruning, not prune=channels")  # fmt: skip


class ClusterMethod(str, Enum):
    """Weight clustering: none, or tfmot's k-means `cluster_weights`."""

    none = "none"
    kmeans = "kmeans"


# Centroid initialisations (tfmot CentroidInitialization, `density` = DENSITY_BASED).
CLUSTER_INITS = ("kmeans_plus_plus", "linear", "density", "random")


@dataclass
class ClusterConfig:
    """Weight clustering after pruning.

    Each kernel in `scope` keeps at most `clusters` distinct values (per output channel
    with `per_channel`, Conv2D only), then a fine-tune of `fine_tune_epochs` trains the
    centroids. `preserve_sparsity` keeps pruned zeros at 0.
    """

    method: ClusterMethod = ClusterMethod.none
    clusters: int = 16
    init: str = "kmeans_plus_plus"
    scope: str = "all"
    per_channel: bool = False
    preserve_sparsity: bool = False
    fine_tune_epochs: int = 1

    def ignored(self) -> set[str]:
        """cluster=none uses nothing but its method."""
        if self.method is ClusterMethod.none:
            return {f for f in self.__dataclass_fields__ if f != "method"}
        return set()

    def __post_init__(self) -> None:
        if self.method is ClusterMethod.none:
            return
        least = 3 if self.preserve_sparsity else 2  # tfmot keeps one centroid at 0 for zeros
        why = f"must be >= {least}" + " with cluster.preserve_sparsity" * (least == 3)
        require(self.clusters >= least, "cluster.clusters", self.clusters, why)
        require(self.init in CLUSTER_INITS, "cluster.init", self.init,
                f"choose from {list(CLUSTER_INITS)}")  # fmt: skip
        check_scope("cluster.scope", self.scope)
        require(self.fine_tune_epochs >= 0, "cluster.fine_tune_epochs", self.fine_tune_epochs,
                "must be >= 0 (0: the clusters as k-means made them)")  # fmt: skip


class QuantMode(str, Enum):
    """TFLite conversion modes."""

    none = "none"  # float32 TFLite
    dynamic = "dynamic"  # int8 weights, float activations
    float16 = "float16"  # float16 weights
    int8 = "int8"  # full integer, int8 input and output, calibrated on training images
    qat = "qat"  # quantization-aware fine-tune, then int8 weights and activations
    pqat = "pqat"  # the same, keeping the pruned zeros
    cqat = "cqat"  # the same, keeping the weight clusters
    pcqat = "pcqat"  # the same, keeping the pruned zeros and the clusters

    @property
    def aware(self) -> bool:
        """Whether the mode fine-tunes with fake quantization before converting."""
        return self in (QuantMode.qat, QuantMode.pqat, QuantMode.cqat, QuantMode.pcqat)


@dataclass
class QuantConfig:
    """Conversion of the (pruned) model to TFLite, and how the result is evaluated."""

    mode: QuantMode = QuantMode.none
    # Training images drawn to calibrate int8 activation ranges.
    representative_samples: int = 200
    threads: int = 2  # LiteRT interpreter threads for evaluation
    fine_tune_epochs: int = 1  # quantization-aware fine-tune (qat, pqat)
    # Store weights in TFLite's sparse format (pays off for heavily pruned models).
    sparse_weights: bool = False
    latency_repeats: int = 50  # single-image invokes timed for tflite_latency_ms
    # int8 only: Keras layers whose ops stay float32 (the converter's denylist), e.g. the
    # ones `python -m fallopt.sensitivity` finds quantized worst.
    float_layers: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        why = f"applies to quant=int8 only, not quant={self.mode.value}"
        ok = not self.float_layers or self.mode is QuantMode.int8
        require(ok, "quant.float_layers", self.float_layers, why)
        n = self.representative_samples
        require(n >= 1, "quant.representative_samples", n, "must be >= 1")
        require(self.threads >= 1, "quant.threads", self.threads, "must be >= 1")
        epochs = self.fine_tune_epochs
        require(epochs >= 1, "quant.fine_tune_epochs", epochs, "must be >= 1")
        repeats = self.latency_repeats
        require(repeats >= 1, "quant.latency_repeats", repeats, "must be >= 1")

    def ignored(self) -> set[str]:
        """Calibration images matter only to int8; the QAT fine-tune only to qat and pqat."""
        ignored = set()
        if self.mode is not QuantMode.int8:
            ignored.add("representative_samples")
        if not self.mode.aware:
            ignored.add("fine_tune_epochs")
        return ignored


@dataclass
class TrackingConfig:
    """Where runs are recorded: any MLflow tracking URI (default: SQLite under mlruns/)."""

    uri: str = "sqlite:///mlruns/mlflow.db"
    experiment: str = "fallopt"
    # For experiments fallopt creates; default: `artifacts/` beside a SQLite database.
    artifact_location: str | None = None
    run_name: str | None = None
    # Publish trained stages as MLflow artifacts so workers without a shared disk reuse them.
    share_stages: bool = False

    def __post_init__(self) -> None:
        require(bool(self.uri.strip()), "tracking.uri", self.uri, "must not be empty")
        require(bool(self.experiment.strip()), "tracking.experiment", self.experiment, "non-empty")


KIB = 1024


@dataclass
class TargetConfig:
    """The device a run is for: RAM and flash budgets (`fallopt.target` checks them).

    `host` has no budgets, so no verdict. A board's figures are its data sheet's: an option
    in `conf/target/`, or any option with `ram_bytes` and `flash_bytes` set for a custom board.
    `ram_reserved_bytes` is what the application, stack and OS need besides the arena;
    `arena_max_bytes` the largest contiguous RAM block, where one arena must fit.
    `runtime_flash_bytes` is TFLM's code with a CNN's kernels: an estimate, not a measurement.
    `arena_margin` is added to the measured arena in the deploy header (optimised kernels
    such as CMSIS-NN take scratch buffers the reference kernels measured here do not).
    `tflm_samples` caps the test images run on TFLM's reference kernels (~0.1 s each).
    """

    name: str = "host"
    description: str = ""
    ram_bytes: int | None = None
    flash_bytes: int | None = None
    ram_reserved_bytes: int = 0
    arena_max_bytes: int | None = None
    runtime_flash_bytes: int = 64 * KIB
    arena_margin: float = 0.1
    tflm_samples: int = 100

    @property
    def is_board(self) -> bool:
        """Whether there is a budget to check a model against."""
        return self.ram_bytes is not None or self.flash_bytes is not None

    def ignored(self) -> set[str]:
        """The description is prose: it does not change a result."""
        return {"description"}

    def __post_init__(self) -> None:
        for key in ("ram_bytes", "flash_bytes", "arena_max_bytes"):
            value = getattr(self, key)
            if value is not None:
                require(value >= 1, f"target.{key}", value, "must be >= 1 byte (or null)")
        for key in ("ram_reserved_bytes", "runtime_flash_bytes"):
            value = getattr(self, key)
            require(value >= 0, f"target.{key}", value, "must be >= 0 bytes")
        if self.ram_bytes is not None:
            reserved = self.ram_reserved_bytes
            require(reserved < self.ram_bytes, "target.ram_reserved_bytes", reserved,
                    f"must be below target.ram_bytes={self.ram_bytes}")  # fmt: skip
        require(0 <= self.arena_margin <= 10, "target.arena_margin", self.arena_margin,
                "must satisfy 0 <= margin <= 10 (0.1 = 10%)")  # fmt: skip
        require(self.tflm_samples >= 0, "target.tflm_samples", self.tflm_samples,
                "must be >= 0 (0 = no TFLM inference, the arena only)")  # fmt: skip


SENSITIVITY_SPARSITIES = [0.3, 0.5, 0.7, 0.8, 0.9, 0.95]


@dataclass
class SensitivityConfig:
    """Settings of `python -m fallopt.sensitivity`.

    Each layer in `scope` is pruned alone to each of `sparsities` without fine-tuning, on
    the validation split. The proposed `prune.per_layer` map gives each layer the highest
    sparsity whose accuracy drop (and every lower one's) stays within `max_drop`; layers
    whose int8 error (rmse / scale, QuantizationDebugger) exceeds `float_threshold` are
    proposed for `quant.float_layers`. Not part of a run's identity: runs ignore it.
    """

    sparsities: list[float] = field(default_factory=lambda: list(SENSITIVITY_SPARSITIES))
    scope: str = "all"
    max_drop: float = 0.02
    float_threshold: float = 0.7

    def __post_init__(self) -> None:
        require(bool(self.sparsities), "sensitivity.sparsities", self.sparsities, "name one")
        for value in self.sparsities:
            check_fraction("sensitivity.sparsities[]", value, allow_zero=False)
        check_scope("sensitivity.scope", self.scope)
        require(0 <= self.max_drop < 1, "sensitivity.max_drop", self.max_drop,
                "must satisfy 0 <= max_drop < 1 (accuracy, 0.02 = 2 points)")  # fmt: skip
        require(self.float_threshold > 0, "sensitivity.float_threshold", self.float_threshold,
                "must be > 0 (rmse / scale; 0.29 is ideal rounding)")  # fmt: skip


@dataclass
class FalloptConfig:
    """One run: data, model, training, pruning, clustering, quantization, tracking, device."""

    dataset: DatasetConfig = MISSING
    model: ModelConfig = MISSING
    train: TrainConfig = field(default_factory=TrainConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    target: TargetConfig = field(default_factory=TargetConfig)
    seed: int = 0
    # How to run, not what: excluded from the config hash (see identity.EXECUTION_KEYS).
    force: bool = False  # rerun even if this config already FINISHED in the experiment
    dry_run: bool = False  # list what would run and which stages it would reuse; no training
    keep_going: bool = True  # in a sweep, a failed job does not stop the others
    threads: int = 0  # TensorFlow and LiteRT threads per job; 0 = cores / parallel jobs
    verbose: bool = False  # errors the user can fix print their full trace too
    # Write the run's C++ bundle (deploy/, 8 MB of C array for the lab's float32 CNN): null =
    # for a single run, not for each job of a sweep (re-run the chosen one with deploy=true).
    deploy: bool | None = None
    # Metrics a sweeper optimises, returned by each job; 2 make a Pareto front.
    objectives: list[str] = field(default_factory=lambda: ["val_accuracy"])
    sensitivity: SensitivityConfig = field(default_factory=SensitivityConfig)

    def ignored(self) -> set[str]:
        """The sensitivity tool's settings do not change a run."""
        return {"sensitivity"}

    def __post_init__(self) -> None:
        check_seed("seed", self.seed)
        require(self.threads >= 0, "threads", self.threads, "must be >= 0 (0 = automatic)")
        unknown = [o for o in self.objectives if o not in OBJECTIVES]
        require(not unknown and bool(self.objectives), "objectives", self.objectives,
                 f"choose from {sorted(OBJECTIVES)}")  # fmt: skip
        self._check_stages()

    def _check_stages(self) -> None:
        """Combinations of prune, cluster and quant that cannot do what they say."""
        mode, clustered = self.quant.mode, self.cluster.method is not ClusterMethod.none
        zeros = self.prune.method.magnitude
        if mode in (QuantMode.cqat, QuantMode.pcqat) and not clustered:
            raise ConfigError(
                f"quant={mode.value} preserves weight clusters, but cluster=none: add "
                "cluster=kmeans, or use quant=qat"
            )
        if mode is QuantMode.cqat and self.cluster.preserve_sparsity:
            raise ConfigError(
                "quant=cqat keeps the clusters but not the zeros cluster.preserve_sparsity=true "
                "kept: use quant=pcqat"
            )
        if mode is QuantMode.pcqat and not (zeros and self.cluster.preserve_sparsity):
            raise ConfigError(
                "quant=pcqat preserves pruned zeros and clusters: it needs prune=constant or "
                "prune=polynomial and cluster.preserve_sparsity=true (or use quant=cqat)"
            )
        if mode in (QuantMode.qat, QuantMode.pqat) and clustered:
            raise ConfigError(
                f"quant={mode.value} would undo the weight clusters of cluster=kmeans (each "
                f"kernel ends with many more values): use quant=cqat, or quant=pcqat to keep "
                "pruned zeros too"
            )
        if mode is QuantMode.pqat and not zeros:
            raise ConfigError(
                f"quant=pqat preserves pruned zeros, but prune={self.prune.method.value} makes "
                "none: use quant=qat"
            )
        if clustered and self.cluster.preserve_sparsity and not zeros:
            raise ConfigError(
                f"cluster.preserve_sparsity=true keeps pruned zeros, but "
                f"prune={self.prune.method.value} makes none: set it false, or prune with "
                "prune=constant"
            )


# Metrics a job can return to a sweeper, and whether larger is better.
OBJECTIVES: dict[str, bool] = {
    "val_accuracy": True,
    "test_accuracy": True,
    "tflite_test_accuracy": True,
    "tflite_test_fall_recall": True,
    "tflite_gzip_bytes": False,
    "tflite_latency_ms": False,
    "keras_gzip_bytes": False,
    "tflm_arena_bytes": False,
    "flash_bytes": False,
    "macs": False,
}
# Objectives that need the data set's positive class to be `fall`: refused on other data.
FALL_OBJECTIVES = ("tflite_test_fall_recall",)


@functools.cache  # once per process
def register_configs() -> None:
    """Store the schemas where conf/ files can extend them (`schema/<group>/<name>`).

    Called by whoever composes (`fallopt.run`, the tests), not on import: the data and model
    sources it imports import this module, and registering while one of them is half
    imported would miss it.
    """
    # Their modules extend DatasetConfig and ModelConfig, defined above.
    from fallopt import data, models

    cs = ConfigStore.instance()
    cs.store(name="fallopt_schema", node=FalloptConfig)
    for group, registry in (("dataset", data), ("model", models)):
        for name, schema in registry.schemas().items():
            cs.store(group=f"schema/{group}", name=name, node=schema)
    for group, schema in (
        ("train", TrainConfig),
        ("prune", PruneConfig),
        ("cluster", ClusterConfig),
        ("quant", QuantConfig),
        ("tracking", TrackingConfig),
        ("target", TargetConfig),
    ):
        cs.store(group=f"schema/{group}", name="base", node=schema)
    # conf/hydra/launcher/ray.yaml and conf/hydra/sweeper/basic.yaml replace Hydra's options
    # of those names on purpose (hydra_plugins/fallopt_hydra); Hydra checks each against the
    # original's schema, which it passes, and warns that it did.
    for replaced in ("launcher/ray", "sweeper/basic"):
        warnings.filterwarnings("ignore", message=f"\n'hydra/{replaced}' is validated against")


def validate(cfg: DictConfig) -> FalloptConfig:
    """Build the typed config, running every range and combination check.

    Raises:
        ConfigError: naming the key, the value and what would be accepted.
    """
    try:
        typed = OmegaConf.to_object(cfg)
    except ValidationError as e:  # e.g. a MISSING value left unset
        raise ConfigError(f"invalid config: {e.msg}") from None
    if not isinstance(typed, FalloptConfig):
        raise ConfigError("config does not extend fallopt_schema (conf/config.yaml's defaults)")
    if typed.train.epochs is None:
        typed.train.epochs = type(typed.model).default_epochs
    require(
        typed.train.epochs >= 1 or type(typed.model).default_epochs == 0,
        "train.epochs",
        typed.train.epochs,
        f"model={typed.model.name} is an architecture: it needs >= 1 epoch of training",
    )
    from fallopt import data, models

    for group, registry in (("dataset", data), ("model", models)):
        node = getattr(typed, group)
        if type(node) not in registry.schemas().values():
            raise ConfigError(
                f"{group}={node.name!r} does not extend a {group} source's schema "
                f"(/schema/{group}/<source>); sources: {sorted(registry.schemas())}"
            )
    return typed


def as_dict(cfg: FalloptConfig) -> dict[str, Any]:
    """The typed config as plain containers (enums as their names), as the run uses it.

    What `OmegaConf.to_container(OmegaConf.structured(cfg), enum_to_str=True)` gives (tested),
    in a thousandth of its 20 ms: every run of a sweep logs it.
    """
    return _plain(cfg)


def _plain(node: Any) -> Any:
    """A config node as plain containers, enums by name (see `as_dict`)."""
    if dataclasses.is_dataclass(node):
        return {f.name: _plain(getattr(node, f.name)) for f in dataclasses.fields(node)}
    if isinstance(node, Enum):
        return node.name
    if isinstance(node, dict):
        return {key: _plain(value) for key, value in node.items()}
    if isinstance(node, list | tuple):
        return [_plain(value) for value in node]
    return node


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested dicts to dotted keys: {"train": {"epochs": 5}} -> {"train.epochs": 5}."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{dotted}."))
        else:
            flat[dotted] = value
    return flat
