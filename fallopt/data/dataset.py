"""The in-memory data set every stage consumes, and the checks and splits that build it.

Images stay uint8 (a quarter of float32's memory) and are normalised batch by batch
(`to_float`) on their way into a model.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

from fallopt.errors import DataError


@dataclass(frozen=True)
class InputRule:
    """How a uint8 pixel v enters a model: `low + v * (high - low) / 255` (`model.input_range`).

    A model file carries no record of the scaling it was trained with (the lab's own models
    take raw 0..255 pixels, MobileNet [-1, 1]), so one rule is set per run and every consumer
    of pixels uses it: training, Keras and LiteRT evaluation, int8 calibration.
    """

    low: float = 0.0
    high: float = 1.0

    @property
    def scale(self) -> np.float32:
        """The factor on v, in the float32 every consumer computes in."""
        return np.float32((self.high - self.low) / 255.0)

    def apply(self, x: np.ndarray) -> np.ndarray:
        """uint8 pixels as the model's float32 input."""
        y = x.astype(np.float32) * self.scale
        if self.low:
            y += np.float32(self.low)
        return y

    def table(self, dtype: type, scale: float = 0.0, zero_point: int = 0) -> np.ndarray:
        """What each uint8 pixel value becomes at an input tensor of `dtype`.

        float32, or quantized with the tensor's scale and zero point as TFLite rounds them:
        the one table LiteRT, TFLM and the deploy bundle's device code all use.
        """
        floats = self.apply(np.arange(256, dtype=np.uint8))
        if dtype == np.float32:
            return floats
        info = np.iinfo(dtype)
        return np.clip(np.rint(floats / scale + zero_point), info.min, info.max).astype(dtype)


UNIT = InputRule()  # [0, 1]: fallopt's own architectures


def to_float(x: np.ndarray, rule: InputRule = UNIT) -> np.ndarray:
    """uint8 pixels to the float32 inputs a model takes under `rule`."""
    return rule.apply(x)


@dataclass(frozen=True)
class Split:
    """Images (n, height, width, channels) uint8, class indices (n,) int64, and groups.

    `groups` (n,), when the data names them: the video or person each image comes from, kept
    whole by splits.
    """

    x: np.ndarray
    y: np.ndarray
    groups: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.y)

    def take(self, index: np.ndarray | slice) -> Split:
        """The samples at `index` (a copy for an index array, a view for a slice)."""
        groups = None if self.groups is None else self.groups[index]
        return Split(self.x[index], self.y[index], groups)

    @cached_property
    def digest(self) -> str:
        """A hash of the images and labels (once per split: 3 GB take seconds)."""
        h = hashlib.sha256()
        for array in (self.x, self.y):
            h.update(str(array.shape).encode())
            h.update(np.ascontiguousarray(array).data)
        return h.hexdigest()[:16]


@dataclass(frozen=True)
class Loaded:
    """What a data source reads: class names, the train pool, own test and validation sets.

    The test and validation sets are the files' own when they have them (else split off).
    `origin` says where the images came from (a path, a generator); `notes` what was done to
    them on the way (resized, converted, skipped), for the `[data]` line.
    """

    class_names: tuple[str, ...]
    pool: Split
    test: Split | None = None
    val: Split | None = None
    origin: str = ""
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Dataset:
    """Train, validation and test splits with the names of their classes.

    `positive` indexes the event class the recall and false-alarm metrics are about (None:
    the data set has none). `notes` say how the data was read and split.
    """

    name: str
    class_names: tuple[str, ...]
    train: Split
    val: Split
    test: Split
    positive: int | None = None
    origin: str = ""
    notes: tuple[str, ...] = ()

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(height, width, channels) of one image."""
        return tuple(self.train.x.shape[1:])  # type: ignore[return-value]

    @property
    def num_classes(self) -> int:
        """How many classes the labels index."""
        return len(self.class_names)

    def splits(self) -> dict[str, Split]:
        """The splits by name, in training order."""
        return {"train": self.train, "val": self.val, "test": self.test}

    def fingerprint(self) -> str:
        """A hash of every image and label of every split: a changed file changes it."""
        digests = "".join(split.digest for split in self.splits().values())
        return hashlib.sha256(digests.encode()).hexdigest()[:16]

    def describe(self) -> str:
        """One line for the log: sizes, shape, classes, and how the data was read and split."""
        h, w, c = self.input_shape
        positive = (
            "" if self.positive is None else f", positive class {self.class_names[self.positive]!r}"
        )
        return (
            f"{self.name}: {len(self.train)} train / {len(self.val)} val / {len(self.test)} test, "
            f"{h}x{w}x{c}, classes {list(self.class_names)}{positive}"
            + "".join(f"; {note}" for note in self.notes)
        )


def numeric_array(data: Any) -> np.ndarray:
    """An array of `data`, refusing text before numpy pads every string to the longest.

    `np.asarray` of a 104 KB pickled list (one 100,000-character string, 2,000 short ones)
    took 963 MB. A list of arrays (images kept one by one) is stacked as it is.
    """
    if isinstance(data, np.ndarray):
        return data
    if isinstance(data, list | tuple) and data and all(isinstance(v, np.ndarray) for v in data):
        return np.stack(data)
    return np.array(data, dtype=np.float64)


def as_images(data: Any, source: str, expected: str) -> np.ndarray:
    """Check and convert image data to uint8 (n, h, w, c); grayscale (n, h, w) gains c=1.

    Floats are accepted in [0, 1] (scaled by 255) or [0, 255]; NaN and inf are refused.
    """
    try:
        x = numeric_array(data)
    except (ValueError, TypeError) as e:
        raise DataError(f"{source}: cannot be read as an image array ({e}); {expected}") from None
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[0] == 0 or min(x.shape[1:3]) < 1 or x.shape[3] not in (1, 3, 4):
        raise DataError(
            f"{source}: shape {x.shape} is not a stack of images (n, height, width, channels "
            f"with channels 1, 3 or 4); {expected}"
        )
    if x.dtype == np.uint8:
        return x
    if np.issubdtype(x.dtype, np.bool_) or not np.issubdtype(x.dtype, np.number):
        raise DataError(f"{source}: dtype {x.dtype} is not numeric pixel data; {expected}")
    if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all():
        bad = int((~np.isfinite(x)).sum())
        raise DataError(f"{source}: {bad} pixel values are NaN or inf; {expected}")
    lo, hi = float(x.min()), float(x.max())
    if lo < 0 or hi > 255:
        raise DataError(f"{source}: pixel values span [{lo}, {hi}], outside [0, 255]; {expected}")
    if np.issubdtype(x.dtype, np.floating) and hi <= 1.0:
        x = x * 255.0
    return np.rint(x).astype(np.uint8)


def as_labels(labels: Any, n: int, valid: Sequence[int], source: str, expected: str) -> np.ndarray:
    """Check labels: one per image, integers from `valid`, at least two classes present."""
    try:
        y = numeric_array(labels).reshape(-1)
    except (ValueError, TypeError) as e:
        raise DataError(f"{source}: labels cannot be read as an array ({e}); {expected}") from None
    if len(y) != n:
        raise DataError(f"{source}: {len(y)} labels for {n} images; {expected}")
    if np.issubdtype(y.dtype, np.floating) and np.all(np.isfinite(y)) and np.all(y == np.rint(y)):
        y = y.astype(np.int64)
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{source}: labels of dtype {y.dtype} are not integers; {expected}")
    unknown = sorted(set(np.unique(y).tolist()) - set(valid))
    if unknown:
        raise DataError(f"{source}: labels {unknown[:10]} are outside {list(valid)}; {expected}")
    if len(np.unique(y)) < 2:
        raise DataError(f"{source}: only class {int(y[0])} occurs; need at least two. {expected}")
    return y.astype(np.int64)


def as_groups(groups: Any, n: int, source: str) -> np.ndarray:
    """One group id per image (a video, a person) as strings; ids may be text or integers."""
    if not isinstance(groups, list | tuple | np.ndarray) or len(groups) != n:
        count = len(groups) if hasattr(groups, "__len__") else type(groups).__name__
        raise DataError(
            f"{source}: {count} groups for {n} images; give one group id (a video or person "
            "name) per image, in the order of the images"
        )
    return np.asarray([str(g) for g in groups])


def hold_out(
    split: Split, fraction: float, seed: int, what: str, by_group: bool
) -> tuple[Split, Split, str]:
    """Split off `fraction` of the samples, every class in both parts; say how.

    With groups (and `by_group`), whole groups are held out, stratified by label where the
    groups allow: frames of one video in both parts would measure memory. Otherwise the
    samples are drawn at random, stratified, `fraction` rounded up. The parts are views of
    `split`'s images, which are reordered in place (no copy).

    Raises:
        DataError: when no split leaves every class in both parts.
    """
    if by_group and split.groups is not None:
        keep, held = _group_indices(split, fraction, seed, what)
        n_groups, n_held = len(np.unique(split.groups)), len(np.unique(split.groups[held]))
        how = f"{what} by group: {n_held} of {n_groups} groups, {len(held)} images"
    else:
        keep, held = _random_indices(split, int(np.ceil(len(split) * fraction)), seed, what)
        ignored = "" if split.groups is None else " (groups ignored: dataset.split_by_group=false)"
        how = f"{what} at random, stratified: {len(held)} images{ignored}"
    kept, held_out = _reordered(split, keep, held)
    return kept, held_out, f"{how} ({len(held) / len(split):.0%})"


def check_disjoint(train: Split, test: Split, where: str) -> None:
    """Refuse a test set that shares a group (a video, a person) with the training data."""
    if train.groups is None or test.groups is None:
        return
    shared = sorted(set(np.unique(train.groups).tolist()) & set(np.unique(test.groups).tolist()))
    if shared:
        raise DataError(
            f"{where}: groups {shared[:5]} are in both the training and the test data, so the "
            "test would measure images the model has seen; keep each video or person in one "
            "of them"
        )


def limit(split: Split, n: int | None, seed: int) -> Split:
    """At most n samples, drawn so every class keeps its share (deterministic per seed)."""
    if n is None or len(split) <= n:
        return split
    order = np.random.default_rng(seed).permutation(len(split))
    # Each sample's rank within its class as a fraction: the smallest n interleave the classes.
    quantile = np.empty(len(split))
    for c in np.unique(split.y):
        members = order[split.y[order] == c]
        quantile[members] = (np.arange(len(members)) + 0.5) / len(members)
    return split.take(np.sort(np.argsort(quantile, kind="stable")[:n]))


def _reorder_rows(x: np.ndarray, order: np.ndarray) -> np.ndarray:
    """`x[order]`, made in place when `x` is writeable, with one row of scratch.

    A copy would hold the images twice while splitting (16,000 CAUCA images: 442 MiB more).
    Each cycle of the permutation is followed once: a row is read before it is overwritten.
    """
    if not x.flags.writeable:
        return x[order]
    moved = np.zeros(len(order), dtype=bool)
    for start in np.flatnonzero(order != np.arange(len(order))):
        if moved[start]:
            continue
        row, i = x[start].copy(), int(start)
        while (j := int(order[i])) != start:
            x[i], moved[i], i = x[j], True, j
        x[i], moved[i] = row, True
    return x


def _reordered(split: Split, keep: np.ndarray, held: np.ndarray) -> tuple[Split, Split]:
    order = np.concatenate([np.sort(keep), np.sort(held)])  # each part in file order
    x = _reorder_rows(split.x, order)
    whole = Split(x, split.y[order], None if split.groups is None else split.groups[order])
    n = len(keep)
    return whole.take(slice(None, n)), whole.take(slice(n, None))  # views of one array


def _unsplittable(split: Split, what: str, detail: str) -> DataError:
    return DataError(
        f"cannot split {len(split)} samples of {len(np.unique(split.y))} classes into {what}: "
        f"{detail}. Use more data (raise dataset.limit) or another fraction"
    )


def _random_indices(
    split: Split, n_held: int, seed: int, what: str
) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split

    n_classes = len(np.unique(split.y))
    if n_held < n_classes or len(split) - n_held < n_classes:
        raise _unsplittable(split, what, f"{n_held} held out leaves a part without some class")
    keep, held = train_test_split(
        np.arange(len(split)), test_size=n_held, stratify=split.y, random_state=seed
    )
    return keep, held


def _group_indices(
    split: Split, fraction: float, seed: int, what: str
) -> tuple[np.ndarray, np.ndarray]:
    """Whole groups held out: of the stratified group folds, the one nearest `fraction`."""
    import warnings

    from sklearn.model_selection import StratifiedGroupKFold

    n_groups = len(np.unique(split.groups))
    folds = min(n_groups, max(2, round(1 / fraction)))
    if n_groups < 2:
        raise _unsplittable(split, what, "all images are of one group")
    classes = set(np.unique(split.y).tolist())
    splitter = StratifiedGroupKFold(folds, shuffle=True, random_state=seed)
    best: tuple[float, np.ndarray, np.ndarray] | None = None
    with warnings.catch_warnings():  # "least populated class has fewer members than folds"
        warnings.simplefilter("ignore", UserWarning)
        for keep, held in splitter.split(np.zeros(len(split)), split.y, split.groups):
            both = set(split.y[keep].tolist()) == classes == set(split.y[held].tolist())
            gap = abs(len(held) / len(split) - fraction)
            if both and (best is None or gap < best[0]):
                best = (gap, keep, held)
    if best is None:
        raise _unsplittable(
            split, what, f"no way to hold out whole groups of the {n_groups} leaves every class "
            "in both parts (add groups, or set dataset.split_by_group=false to split at random, "
            "which lets near-duplicate images leak)"
        )  # fmt: skip
    return best[1], best[2]
