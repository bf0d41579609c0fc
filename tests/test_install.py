"""A non-editable install runs: the wheel carries the Hydra configs (fallopt/conf/)."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile

import pytest

from .conftest import CONF, REPO


@pytest.mark.slow  # builds a wheel and runs a smoke run from it: about a minute
def test_a_wheel_installed_elsewhere_runs_the_smoke_experiment(tmp_path):
    wheels = tmp_path / "wheels"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q",
         "-w", str(wheels), str(REPO)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = wheels.glob("fallopt-*.whl")
    packaged = {n for n in zipfile.ZipFile(wheel).namelist() if n.endswith(".yaml")}
    expected = {f"fallopt/conf/{p.relative_to(CONF)}" for p in CONF.rglob("*.yaml")}
    assert packaged == expected

    # The venv sees the machine's packages (TensorFlow...), but fallopt only from the wheel.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    python = venv / "bin" / "python"
    install = subprocess.run(
        [python, "-m", "pip", "install", "--no-deps", "-q", str(wheel)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert install.returncode == 0, install.stderr[-3000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # The editable install of the checkout must not be what runs.
    env = {**os.environ, "FALLOPT_CACHE": str(tmp_path / "cache"), "PYTHONNOUSERSITE": "1"}
    where = subprocess.run(
        [python, "-c", "import fallopt; print(fallopt.__file__)"],
        cwd=elsewhere, capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert str(venv) in where.stdout, where.stdout + where.stderr
    run = subprocess.run(
        [python, "-m", "fallopt.run", "+experiment=smoke", "dataset.n_train=40",
         "dataset.n_test=20", "dataset.image_size=24", "model.filters=[4,8]",
         "model.dense_units=[8]", "prune.fine_tune_epochs=1"],
        cwd=elsewhere, capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    assert (elsewhere / "mlruns" / "mlflow.db").is_file()
    assert "[track] run" in run.stdout + run.stderr
