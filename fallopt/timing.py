"""Where a run's time goes: seconds spent inside TensorFlow, summed per phase.

The functions that hand work to TensorFlow, LiteRT or TFLM are decorated with
`timed("train")`, `timed("convert")`, `timed("inference")` or `timed("tflm")`. A run logs the
totals as `seconds_<phase>` next to its wall time `seconds_run`: what is left over is
fallopt's own cost (data, caching, tracking, plots), which `scripts/bench_sweep.py` reports
for a whole sweep.
"""

from __future__ import annotations

import functools
import time
from collections import defaultdict
from collections.abc import Callable
from typing import ParamSpec, TypeVar

PHASES = ("train", "convert", "inference", "tflm")

P = ParamSpec("P")
R = TypeVar("R")

_seconds: defaultdict[str, float] = defaultdict(float)


def timed(phase: str) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Add the decorated function's wall time to `phase` (one of PHASES)."""
    if phase not in PHASES:
        raise ValueError(f"phase {phase!r} is not one of {PHASES}")

    def decorate(func: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(func)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            start = time.perf_counter()
            try:
                return func(*args, **kwargs)
            finally:
                _seconds[phase] += time.perf_counter() - start

        return wrapper

    return decorate


def reset() -> None:
    """Start counting from zero (at the start of a run)."""
    _seconds.clear()


def seconds() -> dict[str, float]:
    """Seconds per phase since the last reset, every phase present."""
    return {phase: _seconds[phase] for phase in PHASES}
