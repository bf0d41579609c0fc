"""The lab's Hand-drawn Shapes pickle (ellipse, rectangle, triangle; 14x14 grayscale).

Data: Francois Robert, hand-drawn-shapes-dataset, CC BY 4.0. The full set's pickle names the
drawer of every image (`users`), a group for a by-person split.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fallopt.config import ImageFilesConfig
from fallopt.data import safe_pickle
from fallopt.data.dataset import Loaded, Split, as_groups, as_images, as_labels
from fallopt.errors import DataError
from fallopt.identity import file_digest

CLASS_NAMES = ("ellipse", "rectangle", "triangle")
FORMAT = (
    "expected the lab's HDS format: a pickled dict with 'train_data' (n, 14, 14) uint8 and "
    "'train_labels' (n values, 1 = ellipse, 2 = rectangle, 3 = triangle), optionally "
    "'groups' or 'users' (n drawer ids)"
)


@dataclass
class HdsConfig(ImageFilesConfig):
    """The lab's hand-drawn shapes pickle; the test set is a stratified split of it."""

    name: str = "hds"
    path: str = "../shared/data/hds/hds_data.pickle"

    def ignored(self) -> set[str]:
        """The path: the content counts (`sources`)."""
        return super().ignored() | {"path"}

    def sources(self) -> dict[str, str]:
        """The pickle's content."""
        return {"data": file_digest(self.path)}


SCHEMA = HdsConfig


def load_file(path: Path) -> Split:
    """Read and check the pickle; labels 1..3 become class indices 0..2."""
    raw = safe_pickle.load(path, FORMAT)
    if not isinstance(raw, dict):
        raise DataError(f"{path}: holds a {type(raw).__name__}, not a dict; {FORMAT}")
    missing = [k for k in ("train_data", "train_labels") if k not in raw]
    if missing:
        raise DataError(f"{path}: missing keys {missing} (found {sorted(raw)}); {FORMAT}")
    x = as_images(raw["train_data"], f"{path} key 'train_data'", FORMAT)
    y = as_labels(raw["train_labels"], len(x), (1, 2, 3), f"{path} key 'train_labels'", FORMAT)
    key = next((k for k in ("groups", "users") if k in raw), None)
    groups = None if key is None else as_groups(raw[key], len(x), f"{path} key {key!r}")
    return Split(x, y - 1, groups)


def load(cfg: HdsConfig) -> Loaded:
    """The whole pickle as the train pool: the test set is split off it."""
    path = Path(cfg.path)
    return Loaded(CLASS_NAMES, load_file(path), origin=str(path.resolve()))
