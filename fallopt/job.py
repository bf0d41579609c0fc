"""One Hydra job's life in a run or a sweep: resume, dry-run, threads, keep-going, progress.

A job is identified by its config hash (`identity.config_hash`). Unless `force=true`, a job
whose hash already FINISHED in the experiment is skipped and answers with that run's
metrics, so re-running a sweep that died at job 37 redoes only what did not finish (FAILED,
KILLED, or left RUNNING by a SIGKILL). `dry_run=true` prints what each job would do and
imports no TensorFlow. In a sweep, each job records its outcome on the parent run as tag
`fallopt.job.<num>` (the shared place every worker, on any machine, can write), from which
the progress line and the sweep's summary are computed.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from omegaconf import DictConfig, OmegaConf

from fallopt import track
from fallopt.config import FalloptConfig, TrackingConfig
from fallopt.errors import FalloptError
from fallopt.identity import EXECUTION_KEYS, config_hash
from fallopt.plan import plan
from fallopt.protocol import (
    JOB_TAG,
    PARENT_ENV,
    START_ENV,
    SWEEP_DIR_TAG,
    TOTAL_ENV,
    job_outcomes,
    record_json,
)

log = logging.getLogger("fallopt")


@dataclass(frozen=True)
class Job:
    """Where a job sits: its number in the sweep (None for a single run) and its overrides."""

    num: int | None
    total: int | None
    overrides: str
    sweep_dir: str | None
    parallel: int

    @property
    def label(self) -> str:
        """`job 3/12` in a sweep, `run` alone."""
        if self.num is None:
            return "run"
        return f"job {self.num + 1}/{self.total or '?'}"


def task_overrides(overrides: Sequence[str]) -> str:
    """A job's name: its overrides, without the keys that only say how to run.

    Named by what differs in results: MLflow's random names repeat once `random` is seeded.
    """
    return " ".join(o for o in overrides if not _is_execution_key(o))


def current_job() -> Job:
    """This job as Hydra launched it."""
    hc = HydraConfig.get()
    overrides = task_overrides(hc.overrides.task)
    if hc.mode != RunMode.MULTIRUN:
        return Job(None, None, overrides, None, 1)
    total = os.environ.get(TOTAL_ENV)
    return Job(
        hc.job.num, int(total) if total else None, overrides, str(hc.sweep.dir), _parallel_jobs()
    )


def _is_execution_key(override: str) -> bool:
    key = override.lstrip("+~").split("=", 1)[0]
    return key.split(".", 1)[0] in EXECUTION_KEYS


def _parallel_jobs() -> int:
    """How many jobs the launcher runs at once on this machine."""
    launcher = HydraConfig.get().launcher
    target = str(launcher.get("_target_", ""))
    cores = os.cpu_count() or 1
    if "joblib" in target:
        n = int(launcher.get("n_jobs", 1))
        return cores if n < 0 else max(1, n)
    if "ray" in target:  # each task holds `num_cpus` cores (Ray's default 1)
        num_cpus = launcher.get("ray", {}).get("remote", {}).get("num_cpus", 1)
        return max(1, cores // max(1, int(num_cpus)))
    return 1


def cap_threads(cfg: FalloptConfig, job: Job) -> int:
    """Cap TensorFlow's and LiteRT's threads so parallel jobs do not oversubscribe the cores."""
    threads = cfg.threads or max(1, (os.cpu_count() or 1) // job.parallel)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    from fallopt.backend import set_threads  # imports TensorFlow

    set_threads(threads)
    cfg.quant.threads = min(cfg.quant.threads, threads)
    return threads


def parent_run_id(job: Job, experiment_id: str) -> str | None:
    """The sweep's parent run: from the environment, else found by the sweep's directory.

    Workers started by the sweeping process inherit the environment; workers elsewhere (a
    Ray cluster) look the parent up by its `fallopt.sweep_dir` tag, which every job of the
    sweep resolves to the same string.
    """
    if job.num is None:
        return None
    parent = os.environ.get(PARENT_ENV)
    if parent is None and job.sweep_dir:
        tags = {"fallopt.role": "sweep", SWEEP_DIR_TAG: job.sweep_dir}
        runs = track.find_runs(experiment_id, tags, status="RUNNING")
        parent = runs[0].info.run_id if runs else None
    return parent


def objectives(names: list[str], metrics: dict[str, float]) -> float | list[float]:
    """What the job returns to a sweeper: one float, or a list for multi-objective search."""
    values = [float(metrics.get(name, math.nan)) for name in names]
    return values[0] if len(values) == 1 else values


def finished_run(experiment_id: str, digest: str) -> Run | None:
    """The newest FINISHED run of this config hash in the experiment, if any."""
    runs = track.find_runs(experiment_id, {"fallopt.config_hash": digest}, status="FINISHED")
    return runs[0] if runs else None


def record(parent: str | None, job: Job, outcome: str, run_id: str | None, error: str = "") -> None:
    """Record the job's outcome on the sweep's parent run (a no-op outside sweeps).

    A parent that cannot take it (deleted in the MLflow UI meanwhile) costs the record, not
    the job: the sweep's close says so.
    """
    if parent is None or job.num is None:
        return
    value = {"outcome": outcome, "run_id": run_id, "overrides": job.overrides, "error": error}
    try:
        track.current_client().set_tag(parent, f"{JOB_TAG}{job.num:05d}", record_json(value))
    except MlflowException as e:
        log.warning(
            "[%s] cannot record the outcome (%s) on the sweep's parent run %s: %s",
            job.label, outcome, parent, e.message.splitlines()[0],
        )  # fmt: skip


def _progress(parent: str | None, job: Job, seconds: float) -> None:
    if parent is None or job.total is None:
        log.info("[%s] done in %.0f s", job.label, seconds)
        return
    try:
        done = len(job_outcomes(track.current_client(), parent))
    except MlflowException as e:  # a progress line is not worth failing a finished job
        log.info("[%s] done in %.0f s (progress unknown: %s)", job.label, seconds, e.message)
        return
    elapsed = time.time() - float(os.environ.get(START_ENV, time.time() - seconds))
    left = elapsed / max(done, 1) * max(job.total - done, 0)
    log.info(
        "[%s] done in %.0f s; %d of %d jobs done, about %s left",
        job.label,
        seconds,
        done,
        job.total,
        time.strftime("%H:%M:%S", time.gmtime(left)),
    )


def _go_on(job: Job, keep_going: bool, error: Exception) -> None:
    """Re-raise a job's error, or in a sweep with keep_going, log it and answer None.

    None, not NaN: Optuna's sweeper records a trial that returns None as FAIL, but crashes
    on NaN. With keep_going=false a sweep must stop: run.py turns a FalloptError into one
    line and exit 2; any other error becomes exit 1 here, because Hydra records a job's
    exception and launches the next job, and only an exit stops it.
    """
    if job.num is None or (not keep_going and isinstance(error, FalloptError)):
        raise error
    if not keep_going:
        log.error("[%s] FAILED; keep_going=false stops the sweep", job.label, exc_info=error)
        raise SystemExit(1) from error
    log.error("[%s] FAILED: %s; the sweep goes on (keep_going=false stops it)", job.label, error)
    if not isinstance(error, FalloptError):  # a bug, not bad input: keep the trace
        log.error("[%s] traceback", job.label, exc_info=error)
    return None


def invalid_job(hydra_cfg: DictConfig, error: FalloptError) -> None:
    """A job whose config failed validation: in a sweep with keep_going, record it and go on."""
    job = current_job()
    keep_going = bool(hydra_cfg.get("keep_going", True))
    if job.num is not None and keep_going:
        tracking = OmegaConf.to_object(hydra_cfg.tracking)
        assert isinstance(tracking, TrackingConfig)
        record(parent_run_id(job, track.connect(tracking)), job, "failed", None, str(error))
    return _go_on(job, keep_going, error)


def _artifacts(run_id: str) -> list:
    return track.current_client().list_artifacts(run_id)


def run_job(cfg: FalloptConfig, hydra_cfg: DictConfig) -> float | list[float] | None:
    """Run one job: skip it if done, plan it if dry, else run the experiment and record it."""
    job = current_job()
    cfg.tracking.run_name = cfg.tracking.run_name or job.overrides or None
    digest = config_hash(cfg)
    experiment_id = track.connect(cfg.tracking)
    done = None if cfg.force else finished_run(experiment_id, digest)
    if cfg.dry_run:
        log.info("[dry-run %s] %s", job.label, plan(cfg, job.overrides or "defaults", done))
        return objectives(cfg.objectives, {})
    for run_id in track.reap_dead_runs(experiment_id):
        log.info("[%s] run %s was left RUNNING by a dead process: now KILLED", job.label, run_id)
    parent = parent_run_id(job, experiment_id)
    if done is not None:
        log.info(
            "[%s] %s: already FINISHED in run %s (config hash %s); skipped (force=true reruns)",
            job.label, job.overrides or "defaults", done.info.run_id, digest,
        )  # fmt: skip
        if cfg.deploy and "deploy" not in {a.path for a in _artifacts(done.info.run_id)}:
            log.warning(
                "[%s] deploy=true, but run %s has no deploy/ bundle and is not run again: add "
                "force=true (its stages come from the cache)", job.label, done.info.run_id,
            )  # fmt: skip
        record(parent, job, "reused", done.info.run_id)
        return objectives(cfg.objectives, done.data.metrics)
    log.info("[%s] %s", job.label, job.overrides or "defaults")
    threads = cap_threads(cfg, job)
    log.info("[%s] %d TensorFlow threads (%d parallel jobs)", job.label, threads, job.parallel)
    from fallopt.task import run_experiment  # TensorFlow loads only now

    start = time.time()
    output_dir = Path(HydraConfig.get().runtime.output_dir)
    before = track.last_run_id()
    try:
        metrics = run_experiment(cfg, digest, output_dir, parent, {"fallopt.threads": str(threads)})
    except Exception as e:
        opened = track.last_run_id()  # the run this job opened, if it got that far
        failed = opened if opened != before else None
        record(parent, job, "failed", failed, f"{type(e).__name__}: {e}")
        return _go_on(job, cfg.keep_going, e)
    run_id = track.last_run_id()
    if run_id is None or run_id == before:
        raise RuntimeError("run_experiment returned without opening a run")
    record(parent, job, "finished", run_id)
    _progress(parent, job, time.time() - start)
    return objectives(cfg.objectives, metrics)
