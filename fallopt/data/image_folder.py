"""A folder of image files, one subfolder per class: `DIR/<class>/*.png|jpg|jpeg|bmp`.

The layout of Keras' `image_dataset_from_directory` and ST's model zoo. When DIR holds
`train/` and `test/` (and optionally `val/`), those are the splits. Images are decoded once
into `$FALLOPT_CACHE` (`fallopt.data.images`); later runs and sweep jobs read the cache.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from fallopt.config import EncodedImagesConfig, check_pattern, require
from fallopt.data.dataset import Loaded, Split
from fallopt.data.image_files import decode_set, read_splits
from fallopt.data.images import IMAGE_SUFFIXES, list_images, listing_digest
from fallopt.errors import DataError

SPLITS = ("train", "test", "val")
LAYOUT = (
    "expected DIR/<class>/<image> (.png, .jpg, .jpeg, .bmp), or DIR/train/<class>/... and "
    "DIR/test/<class>/... (optionally DIR/val/<class>/...)"
)


@dataclass
class ImageFolderConfig(EncodedImagesConfig):
    """`path`: the folder; `group_pattern`: where an image's group is in its path.

    The pattern is a regular expression searched in each image's path relative to its split
    folder (e.g. `fall/S1_03_0001.png`); its first group (or the whole match) names the video
    or person the image comes from.
    """

    name: str = "image_folder"
    path: str = "data/images"
    group_pattern: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.group_pattern is not None:
            check_pattern("dataset.group_pattern", self.group_pattern, "not a regular expression")
        require(bool(self.path), "dataset.path", self.path, "must name a folder")

    def ignored(self) -> set[str]:
        """The path: what is in it counts (`sources`)."""
        return super().ignored() | {"path"}

    def sources(self) -> dict[str, str]:
        """Every image's path, size and modification time: a changed file is new data.

        Not their bytes: reading a large set at every start would cost seconds, and a file
        rewritten in place changes its size or time.
        """
        root = Path(self.path)
        return {"images": listing_digest(list_images(root), root) if root.is_dir() else "missing"}


SCHEMA = ImageFolderConfig


def split_folders(root: Path) -> dict[str, Path]:
    """The split folders under `root`: train and test (and val) if present, else root."""
    if not root.is_dir():
        raise DataError(f"{root}: no such folder; {LAYOUT}")
    if (root / "train").is_dir() and (root / "test").is_dir():
        return {s: root / s for s in SPLITS if (root / s).is_dir()}
    return {"train": root}


def class_folders(folder: Path, wanted: list[str] | None) -> dict[str, Path]:
    """The class subfolders of `folder`, sorted, or those `wanted` in that order."""
    found = {
        d.name: d for d in sorted(folder.iterdir()) if d.is_dir() and not d.name.startswith(".")
    }
    if not found:
        raise DataError(f"{folder}: no class folders; {LAYOUT}")
    if wanted is None:
        return found
    missing = [name for name in wanted if name not in found]
    if missing:
        raise DataError(
            f"{folder}: no folder for classes {missing} of dataset.class_names (found "
            f"{sorted(found)}); fix the names or add the folders"
        )
    return {name: found[name] for name in wanted}


def _group_of(pattern: re.Pattern[str], relative: str, path: Path) -> str:
    match = pattern.search(relative)
    if match is None:
        raise DataError(
            f"{path}: dataset.group_pattern={pattern.pattern!r} does not match its path "
            f"{relative!r}; every image needs a group (fix the pattern or the file name)"
        )
    return match.group(1) if pattern.groups else match.group(0)


def _read_split(
    cfg: ImageFolderConfig,
    split: str,
    folder: Path,
    classes: tuple[str, ...] | None,
    like: Split | None,
) -> tuple[tuple[str, ...], Split, str | None]:
    """One split folder's images, labels and groups; the classes are the train folder's."""
    wanted = cfg.class_names if classes is None else None
    folders = class_folders(folder, wanted)
    if classes is None:
        classes = tuple(folders)
    else:  # a test or val folder: its classes must be the training data's
        unknown = [name for name in folders if name not in classes]
        if unknown and cfg.class_names is None:
            raise DataError(
                f"{folder / unknown[0]}: class {unknown[0]!r} is not among the training "
                f"classes {list(classes)}: the model cannot learn it. Add {unknown[0]}/ to the "
                "train folder, or list the classes to use in dataset.class_names"
            )
        folders = {name: d for name, d in folders.items() if name in classes}
    files: list[Path] = []
    labels: list[int] = []
    for name, directory in folders.items():
        found = list_images(directory)
        if not found:
            raise DataError(
                f"{directory}: no images ({', '.join(IMAGE_SUFFIXES)}); add some, delete the "
                "folder, or leave the class out with dataset.class_names"
            )
        files += found
        labels += [classes.index(name)] * len(found)
    groups = None
    if cfg.group_pattern is not None:
        pattern = re.compile(cfg.group_pattern)
        groups = np.array([_group_of(pattern, f.relative_to(folder).as_posix(), f) for f in files])
    split_data, note = decode_set(
        cfg, files, np.array(labels, np.int64), groups, folder, split, like
    )
    return classes, split_data, note


def load(cfg: ImageFolderConfig) -> Loaded:
    """The train pool and, when the folder has them, its own test and validation sets."""
    root = Path(cfg.path)
    return read_splits(split_folders(root), partial(_read_split, cfg), root)
