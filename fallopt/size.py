"""Honest sizes: bytes of a model file on disk, gzipped, and non-zero parameters.

Models are measured as `.keras` files saved without optimizer state (`save_model`): Adam's
moments would roughly triple the file and hide what pruning saves. A `.keras` file is a zip
whose entries are stored uncompressed, so gzip of the file sees the pruned zeros.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fallopt.backend import keras

if TYPE_CHECKING:
    import tf_keras


@dataclass(frozen=True)
class FileSize:
    """Raw and gzip-compressed (level 9, as `gzip -9`) bytes of one file."""

    path: Path
    raw_bytes: int
    gzip_bytes: int


def file_size(path: Path) -> FileSize:
    """Measure a file as it is and after real gzip compression of its bytes."""
    data = path.read_bytes()
    return FileSize(path, len(data), len(gzip.compress(data, compresslevel=9, mtime=0)))


def nonzero_params(model: tf_keras.Model) -> int:
    """Non-zero values over all weights (kernels, biases, BatchNorm statistics)."""
    return int(sum(np.count_nonzero(w) for w in model.get_weights()))


def save_model(model: tf_keras.Model, path: Path) -> Path:
    """Save architecture and weights without optimizer state, atomically."""
    clone = keras().models.clone_model(model)
    clone.set_weights(model.get_weights())
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    clone.save(tmp)
    tmp.replace(path)
    return path
