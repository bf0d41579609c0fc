"""`python -m fallopt.run`: one Hydra job is one tracked run; `-m` sweeps.

Exit codes: 0 done; 1 unexpected error (Hydra prints it; HYDRA_FULL_ERROR=1 for the full
trace); 2 bad config, data or tracking store (one line naming the culprit and the fix;
`verbose=true` adds the trace);
3 a sweep whose jobs did not all finish (its summary lists them).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from fallopt import config, interrupt
from fallopt.backend import native_logs
from fallopt.errors import EXIT_USER_ERROR, FalloptError

log = logging.getLogger("fallopt")
config.register_configs()  # the typed schemas conf/ extends, before Hydra reads conf/


# conf/ inside the package (so a wheel carries it), by absolute path: Hydra resolves a
# relative one against the calling module, which fails when main is called as `fallopt`.
CONF_DIR = str(Path(__file__).resolve().parent / "conf")

if "--help" in sys.argv or "-h" in sys.argv:  # before Hydra answers it: 0.8 s instead of 4
    from fallopt.fast_help import share_group_listing_repository

    share_group_listing_repository()


@contextmanager
def user_errors_exit(cfg: DictConfig) -> Iterator[None]:
    """Start an entry point; an error the user can fix becomes one line and exit 2.

    `verbose=true` adds the trace; `HYDRA_FULL_ERROR=1` lets Hydra print it instead.
    """
    native_logs(verbose=bool(cfg.get("verbose")))  # before TensorFlow loads: its C++ lines
    interrupt.install()
    try:
        yield
    except FalloptError as e:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        log.error("%s", e, exc_info=bool(cfg.get("verbose")))  # verbose=true: with the trace
        sys.exit(EXIT_USER_ERROR)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> float | list[float] | None:
    """Validate the composed config and run it; returns `objectives` (None if it failed)."""
    with user_errors_exit(cfg):
        try:
            settings = config.validate(cfg)
        except FalloptError as e:
            if HydraConfig.get().mode != RunMode.MULTIRUN:
                raise
            from fallopt.job import invalid_job  # one bad combination need not stop a sweep

            return invalid_job(cfg, e)
        from fallopt.job import run_job  # MLflow loads only now, TensorFlow only if training

        return run_job(settings, cfg)


def cli() -> None:
    """The `fallopt` command and `python -m fallopt.run`: `main`, then a quick exit.

    Python's own shutdown then tears down TensorFlow's module graph and its C++ objects,
    which took 2 to 3 s after a sweep, time in which nothing is left to do: the exit handlers
    (the sweep's record among them) run, the logs are flushed, and the process ends. Should
    a thread other than the main one still run, or a profiler or coverage tool watch (they
    write their reports at shutdown), the ordinary shutdown follows instead.
    """
    import atexit
    import threading

    try:
        main()
        code: object = 0
    except SystemExit as e:
        code = e.code
    watched = sys.getprofile() is not None or sys.gettrace() is not None
    others = [t for t in threading.enumerate() if t is not threading.main_thread()]
    if watched or any(t.is_alive() and not t.daemon for t in others):
        sys.exit(code)
    atexit._run_exitfuncs()
    logging.shutdown()
    if code is not None and not isinstance(code, int):  # sys.exit("message") prints it
        print(code, file=sys.stderr)
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)


if __name__ == "__main__":
    cli()
