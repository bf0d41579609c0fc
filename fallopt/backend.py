"""The one place that imports TensorFlow, so that Keras 2 is guaranteed; and its native logs.

TensorFlow's C++ libraries log to file descriptor 2 through absl, below Python's logging. On a
CPU machine every run began with INFO and ERROR lines that say nothing is wrong ("failed call
to cuInit", "oneDNN custom operations are on", "Could not find cuda drivers"). Measured on
TensorFlow 2.21: `TF_CPP_MIN_LOG_LEVEL=3` silences what is logged once TensorFlow runs (the
cuInit ERROR, converter warnings), but not what its libraries log while they load, before
absl reads that level: absl's "All log messages before absl::InitializeLog() is called are
written to STDERR" and the lines after it. Those are filtered out of descriptor 2 while
`tensorflow` is first imported. `TF_ENABLE_ONEDNN_OPTS=0` and `CUDA_VISIBLE_DEVICES=` would
also drop a line each, but change the arithmetic or hide a real GPU, so they stay unset.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from types import ModuleType

from fallopt.errors import FalloptError

LEVEL_VARIABLE = "TF_CPP_MIN_LOG_LEVEL"
QUIET, VERBOSE = 3, 0  # only FATAL; everything (TensorFlow's default)
# Set beside LEVEL_VARIABLE, so that a worker process inheriting both knows the level was
# fallopt's choice, which its own `verbose` may change, and not the user's.
_CHOSEN_VARIABLE = "FALLOPT_TF_CPP_MIN_LOG_LEVEL"

# A native log line and its level: absl's "I0102 15:04:05.678901  123 port.cc:153] ..." (before
# absl is initialised, "I0000 00:00:1795692739.890462 ..."), TSL's older "2024-01-02
# 15:04:05.678901: I port.cc:153] ...", or a bare "WARNING: ..." as absl and LiteRT print.
_NATIVE_LINE = re.compile(
    rb"(?:([IWEF])\d{4} \d\d:\d\d:\d+\.\d+ +\d+ |\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+: ([IWEF]) )"
    rb"[^\]\s]+:\d+\] |(INFO|WARNING|ERROR): "
)
_LEVELS = {b"I": 0, b"INFO": 0, b"W": 1, b"WARNING": 1, b"E": 2, b"ERROR": 2, b"F": 3}


def _user_level() -> str | None:
    """TF_CPP_MIN_LOG_LEVEL as the user set it, or None if unset or fallopt's own choice."""
    value = os.environ.get(LEVEL_VARIABLE)
    return None if value is not None and value == os.environ.get(_CHOSEN_VARIABLE) else value


_USER_LEVEL = _user_level()  # read once, before `native_logs` sets the variable itself


def _kept(line: bytes, level: int) -> bool:
    """Whether `line` is not a native log line below `level`."""
    found = _NATIVE_LINE.match(line)
    return found is None or _LEVELS[next(g for g in found.groups() if g)] >= level


@contextlib.contextmanager
def stderr_captured() -> Iterator[list[bytes]]:
    """Redirect file descriptor 2 to a file for the block; the list then holds what was written.

    Native code writes there below Python's `sys.stderr`. Without a descriptor 2 nothing is
    captured and the list stays empty.
    """
    written: list[bytes] = []
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:
        yield written
        return
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield written
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            written.append(held.read())


@contextlib.contextmanager
def native_logs_filtered(level: int | None = None) -> Iterator[None]:
    """Hold back file descriptor 2, then write it out without native log lines below `level`.

    For native code that logs before it can be told a level: TensorFlow's libraries while
    they load, LiteRT's "INFO: Created TensorFlow Lite XNNPACK delegate for CPU.". Everything
    else written meanwhile, Python's own output included, comes out when the block ends (lost
    only if the process dies inside it).

    Args:
        level: the lowest level kept (0 INFO, 1 WARNING, 2 ERROR, 3 FATAL); by default the one
            `native_logs` chose.
    """
    level = _IMPORT_FILTER.level if level is None else level
    written: list[bytes] = []
    try:
        with stderr_captured() as written:
            yield
    finally:
        for text in written:  # none without a descriptor 2
            with os.fdopen(2, "wb", closefd=False) as stderr:
                lines = text.splitlines(keepends=True)
                stderr.writelines(line for line in lines if _kept(line, level))


class _FilteredLoader(importlib.abc.Loader):
    """Executes a module with its native log lines filtered, then steps aside."""

    def __init__(self, loader: importlib.abc.Loader, level: int) -> None:
        self._loader, self._level = loader, level

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        module.__loader__ = module.__spec__.loader = self._loader  # as if never wrapped
        with native_logs_filtered(self._level):
            self._loader.exec_module(module)


class _ImportFilter(importlib.abc.MetaPathFinder):
    """Filters native log lines below `level` while `tensorflow` is imported."""

    level = QUIET

    def find_spec(
        self, fullname: str, path: object = None, target: object = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != "tensorflow" or self.level <= VERBOSE:
            return None
        # The other finders locate it, this one passing. It stays in sys.meta_path: removing it
        # while the import system iterates that list would skip the finder after it.
        level, self.level = self.level, VERBOSE
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            self.level = level
        if spec is not None and spec.loader is not None:
            spec.loader = _FilteredLoader(spec.loader, level)
        return spec


_IMPORT_FILTER = _ImportFilter()


def native_logs(verbose: bool) -> int:
    """Show TensorFlow's native log lines only if `verbose` (or as TF_CPP_MIN_LOG_LEVEL says).

    Quiet, TF_CPP_MIN_LOG_LEVEL is 3: only FATAL lines, and nothing from loading TensorFlow
    on a CPU machine; its errors still reach Python as exceptions. Verbose, it is 0, as
    TensorFlow's default. A TF_CPP_MIN_LOG_LEVEL the user set wins over both, and applies to
    the lines logged while TensorFlow loads too. `import fallopt` calls this quiet; call it
    again before TensorFlow is imported (it is imported lazily, when a run trains) to change
    it. Once TensorFlow is loaded its level stays.

    Args:
        verbose: show TensorFlow's INFO, WARNING and ERROR lines.

    Returns:
        The level in force for the next import of TensorFlow.
    """
    try:
        level = int(_USER_LEVEL) if _USER_LEVEL is not None else VERBOSE if verbose else QUIET
    except ValueError:  # TensorFlow too reads a malformed value as 0
        level = VERBOSE
    if _USER_LEVEL is None:
        os.environ[LEVEL_VARIABLE] = os.environ[_CHOSEN_VARIABLE] = str(level)
    _IMPORT_FILTER.level = level
    if _IMPORT_FILTER not in sys.meta_path:
        sys.meta_path.insert(0, _IMPORT_FILTER)
    return level


def keras() -> ModuleType:
    """Return `tf_keras`, after checking that `tf.keras` (used by tfmot) is the same Keras 2."""
    import tensorflow as tf
    import tf_keras

    if tf.keras.Model is not tf_keras.Model:
        raise FalloptError(
            "tf.keras is Keras 3, but tensorflow-model-optimization needs Keras 2: "
            "import fallopt before touching tf.keras, or set TF_USE_LEGACY_KERAS=1"
        )
    return tf_keras


def set_threads(threads: int) -> None:
    """Cap TensorFlow's thread pools. Once TensorFlow has run, the first cap stays."""
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(min(2, threads))
    except RuntimeError:  # already initialized: a worker's earlier job set the same cap
        pass
