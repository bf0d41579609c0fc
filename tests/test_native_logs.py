"""TensorFlow's native log lines stay off the terminal unless asked for; Python's output stays."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# What a CPU machine printed before fallopt's first line (TensorFlow 2.21).
NOISE = (
    "All log messages before absl::InitializeLog() is called",
    "failed call to cuInit",
    "oneDNN custom operations are on",
    "Could not find cuda drivers",
    "Unable to register cuDNN factory",
)
NATIVE_LINE = re.compile(r"^[IWE]\d{4} \d\d:\d\d:\d+\.\d+ +\d+ \S+:\d+\] ", re.MULTILINE)

# A stand-in for TensorFlow that logs as its libraries do while they load, among Python output.
FAKE_TENSORFLOW = r"""
import os, sys, warnings
print("python before", file=sys.stderr)
os.write(2, b"WARNING: All log messages before absl::InitializeLog() is called are written"
            b" to STDERR\n"
            b"I0000 00:00:1795692739.890462   21795 port.cc:153] oneDNN custom operations are on.\n"
            b"E0000 00:00:1795692747.949849   21795 cuda_platform.cc:52] failed call to cuInit\n"
            b"F0000 00:00:1795692747.949849   21795 check.cc:1] a fatal line\n")
warnings.warn("a python warning")
if os.environ.get("FAKE_TF_FAILS"):
    raise ImportError("a real error while importing")
"""


def _python(code: str, *, level: str | None = None, **env: str) -> subprocess.Popen:
    """Start `python -c code` in the repo, with TF_CPP_MIN_LOG_LEVEL unset or `level`."""
    environ = {k: v for k, v in os.environ.items() if "TF_CPP_MIN_LOG_LEVEL" not in k} | env
    if level is not None:
        environ["TF_CPP_MIN_LOG_LEVEL"] = level
    return subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=REPO,
        env=environ,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _stderr(proc: subprocess.Popen) -> str:
    _, err = proc.communicate(timeout=120)
    return err


def test_tensorflow_starts_without_native_noise_unless_verbose():
    code = (
        "import sys, fallopt; from fallopt.backend import native_logs; native_logs({}); "
        "import tensorflow as tf; tf.constant(1) + 1; print('python after', file=sys.stderr)"
    )
    # Both at once: importing TensorFlow takes seconds.
    quiet, verbose = _python(code.format(False)), _python(code.format(True))
    quiet_err, verbose_err = _stderr(quiet), _stderr(verbose)
    assert quiet.returncode == 0, quiet_err
    assert [n for n in NOISE if n in quiet_err] == [] and not NATIVE_LINE.search(quiet_err)
    assert "python after" in quiet_err
    assert verbose.returncode == 0, verbose_err
    assert NATIVE_LINE.search(verbose_err), "verbose should show TensorFlow's own lines"


@pytest.fixture
def fake_tensorflow(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "tensorflow").mkdir()
    (tmp_path / "tensorflow" / "__init__.py").write_text(FAKE_TENSORFLOW)
    return {"PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])}


def _import_fake(fake_tensorflow: dict[str, str], verbose: bool, **kwargs: str) -> str:
    code = (
        "import fallopt; from fallopt.backend import native_logs; "
        f"native_logs({verbose}); import tensorflow"
    )
    return _stderr(_python(code, **fake_tensorflow, **kwargs))


def test_lines_logged_while_tensorflow_loads_are_filtered_and_python_output_kept(
    fake_tensorflow,
):
    err = _import_fake(fake_tensorflow, False)
    assert [n for n in NOISE if n in err] == []
    assert err.index("python before") < err.index("a fatal line") < err.index("a python warning")


def test_verbose_keeps_every_line(fake_tensorflow):
    err = _import_fake(fake_tensorflow, True)
    assert all(line in err for line in ("absl::InitializeLog", "oneDNN", "cuInit", "fatal"))


def test_a_level_the_user_set_is_respected_for_loading_lines_too(fake_tensorflow):
    err = _import_fake(fake_tensorflow, False, level="1")  # warnings and up
    assert "oneDNN" not in err
    assert all(line in err for line in ("absl::InitializeLog", "cuInit", "python warning"))
    code = (
        "import os, fallopt; print(fallopt.native_logs(True), os.environ['TF_CPP_MIN_LOG_LEVEL'])"
    )
    out, _ = _python(code, level="1").communicate(timeout=60)
    assert out.split() == ["1", "1"]


def test_a_worker_inheriting_fallopts_choice_may_still_turn_verbose(fake_tensorflow):
    # A joblib worker inherits the parent's variables; its own `verbose` decides.
    inherited = {"FALLOPT_TF_CPP_MIN_LOG_LEVEL": "3"}
    err = _import_fake(fake_tensorflow, True, level="3", **inherited)
    assert "oneDNN" in err and "cuInit" in err


def test_a_real_error_while_importing_is_shown(fake_tensorflow):
    err = _import_fake(fake_tensorflow, False, FAKE_TF_FAILS="1")
    assert "ImportError: a real error while importing" in err and "python before" in err
    assert "cuInit" not in err
