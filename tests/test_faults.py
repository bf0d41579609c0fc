"""Faults while running (docs/faults.md): kills at random points and at chosen stages,
two sweeps at once.

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

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from fallopt.cache import StageCache
from fallopt.litert import TFLiteModel

from .conftest import REPO, TINY, fallopt_cli, multirun

GRID = ["prune.sparsity=0.3,0.8", "quant=none,dynamic"]
ARTIFACTS = ["config.yaml", "model.tflite", "confusion_matrix.json", "model/model.keras"]


def _ctrl_c_as_in_a_terminal() -> None:
    # A shell's background job (how CI may start us) inherits SIGINT ignored, and Python
    # then never raises KeyboardInterrupt: restore the default a terminal's process has.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start(tmp_path: Path, name: str, *overrides: str, sweep: bool = True) -> subprocess.Popen:
    """`python -m fallopt.run [-m]` on tiny data into tmp_path's store, output to `name`."""
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    out = f"hydra.{'sweep' if sweep else 'run'}.dir={tmp_path}/{name}"
    args = [*(["-m"] if sweep else []), *TINY, *overrides, f"tracking.uri={uri}", out]
    return subprocess.Popen(
        [sys.executable, "-m", "fallopt.run", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "FALLOPT_CACHE": str(tmp_path / "cache")},
        preexec_fn=_ctrl_c_as_in_a_terminal,
    )


def _assert_cache_whole(stages: Path) -> None:
    """The stage cache holds only complete, checksummed entries and no temporary folders."""
    assert not list(stages.glob(".*.tmp"))
    cache = StageCache(stages)
    for entry in (p for p in stages.iterdir() if p.is_dir()):
        assert cache._valid(entry) is not None, entry


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
    _assert_cache_whole(tmp_path / "cache" / "stages")


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


def _store(tmp_path: Path) -> tuple[MlflowClient, list]:
    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    experiment = client.get_experiment_by_name("fallopt")
    return client, client.search_runs([experiment.experiment_id], max_results=100)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "SIGINT"])
@pytest.mark.parametrize(
    "stage",
    [
        ("fallopt.track:log_metrics", "train_accuracy"),  # in model.fit, after the 1st epoch
        ("fallopt.task:convert", ""),  # the converter returned; model.tflite not yet written
        ("fallopt.track:log_artifacts", "model.tflite"),  # model.tflite uploaded, not the rest
    ],
    ids=["training", "conversion", "upload"],
)
def test_a_kill_at_a_chosen_stage_resumes_to_one_complete_run(tmp_path, stage, sig):
    marker = tmp_path / "paused"
    args = ["prune.sparsity=0.5", "quant=dynamic", *TINY]
    args += [f"tracking.uri=sqlite:///{tmp_path}/mlruns/mlflow.db", f"hydra.run.dir={tmp_path}/o"]
    env = {**os.environ, "FALLOPT_CACHE": str(tmp_path / "cache")}
    paused = subprocess.Popen(
        [sys.executable, "-m", "tests.pause_at", *stage, str(marker), *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        preexec_fn=_ctrl_c_as_in_a_terminal,
    )
    deadline = time.time() + 300
    while not marker.exists():
        assert paused.poll() is None and time.time() < deadline, paused.communicate()[0][-3000:]
        time.sleep(0.2)
    paused.send_signal(sig)
    assert paused.wait(timeout=120) != 0
    client, (killed,) = _store(tmp_path)
    # Ctrl-C ends the run itself; a SIGKILLed writer cannot, so its run waits for the reaper.
    assert killed.info.status == ("KILLED" if sig == signal.SIGINT else "RUNNING")
    uploaded = {a.path for a in client.list_artifacts(killed.info.run_id)}
    assert ("model.tflite" in uploaded) == (stage[0] == "fallopt.track:log_artifacts")
    assert "deploy" not in uploaded and "model" not in uploaded

    resumed = fallopt_cli(*args, env=env)
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-3000:]
    client, runs = _store(tmp_path)
    status = {r.info.run_id: r.info.status for r in runs}
    assert status.pop(killed.info.run_id) == "KILLED"  # never FINISHED, so never reused
    ((run_id, finished),) = status.items()  # exactly one new run, and it finished
    assert finished == "FINISHED"
    listed = {a.path for a in client.list_artifacts(run_id)}
    listed |= {a.path for a in client.list_artifacts(run_id, "model")}
    assert set(ARTIFACTS) <= listed
    tflite = client.download_artifacts(run_id, "model.tflite", str(tmp_path / "dl"))
    probs = TFLiteModel(Path(tflite).read_bytes(), 1).predict(np.zeros((2, 24, 24, 3), np.uint8))
    assert probs.shape == (2, 2) and np.allclose(probs.sum(axis=1), 1, atol=1e-3)
    _assert_cache_whole(tmp_path / "cache" / "stages")


@pytest.mark.slow
def test_ctrl_c_at_any_moment_after_start_up_never_ends_finished(tmp_path):
    """Ctrl-C landing during TensorFlow's import (in a finalizer, where Python only prints
    "Exception ignored") or anywhere later ends the run KILLED, or before it starts."""
    for i, delay in enumerate([0.0, 0.2, 0.5, 1.0, 2.0, 4.0]):
        # Training long enough (several seconds) that the last signal lands before the end.
        proc = _start(tmp_path, f"o{i}", f"seed={i}", "train.epochs=40", sweep=False)
        lines = []
        for line in proc.stdout:  # the signal follows the thread cap, as in the audit
            lines.append(line)
            if "TensorFlow threads" in line:
                break
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=180)
        output = "".join(lines) + rest
        assert proc.returncode != 0, f"Ctrl-C after {delay} s was ignored:\n{output[-3000:]}"
    client, runs = _store(tmp_path)
    assert {r.info.status for r in runs} <= {"KILLED"}, [r.info.status for r in runs]
