"""MLflow: where runs go, how they start and end, and what every run logs."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import socket
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Run
from mlflow.exceptions import MlflowException

from fallopt import interrupt
from fallopt.config import TrackingConfig
from fallopt.errors import FalloptError

# The SQLite store's schema migrations log dozens of INFO lines on first use.
logging.getLogger("alembic").setLevel(logging.WARNING)

_SQLITE = "sqlite:///"
MAX_TAG = 5000  # characters fallopt writes into one tag (MLflow takes 8,000)


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


def connect(cfg: TrackingConfig, experiment: str | None = None) -> str:
    """Point MLflow at `cfg.uri` and return the id of an experiment, creating both if needed.

    The experiment is `cfg.experiment` unless named. A new experiment's artifacts go to
    `cfg.artifact_location`, by default `artifacts/` beside a SQLite database, so the whole
    store lives under one folder.
    """
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
    if cfg.uri.startswith(("http://", "https://")):
        check_reachable(cfg.uri)
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


def owner_tags() -> dict[str, str]:
    """Which process writes a run: lets a later process tell a dead writer from a live one."""
    return {"fallopt.host": socket.gethostname(), "fallopt.pid": str(os.getpid())}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def reap_dead_runs(experiment_id: str) -> list[str]:
    """Mark KILLED the experiment's RUNNING runs whose writer, on this host, has died.

    A SIGKILLed process cannot end its runs (a job's, a sweep's parent, a stage upload); this
    is how they stop showing as RUNNING. Runs written from other hosts are left alone: their
    writers cannot be checked from here.
    """
    reaped = []
    for run in find_runs(experiment_id, {"fallopt.host": socket.gethostname()}, "RUNNING"):
        pid = run.data.tags.get("fallopt.pid", "")
        if pid.isdigit() and not _alive(int(pid)):
            client = mlflow.MlflowClient()
            client.set_tag(run.info.run_id, "fallopt.error", "its process died (killed)")
            client.set_terminated(run.info.run_id, "KILLED")
            reaped.append(run.info.run_id)
    return reaped


@contextmanager
def tracked_run(experiment_id: str, run_name: str | None, tags: dict[str, str]) -> Iterator[str]:
    """Run the body inside an MLflow run and yield its id.

    The run ends FINISHED on success, KILLED on Ctrl-C and FAILED on any error (with the error
    as tag `fallopt.error`): it is never left RUNNING. A Ctrl-C that some library swallowed
    still ends it KILLED (see `interrupt`).
    """
    run = mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags=tags)
    try:
        interrupt.check()
        yield run.info.run_id
        interrupt.check()
    except KeyboardInterrupt:
        mlflow.end_run("KILLED")
        raise
    except BaseException as e:
        try:
            mlflow.set_tag("fallopt.error", f"{type(e).__name__}: {e}"[:MAX_TAG])
        finally:
            mlflow.end_run("FAILED")
        raise
    mlflow.end_run("FINISHED")


def log_params(flat: dict[str, Any]) -> None:
    """Log already flattened params; values become strings as MLflow stores them."""
    mlflow.log_params({key: str(value) for key, value in flat.items()})


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    """Log metrics, optionally at a step (the epoch for training curves)."""
    mlflow.log_metrics(metrics, step=step)


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
    return lambda epoch, logs: mlflow.log_metrics(_as_metrics(logs), step=first_step + epoch)


def log_history(history: dict[str, list[float]], first_step: int) -> None:
    """Log a reused stage's Keras history as if it had been streamed."""
    for i in range(len(next(iter(history.values()), []))):
        logs = {name: values[i] for name, values in history.items()}
        mlflow.log_metrics(_as_metrics(logs), step=first_step + i)


def set_tags(tags: dict[str, str]) -> None:
    """Tag the active run."""
    mlflow.set_tags(tags)


def log_artifacts(paths: list[Path], artifact_path: str | None = None) -> None:
    """Copy files into the run's artifact store."""
    for path in paths:
        mlflow.log_artifact(str(path), artifact_path=artifact_path)


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
    for split, digest in digests.items():
        dataset = MetaDataset(source, name=f"{name}-{split}", digest=digest)
        mlflow.log_input(dataset, context=_CONTEXTS.get(split, split))
