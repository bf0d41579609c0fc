"""Shared fixtures: composed configs with tiny overrides, a private tracking store and cache."""

from __future__ import annotations

import os
import pickle
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from mlflow.entities import Run
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig

import fallopt  # noqa: F401  (sets TF_USE_LEGACY_KERAS before any test imports TensorFlow)
import fallopt.config
from fallopt.data import Split

fallopt.config.register_configs()  # the schemas conf/ extends

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))  # local_cluster: the test and demo cluster pieces
CONF = REPO / "fallopt" / "conf"
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


def bright_squares(n: int, train: int, size: int = 12) -> tuple[Split, Split]:
    """n learnable grey images (a bright square means class 1): the first `train` for
    training, the rest for validation."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(n, size, size, 1), dtype=np.uint8)
    y = np.arange(n) % 2
    x[y == 1, size // 4 : size - size // 4, size // 4 : size - size // 4] = 255
    return Split(x[:train], y[:train]), Split(x[train:], y[train:])


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch) -> None:
    """Each test its own data and stage cache: no test reuses another's baseline."""
    monkeypatch.setenv("FALLOPT_CACHE", str(tmp_path_factory.mktemp("fallopt-cache")))


@pytest.fixture(autouse=True)
def _fresh_process() -> None:
    """What a process keeps for its next jobs (data, checks, sizes, models, figures, the
    store's client) is not kept for the next test. Modules not imported yet stay so."""
    task, size = sys.modules.get("fallopt.task"), sys.modules.get("fallopt.size")
    plots, track = sys.modules.get("fallopt.plots"), sys.modules.get("fallopt.track")
    for memo in (task and task._shared, task and task._data, size and size._loaded,
                 plots and plots._drawn, track and track._connected):  # fmt: skip
        if memo:
            memo.clear()
    if size:
        size._measure.cache_clear()
    if track:
        track.client.cache_clear()


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


@dataclass
class Sweep:
    """A finished `python -m fallopt.run -m` subprocess and what it tracked."""

    proc: subprocess.CompletedProcess | None
    client: MlflowClient
    experiment_id: str
    parent: Run | None
    children: list[Run]

    @property
    def output(self) -> str:
        """stdout and stderr together (Hydra logs to both)."""
        return self.proc.stdout + self.proc.stderr

    def runs(self, status: str | None = None) -> list[Run]:
        """Every fallopt run (not parents or stages) in the experiment, optionally by status."""
        runs = self.client.search_runs([self.experiment_id], max_results=1000)
        runs = [r for r in runs if "fallopt.config_hash" in r.data.tags]
        return [r for r in runs if status is None or r.info.status == status]


def fallopt_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 600
) -> subprocess.CompletedProcess:
    """`python -m fallopt.run ARGS` from the checkout, output captured, `env` added."""
    return subprocess.run(
        [sys.executable, "-m", "fallopt.run", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def multirun(
    tmp_path: Path,
    *overrides: str,
    uri: str | None = None,
    name: str = "sweep",
    returncode: int = 0,
    env: dict[str, str] | None = None,
    tiny: bool = True,
) -> Sweep:
    """Run `python -m fallopt.run -m` on tiny data into `tmp_path/name`; check its exit code.

    The sweep's parent run is found by its directory, so several sweeps may share a store.
    `tiny=False` leaves out TINY's data and architecture overrides (for a model file).
    """
    uri = uri or f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    sweep_dir = tmp_path / name
    args = [
        *overrides,
        *(TINY if tiny else []),
        f"tracking.uri={uri}",
        f"hydra.sweep.dir={sweep_dir}",
    ]
    proc = fallopt_cli("-m", *args, env={"FALLOPT_CACHE": str(tmp_path / "cache"), **(env or {})})
    assert proc.returncode == returncode, (proc.stdout + proc.stderr)[-4000:]
    return tracked(uri, sweep_dir, proc)


def tracked(uri: str, sweep_dir: Path, proc: subprocess.CompletedProcess | None = None) -> Sweep:
    """What the sweep into `sweep_dir` left in the store at `uri`."""
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("fallopt")
    if experiment is None:
        return Sweep(proc, client, "", None, [])
    parents = client.search_runs(
        [experiment.experiment_id], f"tags.`fallopt.sweep_dir` = '{sweep_dir}'"
    )
    parent = parents[0] if parents else None
    children = []
    if parent is not None:
        children = client.search_runs(
            [experiment.experiment_id],
            f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
            max_results=1000,
        )
    return Sweep(proc, client, experiment.experiment_id, parent, children)


@contextmanager
def mlflow_service(command: list[str], log: Path) -> Iterator[str]:
    """`mlflow <command>` (ui or server) on a free loopback port; yields its URL once healthy."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    with log.open("w") as err:
        args = [
            sys.executable,
            "-m",
            "mlflow",
            *command,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ]
        server = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=err)
        try:
            deadline = time.time() + 120
            while True:
                try:
                    urllib.request.urlopen(f"{url}/health", timeout=2)
                    break
                except OSError:
                    if time.time() > deadline or server.poll() is not None:
                        pytest.fail(f"mlflow {command[0]} did not start: {log.read_text()[-2000:]}")
                    time.sleep(0.5)
            yield url
        finally:
            server.terminate()
            server.wait(30)


POSTGRES_ENV = "FALLOPT_TEST_POSTGRES"  # e.g. postgresql://fallopt:fallopt@127.0.0.1:5432/postgres


@pytest.fixture
def mlflow_server(tmp_path: Path) -> Iterator[str]:
    """`mlflow server` on a fresh PostgreSQL database, artifacts served; yields its URI."""
    import local_cluster

    admin = os.environ.get(POSTGRES_ENV)
    if not admin:
        if os.environ.get("CI"):
            pytest.fail(f"{POSTGRES_ENV} is not set: .ci/run starts PostgreSQL and sets it")
        pytest.skip(f"set {POSTGRES_ENV} to a PostgreSQL admin URI (see README, Scaling up)")
    with (
        local_cluster.postgres_database(admin) as backend,
        local_cluster.mlflow_server(backend, tmp_path / "server") as uri,
    ):
        yield uri


# A prune x quant grid: 4 jobs sharing 1 baseline and 2 pruned models.
GRID = ["prune.sparsity=0.5,0.8", "quant=dynamic,int8", "quant.representative_samples=20"]


@pytest.fixture(scope="session")
def grid_sweep(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Sweep]:
    """GRID in two parallel jobs (joblib), run once and shared by the sweep and report tests."""
    tmp = tmp_path_factory.mktemp("grid")
    return tmp, multirun(tmp, *GRID, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2")


def front_by_hand(runs: list[Run], accuracy: str, size: str) -> set[str]:
    """Pareto front by the definition: no other run at least as accurate and at most as
    large, and better in one. Independent of fallopt.pareto, which it checks."""
    points = {r.info.run_id: (r.data.metrics[accuracy], r.data.metrics[size]) for r in runs}
    return {
        run
        for run, (acc, sz) in points.items()
        if not any(a >= acc and s <= sz and (a > acc or s < sz) for a, s in points.values())
    }
