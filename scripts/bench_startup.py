"""Start-up: how fast `--help` and a config error answer, next to importing TensorFlow.

Each command runs in a fresh process, --repeats times; the median wall time is reported.
Both must answer without importing TensorFlow (checked: the run fails otherwise).

python scripts/bench_startup.py [--repeats 5]
Prints `name: value` lines last.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Runs fallopt.run's main as `python -m fallopt.run` would, then says whether TF was loaded.
PROBE = (
    "import atexit, runpy, sys;"
    "atexit.register(lambda: print('TENSORFLOW_LOADED=' + str('tensorflow' in sys.modules)));"
    "sys.argv = ['fallopt.run', *sys.argv[1:]];"
    "runpy.run_module('fallopt.run', run_name='__main__')"
)

COMMANDS = {
    "help": ([sys.executable, "-m", "fallopt.run", "--help"], 0),
    "config_error": ([sys.executable, "-m", "fallopt.run", "prune.sparsity=1.5"], 2),
    "import_tensorflow": ([sys.executable, "-c", "import tensorflow"], 0),
}


def seconds(command: list[str], expected: int) -> float:
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != expected:
        sys.exit(f"{' '.join(command)} exited {proc.returncode}:\n{proc.stderr[-2000:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    for name in ("help", "config_error"):
        command, expected = COMMANDS[name]
        probe = subprocess.run(
            [sys.executable, "-c", PROBE, *command[3:]], cwd=REPO, capture_output=True, text=True
        )
        if probe.returncode != expected or "TENSORFLOW_LOADED=False" not in probe.stdout:
            sys.exit(f"{name}: TensorFlow was imported or the exit code was {probe.returncode}")
    median = {
        name: statistics.median(seconds(*COMMANDS[name]) for _ in range(args.repeats))
        for name in COMMANDS
    }
    for name, value in median.items():
        print(f"{name:18s} {value:5.2f} s (median of {args.repeats})")
    print(f"startup_help_seconds: {median['help']:.2f}")
    print(f"startup_config_error_seconds: {median['config_error']:.2f}")
    ratio = median["help"] / median["import_tensorflow"]
    print(f"startup_help_over_tensorflow_import: {ratio:.2f}")


if __name__ == "__main__":
    main()
