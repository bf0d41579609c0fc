"""What the image file sources (`image_folder`, `csv`) share: listed files decoded as a split."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from fallopt.config import EncodedImagesConfig
from fallopt.data.dataset import Loaded, Split
from fallopt.data.images import decode_images


def decode_set(
    cfg: EncodedImagesConfig,
    files: Sequence[Path],
    labels: np.ndarray,
    groups: np.ndarray | None,
    base: Path,
    what: str,
    like: Split | None = None,
) -> tuple[Split, str | None]:
    """Decode `files` (cached) as a split with their labels and groups; note what changed.

    Without `dataset.image_size` / `channels`, the first image sets the shape, and a test or
    validation split takes the training split's (`like`), whatever its own first image is.
    """
    from fallopt.data import default_cache_dir

    size = None if cfg.image_size is None else (cfg.image_size[0], cfg.image_size[1])
    channels = cfg.channels
    if like is not None:
        _, h, w, c = like.x.shape
        size, channels = size or (h, w), channels or c
    decoded = decode_images(
        files, base, size=size, channels=channels, resize_filter=cfg.resize_filter,
        skip_bad=cfg.skip_bad, cache_dir=default_cache_dir(), what=what,
    )  # fmt: skip
    kept = decoded.kept
    split = Split(decoded.x, labels[kept], None if groups is None else groups[kept])
    changes = [
        f"{count} {text}"
        for count, text in (
            (decoded.resized, f"resized to {decoded.x.shape[1]}x{decoded.x.shape[2]} "
             f"({cfg.resize_filter})"),
            (decoded.converted, f"converted to {decoded.x.shape[3]} channel(s)"),
            (len(decoded.skipped), "unreadable, skipped (dataset.skip_bad)"),
        )
        if count
    ]  # fmt: skip
    return split, f"{what}: {', '.join(changes)}" if changes else None


# (split name, where its files are listed, the training split's classes and images or None)
# -> (classes, the split, a note)
SplitReader = Callable[
    [str, Path, tuple[str, ...] | None, Split | None], tuple[tuple[str, ...], Split, str | None]
]


def read_splits(places: dict[str, Path], read: SplitReader, origin: Path) -> Loaded:
    """Read each split's files, training first: its classes and shape bind the others."""
    classes: tuple[str, ...] | None = None
    splits: dict[str, Split] = {}
    notes = []
    for split, place in places.items():
        classes, splits[split], note = read(split, place, classes, splits.get("train"))
        notes += [note] if note else []
    assert classes is not None
    return Loaded(
        classes, splits["train"], splits.get("test"), splits.get("val"),
        origin=str(origin.resolve()), notes=tuple(notes),
    )  # fmt: skip
