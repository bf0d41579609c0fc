"""Tracking at scale: a job's MLflow work with 500 finished runs in the experiment, against none.

A job's MLflow work is what `fallopt.job` and `fallopt.task` do with the store, through
fallopt's own functions, in their order: open the store (as a fresh worker process), the
resume lookup, reaping dead writers, finding the sweep's parent by its tag, opening the stage
store, then the run itself (params, dataset inputs, epoch curves, tags, artifacts of a
run's usual sizes, final metrics), the outcome record on the parent and the progress line.

Both cases are measured side by side in one run, in the same store, after 5 jobs that warm
it up (a new server's first requests took seconds): first with a new experiment (it then
holds only the runs of those jobs and of the case itself, 15 at most), then after adding
`--runs` FINISHED runs shaped like fallopt's (each with the params of a real config, 90
metrics and 20 tags, children of the sweep's parent, which then holds their job records),
and 50 published stages.

python scripts/bench_tracking.py [--runs 500] [--jobs 10] [--postgres ADMIN_URI]
  --postgres: also measure an `mlflow server` on a fresh PostgreSQL database (as a cluster
  uses it), e.g. postgresql://fallopt:fallopt@127.0.0.1:5432/postgres
Prints `name: value` lines last.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import local_cluster

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fallopt import job, track  # noqa: E402
from fallopt.config import TrackingConfig, as_dict, flatten  # noqa: E402
from fallopt.protocol import JOB_TAG, PARENT_ENV, SWEEP_DIR_TAG, record_json  # noqa: E402
from fallopt.stage_store import STAGE_TAG, stage_cache  # noqa: E402

SWEEP_DIR = "multirun/bench"
WARM_UP = 5  # jobs run, not timed, before the first case
EPOCHS = 7  # 5 baseline + 2 fine-tune epochs, as a default run logs them
ARTIFACTS = {  # a default run's small and large files
    "config.yaml": 3_000, "sparsity_per_layer.csv": 300, "model.tflite": 350_000,
    "tflite_confusion_matrix.json": 20, "confusion_matrix.json": 20,
    "confusion_matrix.png": 25_000, "training_curves.png": 45_000, "model.keras": 1_400_000,
}  # fmt: skip


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=500)
    parser.add_argument("--jobs", type=int, default=10, help="jobs timed per case (median)")
    parser.add_argument("--postgres", default=os.environ.get("FALLOPT_TEST_POSTGRES"))
    return parser.parse_args()


def config_params() -> dict[str, str]:
    """The params a default run logs: its composed, validated config, flattened."""
    from hydra import compose, initialize_config_dir

    from fallopt.config import register_configs, validate

    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "fallopt" / "conf"), version_base="1.3"):
        cfg = validate(compose("config", overrides=["quant=int8"]))
    return {key: str(value) for key, value in flatten(as_dict(cfg)).items()}


def populate(tracking: TrackingConfig, parent: str, runs: int, params: dict[str, str]) -> None:
    """`runs` FINISHED fallopt-shaped runs under `parent`, their records, and 50 stages."""
    from mlflow.entities import Metric, Param

    client = track.client(tracking.uri)
    experiment_id = track.connect(tracking)
    now = int(time.time() * 1000)
    for i in range(runs):
        tags = {"fallopt.config_hash": uuid.uuid4().hex[:12], "mlflow.parentRunId": parent,
                **track.owner_tags(), "fallopt.pid": "1"}  # fmt: skip
        tags.update({f"fallopt.tag{k}": "x" * 40 for k in range(20 - len(tags))})
        run = client.create_run(experiment_id, run_name=f"job {i}", tags=tags).info.run_id
        items = [Param(k, v) for k, v in params.items()]
        for start in range(0, len(items), 100):
            client.log_batch(run, params=items[start : start + 100])
        client.log_batch(run, metrics=[Metric(f"m{k}", 0.5, now, 0) for k in range(90)])
        client.set_terminated(run, "FINISHED")
        record = {"outcome": "finished", "run_id": run, "overrides": f"seed={i}", "error": ""}
        client.set_tag(parent, f"{JOB_TAG}{i:05d}", record_json(record))
    stages = track.connect(tracking, f"{tracking.experiment}.stages")
    for i in range(50):
        run = client.create_run(stages, tags={STAGE_TAG: f"pruned-{i:016d}", **track.owner_tags()})
        client.set_terminated(run.info.run_id, "FINISHED")


def one_job(tracking: TrackingConfig, num: int, files: list[Path], params: dict[str, str]) -> float:
    """Seconds of one job's MLflow work (see the module's docstring)."""
    track._connected.clear()  # a fresh worker: nothing remembered from earlier jobs
    track.client.cache_clear()
    start = time.perf_counter()
    experiment_id = track.connect(tracking)
    job.finished_run(experiment_id, uuid.uuid4().hex[:12])  # a job not yet done
    track.reap_dead_runs(experiment_id)
    this = job.Job(num, 10_000, f"seed={num}", SWEEP_DIR, 1)
    parent = job.parent_run_id(this, experiment_id)  # by tag, as on another machine
    stage_cache(tracking).status("baseline", "0" * 16)
    tags = {"fallopt.config_hash": uuid.uuid4().hex[:12], "mlflow.parentRunId": parent,
            **track.owner_tags()}  # fmt: skip
    with track.tracked_run(experiment_id, f"seed={num}", tags) as run_id:
        track.log_params(params)
        splits = {split: "abc" for split in ("train", "val", "test")}
        track.log_datasets("synthetic_falls", "synthetic", splits)
        for epoch in range(EPOCHS):
            names = ("train_loss", "train_accuracy", "val_loss", "val_accuracy")
            track.log_metrics(dict.fromkeys(names, 0.5), step=epoch + 1)
        track.set_tags({f"fallopt.stage{k}": "trained" for k in range(12)})
        track.log_artifacts(files[:-1])
        track.log_artifacts(files[-1:], "model")
        track.log_metrics({f"m{k}": 0.5 for k in range(90)})
    job.record(parent, this, "finished", run_id)
    job._progress(parent, this, 1.0)
    return time.perf_counter() - start


def measure(tracking: TrackingConfig, args: argparse.Namespace, files: list[Path]) -> tuple:
    """Median seconds of a job's MLflow work with an empty experiment, then with `runs`."""
    params = config_params()
    experiment_id = track.connect(tracking)
    tags = {"fallopt.role": "sweep", SWEEP_DIR_TAG: SWEEP_DIR, **track.owner_tags()}
    parent = track.client(tracking.uri).create_run(experiment_id, tags=tags).info.run_id
    os.environ.pop(PARENT_ENV, None)
    for i in range(WARM_UP):  # first requests warm up the client and a new server's workers
        one_job(tracking, 80_000 + i, files, params)
    empty = [one_job(tracking, 90_000 + i, files, params) for i in range(args.jobs)]
    start = time.perf_counter()
    populate(tracking, parent, args.runs, params)
    print(f"  {args.runs} runs added in {time.perf_counter() - start:.0f} s", flush=True)
    full = [one_job(tracking, 95_000 + i, files, params) for i in range(args.jobs)]
    print(f"  jobs with 0 runs: {' '.join(f'{t:.3f}' for t in empty)}")
    print(f"  jobs with {args.runs} runs: {' '.join(f'{t:.3f}' for t in full)}")
    return statistics.median(empty), statistics.median(full)


def measure_store(
    kind: str, uri: str, args: argparse.Namespace, files: list[Path], figures: dict[str, float]
) -> None:
    """Measure one store; its figures go into `figures`."""
    print(f"{kind} ({uri}):", flush=True)
    empty, full = measure(TrackingConfig(uri=uri, share_stages=True), args, files)
    print(f"  a job's MLflow work: {empty:.3f} s with 0 runs, {full:.3f} s with {args.runs} "
          f"(median of {args.jobs} jobs each)")  # fmt: skip
    figures[f"tracking_{kind}_job_seconds_0"] = empty
    figures[f"tracking_{kind}_job_seconds_{args.runs}"] = full
    figures[f"tracking_{kind}_ratio_{args.runs}_over_0"] = full / empty


def main() -> None:
    args = parse()
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        os.environ["FALLOPT_CACHE"] = str(tmp / "cache")
        files = []
        for name, size in ARTIFACTS.items():
            path = tmp / name
            path.write_bytes(os.urandom(size))
            files.append(path)
        figures: dict[str, float] = {}
        measure_store("sqlite", f"sqlite:///{tmp}/mlruns/mlflow.db", args, files, figures)
        if args.postgres:  # started only now: its start-up would load the machine meanwhile
            with (
                local_cluster.postgres_database(args.postgres) as backend,
                local_cluster.mlflow_server(backend, tmp / "server") as uri,
            ):
                measure_store("server", uri, args, files, figures)
    for name, value in figures.items():
        print(f"{name}: {value:.3f}")


if __name__ == "__main__":
    main()
