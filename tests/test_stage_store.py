"""The stage store shared through MLflow: one builder in the whole cluster, the others wait
and fetch; a builder that dies (mid-training or mid-upload) is taken over; nothing partial is
ever fetched. Each "machine" is a process with a cache directory of its own."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from fallopt import track
from fallopt.cache import BUILT, FETCHED, StageCache
from fallopt.config import TrackingConfig
from fallopt.stage_store import STAGE_TAG, MlflowStageStore

from .conftest import REPO

# One machine: its own cache, the shared store; the build takes `seconds` and is counted in
# `builds` (one line per build, from any process). Prints where the entry came from.
MACHINE = """
import sys, time
from pathlib import Path
from fallopt.cache import StageCache
from fallopt.config import TrackingConfig
from fallopt.stage_store import MlflowStageStore

uri, root, builds, seconds = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), float(sys.argv[4])

def build(out):
    with builds.open("a") as f:
        f.write(f"{root.name}\\n")
    time.sleep(seconds)
    (out / "model.keras").write_bytes(b"weights" * 1000)
    (out / "float32.tflite").write_bytes(b"TFL3" * 500)
    return {"history": {"accuracy": [0.5]}}

store = MlflowStageStore(TrackingConfig(uri=uri, share_stages=True))
entry, _ = StageCache(root, store).get_or_build("baseline", "k", build)
print(entry.origin, (entry.path / "model.keras").stat().st_size)
"""


def _machines(n: int, tmp_path: Path, uri: str, seconds: float) -> list[subprocess.Popen]:
    return [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                MACHINE,
                uri,
                str(tmp_path / f"machine{i}"),
                str(tmp_path / "builds.txt"),
                str(seconds),
            ],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for i in range(n)
    ]


def check_one_builder(tmp_path: Path, uri: str, n: int = 4) -> None:
    """`n` machines at once: one builds, the rest fetch the same files; one entry published."""
    tmp_path.mkdir(exist_ok=True)
    procs = _machines(n, tmp_path, uri, seconds=4)
    outputs = []
    for proc in procs:
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err[-3000:]
        outputs.append(out.splitlines()[-1].split())  # last: MLflow prints its run links
    origins = sorted(origin for origin, _ in outputs)
    assert origins == [BUILT] + [FETCHED] * (n - 1)
    assert {size for _, size in outputs} == {"7000"}
    assert len((tmp_path / "builds.txt").read_text().split()) == 1
    client = MlflowClient(uri)
    stages = client.get_experiment_by_name("fallopt.stages").experiment_id
    runs = client.search_runs([stages], f"tags.`{STAGE_TAG}` = 'baseline-k'")
    assert [r.info.status for r in runs] == ["FINISHED"]  # losing claims left nothing behind


def test_machines_building_the_same_stage_at_once_train_it_once(tmp_path):
    check_one_builder(tmp_path, f"sqlite:///{tmp_path}/mlruns/mlflow.db")


def _build(out: Path) -> dict:
    (out / "model.keras").write_bytes(b"w" * 10)
    return {}


def test_a_builder_killed_mid_upload_is_taken_over_and_its_files_never_fetched(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    # The builder uploads one file of its entry, then its machine dies (SIGKILL).
    dying = MACHINE.replace(
        "store = MlflowStageStore",
        "import os, signal\n"
        "from mlflow.tracking import MlflowClient\n"
        "def upload_then_die(self, run_id, local_dir, artifact_path=None):\n"
        "    first = sorted(Path(local_dir).iterdir())[0]\n"
        "    self.log_artifact(run_id, str(first), artifact_path)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "MlflowClient.log_artifacts = upload_then_die\n"
        "store = MlflowStageStore",
    )
    proc = subprocess.run(
        [sys.executable, "-c", dying, uri, str(tmp_path / "a"), str(tmp_path / "builds.txt"), "0"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == -9
    client = MlflowClient(uri)
    stages = client.get_experiment_by_name("fallopt.stages").experiment_id
    (dead,) = client.search_runs([stages])
    assert dead.info.status == "RUNNING"
    assert [a.path for a in client.list_artifacts(dead.info.run_id, "entry")] == [
        "entry/float32.tflite"
    ]  # half the entry is up

    tracking = TrackingConfig(uri=uri, share_stages=True)
    entry, reused = StageCache(tmp_path / "b", MlflowStageStore(tracking)).get_or_build(
        "baseline", "k", _build
    )
    assert (entry.origin, reused) == (BUILT, False)  # rebuilt, not the half upload
    assert (entry.path / "model.keras").read_bytes() == b"w" * 10
    dead = client.get_run(dead.info.run_id)
    assert dead.info.status == "KILLED"
    assert dead.data.tags["fallopt.error"] == "its process died (killed)"


def test_a_failed_build_releases_its_claim_for_the_next_worker(tmp_path):
    tracking = TrackingConfig(uri=f"sqlite:///{tmp_path}/mlruns/mlflow.db", share_stages=True)

    def broken(out: Path) -> dict:
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError):
        StageCache(tmp_path / "a", MlflowStageStore(tracking)).get_or_build("pruned", "k", broken)
    start = time.monotonic()
    entry, _ = StageCache(tmp_path / "b", MlflowStageStore(tracking)).get_or_build(
        "pruned", "k", _build
    )
    assert entry.origin == BUILT and time.monotonic() - start < 20  # not waiting on it
    client = MlflowClient(tracking.uri)
    stages = client.get_experiment_by_name("fallopt.stages").experiment_id
    failed = client.search_runs([stages], "attributes.status = 'FAILED'")
    assert [r.data.tags["fallopt.error"] for r in failed] == ["RuntimeError: out of memory"]


def test_a_claim_on_another_host_is_waited_for_while_it_beats_and_taken_over_once_silent(
    tmp_path,
):
    tracking = TrackingConfig(uri=f"sqlite:///{tmp_path}/mlruns/mlflow.db", share_stages=True)
    store = MlflowStageStore(tracking)
    client = MlflowClient(tracking.uri)
    stages = client.get_experiment_by_name("fallopt.stages").experiment_id
    elsewhere = {"fallopt.host": "gpu-node-7", "fallopt.pid": "4242", STAGE_TAG: "baseline-k"}
    beating = client.create_run(
        stages, tags={**elsewhere, track.HEARTBEAT_TAG: f"{time.time():.0f}"}
    ).info.run_id
    assert store.claim("baseline-k") == "pid 4242 on gpu-node-7"
    assert client.get_run(beating).info.status == "RUNNING"
    silent = time.time() - track.STALE_SECONDS - 30
    client.set_tag(beating, track.HEARTBEAT_TAG, f"{silent:.0f}")
    claim = store.claim("baseline-k")
    assert not isinstance(claim, str)
    claim.release("test over")
    assert client.get_run(beating).info.status == "KILLED"
    assert "no heartbeat for" in client.get_run(beating).data.tags["fallopt.error"]


def test_a_published_entry_that_fails_its_checksums_is_retired_and_built_again(tmp_path):
    tracking = TrackingConfig(uri=f"sqlite:///{tmp_path}/mlruns/mlflow.db", share_stages=True)
    StageCache(tmp_path / "a", MlflowStageStore(tracking)).get_or_build("pruned", "k", _build)
    client = MlflowClient(tracking.uri)
    stages = client.get_experiment_by_name("fallopt.stages").experiment_id
    (published,) = client.search_runs([stages])
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.keras").write_bytes(b"x" * 10)  # same size, other bytes: fails its checksum
    client.log_artifact(published.info.run_id, str(bad / "model.keras"), "entry")
    start = time.monotonic()
    entry, _ = StageCache(tmp_path / "b", MlflowStageStore(tracking)).get_or_build(
        "pruned", "k", _build
    )
    assert entry.origin == BUILT and time.monotonic() - start < 30  # no endless wait
    retired = client.get_run(published.info.run_id)
    assert retired.info.status == "FAILED"
    assert retired.data.tags["fallopt.error"] == "its files failed their checksums"
    statuses = sorted(r.info.status for r in client.search_runs([stages]))
    assert statuses == ["FAILED", "FINISHED"]  # the rebuilt entry is the one published
