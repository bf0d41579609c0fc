"""The record of a multirun: one MLflow parent run, the jobs as its children, a summary.

`SweepRecord` is a Hydra callback (conf/config.yaml). When a multirun starts it counts the
jobs, opens a parent run tagged `fallopt.role=sweep` and `fallopt.sweep_dir`, and exports
its id, the job count and the start time to the jobs (see job.py). Jobs link themselves with
MLflow's `mlflow.parentRunId` tag and record their outcome on the parent. When the sweep
ends (or the process exits after a job stopped it), the parent gets a CSV of the sweep's
runs (those it ran and those it reused), the lab's plots, the best run by validation
accuracy and, with two objectives, the Pareto-optimal runs tagged `fallopt.pareto=true`.
The process then exits non-zero if any job failed or never reported.

Hydra builds this callback for every run, sweep or not, so this module stays light: MLflow
loads when a multirun starts, and the summary (`sweep_summary`) when it ends.
"""

from __future__ import annotations

import atexit
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from fallopt.config import TrackingConfig
from fallopt.errors import EXIT_SWEEP_INCOMPLETE, EXIT_USER_ERROR, FalloptError

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

log = logging.getLogger("fallopt.sweep")


def sweep_size(config: DictConfig) -> int | None:
    """How many jobs the sweep will launch: the grid's size, or an Optuna study's n_trials."""
    from hydra.utils import get_class

    sweeper = config.hydra.sweeper
    if "optuna" in str(sweeper.get("_target_", "")):
        return int(sweeper.n_trials)
    # By name: Hydra's plugin scan executes plugin modules again, making new class objects.
    grid = f"{BasicSweeper.__module__}.{BasicSweeper.__qualname__}"
    if grid not in (f"{c.__module__}.{c.__qualname__}" for c in get_class(sweeper._target_).mro()):
        return None
    params = sweeper.get("params") or {}
    arguments = [f"{k}={v}" for k, v in params.items()] + list(config.hydra.overrides.task)
    overrides = OverridesParser.create().parse_overrides(arguments)
    return sum(len(batch) for batch in BasicSweeper.split_arguments(overrides, None))


def _check_launcher(config: DictConfig) -> None:
    """Let the launcher refuse what it cannot run before the parent run opens.

    A launcher class may define `check_config(config)` (the Ray launcher: its head answers).
    """
    from hydra.utils import get_class

    check = getattr(get_class(config.hydra.launcher._target_), "check_config", None)
    if check is not None:
        check(config)


def _unreachable(uri: str) -> str | None:
    """Why the tracking server at `uri` is gone, in one line; None if it answers (or is a file).

    Asked before the summary: MLflow's client would retry each of its requests.
    """
    from fallopt.track import TrackingError, check_reachable

    if not uri.startswith(("http://", "https://")):
        return None
    try:
        check_reachable(uri)
    except TrackingError as e:
        return str(e)
    return None


class SweepRecord(Callback):
    """Hydra callback: a parent MLflow run around every multirun."""

    def __init__(self) -> None:
        self._parent: str | None = None
        self._client: MlflowClient | None = None
        self._uri = ""
        self._out_dir = Path(".")
        self._total: int | None = None
        self._objectives: list[str] = []
        self._failed = False

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Count the jobs, open the parent run and export what jobs need to the environment.

        Hydra only warns when a callback raises; a sweep without its record must not start.
        """
        try:
            self._start(config)
        except FalloptError as e:
            log.error("%s", e)
            raise SystemExit(EXIT_USER_ERROR) from None
        except Exception:
            log.exception("[sweep] cannot open the sweep's parent run")
            raise SystemExit(1) from None

    def _start(self, config: DictConfig) -> None:
        # Hydra builds this callback for every run: MLflow loads only when a multirun starts.
        from mlflow.tracking import MlflowClient

        from fallopt import track
        from fallopt.protocol import PARENT_ENV, START_ENV, SWEEP_DIR_TAG, TOTAL_ENV

        self._total = sweep_size(config)
        if self._total:
            os.environ[TOTAL_ENV] = str(self._total)
        if config.get("dry_run"):
            log.info("[dry-run] %s jobs; nothing is trained or logged", self._total or "?")
            return
        _check_launcher(config)
        tracking = OmegaConf.to_object(config.tracking)
        assert isinstance(tracking, TrackingConfig)
        experiment_id = track.connect(tracking)
        self._client = MlflowClient(tracking.uri)
        self._uri = tracking.uri
        self._out_dir = Path(config.hydra.sweep.dir)
        self._objectives = list(config.objectives)
        overrides = " ".join(config.hydra.overrides.task)
        for run_id in track.reap_dead_runs(experiment_id):
            log.info("[sweep] run %s was left RUNNING by a killed process: marked KILLED", run_id)
        tags = {"fallopt.role": "sweep", SWEEP_DIR_TAG: str(config.hydra.sweep.dir)}
        tags["fallopt.sweep_path"] = str(self._out_dir.resolve())
        tags.update(track.owner_tags())
        run = self._client.create_run(experiment_id, run_name=f"sweep {overrides}"[:250], tags=tags)
        self._parent = run.info.run_id
        os.environ[PARENT_ENV] = self._parent
        os.environ[START_ENV] = str(time.time())
        atexit.register(self._close, "FAILED")  # a job stopped the sweep (keep_going=false)
        log.info(
            "[sweep] %s jobs; parent run %s in experiment %r",
            self._total or "?",
            self._parent,
            tracking.experiment,
        )

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        """Summarize the jobs, close the parent, and exit non-zero if any job failed."""
        self._close("FINISHED")
        if self._failed:
            raise SystemExit(EXIT_SWEEP_INCOMPLETE)

    def _close(self, status: str) -> None:
        """Summarize and end the parent run; never raises, since it also runs at exit.

        Any failure (of the summary, or a parent deleted in the MLflow UI meanwhile) ends the
        parent FAILED with the error, and the sweep exits non-zero.
        """
        if self._parent is None or self._client is None:
            return
        from mlflow.exceptions import MlflowException

        from fallopt.protocol import PARENT_ENV, START_ENV, TOTAL_ENV
        from fallopt.sweep_summary import summarize

        parent, self._parent = self._parent, None
        for name in (PARENT_ENV, START_ENV, TOTAL_ENV):
            os.environ.pop(name, None)
        self._failed = True  # unless the summary says every job finished
        gone = _unreachable(self._uri)
        if gone is not None:
            log.error(
                "[sweep] no summary: %s. The sweep's parent run %s stays RUNNING until a later "
                "sweep finds it dead; once the server is back, run the same sweep again: it "
                "redoes exactly the jobs that did not finish", gone, parent,
            )  # fmt: skip
            return
        try:
            deleted = self._client.get_run(parent).info.lifecycle_stage == "deleted"
        except MlflowException:
            deleted = False  # unreadable: the summary below fails and says why
        if deleted:
            log.error(
                "[sweep] the sweep's parent run %s was deleted while the sweep ran, and with "
                "it the jobs' records: no summary. The jobs' own runs are still in the "
                "experiment (tag mlflow.parentRunId = %s)",
                parent, parent,
            )  # fmt: skip
            return
        error = None
        try:
            complete = summarize(self._client, parent, self._out_dir, self._total, self._objectives)
            self._failed = not complete
        except Exception as e:
            error = f"{type(e).__name__}: {e}"
            log.error("[sweep] cannot summarize the sweep: %s", error, exc_info=e)
        try:
            if error:
                self._client.set_tag(parent, "fallopt.error", error[:5000])
            self._client.set_terminated(parent, "FAILED" if self._failed else status)
        except MlflowException as e:
            log.error("[sweep] cannot end the parent run %s: %s", parent, e.message)
