"""The in-memory data set every stage consumes, and the checks and splits that build it.

Images stay uint8 (a quarter of float32's memory) and are normalised batch by batch
(`to_float`) on their way into a model.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.model_selection import train_test_split

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


UNIT = InputRule()  # [0, 1]: fallopt's own architectures


def to_float(x: np.ndarray, rule: InputRule = UNIT) -> np.ndarray:
    """uint8 pixels to the float32 inputs a model takes under `rule`."""
    return rule.apply(x)


@dataclass(frozen=True)
class Split:
    """Images (n, height, width, channels) uint8 and class indices (n,) int64."""

    x: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:
        return len(self.y)


@dataclass(frozen=True)
class Dataset:
    """Train, validation and test splits with the names of their classes."""

    name: str
    class_names: tuple[str, ...]
    train: Split
    val: Split
    test: Split

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(height, width, channels) of one image."""
        return tuple(self.train.x.shape[1:])  # type: ignore[return-value]

    @property
    def num_classes(self) -> int:
        """How many classes the labels index."""
        return len(self.class_names)

    def fingerprint(self) -> str:
        """A hash of every image and label of every split: a changed file changes it."""
        h = hashlib.sha256()
        for split in (self.train, self.val, self.test):
            for array in (split.x, split.y):
                h.update(str(array.shape).encode())
                h.update(np.ascontiguousarray(array).data)
        return h.hexdigest()[:16]

    def describe(self) -> str:
        """One line for the log."""
        h, w, c = self.input_shape
        return (
            f"{self.name}: {len(self.train)} train / {len(self.val)} val / {len(self.test)} test, "
            f"{h}x{w}x{c}, classes {list(self.class_names)}"
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


def stratified_split(split: Split, fraction: float, seed: int, what: str) -> tuple[Split, Split]:
    """Split off `fraction` of the samples (rounded up), keeping the class proportions.

    The parts are views of `split`'s images, which are reordered in place (no copy).

    Raises:
        DataError: when the split would leave a part without every class.
    """
    return _split_off(split, int(np.ceil(len(split) * fraction)), seed, what)


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
    kept = np.sort(np.argsort(quantile, kind="stable")[:n])
    return Split(split.x[kept], split.y[kept])


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


def _split_off(split: Split, n_held: int, seed: int, what: str) -> tuple[Split, Split]:
    n_classes = len(np.unique(split.y))
    if n_held < n_classes or len(split) - n_held < n_classes:
        raise DataError(
            f"cannot split {len(split)} samples of {n_classes} classes into {what}: "
            f"{n_held} held out leaves a part without some class. Use more data (raise "
            "dataset.limit) or another fraction"
        )
    keep, held = train_test_split(
        np.arange(len(split)), test_size=n_held, stratify=split.y, random_state=seed
    )
    order = np.concatenate([np.sort(keep), np.sort(held)])  # each part in file order
    x, y, n = _reorder_rows(split.x, order), split.y[order], len(keep)
    return Split(x[:n], y[:n]), Split(x[n:], y[n:])  # views of one array
