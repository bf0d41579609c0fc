"""The lab's CAUCA fall pickles: `data_train_96_96_3.pickle` and `data_test_96_96_3.pickle`.

A pickle may carry a `groups` key (one id per image: the video or subject it comes from), or
`train_groups` / `test_groups` name JSON files holding that list (as `../shared/data/gmdcsa24`
does), so that validation keeps each video whole.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fallopt.config import ImageFilesConfig
from fallopt.data import safe_pickle
from fallopt.data.dataset import Loaded, Split, as_groups, as_images, as_labels, numeric_array
from fallopt.errors import DataError
from fallopt.identity import file_digest

CLASS_NAMES = ("no_fall", "fall")
FORMAT = (
    "expected the lab's CAUCA format: a pickled dict with 'data' (n images, height x width x "
    "channels, uint8), 'labels' (n values, 0 = no fall, 1 = fall), 'width', 'height', "
    "'channels', and optionally 'groups' (n video or subject ids)"
)
KEYS = ("data", "labels", "width", "height", "channels")


@dataclass
class CaucaConfig(ImageFilesConfig):
    """The lab's CAUCA pickles; the test pickle is the held-out test set.

    `train_groups` / `test_groups`: JSON files with one group id per image of each pickle.
    """

    name: str = "cauca"
    train_path: str = "data/cauca/data_train_96_96_3.pickle"
    test_path: str = "data/cauca/data_test_96_96_3.pickle"
    train_groups: str | None = None
    test_groups: str | None = None

    def ignored(self) -> set[str]:
        """Paths: the contents count (`sources`), so the same files moved are the same run."""
        paths = {"train_path", "test_path", "train_groups", "test_groups"}
        return super().ignored() | paths | {"test_split"}  # the test pickle is the test set

    def sources(self) -> dict[str, str]:
        """The files' contents: a new file at the same path is new data."""
        files = {"train": self.train_path, "test": self.test_path,
                 "train_groups": self.train_groups, "test_groups": self.test_groups}  # fmt: skip
        return {k: file_digest(v) for k, v in files.items() if v is not None}


SCHEMA = CaucaConfig


def _groups_file(path: Path, n: int) -> np.ndarray:
    try:
        groups = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(
            f"{path}: cannot be read as a JSON list of group ids ({e}); give one video or "
            "subject id per image, in the order of the pickle's images"
        ) from None
    return as_groups(groups, n, str(path))


def load_file(path: Path, groups_path: Path | None = None) -> Split:
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
    if groups_path is not None:
        groups = _groups_file(groups_path, len(x))
    elif "groups" in raw:
        groups = as_groups(raw["groups"], len(x), f"{path} key 'groups'")
    else:
        groups = None
    return Split(x, y, groups)


def load(cfg: CaucaConfig) -> Loaded:
    """The train pool and the held-out test set; both must have the same image shape."""
    train_path, test_path = Path(cfg.train_path), Path(cfg.test_path)
    train = load_file(train_path, cfg.train_groups and Path(cfg.train_groups))
    test = load_file(test_path, cfg.test_groups and Path(cfg.test_groups))
    if train.x.shape[1:] != test.x.shape[1:] and cfg.image_size is None:
        raise DataError(
            f"{test_path}: images are {test.x.shape[1:]} but {train_path} has "
            f"{train.x.shape[1:]}; use the train and test pickles of one size, or resize both "
            "(dataset.image_size=[height,width])"
        )
    return Loaded(CLASS_NAMES, train, test, origin=str(train_path.resolve().parent))
