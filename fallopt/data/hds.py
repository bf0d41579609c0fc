"""The lab's Hand-drawn Shapes pickle (ellipse, rectangle, triangle; 14x14 grayscale).

Data: Francois Robert, hand-drawn-shapes-dataset, CC BY 4.0.
"""

from __future__ import annotations

from pathlib import Path

from fallopt.data import safe_pickle
from fallopt.data.dataset import Split, as_images, as_labels
from fallopt.errors import DataError

CLASS_NAMES = ("ellipse", "rectangle", "triangle")
FORMAT = (
    "expected the lab's HDS format: a pickled dict with 'train_data' (n, 14, 14) uint8 and "
    "'train_labels' (n values, 1 = ellipse, 2 = rectangle, 3 = triangle)"
)


def load(path: Path) -> Split:
    """Read and check the pickle; labels 1..3 become class indices 0..2."""
    raw = safe_pickle.load(path, FORMAT)
    if not isinstance(raw, dict):
        raise DataError(f"{path}: holds a {type(raw).__name__}, not a dict; {FORMAT}")
    missing = [k for k in ("train_data", "train_labels") if k not in raw]
    if missing:
        raise DataError(f"{path}: missing keys {missing} (found {sorted(raw)}); {FORMAT}")
    x = as_images(raw["train_data"], f"{path} key 'train_data'", FORMAT)
    y = as_labels(raw["train_labels"], len(x), (1, 2, 3), f"{path} key 'train_labels'", FORMAT)
    return Split(x, y - 1)
