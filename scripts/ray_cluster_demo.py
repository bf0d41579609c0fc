"""A sweep on a Ray cluster whose nodes share no disk: which node ran what, and which stages
were trained and which fetched. Optionally a node dies mid-sweep and the sweep is re-run.

Builds the cluster on this machine (scripts/local_cluster.py): an `mlflow server` serving
the artifacts (on PostgreSQL with --postgres, else on a SQLite file), a Ray head and a worker
node, each in a directory of its own with a FALLOPT_CACHE of its own, and a driver directory
from which the sweep is launched, as on a real cluster:

  python -m fallopt.run -m hydra/launcher=ray hydra.launcher.ray.init.address=HEAD:PORT \\
      tracking=server tracking.uri=http://SERVER:PORT prune.sparsity=0.5,0.8 quant=...

With --kill-node, a second sweep (seed=1: stages of its own) runs with Ray's retries off;
once a job has finished on the worker node and another runs there, the worker node is
frozen, then killed (SIGKILL, raylet and workers), the sweep ends listing the lost jobs
(exit 3), the node comes back, and the same sweep is run again: it finishes exactly the
missing jobs.

python scripts/ray_cluster_demo.py [--postgres ADMIN_URI] [--tracking-uri URI]
    [--dir DIR] [--kill-node] [--json FILE] [OVERRIDES ...]
OVERRIDES go to every sweep (default: a small data set and CNN, 8 jobs of about 10 s).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from contextlib import ExitStack
from pathlib import Path

import local_cluster
from local_cluster import RayNode

REPO = Path(__file__).resolve().parents[1]
GRID = ["prune.sparsity=0.5,0.8", "quant=none,dynamic,float16,int8"]
SMALL = [
    "dataset.image_size=32", "dataset.n_train=200", "dataset.n_test=100", "train.epochs=1",
    "train.batch_size=32", "prune.fine_tune_epochs=1", "model.filters=[8,16]",
    "model.dense_units=[16]", "target.tflm_samples=20",
]  # fmt: skip
STAGE_KINDS = ("baseline", "pruned")
FREEZE_SETTLE_SECONDS = 0.5


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--postgres", default=os.environ.get("FALLOPT_TEST_POSTGRES"),
        help="PostgreSQL admin URI for the server's store (default: SQLite)",
    )  # fmt: skip
    parser.add_argument("--tracking-uri", help="use this running tracking server instead")
    parser.add_argument("--dir", type=Path, help="where the nodes live (default: temporary)")
    parser.add_argument("--kill-node", action="store_true")
    parser.add_argument("--json", type=Path, help="write what happened here, for tests")
    parser.add_argument("overrides", nargs="*", default=SMALL)
    return parser.parse_args()


def sweep(driver: Path, head: RayNode, uri: str, name: str, *overrides: str) -> subprocess.Popen:
    """`python -m fallopt.run -m` on the cluster, launched from the driver's directory."""
    args = [sys.executable, "-m", "fallopt.run", "-m", "hydra/launcher=ray",
            f"hydra.launcher.ray.init.address={head.address}", "tracking=server",
            f"tracking.uri={uri}",
            f"hydra.sweep.dir=multirun/{name}", *overrides]  # fmt: skip
    log = (driver / f"{name}.log").open("w")
    env = {**os.environ, "FALLOPT_CACHE": str(driver / "cache"), "PYTHONPATH": str(REPO),
           **local_cluster.ray_auth(head.token)}  # fmt: skip
    print(f"[demo] {name}: {' '.join(args[2:])}", flush=True)
    return subprocess.Popen(args, cwd=driver, env=env, stdout=log, stderr=subprocess.STDOUT)


def runs_of(uri: str, sweep_dir: str) -> tuple[object, list]:
    """The sweep's parent run and its children."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("fallopt")
    parents = client.search_runs(
        [experiment.experiment_id], f"tags.`fallopt.sweep_dir` = '{sweep_dir}'"
    )
    children = client.search_runs(
        [experiment.experiment_id], f"tags.mlflow.parentRunId = '{parents[0].info.run_id}'"
    )
    return parents[0], children


def node_names(head: RayNode) -> dict[str, str]:
    """Ray node id -> the demo's name for the node (its custom resource)."""
    os.environ.update(local_cluster.ray_auth(head.token))
    import ray

    ray.init(address=head.address, logging_level="ERROR")
    try:
        names = {}
        for node in ray.nodes():
            own = [r for r in node["Resources"] if r == "head" or r.startswith("worker")]
            names[node["NodeID"]] = own[0] if own else node["NodeID"][:8]
        return names
    finally:
        ray.shutdown()


def report(uri: str, sweep_dir: str, names: dict[str, str], common: list[str]) -> dict:
    """Print which node ran each job and where its stages came from; return it as data.

    Jobs are named by their overrides, less the `common` ones every job has.
    """
    parent, children = runs_of(uri, sweep_dir)
    rows = []
    for run in sorted(children, key=lambda r: r.data.tags.get("mlflow.runName", "")):
        tags = run.data.tags
        name = " ".join(o for o in tags.get("mlflow.runName", "").split() if o not in common)
        node = names.get(tags.get("fallopt.ray_node", ""), "?")
        origins = {kind: tags.get(f"fallopt.{kind}_from", "-") for kind in STAGE_KINDS}
        rows.append({"run": run.info.run_id, "name": name,
                     "status": run.info.status, "node": node,
                     "config_hash": tags.get("fallopt.config_hash"), **origins})  # fmt: skip
        print(f"  {node:8} {run.info.status:9} baseline {origins['baseline']:6} pruned "
              f"{origins['pruned']:6} {name}")  # fmt: skip
    built = Counter(r["node"] for r in rows for k in STAGE_KINDS if r[k] == "built")
    fetched = Counter(r["node"] for r in rows for k in STAGE_KINDS if r[k] == "store")
    print(f"  stages trained: {sum(built.values())} ({dict(built)}); fetched from the store: "
          f"{sum(fetched.values())} ({dict(fetched)}); jobs per node: "
          f"{dict(Counter(r['node'] for r in rows))}")  # fmt: skip
    return {"parent": parent.info.run_id, "parent_status": parent.info.status, "runs": rows}


def running_on(uri: str, sweep_dir: str, worker: str) -> bool:
    """Whether a job runs on `worker` (a node id) after one has finished there."""
    try:
        _, children = runs_of(uri, sweep_dir)
    except (IndexError, AttributeError):  # the sweep's parent is not there yet
        return False
    there = {r.info.status for r in children if r.data.tags.get("fallopt.ray_node") == worker}
    return {"FINISHED", "RUNNING"} <= there


def freeze_under_a_job(uri: str, sweep_dir: str, worker: RayNode, worker_id: str,
                       proc: subprocess.Popen) -> None:  # fmt: skip
    """Return with the worker node frozen (SIGSTOP) while a job runs on it.

    Frozen first, then checked: a job still running once the node stands still cannot finish
    before the kill, however short it is. The pause lets a request it sent just before reach
    the server.
    """
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if running_on(uri, sweep_dir, worker_id):
            worker.pause()
            try:
                time.sleep(FREEZE_SETTLE_SECONDS)
                if running_on(uri, sweep_dir, worker_id):
                    return
            except BaseException:
                worker.resume()
                raise
            worker.resume()
        time.sleep(0.1)
    raise SystemExit("[demo] no job was running on the worker node to kill it under")


def main() -> None:
    args = parse()
    summary: dict = {}
    with ExitStack() as stack:
        root = args.dir or Path(stack.enter_context(tempfile.TemporaryDirectory(dir="/tmp")))
        uri = args.tracking_uri
        if uri is None:
            backend = f"sqlite:///{root}/server.db"
            if args.postgres:
                backend = stack.enter_context(local_cluster.postgres_database(args.postgres))
            uri = stack.enter_context(local_cluster.mlflow_server(backend, root / "server"))
        print(f"[demo] tracking server {uri}", flush=True)
        nodes = stack.enter_context(local_cluster.ray_cluster(root))
        head, worker = nodes
        names = node_names(head)
        print(f"[demo] Ray nodes: {', '.join(f'{v} {k[:8]}' for k, v in names.items())}; each "
              f"with its own directory and FALLOPT_CACHE under {root}", flush=True)  # fmt: skip
        driver = root / "driver"
        driver.mkdir()

        proc = sweep(driver, head, uri, "grid", *GRID, *args.overrides)
        summary["grid_exit"] = proc.wait()
        print(f"[demo] grid: exit {summary['grid_exit']}")
        summary["grid"] = report(uri, "multirun/grid", names, args.overrides)
        summary["nodes"] = names

        if args.kill_node:
            worker_id = next(k for k, v in names.items() if v == worker.name)
            lossy = [*GRID, "seed=1", "+hydra.launcher.ray.remote.max_retries=0", *args.overrides]
            proc = sweep(driver, head, uri, "lossy", *lossy)
            freeze_under_a_job(uri, "multirun/lossy", worker, worker_id, proc)
            print(f"[demo] killing the {worker.name} node (SIGKILL: raylet and workers)")
            worker.kill()
            summary["lossy_exit"] = proc.wait()
            print(f"[demo] lossy: exit {summary['lossy_exit']} (3: jobs lost)")
            summary["lossy"] = report(uri, "multirun/lossy", names, lossy[len(GRID) :])
            worker.start()
            for node, name in node_names(head).items():  # the node back has a new id
                names.setdefault(node, f"{name} (back)" if name in names.values() else name)
            summary["nodes"] = names
            print(f"[demo] {worker.name} is back; the same sweep again:")
            proc = sweep(driver, head, uri, "again", *lossy)
            summary["again_exit"] = proc.wait()
            print(f"[demo] again: exit {summary['again_exit']}")
            summary["again"] = report(uri, "multirun/again", names, lossy[len(GRID) :])
        summary["uri"] = uri
        if args.json:
            args.json.write_text(json.dumps(summary, indent=1))
    codes = [summary.get(k, 0) for k in ("grid_exit", "again_exit")]
    sys.exit(0 if not any(codes) else 1)


if __name__ == "__main__":
    main()
