"""The benchmark scripts run from a checkout and print their figures (tiny sizes).

Slow (`pytest -m slow`): about two minutes of subprocesses. The figures themselves are
measured at full size by `scripts/bench_all` (README, Performance), not asserted here.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from .conftest import REPO


def _figures(script: str, *args: str) -> dict[str, float]:
    proc = subprocess.run(
        [sys.executable, f"scripts/{script}", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    lines = proc.stdout.strip().splitlines()
    figures = {}
    for line in reversed(lines):  # the figures come last
        match = re.fullmatch(r"([a-z0-9_]+): ([0-9.]+)", line)
        if not match:
            break
        figures[match[1]] = float(match[2])
    return figures


@pytest.mark.slow
def test_startup_answers_without_tensorflow():
    figures = _figures("bench_startup.py", "--repeats", "1")
    assert set(figures) == {
        "startup_help_seconds",
        "startup_config_error_seconds",
        "startup_help_over_tensorflow_import",
    }
    assert figures["startup_help_over_tensorflow_import"] < 1


@pytest.mark.slow
def test_memory_keeps_lab_sized_data_below_the_labs_copies():
    figures = _figures("bench_memory.py", "--images", "400", "--test-images", "100", "--steps", "2")
    assert 0 < figures["memory_peak_over_raw_fallopt"] < figures["memory_peak_over_raw_lab"]


@pytest.mark.slow
def test_tflite_eval_reports_every_mode_against_lab_and_raw_invoke():
    figures = _figures("bench_tflite_eval.py", "--images", "64", "--repeats", "1")
    for mode in ("none", "dynamic", "int8"):
        assert figures[f"tflite_eval_speedup_over_lab_{mode}"] > 0
        assert figures[f"tflite_eval_time_over_raw_invoke_{mode}"] > 0


@pytest.mark.slow
def test_sweep_runs_both_flows_over_the_grid():
    figures = _figures(
        "bench_sweep.py", "--sparsities", "0.5", "--modes", "none,dynamic", "--image-size", "48",
        "--n-train", "60", "--n-test", "20", "--epochs", "1", "--fine-tune-epochs", "1",
        "--default-grid", "0.5:none", "--default-size", "48,60,20,1,1",
    )  # fmt: skip
    assert figures["sweep_speedup_over_lab"] > 0
    assert figures["sweep_overhead"] > 1  # wall time includes the time inside TensorFlow
    assert figures["sweep_overhead_default_size"] > 1


@pytest.mark.slow
def test_tracking_at_scale_times_a_jobs_mlflow_work_against_a_full_experiment():
    figures = _figures("bench_tracking.py", "--runs", "20", "--jobs", "2")
    assert 0 < figures["tracking_sqlite_job_seconds_0"] < 5
    assert figures["tracking_sqlite_ratio_20_over_0"] > 0
