"""Data sets: each config option's loader, then the same limit and splits for all."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from fallopt.config import (
    CaucaConfig,
    DatasetConfig,
    DigitsConfig,
    HdsConfig,
    SyntheticFallsConfig,
)
from fallopt.data import cauca, digits, hds, synthetic_falls
from fallopt.data.dataset import UNIT, Dataset, InputRule, Split, limit, stratified_split, to_float

__all__ = ["UNIT", "Dataset", "InputRule", "Split", "default_cache_dir", "load_dataset", "to_float"]

log = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    """`$FALLOPT_CACHE`, else `~/.cache/fallopt`."""
    return Path(os.environ.get("FALLOPT_CACHE", Path.home() / ".cache" / "fallopt"))


def _synthetic(cfg: SyntheticFallsConfig) -> tuple[Split, Split]:
    cache = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
    sets = []
    for split, n in (("train", cfg.n_train), ("test", cfg.n_test)):
        n = min(n, cfg.limit or n)  # every prefix is balanced: generate only what is used
        if not synthetic_falls.cache_path(
            cache, n, cfg.seed, split, cfg.image_size, cfg.channels
        ).exists():
            log.info(
                "[data] generating %d synthetic_falls %s images (cached in %s)", n, split, cache
            )
        x, y = synthetic_falls.load_or_generate(
            cache, n, cfg.seed, split, cfg.image_size, cfg.channels
        )
        sets.append(Split(x, y))
    return sets[0], sets[1]


def load_dataset(cfg: DatasetConfig, val_split: float, seed: int) -> Dataset:
    """Load the configured data set and split it into train, validation and test.

    Args:
        cfg: one of the dataset schemas.
        val_split: the fraction of the train pool held out for validation (stratified).
        seed: seeds the splits and the `limit` subsample.

    Raises:
        DataError: naming the file, the problem and the expected format.
    """
    test: Split | None = None
    if isinstance(cfg, SyntheticFallsConfig):
        pool, test = _synthetic(cfg)
        names = synthetic_falls.CLASS_NAMES
    elif isinstance(cfg, CaucaConfig):
        pool, test = cauca.load(Path(cfg.train_path), Path(cfg.test_path))
        names = cauca.CLASS_NAMES
    elif isinstance(cfg, HdsConfig):
        pool, names = hds.load(Path(cfg.path)), hds.CLASS_NAMES
    elif isinstance(cfg, DigitsConfig):
        pool, names = digits.load(), digits.CLASS_NAMES
    else:
        raise TypeError(f"no loader for {type(cfg).__name__}")
    if test is None:
        pool, test = stratified_split(
            pool, cfg.test_split, seed, "train and test (dataset.test_split)"
        )
    pool, test = limit(pool, cfg.limit, seed), limit(test, cfg.limit, seed)
    train, val = stratified_split(pool, val_split, seed, "train and validation (train.val_split)")
    return Dataset(cfg.name, tuple(names), train, val, test)
