"""Faults during sweeps (docs/faults.md): kills at random points, two sweeps at once.

Slow: each starts several sweeps in subprocesses (`pytest -m slow`, which CI runs).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fallopt.cache import StageCache

from .conftest import REPO, TINY, multirun

GRID = ["prune.sparsity=0.3,0.8", "quant=none,dynamic"]
ARTIFACTS = ["config.yaml", "model.tflite", "confusion_matrix.json", "model/model.keras"]


def _start(tmp_path: Path, name: str, *overrides: str) -> subprocess.Popen:
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    args = [*overrides, *TINY, f"tracking.uri={uri}", f"hydra.sweep.dir={tmp_path}/{name}"]
    return subprocess.Popen(
        [sys.executable, "-m", "fallopt.run", "-m", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "FALLOPT_CACHE": str(tmp_path / "cache")},
    )


@pytest.mark.slow
def test_sweeps_killed_at_random_points_resume_to_every_combination_finished_once(tmp_path):
    rng = random.Random(int(os.environ.get("FALLOPT_FAULT_SEED", "2026")))
    for attempt in range(4):  # SIGKILL and SIGINT alternately, at 3-40 s: start-up, training,
        proc = _start(tmp_path, f"killed{attempt}", *GRID)  # conversion or artifact upload
        time.sleep(rng.uniform(3, 40))
        proc.send_signal(signal.SIGKILL if attempt % 2 == 0 else signal.SIGINT)
        proc.communicate(timeout=120)

    final = multirun(tmp_path, *GRID, name="final")
    finished = final.runs("FINISHED")
    hashes = [r.data.tags["fallopt.config_hash"] for r in finished]
    assert len(hashes) == 4 and len(set(hashes)) == 4  # every combination, exactly once
    assert not final.runs("RUNNING")  # killed writers' runs were marked KILLED
    for run in finished:  # a FINISHED run has every artifact, complete
        listed = {a.path for a in final.client.list_artifacts(run.info.run_id)}
        listed |= {a.path for a in final.client.list_artifacts(run.info.run_id, "model")}
        assert set(ARTIFACTS) <= listed
        local = final.client.download_artifacts(
            run.info.run_id, "model.tflite", str(tmp_path / "dl")
        )
        assert Path(local).read_bytes()[4:8] == b"TFL3"
    # No orphan artifacts: every artifact folder belongs to a run the store knows.
    known = {r.info.run_id for r in final.runs()} | {
        r.info.run_id for r in final.client.search_runs([final.experiment_id], max_results=1000)
    }
    folders = {p.name for p in (tmp_path / "mlruns" / "artifacts").iterdir()}
    assert folders <= known
    # The stage cache holds only complete, checksummed entries and no temporary folders.
    stages = tmp_path / "cache" / "stages"
    assert not list(stages.glob(".*.tmp"))
    cache = StageCache(stages)
    for entry in (p for p in stages.iterdir() if p.is_dir()):
        assert cache._valid(entry) is not None, entry


@pytest.mark.slow
def test_two_sweeps_writing_one_experiment_at_once_both_finish(tmp_path):
    first = _start(tmp_path, "one", "prune.sparsity=0.3,0.5")
    second = _start(tmp_path, "two", "prune.sparsity=0.5,0.8")
    outputs = [p.communicate(timeout=600)[0] for p in (first, second)]
    assert [first.returncode, second.returncode] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    assert not any("database is locked" in out for out in outputs)
    store = multirun(tmp_path, "prune.sparsity=0.3,0.5,0.8", name="after")  # all reused
    assert "[sweep] 0 finished, 3 reused (already FINISHED), 0 failed" in store.output
    runs = store.runs("FINISHED")
    # Both sweeps needed one baseline: the stage lock let exactly one of them train it.
    assert [r.data.tags["fallopt.stage.baseline"] for r in runs].count("trained") == 1
    assert not store.runs("RUNNING")
