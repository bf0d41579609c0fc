"""Honest sizes: bytes of a model file on disk, gzipped, and non-zero parameters.

Models are measured as `.keras` files saved without optimizer state (`save_model`): Adam's
moments would roughly triple the file and hide what pruning saves. A `.keras` file is a zip
whose entries are stored uncompressed, so gzip of the file sees the pruned zeros.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fallopt.backend import keras
from fallopt.memo import Memo

if TYPE_CHECKING:
    import tf_keras


@dataclass(frozen=True)
class FileSize:
    """Raw and gzip-compressed (level 9, as `gzip -9`) bytes of one file."""

    path: Path
    raw_bytes: int
    gzip_bytes: int


def file_size(path: Path) -> FileSize:
    """Measure a file as it is and after real gzip compression of its bytes.

    Remembered while the file is unchanged: every run of a sweep measures the same baseline
    (and a quantization grid the same pruned model), and gzip -9 of the lab's float32 .tflite
    file took 0.5 s a time.
    """
    stat = path.stat()
    raw, gzipped = _measure(path.resolve(), stat.st_mtime_ns, stat.st_size)
    return FileSize(path, raw, gzipped)


class Measuring:
    """`file_size(path)`, computed meanwhile in a thread of its own: `.result()` waits for it.

    zlib compresses without Python's lock, and the thread runs at the lowest priority, so the
    gzip takes a core only when TensorFlow leaves one idle (the TFLite converter, model
    loading and TFLM use one core): it does not slow what a run times (the LiteRT
    evaluation's throughput, the latency), and the run waits only for what is left of it.
    """

    def __init__(self, path: Path) -> None:
        self._size: FileSize | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._measure, args=(path,), daemon=True)
        self._thread.start()

    def _measure(self, path: Path) -> None:
        with contextlib.suppress(OSError, AttributeError):  # Linux: the nice of this thread
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        try:
            self._size = file_size(path)
        except BaseException as e:  # raised where the result is asked for
            self._error = e

    def result(self) -> FileSize:
        """The sizes, once measured; the measurement's error, if it failed."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._size is not None
        return self._size


@functools.lru_cache(maxsize=64)
def _measure(path: Path, mtime_ns: int, size: int) -> tuple[int, int]:
    data = path.read_bytes()
    return len(data), len(gzip.compress(data, compresslevel=9, mtime=0))


def nonzero_params(model: tf_keras.Model) -> int:
    """Non-zero values over all weights (kernels, biases, BatchNorm statistics)."""
    return int(sum(np.count_nonzero(w) for w in model.get_weights()))


def load_saved(path: Path) -> tf_keras.Model:
    """A model file saved by `save_model`, loaded once per process while it is unchanged.

    Loading took 0.15 to 0.3 s a time. The stage that saves a model loads it back to check
    it, and every run of a quantization grid then evaluates and converts that same model:
    they share the one object (none of them changes it). Remembered by the file's identity,
    not its name, so the entry renamed into the stage cache is the same file.
    """
    stat = path.stat()
    key = (stat.st_dev, stat.st_ino, stat.st_mtime_ns, stat.st_size)
    return _loaded.get(key, lambda: keras().models.load_model(path, compile=False))


_loaded: Memo[tuple[int, int, int, int], Any] = Memo(4)


def save_model(model: tf_keras.Model, path: Path) -> Path:
    """Save architecture and weights without optimizer state, atomically.

    A model with an optimizer is saved through a copy without one (the `.keras` format has
    no switch to leave it out); one without (a stripped or rebuilt model) as it is.
    """
    if getattr(model, "optimizer", None) is not None:
        clone = keras().models.clone_model(model)
        clone.set_weights(model.get_weights())
        model = clone
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    model.save(tmp)
    tmp.replace(path)
    return path
