"""fallopt's Ray launcher without a cluster (its work is in fallopt.launching): its checks,
and its record of a lost job. The cluster itself is test_ray_cluster.py (slow); the sweeper's
config loader is test_composing.py."""

from __future__ import annotations

import logging
import pickle
import socket
import time

import pytest
from hydra import compose, initialize_config_dir
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from fallopt import track
from fallopt.config import TrackingConfig, validate
from fallopt.identity import config_hash
from fallopt.launching import (
    LOCAL_OBJECT_STORE_BYTES,
    ExitAsError,
    JobExit,
    RayHeadError,
    check_head,
    init_options,
    record_lost,
)
from fallopt.protocol import PARENT_ENV, TOTAL_ENV, job_outcomes

from .conftest import CONF, fallopt_cli


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once it is closed


def test_a_head_that_does_not_answer_is_named_with_the_fix_in_seconds():
    port = _closed_port()
    start = time.monotonic()
    with pytest.raises(RayHeadError) as error:
        check_head(f"127.0.0.1:{port}")
    assert time.monotonic() - start < 6
    message = str(error.value)
    assert f"hydra.launcher.ray.init.address=127.0.0.1:{port}" in message
    assert "no Ray head answers" in message and f"ray start --head --port={port}" in message
    with pytest.raises(RayHeadError, match="Start a head node"):
        check_head("auto")  # and no cluster on this machine
    assert check_head(None) is None  # a local instance: nothing to reach


def test_keys_ray_refuses_when_joining_a_cluster_are_dropped_with_a_warning(caplog):
    init = {"address": "10.0.0.1:6379", "num_cpus": 2, "object_store_memory": 10**8}
    with caplog.at_level("WARNING"):
        options = init_options(init, connecting=True)
    assert options == {"address": "10.0.0.1:6379"}
    assert "hydra.launcher.ray.init.num_cpus" in caplog.text
    assert "hydra.launcher.ray.init.object_store_memory" in caplog.text
    local = init_options({"address": None, "num_cpus": 2}, connecting=False)
    assert local["object_store_memory"] == LOCAL_OBJECT_STORE_BYTES and local["num_cpus"] == 2


def test_an_unreachable_head_fails_the_sweep_before_anything_is_opened(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    port = _closed_port()
    proc = fallopt_cli(
        "-m", "hydra/launcher=ray", f"hydra.launcher.ray.init.address=127.0.0.1:{port}",
        "prune.sparsity=0.5,0.8", f"tracking.uri={uri}", f"hydra.sweep.dir={tmp_path}/sweep",
        timeout=120,
    )  # fmt: skip
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output[-3000:]
    assert "no Ray head answers at" in output and "Traceback" not in output
    assert not (tmp_path / "mlruns").exists()  # no store, no parent run, nothing to clean


def test_a_job_lost_with_its_node_is_recorded_failed_and_its_run_killed(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    tracking = TrackingConfig(uri=uri)
    experiment = track.connect(tracking)
    client = MlflowClient(uri)
    parent = client.create_run(experiment, tags={"fallopt.role": "sweep"}).info.run_id
    overrides = ["prune.sparsity=0.8", "quant=int8", f"tracking.uri={uri}"]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        config = compose("config", overrides, return_hydra_config=True)
        digest = config_hash(validate(compose("config", overrides)))
    # Its run, on another host (its writer cannot be checked), named as the user chose.
    orphan = client.create_run(
        experiment, run_name="my name for it",
        tags={"mlflow.parentRunId": parent, "fallopt.config_hash": digest,
              "fallopt.host": "gpu-7", "fallopt.pid": "1"},
    ).info.run_id  # fmt: skip
    monkeypatch.setenv(PARENT_ENV, parent)
    monkeypatch.setenv(TOTAL_ENV, "8")
    reason = record_lost(config, 7, overrides, RuntimeError("node 1f2e died\nmore"))
    assert reason == "lost on Ray: RuntimeError: node 1f2e died"
    record = job_outcomes(client, parent)[7]
    assert record["outcome"] == "failed" and record["run_id"] is None
    assert record["error"] == "lost on Ray: RuntimeError: node 1f2e died"
    assert record["overrides"] == "prune.sparsity=0.8 quant=int8"
    orphan = client.get_run(orphan)
    assert orphan.info.status == "KILLED"
    assert orphan.data.tags["fallopt.error"].startswith("lost on Ray")


def test_a_job_that_exits_on_ray_raises_its_code_and_errors_instead_of_killing_the_worker():
    def stops_the_sweep(cfg):
        logging.getLogger("fallopt.run").error("prune.sparsity=1.5: must be in [0, 1)")
        raise SystemExit(2)  # keep_going=false, or a bad value: fallopt exits from the job

    before = list(logging.getLogger().handlers)
    with pytest.raises(JobExit) as stopped:
        ExitAsError(stops_the_sweep)(OmegaConf.create({}))
    # The driver logs the errors: Ray's log forwarding may not deliver them before it exits.
    assert stopped.value.code == 2
    assert stopped.value.errors == ["prune.sparsity=1.5: must be in [0, 1)"]
    shipped = pickle.loads(pickle.dumps(stopped.value))  # as Ray returns it to the driver
    assert (shipped.code, shipped.errors, str(shipped)) == (
        2,
        stopped.value.errors,
        str(stopped.value),
    )
    assert len(logging.getLogger().handlers) == len(before)  # the catcher is gone again
    assert ExitAsError(lambda cfg: 0.75)(OmegaConf.create({})) == 0.75  # answers pass through
