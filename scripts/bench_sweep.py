"""A prune x quant sweep: fallopt against the lab's notebook flow, side by side in one run.

Same data (synthetic_falls, generated once beforehand), same CNN, same epochs, same machine,
each flow in a fresh process (TensorFlow's import counted for both):

  lab      train the baseline once and save it; then for every combination: reload it,
           prune and fine-tune, convert, evaluate one image per invoke (scripts/lab_flow.py)
  fallopt  python -m fallopt.run -m over the same grid, tracked in a fresh SQLite store

Also fallopt's overhead: the sweep's wall time over the seconds its runs spent inside
TensorFlow training, conversion and inference (each run logs them as `seconds_<phase>`).

python scripts/bench_sweep.py [--sparsities 0.2,0.4,0.5,0.6,0.8]
    [--modes none,dynamic,float16,int8] [--image-size 48] [--n-train 800] [--n-test 200]
    [--epochs 2] [--fine-tune-epochs 1]
Prints `name: value` lines last.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparsities", default="0.2,0.4,0.5,0.6,0.8")
    parser.add_argument("--modes", default="none,dynamic,float16,int8")
    parser.add_argument("--image-size", type=int, default=48)
    parser.add_argument("--n-train", type=int, default=800)
    parser.add_argument("--n-test", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--fine-tune-epochs", type=int, default=1)
    parser.add_argument("--lab", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args()


def dataset(args: argparse.Namespace):
    from fallopt.data import load_dataset
    from fallopt.data.synthetic_falls import SyntheticFallsConfig

    cfg = SyntheticFallsConfig(image_size=args.image_size, n_train=args.n_train, n_test=args.n_test)
    return load_dataset(cfg, val_split=0.2, seed=0)


def lab(args: argparse.Namespace) -> None:
    """The lab's flow over the grid in this process; prints the accuracies as JSON."""
    import lab_flow

    from fallopt.backend import keras

    data = dataset(args)
    x = data.train.x.astype("float32") / 255.0  # the notebook's float32 copies
    val = (data.val.x.astype("float32") / 255.0, data.val.y)
    keras().utils.set_random_seed(0)
    model = lab_flow.cauca_cnn(data.input_shape)
    lab_flow.fit(model, x, data.train.y, val, args.epochs)
    with tempfile.TemporaryDirectory() as tmp:
        baseline = Path(tmp) / "baseline.h5"
        model.save(baseline)
        representative = data.train.x[:200]  # uint8: lab_flow.convert scales them
        accuracy = {}
        for sparsity in args.sparsities.split(","):
            for mode in args.modes.split(","):
                pruned = lab_flow.prune_and_fine_tune(
                    baseline, float(sparsity), x, data.train.y, val, args.fine_tune_epochs
                )
                content = lab_flow.convert(pruned, mode, representative)
                predicted, _ = lab_flow.per_image_predictions(content, data.test.x)
                accuracy[f"{sparsity} {mode}"] = float((predicted == data.test.y).mean())
    print(json.dumps(accuracy))


def fallopt_sweep(args: argparse.Namespace, tmp: Path) -> tuple[float, list]:
    """Run the grid with fallopt into the store at `tmp`; returns its wall time and runs."""
    from mlflow.tracking import MlflowClient

    from fallopt.config import TrackingConfig
    from fallopt.track import connect

    uri = f"sqlite:///{tmp}/mlruns/mlflow.db"
    connect(TrackingConfig(uri=uri))  # the store exists beforehand, as a user's does
    overrides = [
        f"prune.sparsity={args.sparsities}", f"quant={args.modes}", "prune.scope=all",
        f"dataset.image_size={args.image_size}", f"dataset.n_train={args.n_train}",
        f"dataset.n_test={args.n_test}", f"train.epochs={args.epochs}",
        f"prune.fine_tune_epochs={args.fine_tune_epochs}", f"tracking.uri={uri}",
        f"hydra.sweep.dir={tmp}/sweep",
        "target.tflm_samples=0",  # the lab never ran TFLM: compare the same work
    ]  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "fallopt.run", "-m", *overrides],
        cwd=REPO, capture_output=True, text=True, env=os.environ,
    )  # fmt: skip
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"the fallopt sweep failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("fallopt")
    runs = client.search_runs([experiment.experiment_id], "attributes.status = 'FINISHED'")
    return wall, [r for r in runs if "fallopt.config_hash" in r.data.tags]


def main() -> None:
    args = parse()
    if args.lab:
        lab(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["FALLOPT_CACHE"] = f"{tmp}/cache"  # no stage reused from earlier runs
        dataset(args)  # generated once, outside both timings
        n = len(args.sparsities.split(",")) * len(args.modes.split(","))
        print(f"grid: {n} combinations, {args.image_size}x{args.image_size}x3, "
              f"{args.n_train} + {args.n_test} images, {args.epochs} + {args.fine_tune_epochs} "
              "epochs")  # fmt: skip

        start = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, __file__, "--lab", *sys.argv[1:]],
            capture_output=True, text=True, env=os.environ,
        )  # fmt: skip
        lab_s = time.perf_counter() - start
        if proc.returncode != 0:
            sys.exit(f"the lab flow failed:\n{proc.stderr[-3000:]}")
        lab_accuracy = json.loads(proc.stdout.strip().splitlines()[-1])

        fallopt_s, runs = fallopt_sweep(args, Path(tmp))
    if len(runs) != n:
        sys.exit(f"the fallopt sweep finished {len(runs)} runs of {n}")
    spent = {
        phase: sum(r.data.metrics[f"seconds_{phase}"] for r in runs)
        for phase in ("train", "convert", "inference", "tflm")
    }
    in_runs = sum(r.data.metrics["seconds_run"] for r in runs)
    tf_s = sum(spent.values())
    accuracy = [r.data.metrics["tflite_test_accuracy"] for r in runs]
    print(f"lab      {lab_s:6.1f} s, TFLite test accuracy {min(lab_accuracy.values()):.3f}"
          f"..{max(lab_accuracy.values()):.3f}")  # fmt: skip
    print(f"fallopt  {fallopt_s:6.1f} s, TFLite test accuracy {min(accuracy):.3f}"
          f"..{max(accuracy):.3f}")  # fmt: skip
    print(
        "fallopt inside TensorFlow: "
        + ", ".join(f"{phase} {s:.1f} s" for phase, s in spent.items())
        + f"; inside its runs {in_runs:.1f} s; start-up, Hydra and the sweep record "
        f"{fallopt_s - in_runs:.1f} s"
    )
    print(f"sweep_speedup_over_lab: {lab_s / fallopt_s:.2f}")
    print(f"sweep_overhead: {fallopt_s / tf_s:.2f}")


if __name__ == "__main__":
    main()
