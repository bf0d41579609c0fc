"""A sweep on a real multi-node Ray cluster with no shared disk (slow).

`scripts/ray_cluster_demo.py` builds it on this machine: two Ray nodes (`ray start`), each in
a directory of its own with a FALLOPT_CACHE of its own, and an `mlflow server` on PostgreSQL
that serves the artifacts, so nothing passes between the nodes but through the server. It
runs a prune x quant grid of 8 jobs, then a second grid during which the worker node is
killed, then that grid again. What happened is checked here from the tracking store itself.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter, defaultdict

import pytest
from mlflow.tracking import MlflowClient

from .conftest import REPO, TINY, tracked


def _grid(runs: list) -> dict[str, list]:
    """Runs by config hash (one combination each)."""
    by_hash = defaultdict(list)
    for run in runs:
        by_hash[run.data.tags["fallopt.config_hash"]].append(run)
    return by_hash


@pytest.mark.slow
def test_a_sweep_across_two_nodes_trains_each_stage_once_and_resumes_after_a_node_dies(
    tmp_path, mlflow_server
):
    tiny = [*TINY, "target.tflm_samples=10"]
    proc = subprocess.run(
        [sys.executable, "scripts/ray_cluster_demo.py", "--tracking-uri", mlflow_server,
         "--dir", str(tmp_path / "c"), "--kill-node", "--json", str(tmp_path / "demo.json"),
         *tiny],
        cwd=REPO, capture_output=True, text=True, timeout=1500,
    )  # fmt: skip
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    demo = json.loads((tmp_path / "demo.json").read_text())
    driver = tmp_path / "c" / "driver"
    client = MlflowClient(mlflow_server)

    # The grid: every job FINISHED under one parent, on both nodes.
    grid = tracked(mlflow_server, "multirun/grid")
    assert grid.parent.info.status == "FINISHED" and demo["grid_exit"] == 0
    assert len(grid.children) == 8 and {r.info.status for r in grid.children} == {"FINISHED"}
    nodes = Counter(r.data.tags["fallopt.ray_node"] for r in grid.children)
    assert len(nodes) == 2 and set(nodes) <= set(demo["nodes"])
    # Each stage trained once in the whole cluster; a node that did not train it fetched it
    # from the store (its checksums checked) before its cache had it.
    stages = client.get_experiment_by_name("fallopt.stages").experiment_id
    published = client.search_runs([stages], "attributes.status = 'FINISHED'")
    for kind in ("baseline", "pruned"):  # one baseline; a pruned model per sparsity
        by_stage = defaultdict(list)
        for run in grid.children:
            tags = run.data.tags
            stage = run.data.params["prune.sparsity"] if kind == "pruned" else "the baseline"
            by_stage[stage].append((tags["fallopt.ray_node"], tags[f"fallopt.{kind}_from"]))
        for stage, uses in by_stage.items():
            origins = Counter(origin for _, origin in uses)
            assert origins["built"] == 1, (kind, stage, uses)
            builder = next(node for node, origin in uses if origin == "built")
            others = {node for node, _ in uses} - {builder}
            for node in others:  # the first use there came from the store
                assert "store" in {o for n, o in uses if n == node}, (kind, stage, uses)
    grid_stages = [r for r in published if r.data.tags["fallopt.stage"].startswith("baseline")]
    assert len(grid_stages) == 2  # the grid's baseline and the lossy grid's (seed=1)
    assert "fetched from the shared store" in (driver / "grid.log").read_text()
    assert "checked against their checksums" in (driver / "grid.log").read_text()

    # The lossy grid: the worker node was killed mid-sweep; the sweep says which jobs were
    # lost (exit 3), their runs end KILLED, none is left RUNNING.
    lossy = tracked(mlflow_server, "multirun/lossy")
    assert demo["lossy_exit"] == 3
    statuses = Counter(r.info.status for r in lossy.children)
    assert statuses["KILLED"] >= 1 and statuses["RUNNING"] == 0
    assert "lost on Ray: NodeDiedError" in (driver / "lossy.log").read_text()
    finished = {h for h, runs in _grid(lossy.children).items()
                if any(r.info.status == "FINISHED" for r in runs)}  # fmt: skip
    everything = set(_grid(lossy.children))
    assert len(everything) == 8 and finished < everything

    # Run again, it finishes exactly the missing combinations, once each.
    again = tracked(mlflow_server, "multirun/again")
    assert demo["again_exit"] == 0 and again.parent.info.status == "FINISHED"
    redone = _grid(again.children)
    assert set(redone) == everything - finished
    assert all(len(runs) == 1 and runs[0].info.status == "FINISHED" for runs in redone.values())
    assert f"{len(redone)} finished, {len(finished)} reused" in (driver / "again.log").read_text()
