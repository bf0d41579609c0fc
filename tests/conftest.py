"""Shared fixtures: composed configs with tiny overrides, a private tracking store and cache."""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

import fallopt  # noqa: F401  (sets TF_USE_LEGACY_KERAS before any test imports TensorFlow)
import fallopt.config  # noqa: F401  (registers the schemas conf/ extends)

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
SHARED = Path(os.environ.get("FALLOPT_SHARED", REPO.parent / "shared"))
HDS_PICKLE = SHARED / "data" / "hds" / "hds_data.pickle"

# Small enough for seconds per run, large enough for every class in every split.
TINY = [
    "dataset.image_size=24",
    "dataset.n_train=60",
    "dataset.n_test=20",
    "model.filters=[4,8]",
    "model.kernel_size=3",
    "model.dense_units=[8]",
    "train.epochs=1",
    "train.batch_size=16",
    "prune.fine_tune_epochs=1",
]


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch) -> None:
    """Each test its own data and stage cache: no test reuses another's baseline."""
    monkeypatch.setenv("FALLOPT_CACHE", str(tmp_path_factory.mktemp("fallopt-cache")))


@pytest.fixture
def compose_cfg() -> Callable[..., DictConfig]:
    """Compose conf/ as `python -m fallopt.run` would, with overrides."""

    def _compose(*overrides: str) -> DictConfig:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            return compose("config", overrides=list(overrides))

    return _compose


@pytest.fixture
def tracking_uri(tmp_path: Path) -> str:
    """A fresh SQLite tracking store for one test."""
    return f"sqlite:///{tmp_path}/mlruns/mlflow.db"


@pytest.fixture
def hds_pickle() -> Path:
    if not HDS_PICKLE.is_file():
        pytest.skip(f"real HDS data not found at {HDS_PICKLE} (set FALLOPT_SHARED)")
    return HDS_PICKLE


def write_pickle(path: Path, obj: object) -> Path:
    with path.open("wb") as f:
        pickle.dump(obj, f)
    return path


def cauca_dict(n: int = 40, size: int = 16, seed: int = 0, **changes: object) -> dict:
    """A small pickle payload in the lab's CAUCA format (labels as a Python list, as theirs)."""
    rng = np.random.default_rng(seed)
    payload = {
        "data": rng.integers(0, 256, size=(n, size, size, 3), dtype=np.uint8),
        "labels": [i % 2 for i in range(n)],
        "width": size,
        "height": size,
        "channels": 3,
    }
    payload.update(changes)
    return payload
