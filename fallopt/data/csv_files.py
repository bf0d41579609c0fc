"""Images listed in CSV files: one row per image, `filename,label` (the face-mask course's way).

Paths are relative to the CSV's own folder. Labels may be text or integers; the classes are
their sorted values (numerically for integers), or `dataset.class_names`. Images are decoded
once into `$FALLOPT_CACHE` (`fallopt.data.images`).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from fallopt.config import EncodedImagesConfig, require
from fallopt.data.dataset import Loaded, Split
from fallopt.data.image_files import decode_set, read_splits
from fallopt.data.images import listing_digest
from fallopt.errors import DataError
from fallopt.identity import file_digest


@dataclass
class CsvConfig(EncodedImagesConfig):
    """`train_csv` (and `test_csv`, `val_csv` if the data has them; else split off).

    `path_column` and `label_column` name the columns; `group_column`, if set, the video or
    person each image comes from.
    """

    name: str = "csv"
    train_csv: str = "data/train.csv"
    test_csv: str | None = None
    val_csv: str | None = None
    path_column: str = "filename"
    label_column: str = "label"
    group_column: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("path_column", "label_column"):
            require(bool(getattr(self, key)), f"dataset.{key}", getattr(self, key), "non-empty")

    def csvs(self) -> dict[str, Path]:
        """The CSV of each split the data has."""
        named = {"train": self.train_csv, "test": self.test_csv, "val": self.val_csv}
        return {split: Path(p) for split, p in named.items() if p is not None}

    def ignored(self) -> set[str]:
        """Paths: the CSVs' content and the listed files count (`sources`)."""
        own_test = {"test_split"} if self.test_csv is not None else set()
        return super().ignored() | {"train_csv", "test_csv", "val_csv"} | own_test

    def sources(self) -> dict[str, str]:
        """Each CSV's content and its images' names, sizes and modification times."""
        found = {}
        for split, path in self.csvs().items():
            found[split] = file_digest(path)
            try:
                rows = read_rows(path, self)
                files = [path.parent / row[self.path_column] for row in rows]
                found[f"{split}_images"] = listing_digest(files, path.parent)
            except DataError:  # the loader reports it, with the row
                found[f"{split}_images"] = "unreadable"
        return found


SCHEMA = CsvConfig


def read_rows(path: Path, cfg: CsvConfig) -> list[dict[str, str]]:
    """The CSV's rows, checked to have the configured columns."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            columns = reader.fieldnames or []
    except FileNotFoundError:
        raise DataError(f"{path}: no such CSV file; check dataset.{_key(path, cfg)}") from None
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(
            f"{path}: cannot be read as a CSV file ({e}); save it as UTF-8 CSV"
        ) from None
    wanted = [c for c in (cfg.path_column, cfg.label_column, cfg.group_column) if c is not None]
    missing = [c for c in wanted if c not in columns]
    if missing:
        raise DataError(
            f"{path}: no column {missing[0]!r} (columns: {columns}); name the right one with "
            f"dataset.{_column_key(missing[0], cfg)}"
        )
    if not rows:
        raise DataError(f"{path}: lists no images; add rows '{cfg.path_column},{cfg.label_column}'")
    return rows


def _key(path: Path, cfg: CsvConfig) -> str:
    return next(f"{s}_csv" for s, p in cfg.csvs().items() if p == path)


def _column_key(column: str, cfg: CsvConfig) -> str:
    keys = {cfg.path_column: "path_column", cfg.label_column: "label_column"}
    return keys.get(column, "group_column")


def _row_error(path: Path, i: int, problem: str) -> DataError:
    return DataError(f"{path} row {i + 2}: {problem}")  # row 1 is the header


def _class_names(labels: list[str], wanted: list[str] | None) -> tuple[str, ...]:
    """The sorted distinct labels, numerically when all are integers; or those `wanted`."""
    if wanted is not None:
        return tuple(wanted)
    distinct = set(labels)
    try:
        return tuple(str(v) for v in sorted(int(v) for v in distinct))
    except ValueError:
        return tuple(sorted(distinct))


def _normal(label: str) -> str:
    """An integer label as its number ("007" and "7" are one class); text as it is."""
    try:
        return str(int(label))
    except ValueError:
        return label


def _read_split(
    cfg: CsvConfig,
    split: str,
    path: Path,
    classes: tuple[str, ...] | None,
    like: Split | None,
) -> tuple[tuple[str, ...], Split, str | None]:
    rows = read_rows(path, cfg)
    labels = []
    for i, row in enumerate(rows):
        label = (row[cfg.label_column] or "").strip()
        if not label:
            raise _row_error(path, i, f"no {cfg.label_column!r}; give every image a label")
        labels.append(_normal(label))
    if classes is None:
        classes = _class_names(labels, cfg.class_names)
    keep = [i for i, label in enumerate(labels) if label in classes]
    if cfg.class_names is None and len(keep) < len(rows):
        i = next(i for i, label in enumerate(labels) if label not in classes)
        raise _row_error(
            path, i, f"label {labels[i]!r} is not among the training classes {list(classes)}: "
            "the model cannot learn it. Add training images of it, or list the classes to use "
            "in dataset.class_names"
        )  # fmt: skip
    if not keep:
        raise DataError(f"{path}: no row has a label in dataset.class_names={list(classes)}")
    files = []
    for i in keep:
        name = (rows[i][cfg.path_column] or "").strip()
        file = path.parent / name
        if not name or not file.is_file():
            raise _row_error(
                path, i, f"{name!r} does not exist as {file} (paths are relative to the CSV's "
                "folder); fix the path or remove the row"
            )  # fmt: skip
        files.append(file)
    groups = None
    if cfg.group_column is not None:
        groups = np.array([(rows[i][cfg.group_column] or "").strip() for i in keep])
        if not all(groups):
            i = keep[int(np.argmin([bool(g) for g in groups]))]
            raise _row_error(path, i, f"no {cfg.group_column!r}; give every image a group")
    y = np.array([classes.index(labels[i]) for i in keep], np.int64)
    split_data, note = decode_set(cfg, files, y, groups, path.parent, split, like)
    left_out = len(rows) - len(keep)
    if left_out:
        note = (
            f"{note}; " if note else f"{split}: "
        ) + f"{left_out} rows of other classes left out"
    return classes, split_data, note


def load(cfg: CsvConfig) -> Loaded:
    """The train pool and, where the CSVs are given, the test and validation sets."""
    return read_splits(cfg.csvs(), partial(_read_split, cfg), Path(cfg.train_csv))
