"""MLflow: where runs go, how they start and end, and what every run logs."""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import re
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from fallopt import interrupt
from fallopt.config import TrackingConfig
from fallopt.errors import FalloptError

log = logging.getLogger(__name__)
# The SQLite store's schema migrations log dozens of INFO lines on first use.
logging.getLogger("alembic").setLevel(logging.WARNING)

_SQLITE = "sqlite:///"
MAX_TAG = 5000  # characters fallopt writes into one tag (MLflow takes 8,000)

# A writer on another host cannot be checked by its pid: one that must be known alive (a
# stage's builder, which others wait for) beats a tag; silent for STALE_SECONDS, it is dead.
# Hosts' clocks must agree to well within that (NTP does).
HEARTBEAT_TAG = "fallopt.heartbeat"
HEARTBEAT_SECONDS = 10.0
STALE_SECONDS = 60.0


class TrackingError(FalloptError):
    """The tracking store cannot be reached or written."""


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///` URI (relative to the working directory), else None."""
    return Path(uri[len(_SQLITE) :]) if uri.startswith(_SQLITE) else None


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail fast on a tracking server that does not answer.

    MLflow's own client retries with backoff for minutes before giving up.
    """
    try:
        urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout).close()
    except urllib.error.HTTPError:
        pass  # it answered
    except (OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise TrackingError(
            f"tracking.uri={uri}: no tracking server answers ({reason}). Start it (README: "
            "Scaling up) or point tracking.uri / MLFLOW_TRACKING_URI at one that runs"
        ) from None


def _create_sqlite_store(db: Path) -> None:
    """Create a SQLite store whole or not at all.

    MLflow builds a new database in dozens of migration steps: a process killed in between
    (or a second process migrating the same file) left a store every later run crashed on.
    So the store is built in a private file and linked into place, which fails if another
    process got there first.
    """
    for stale in db.parent.glob(f".{db.name}.*.tmp"):  # left by a killed creator
        pid = stale.name.split(".")[-2]
        if pid.isdigit() and not _alive(int(pid)):
            stale.unlink(missing_ok=True)
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    tmp = db.with_name(f".{db.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        store = SqlAlchemyStore(f"{_SQLITE}{tmp}", (db.parent / "artifacts").resolve().as_uri())
        store.engine.dispose()
        os.link(tmp, db)
    except FileExistsError:
        pass  # created meanwhile by a parallel job
    except Exception as e:
        raise TrackingError(f"tracking.uri={_SQLITE}{db}: cannot create the store: {e}") from None
    finally:
        tmp.unlink(missing_ok=True)


def path_component(name: str) -> str:
    """`name` as one safe folder name: an experiment called `../../x` stays inside the store."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name).lstrip(".")
    if safe == name:
        return name
    return f"{safe or 'experiment'}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"


@functools.lru_cache(maxsize=8)
def client(uri: str) -> MlflowClient:
    """One client per store and process (MLflow's fluent calls build one per call)."""
    return MlflowClient(uri)


def current_client() -> MlflowClient:
    """The process's client for the store `connect` pointed MLflow at."""
    return client(mlflow.get_tracking_uri())


# (uri, experiment, store file's inode) -> experiment id: a job opens its store once.
_connected: dict[tuple[str, str, int], str] = {}


def connect(cfg: TrackingConfig, experiment: str | None = None) -> str:
    """Point MLflow at `cfg.uri` and return the id of an experiment, creating both if needed.

    The experiment is `cfg.experiment` unless named. A new experiment's artifacts go to
    `cfg.artifact_location`, by default `artifacts/` beside a SQLite database, so the whole
    store lives under one folder. The answer is remembered for the process: later calls for
    the same store and experiment cost nothing (a SQLite file replaced meanwhile is new).
    """
    name = experiment or cfg.experiment
    if cfg.uri.startswith(("http://", "https://")):
        check_reachable(cfg.uri)  # every time: a server gone since must fail in seconds
    db = sqlite_path(cfg.uri)
    inode = db.stat().st_ino if db is not None and db.exists() else 0
    known = _connected.get((cfg.uri, name, inode))
    if known is not None:
        mlflow.set_tracking_uri(cfg.uri)
        return known
    experiment_id = _open(cfg, experiment)
    if db is not None:
        inode = db.stat().st_ino
    _connected[(cfg.uri, name, inode)] = experiment_id
    return experiment_id


def _open(cfg: TrackingConfig, experiment: str | None) -> str:
    name = experiment or cfg.experiment
    artifact_location = cfg.artifact_location
    db = sqlite_path(cfg.uri)
    if db is not None:
        try:
            db.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise TrackingError(f"tracking.uri={cfg.uri}: cannot create {db.parent}: {e}") from None
        artifact_location = artifact_location or (db.parent / "artifacts").resolve().as_uri()
    if artifact_location and experiment:
        artifact_location = f"{artifact_location.rstrip('/')}/{path_component(experiment)}"
    if db is not None and not db.exists():
        _create_sqlite_store(db)
    mlflow.set_tracking_uri(cfg.uri)
    try:
        found = mlflow.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        try:
            return mlflow.create_experiment(name, artifact_location=artifact_location)
        except MlflowException:  # created meanwhile by a parallel job
            found = mlflow.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id
    except MlflowException as e:
        raise TrackingError(
            f"tracking.uri={cfg.uri}: cannot open experiment {name!r}: {e.message}. "
            "Check the URI (or start the tracking server) and that the store is writable"
        ) from None


def find_runs(experiment_id: str, tags: dict[str, str], status: str | None = None) -> list[Run]:
    """Runs of the experiment carrying all `tags` (and `status`), newest first."""
    clauses = [f"tags.`{key}` = '{value}'" for key, value in tags.items()]
    if status:
        clauses.append(f"attributes.status = '{status}'")
    return mlflow.search_runs(
        [experiment_id],
        filter_string=" and ".join(clauses),
        order_by=["attributes.start_time DESC"],
        output_format="list",
    )


def _ray() -> Any | None:
    """Ray, if this process is in it (a Ray worker, or a connected driver), else None."""
    ray = sys.modules.get("ray")  # never imported here: only a process in Ray has it
    return ray if ray is not None and ray.is_initialized() else None


def ray_node() -> str | None:
    """The Ray node this process works on, else None."""
    ray = _ray()
    return None if ray is None else ray.get_runtime_context().get_node_id()


def owner_tags() -> dict[str, str]:
    """Which process writes a run: lets a later process tell a dead writer from a live one."""
    tags = {"fallopt.host": socket.gethostname(), "fallopt.pid": str(os.getpid())}
    node = ray_node()
    if node is not None:
        tags["fallopt.ray_node"] = node
    return tags


def describe_owner(run: Run) -> str:
    """`pid 123 on host-a (Ray node 1f2e3d4c)`: who writes a run, for log lines."""
    tags = run.data.tags
    node = tags.get("fallopt.ray_node")
    where = f" (Ray node {node[:8]})" if node else ""
    return f"pid {tags.get('fallopt.pid', '?')} on {tags.get('fallopt.host', '?')}{where}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _dead_ray_nodes() -> set[str]:
    """Ids of the Ray nodes known dead, if this process is in Ray (else none)."""
    ray = _ray()
    return set() if ray is None else {node["NodeID"] for node in ray.nodes() if not node["Alive"]}


class _Liveness:
    """Tells whether a RUNNING run's writer is dead.

    By its pid on this host, its Ray node (asked once, and only if needed), or its heartbeat.
    """

    def __init__(self) -> None:
        self._dead_nodes: set[str] | None = None

    def dead(self, run: Run) -> str | None:
        """Why the run's writer is known to be dead, or None if it may be alive."""
        tags = run.data.tags
        if tags.get("fallopt.host") == socket.gethostname():
            pid = tags.get("fallopt.pid", "")
            if pid.isdigit() and not _alive(int(pid)):
                return "its process died (killed)"
        node = tags.get("fallopt.ray_node")
        if node:
            if self._dead_nodes is None:
                self._dead_nodes = _dead_ray_nodes()
            if node in self._dead_nodes:
                return f"its Ray node {node[:8]} died"
        # Also on this host: a process that lives on may have given the run up (a claim it
        # could not end while the store was away) and stopped beating.
        beat = tags.get(HEARTBEAT_TAG)
        if beat and time.time() - float(beat) > STALE_SECONDS:
            return f"its writer fell silent (no heartbeat for {time.time() - float(beat):.0f} s)"
        return None


class Heartbeat:
    """Beats `HEARTBEAT_TAG` on a run from a daemon thread until stopped.

    A beat the store does not take (it is away) is skipped: if the store stays away, other
    writers find the run silent after `STALE_SECONDS`, which is what it then is.
    """

    def __init__(self, uri: str, run_id: str) -> None:
        self._stop = threading.Event()
        # A client of its own, not `client(uri)`: it is used from the heartbeat's thread.
        self._client, self._run_id = MlflowClient(uri), run_id
        self._thread = threading.Thread(target=self._beat, daemon=True, name="fallopt-heartbeat")
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            try:
                self._client.set_tag(self._run_id, HEARTBEAT_TAG, f"{time.time():.0f}")
            except Exception as e:  # whatever the store says, the next beat may pass
                log.debug("heartbeat of run %s not recorded: %s", self._run_id, e)

    def stop(self) -> None:
        """Stop beating; a beat under way may still finish (its thread is not waited for)."""
        self._stop.set()


def end_dead(run: Run, why: str) -> None:
    """Mark a dead writer's run KILLED, saying why."""
    c = current_client()
    c.set_tag(run.info.run_id, "fallopt.error", why)
    c.set_terminated(run.info.run_id, "KILLED")


def live_runs(runs: list[Run]) -> list[Run]:
    """The RUNNING `runs` whose writers may be alive; the dead ones' runs are ended KILLED."""
    liveness, alive = _Liveness(), []
    for run in runs:
        why = liveness.dead(run)
        if why is None:
            alive.append(run)
        else:
            end_dead(run, why)
    return alive


def reap_dead_runs(experiment_id: str) -> list[str]:
    """Mark KILLED the experiment's RUNNING runs whose writer is known to have died.

    A SIGKILLed process cannot end its runs (a job's, a sweep's parent, a stage upload); this
    is how they stop showing as RUNNING. A writer on this host is checked by its pid, one on
    another host by its Ray node (when this process is in Ray) or its heartbeat; runs of
    other writers are left alone.
    """
    running = find_runs(experiment_id, {}, "RUNNING")
    alive = {run.info.run_id for run in live_runs(running)}
    return [run.info.run_id for run in running if run.info.run_id not in alive]


_last_run_id: str | None = None


def last_run_id() -> str | None:
    """The id of the run this process started last (`mlflow.last_active_run` reads it whole)."""
    return _last_run_id


@contextmanager
def tracked_run(experiment_id: str, run_name: str | None, tags: dict[str, str]) -> Iterator[str]:
    """Run the body inside an MLflow run and yield its id.

    The run ends FINISHED on success, KILLED on Ctrl-C and FAILED on any error (with the error
    as tag `fallopt.error`): it is never left RUNNING. A Ctrl-C that some library swallowed
    still ends it KILLED (see `interrupt`). In a Ray worker the run beats a heartbeat, so a
    writer that dies on another host is found dead by later jobs (`reap_dead_runs`). Tags and
    final metrics the body logs wait for the run's next request (`_Waiting`); whatever waits
    when the run ends is sent, however it ends.
    """
    global _last_run_id
    # A Ray worker may run on another host: its run beats, so that others can tell it died.
    remote = ray_node() is not None
    if remote:
        tags = {**tags, HEARTBEAT_TAG: f"{time.time():.0f}"}
    run = mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags=tags)
    run_id = _last_run_id = run.info.run_id
    _waiting.start(run_id)
    heartbeat = Heartbeat(mlflow.get_tracking_uri(), run_id) if remote else None
    try:
        interrupt.check()
        yield run_id
        interrupt.check()
        _send(run_id)
    except KeyboardInterrupt:
        _end_killed(run_id)
        raise
    except BaseException as e:
        if interrupt.received():  # Ctrl-C, surfacing as the error of what it cut short
            _end_killed(run_id)
            raise KeyboardInterrupt("Ctrl-C (SIGINT) received") from e
        try:
            _send_quietly(run_id, {"fallopt.error": f"{type(e).__name__}: {e}"[:MAX_TAG]})
        finally:
            mlflow.end_run("FAILED")
        raise
    finally:
        _waiting.start(None)
        if heartbeat is not None:
            heartbeat.stop()
    mlflow.end_run("FINISHED")


def _end_killed(run_id: str) -> None:
    """End the run KILLED, then send what waited: a second Ctrl-C meanwhile leaves it KILLED.

    A store that cannot say so must not hide the Ctrl-C.
    """
    try:
        mlflow.end_run("KILLED")
    except Exception as e:
        log.warning("[track] cannot mark the interrupted run KILLED: %s", e)
    _send_quietly(run_id)


class _Waiting:
    """The tags and final metrics of `tracked_run`'s run that wait for its next request.

    A job tags and scores its run a dozen times; each request costs 5 ms on SQLite and 20-30
    ms against a server. They go with the next request the run makes anyway (its params, an
    epoch's metrics) or when it ends. Params are never kept waiting: a run that dies still
    shows its config. Tags by key: the last value set is the one sent.
    """

    def __init__(self) -> None:
        self.run_id: str | None = None
        self.tags: dict[str, str] = {}
        self.metrics: list[Any] = []

    def start(self, run_id: str | None) -> None:
        """Keep what `run_id` logs waiting (None: send everything at once), nothing yet."""
        self.run_id, self.tags, self.metrics = run_id, {}, []

    def here(self) -> bool:
        """Whether what is logged now may wait: the active run is `tracked_run`'s."""
        run = mlflow.active_run()
        return run is not None and run.info.run_id == self.run_id


_waiting = _Waiting()


def _send(
    run_id: str,
    tags: dict[str, str] | None = None,
    metrics: Sequence[Any] = (),
    params: Sequence[Any] = (),
) -> None:
    """Send these and what waits for `run_id` in one request (MLflow splits it if need be).

    What waited is forgotten only once sent.
    """
    from mlflow.entities import RunTag

    waited = _waiting.run_id == run_id
    all_tags = {**(_waiting.tags if waited else {}), **(tags or {})}
    all_metrics = [*(_waiting.metrics if waited else []), *metrics]
    if all_tags or all_metrics or params:
        current_client().log_batch(
            run_id,
            metrics=all_metrics,
            params=list(params),
            tags=[RunTag(k, v) for k, v in all_tags.items()],
        )
    if waited:
        _waiting.tags, _waiting.metrics = {}, []


def _send_quietly(run_id: str, tags: dict[str, str] | None = None) -> None:
    """`_send`, for a run that is ending anyway: a store that fails here fails the end too."""
    try:
        _send(run_id, tags)
    except Exception as e:
        log.warning("[track] cannot send the run's last tags and metrics: %s", e)


def _active_run_id() -> str:
    run = mlflow.active_run()
    if run is None:
        raise RuntimeError("no active MLflow run (track.tracked_run starts one)")
    return run.info.run_id


def _log(tags: dict[str, str] | None = None, metrics: Sequence[Any] = ()) -> None:
    """Log to the active run: waiting for its next request inside `tracked_run`, else now."""
    if _waiting.here():
        _waiting.tags.update(tags or {})
        _waiting.metrics.extend(metrics)
    else:
        _send(_active_run_id(), tags, metrics)


def log_params(flat: dict[str, Any]) -> None:
    """Log already flattened params (at once); values become strings as MLflow stores them."""
    from mlflow.entities import Param

    _send(_active_run_id(), params=[Param(key, str(value)) for key, value in flat.items()])


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    """Log metrics; at a step (the epoch, for training curves) they are sent at once."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    logged = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
    if step is None:
        _log(metrics=logged)
    else:
        _send(_active_run_id(), metrics=logged)


def metric_name(keras_name: str) -> str:
    """Keras' history name as logged: loss -> train_loss, accuracy -> train_accuracy."""
    return keras_name if keras_name.startswith("val_") else f"train_{keras_name}"


def _as_metrics(logs: dict[str, float]) -> dict[str, float]:
    return {metric_name(k): v for k, v in logs.items()}


def epoch_logger(first_step: int) -> Callable[[int, dict[str, float]], None]:
    """A Keras epoch hook logging at step = first_step + epoch.

    Steps are epochs counted over the whole run (1-based, as Keras prints them): baseline
    epochs first, then fine-tune epochs, so one curve shows both and the last value is the
    final model's.
    """
    return lambda epoch, logs: log_metrics(_as_metrics(logs), step=first_step + epoch)


def log_history(history: dict[str, list[float]], first_step: int) -> None:
    """Log a reused stage's Keras history as if it had been streamed."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    logged = [
        Metric(metric_name(name), float(value), now, first_step + i)
        for name, values in history.items()
        for i, value in enumerate(values)
    ]
    _log(metrics=logged)


def set_tags(tags: dict[str, str]) -> None:
    """Tag the active run."""
    _log({key: str(value) for key, value in tags.items()})


def log_artifacts(paths: list[Path], artifact_path: str | None = None) -> None:
    """Copy files into the run's artifact store."""
    c, run_id = current_client(), _active_run_id()
    for path in paths:
        c.log_artifact(run_id, str(path), artifact_path=artifact_path)


# A unique-key clash as SQLite, PostgreSQL and MySQL word it.
_DUPLICATE = re.compile(r"UNIQUE constraint failed|duplicate key|Duplicate entry", re.IGNORECASE)

# MLflow's names for what a split is used for (its runs table shows them under Datasets).
_CONTEXTS = {"train": "training", "val": "validation", "test": "test"}


def log_datasets(name: str, origin: str, digests: dict[str, str]) -> None:
    """Log each split as an MLflow dataset input: name, content digest and source.

    Only this description is stored, never the images, so it costs nothing at any size.
    """
    import warnings

    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    if Path(origin).exists():
        with warnings.catch_warnings():  # "can be interpreted in multiple ways": all local
            warnings.simplefilter("ignore", UserWarning)
            source = resolve_dataset_source(str(Path(origin).resolve()))
    else:  # a generator, not a file
        source = CodeDatasetSource({"origin": origin})
    splits = [
        MetaDataset(source, name=f"{name}-{split}", digest=digest)
        for split, digest in digests.items()
    ]
    _log_inputs(splits, [_CONTEXTS.get(split, split) for split in digests])


def _log_inputs(datasets: list[Any], contexts: list[str]) -> None:
    """`mlflow.log_inputs`, retried when another job inserted the same new data set meanwhile.

    MLflow looks a data set up, then inserts it: two jobs logging the same new one at once
    collide on its unique key (seen with 2 sweeps on one SQLite store). The loser's retry
    finds the winner's row.
    """
    for attempt in range(3):
        try:
            mlflow.log_inputs(datasets, contexts, [None] * len(datasets))
            return
        except MlflowException as e:
            if attempt == 2 or not _DUPLICATE.search(str(e)):
                raise
            time.sleep(0.2 * (attempt + 1))
