"""`python -m fallopt.run` with one function paused, so a test can kill it exactly there.

    python -m tests.pause_at MODULE:FUNCTION MATCH MARKER [fallopt.run arguments ...]

The first call of MODULE.FUNCTION whose arguments mention MATCH ("" matches any) runs to
completion, then MARKER is created and the process sleeps inside the call: a signal sent once
MARKER exists lands in the middle of that stage (e.g. after the converter returned but before
the file is written, or after one artifact of a run is uploaded and before the next).
"""

from __future__ import annotations

import functools
import importlib
import runpy
import sys
import time
from pathlib import Path
from typing import Any


def pause_after(target: str, match: str, marker: Path) -> None:
    module_name, name = target.split(":")
    module = importlib.import_module(module_name)
    original = getattr(module, name)

    @functools.wraps(original)
    def paused(*args: Any, **kwargs: Any) -> Any:
        result = original(*args, **kwargs)
        if match in repr((args, kwargs)) and not marker.exists():
            marker.touch()
            time.sleep(600)
        return result

    setattr(module, name, paused)


if __name__ == "__main__":
    target, match, marker, *arguments = sys.argv[1:]
    pause_after(target, match, Path(marker))
    sys.argv = ["fallopt.run", *arguments]
    runpy.run_module("fallopt.run", run_name="__main__", alter_sys=True)
