"""Launching a sweep's jobs: what fallopt's Hydra plugins do, kept out of them.

Hydra's plugins (hydra_plugins/fallopt_hydra: the default sweeper and the Ray launcher) must
live in the `hydra_plugins` namespace, and Hydra executes those modules again whenever it
scans for plugins, so their classes and functions are redefined each time. The work is done
here, where every object keeps its identity; the plugin classes only call it.

- Joining a Ray cluster: `check_head` (a head that does not answer is reported in seconds,
  Ray itself retried one for 14 minutes) and `init_options` (keys Ray refuses when joining).
- `record_lost`: a job lost with its Ray node or worker, recorded as failed on the sweep's
  parent and its run ended KILLED, so that the sweep goes on and a re-run redoes it.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable, Sequence
from typing import Any

from omegaconf import DictConfig

from fallopt.errors import FalloptError

log = logging.getLogger("fallopt.ray")


# ray.init keys that describe a local instance: Ray refuses them when connecting to a cluster.
LOCAL_ONLY = ("num_cpus", "num_gpus", "resources", "labels", "object_store_memory",
              "_system_config", "_enable_object_reconstruction")  # fmt: skip
# hydra-ray-launcher's own default for the local instance (Ray issue 11966: CI memory).
LOCAL_OBJECT_STORE_BYTES = 78_643_200
TCP_SECONDS = 2.0  # the head's port must accept a connection within this
GCS_SECONDS = 3.0  # and its GCS answer within this
# Ray's own connection timeouts for the probe (and the driver's ray.init after it).
_GCS_TIMEOUTS = {"RAY_py_gcs_connect_timeout_s": "3", "RAY_gcs_rpc_server_connect_timeout_s": "2"}


class RayHeadError(FalloptError):
    """The Ray cluster named by the launcher's address cannot be reached."""


def cluster_address(address: str | None) -> str | None:
    """`host:port` of the cluster `ray.init(address=...)` would join; None: a local instance.

    None when there is no address, no RAY_ADDRESS and no cluster started on this machine.
    """
    if address and address.startswith("ray://"):
        return address.removeprefix("ray://")
    from ray._private.services import canonicalize_bootstrap_address

    try:
        return canonicalize_bootstrap_address(address)
    except ConnectionError as e:  # `auto` and no cluster found
        raise RayHeadError(
            f"hydra.launcher.ray.init.address={address}: {e}. Start a head node (`ray start "
            "--head`) or give its address (README: Scaling up)"
        ) from None


def check_head(address: str | None) -> str | None:
    """Fail in seconds if the cluster's head does not answer; returns its `host:port`.

    Ray itself retried an unreachable head for 14 minutes here before it gave up. A TCP
    connection alone proves little (a proxy or another service may accept it), so the head's
    GCS is asked too, within a deadline.
    """
    for name, seconds in _GCS_TIMEOUTS.items():  # read when Ray loads: before `import ray`
        os.environ.setdefault(name, seconds)
    target = cluster_address(address)
    if target is None:
        return None
    why = _head_silent(target, gcs=not (address or "").startswith("ray://"))
    if why is not None:
        port = target.rpartition(":")[2]
        raise RayHeadError(
            f"hydra.launcher.ray.init.address={address or target}: no Ray head answers at "
            f"{target} ({why}). Start it (`ray start --head --port={port}`) or fix the "
            "address (README: Scaling up)"
        )
    return target


def _head_silent(target: str, gcs: bool) -> str | None:
    """Why the Ray head at `host:port` does not answer, or None if it (and its GCS) does.

    A Ray Client address (`ray://`) is a proxy, not a GCS: only its port is tried.
    """
    host, _, port = target.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=TCP_SECONDS).close()
    except (OSError, ValueError) as e:
        return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    if not gcs:
        return None
    from ray._raylet import GcsClient

    answer: list[str | None] = ["no answer from its GCS within 3 s"]

    def probe() -> None:
        try:
            GcsClient(address=target)
            answer[0] = None
        except Exception as e:  # what Ray raises varies: RpcError, RuntimeError, ...
            answer[0] = f"its GCS: {type(e).__name__}: {str(e).splitlines()[0][:200]}"

    thread = threading.Thread(target=probe, daemon=True, name="fallopt-ray-probe")
    thread.start()
    thread.join(GCS_SECONDS)
    return answer[0]


def init_options(init: dict[str, Any], connecting: bool) -> dict[str, Any]:
    """`ray.init` keyword arguments: local-only keys dropped when joining a cluster."""
    options = dict(init)
    if not connecting:
        options.setdefault("object_store_memory", LOCAL_OBJECT_STORE_BYTES)
        return options
    dropped = [key for key in LOCAL_ONLY if options.pop(key, None) is not None]
    if dropped:
        log.warning(
            "[ray] joining a running cluster: %s ignored (they describe a local instance; "
            "each node sets its own with `ray start`)",
            ", ".join(f"hydra.launcher.ray.init.{key}" for key in dropped),
        )
    return options


def record_lost(config: DictConfig, num: int, overrides: Sequence[str], error: Exception) -> str:
    """Record a job lost with its Ray node or worker: failed on the parent, its run KILLED.

    Ray retried it as often as `hydra.launcher.ray.remote.max_retries` allowed, so no attempt
    of it lives on. The run is found by the sweep's parent and the job's config hash. Returns
    the reason recorded.
    """
    from hydra.core.utils import filter_overrides
    from omegaconf import open_dict

    from fallopt import job, track
    from fallopt.config import validate
    from fallopt.identity import config_hash
    from fallopt.protocol import PARENT_ENV, TOTAL_ENV

    reason = f"lost on Ray: {type(error).__name__}: {str(error).splitlines()[0]}"
    total = os.environ.get(TOTAL_ENV)
    lost = job.Job(num, int(total) if total else None,
                   job.task_overrides(filter_overrides(overrides)),
                   str(config.hydra.sweep.dir), 1)  # fmt: skip
    log.error("[ray] %s (%s) %s", lost.label, lost.overrides, reason)
    parent = os.environ.get(PARENT_ENV)
    job.record(parent, lost, "failed", None, reason)
    task = config.copy()
    with open_dict(task):
        del task["hydra"]
    try:
        typed = validate(task)
    except FalloptError:  # a config that never ran: it opened no run
        return reason
    if parent is not None:
        tags = {"mlflow.parentRunId": parent, "fallopt.config_hash": config_hash(typed)}
        for run in track.find_runs(track.connect(typed.tracking), tags, "RUNNING"):
            track.end_dead(run, reason[: track.MAX_TAG])
            log.info("[ray] run %s of the lost job: KILLED", run.info.run_id)
    return reason


class JobExit(RuntimeError):
    """A job on Ray that ended with an exit (`keep_going=false`, a bad value).

    It carries the exit code and the errors the job logged: Ray's log forwarding may not
    deliver them before the sweep ends.
    """

    def __init__(self, code: object, errors: Sequence[str] = ()) -> None:
        super().__init__("\n".join(errors) or f"the job exited with {code!r}")
        self.code = code
        self.errors = list(errors)

    def __reduce__(self) -> tuple[type, tuple[object, list[str]]]:
        return type(self), (self.code, self.errors)  # Ray pickles it: rebuilt as it was made


class _Errors(logging.Handler):
    """The messages of the ERROR records logged while it is attached."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


class ExitAsError:
    """A task function for Ray workers: the job's exit becomes a `JobExit` error.

    fallopt stops a sweep by exiting from a job; in a Ray task that kills the worker, which
    Ray then retries as if its node were lost. As an error, Hydra records it in the job's
    result, and the launcher stops the sweep with the same exit code and the job's errors.
    """

    def __init__(self, task: Callable[[DictConfig], Any]) -> None:
        self.task = task

    def __call__(self, cfg: DictConfig) -> Any:
        """Run the job; its exit is raised as `JobExit`."""
        errors = _Errors()
        logging.getLogger().addHandler(errors)
        try:
            return self.task(cfg)
        except SystemExit as e:
            raise JobExit(e.code, errors.lines) from None
        finally:
            logging.getLogger().removeHandler(errors)


def describe_nodes(nodes: list[dict[str, Any]]) -> str:
    """`2 nodes alive, 2 CPUs`, from `ray.nodes()`."""
    alive = [n for n in nodes if n.get("Alive")]
    cpus = sum(n.get("Resources", {}).get("CPU", 0) for n in alive)
    return f"{len(alive)} nodes alive, {cpus:g} CPUs"
