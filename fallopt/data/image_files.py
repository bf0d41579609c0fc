"""What the image file sources (`image_folder`, `csv`) share: listed files decoded as a split."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fallopt.config import EncodedImagesConfig
from fallopt.data.dataset import Split
from fallopt.data.images import decode_images


def decode_set(
    cfg: EncodedImagesConfig,
    files: Sequence[Path],
    labels: np.ndarray,
    groups: np.ndarray | None,
    base: Path,
    what: str,
) -> tuple[Split, str | None]:
    """Decode `files` (cached) as a split with their labels and groups; note what changed."""
    from fallopt.data import default_cache_dir

    size = None if cfg.image_size is None else (cfg.image_size[0], cfg.image_size[1])
    decoded = decode_images(
        files, base, size=size, channels=cfg.channels, resize_filter=cfg.resize_filter,
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
