"""Where a run's images come from: one module per data source, found by name.

A source is a module here that defines `SCHEMA`, its config dataclass (a `DatasetConfig`),
and `load(cfg) -> Loaded`: its class names, its train pool and, when its files have them,
its own test and validation sets (a source without a test set needs `test_split` in its
schema). Its YAML presets in `fallopt/conf/dataset/` extend `/schema/dataset/<module>`.
Adding a data set is that module plus a YAML file. `load_dataset` then does for every
source what is the same: shapes, the event class, limits and the splits.
"""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path
from types import ModuleType

from fallopt.config import DatasetConfig, ImageFilesConfig
from fallopt.data.dataset import (
    UNIT,
    Dataset,
    InputRule,
    Loaded,
    Split,
    check_disjoint,
    hold_out,
    limit,
    to_float,
)
from fallopt.errors import DataError
from fallopt.registry import discover, owner

__all__ = [
    "UNIT", "Dataset", "InputRule", "Loaded", "Split", "default_cache_dir", "load_dataset",
    "schemas", "to_float",
]  # fmt: skip


def default_cache_dir() -> Path:
    """`$FALLOPT_CACHE`, else `~/.cache/fallopt`."""
    return Path(os.environ.get("FALLOPT_CACHE", Path.home() / ".cache" / "fallopt"))


@cache
def sources() -> dict[str, ModuleType]:
    """Every data source module, by name."""
    return discover(__name__, __path__, "load")


def schemas() -> dict[str, type[DatasetConfig]]:
    """The config schema of every source, by source name."""
    return {name: module.SCHEMA for name, module in sources().items()}


def positive_index(cfg: DatasetConfig, class_names: tuple[str, ...]) -> int | None:
    """The event class: `dataset.positive_class`, else `fall` where there is one."""
    if cfg.positive_class is None:
        return class_names.index("fall") if "fall" in class_names else None
    if cfg.positive_class not in class_names:
        raise DataError(
            f"dataset.positive_class={cfg.positive_class!r} is not a class of {cfg.name}; "
            f"choose one of {list(class_names)}"
        )
    return class_names.index(cfg.positive_class)


def _check_test_classes(pool: Split, test: Split, names: tuple[str, ...]) -> None:
    lacking = sorted(set(test.y.tolist()) - set(pool.y.tolist()))
    if lacking:
        raise DataError(
            f"the test set has class {names[lacking[0]]!r}, which the training data lacks: the "
            "model cannot learn it. Add training images of it, or leave it out "
            "(dataset.class_names)"
        )


def load_dataset(cfg: DatasetConfig, val_split: float, seed: int) -> Dataset:
    """Load the configured data set and split it into train, validation and test.

    Args:
        cfg: one of the dataset schemas.
        val_split: the fraction of the train pool held out for validation, unless the
            source has its own validation set.
        seed: seeds the splits and the `limit` subsample.

    Raises:
        DataError: naming the file, the problem and the fix.
    """
    loaded: Loaded = owner(cfg, sources()).load(cfg)
    pool, test, val, notes = loaded.pool, loaded.test, loaded.val, list(loaded.notes)
    if isinstance(cfg, ImageFilesConfig):
        from fallopt.data.resize import conform

        shaped = []
        for split in (pool, test, val):
            if split is not None:
                split, note = conform(split, cfg.image_size, cfg.channels, cfg.resize_filter)
                notes += [note] if note else []
            shaped.append(split)
        pool, test, val = shaped
    by_group = cfg.split_by_group
    if test is None:
        pool, test, how = hold_out(
            pool, cfg.test_split, seed, "test (dataset.test_split)", by_group
        )
        notes.append(how)
    elif by_group:
        check_disjoint(pool, test, f"{cfg.name} test set")
    _check_test_classes(pool, test, loaded.class_names)
    pool, test = limit(pool, cfg.limit, seed), limit(test, cfg.limit, seed)
    if val is None:
        train, val, how = hold_out(pool, val_split, seed, "validation (train.val_split)", by_group)
        notes.append(how)
    else:
        train, val = pool, limit(val, cfg.limit, seed)
        notes.append(f"validation: the files' own, {len(val)} images")
    return Dataset(
        cfg.name, loaded.class_names, train, val, test,
        positive=positive_index(cfg, loaded.class_names), origin=loaded.origin, notes=tuple(notes),
    )  # fmt: skip
