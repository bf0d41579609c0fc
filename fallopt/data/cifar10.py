"""CIFAR-10's python batches (`cifar-10-batches-py`: data_batch_1..5, test_batch, batches.meta).

Read through the restricted unpickler: the batches are pickles, and a downloaded pickle must
not run code. Get them once from https://www.cs.toronto.edu/~kriz/cifar.html
(cifar-10-python.tar.gz, extracted); fallopt downloads nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fallopt.config import ImageFilesConfig
from fallopt.data import safe_pickle
from fallopt.data.dataset import Loaded, Split, as_labels
from fallopt.errors import DataError
from fallopt.identity import file_digest

TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
META_FILE = "batches.meta"
SIDE = 32
FORMAT = (
    "expected CIFAR-10's python version: pickled dicts with 'data' (n, 3072) uint8, rows of "
    "1,024 red, then green, then blue pixels of a 32x32 image, and 'labels' (n values 0..9); "
    "batches.meta has 'label_names'. Get cifar-10-python.tar.gz from "
    "https://www.cs.toronto.edu/~kriz/cifar.html and extract it"
)


@dataclass
class Cifar10Config(ImageFilesConfig):
    """`path`: the extracted `cifar-10-batches-py` folder."""

    name: str = "cifar10"
    path: str = "data/cifar-10-batches-py"

    def ignored(self) -> set[str]:
        """The path: the batches' content counts (`sources`); the test batch is the test set."""
        return super().ignored() | {"path", "test_split"}

    def sources(self) -> dict[str, str]:
        """Every batch file's content."""
        root = Path(self.path)
        return {name: file_digest(root / name) for name in (*TRAIN_FILES, TEST_FILE, META_FILE)}


SCHEMA = Cifar10Config


def _read(path: Path) -> dict[str, Any]:
    """A batch as a dict with text keys (Python 2 pickled them as str, Python 3 as bytes)."""
    if not path.is_file():
        raise DataError(f"{path}: missing; {FORMAT}")
    raw = safe_pickle.load(path, FORMAT)
    if not isinstance(raw, dict):
        raise DataError(f"{path}: holds a {type(raw).__name__}, not a dict; {FORMAT}")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in raw.items()}


def read_batch(path: Path, n_classes: int) -> Split:
    """One batch's images (n, 32, 32, 3) uint8 and labels."""
    raw = _read(path)
    missing = [k for k in ("data", "labels") if k not in raw]
    if missing:
        raise DataError(f"{path}: missing keys {missing} (found {sorted(raw)}); {FORMAT}")
    data = raw["data"]
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2
            and data.shape[1] == 3 * SIDE * SIDE):  # fmt: skip
        shape = getattr(data, "shape", type(data).__name__)
        raise DataError(f"{path} key 'data': {shape} is not (n, 3072) uint8; {FORMAT}")
    x = data.reshape(-1, 3, SIDE, SIDE).transpose(0, 2, 3, 1)  # planes to pixels
    y = as_labels(raw["labels"], len(x), range(n_classes), f"{path} key 'labels'", FORMAT)
    return Split(np.ascontiguousarray(x), y)


def load(cfg: Cifar10Config) -> Loaded:
    """The five training batches as the pool and the test batch as the test set."""
    root = Path(cfg.path)
    names = _read(root / META_FILE).get("label_names")
    if not (isinstance(names, list) and len(names) >= 2):
        raise DataError(f"{root / META_FILE}: no list 'label_names'; {FORMAT}")
    names = tuple(n.decode("latin1") if isinstance(n, bytes) else str(n) for n in names)
    batches = [read_batch(root / name, len(names)) for name in TRAIN_FILES]
    pool = Split(np.concatenate([b.x for b in batches]), np.concatenate([b.y for b in batches]))
    return Loaded(names, pool, read_batch(root / TEST_FILE, len(names)), origin=str(root.resolve()))
