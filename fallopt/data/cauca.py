"""The lab's CAUCA fall pickles: `data_train_96_96_3.pickle` and `data_test_96_96_3.pickle`."""

from __future__ import annotations

from pathlib import Path

from fallopt.data import safe_pickle
from fallopt.data.dataset import Split, as_images, as_labels, numeric_array
from fallopt.errors import DataError

CLASS_NAMES = ("no_fall", "fall")
FORMAT = (
    "expected the lab's CAUCA format: a pickled dict with 'data' (n images, height x width x "
    "channels, uint8), 'labels' (n values, 0 = no fall, 1 = fall), 'width', 'height', "
    "'channels'"
)
KEYS = ("data", "labels", "width", "height", "channels")


def load_file(path: Path) -> Split:
    """Read and check one CAUCA pickle; flat rows are reshaped with its width/height/channels."""
    raw = safe_pickle.load(path, FORMAT)
    if not isinstance(raw, dict):
        raise DataError(f"{path}: holds a {type(raw).__name__}, not a dict; {FORMAT}")
    missing = [k for k in KEYS if k not in raw]
    if missing:
        raise DataError(f"{path}: missing keys {missing} (found {sorted(raw)}); {FORMAT}")
    try:
        h, w, c = (int(raw[k]) for k in ("height", "width", "channels"))
    except (TypeError, ValueError):
        raise DataError(
            f"{path}: 'height', 'width', 'channels' must be integers; {FORMAT}"
        ) from None
    try:
        data = numeric_array(raw["data"])
    except (ValueError, TypeError) as e:
        raise DataError(f"{path} key 'data': cannot be read as numbers ({e}); {FORMAT}") from None
    if data.ndim == 2 and data.shape[1] == h * w * c:  # stored as flat rows
        data = data.reshape(-1, h, w, c)
    x = as_images(data, f"{path} key 'data'", FORMAT)
    if x.shape[1:] != (h, w, c):
        raise DataError(
            f"{path}: images are {x.shape[1:]} but the file says height={h}, width={w}, "
            f"channels={c}; {FORMAT}"
        )
    y = as_labels(raw["labels"], len(x), (0, 1), f"{path} key 'labels'", FORMAT)
    return Split(x, y)


def load(train_path: Path, test_path: Path) -> tuple[Split, Split]:
    """The train pool and the held-out test set; both must have the same image shape."""
    train, test = load_file(train_path), load_file(test_path)
    if train.x.shape[1:] != test.x.shape[1:]:
        raise DataError(
            f"{test_path}: images are {test.x.shape[1:]} but {train_path} has "
            f"{train.x.shape[1:]}; use the train and test pickles of one size"
        )
    return train, test
