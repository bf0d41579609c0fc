"""A prune x quant sweep: fallopt against the lab's notebook flow, side by side in one run.

Same data (synthetic_falls, generated once beforehand), same CNN, same epochs, same machine,
each flow in a fresh process (TensorFlow's import counted for both):

  lab      train the baseline once and save it; then for every combination: reload it,
           prune and fine-tune, convert, evaluate one image per invoke (scripts/lab_flow.py)
  fallopt  python -m fallopt.run -m over the same grid, tracked in a fresh SQLite store

Also fallopt's overhead: the sweep's wall time (Python's and TensorFlow's start-up included)
over the seconds its runs spent inside TensorFlow training, conversion and inference, and
TFLM (each run logs them as `seconds_<phase>`); at this small size, and then, in the same
run, for the same grid swept by fallopt at the default data size (96x96, 2,000 + 500 images,
5 + 2 epochs).

python scripts/bench_sweep.py [--sparsities 0.2,0.4,0.5,0.6,0.8]
    [--modes none,dynamic,float16,int8] [--image-size 48] [--n-train 800] [--n-test 200]
    [--epochs 2] [--fine-tune-epochs 1] [--default-grid SPARSITIES:MODES]
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
    parser.add_argument(
        "--default-grid", default="0.2,0.4,0.5,0.6,0.8:none,dynamic,float16,int8",
        help="SPARSITIES:MODES run by fallopt alone at the default data size for its overhead "
        "there ('none' skips it)",
    )  # fmt: skip
    parser.add_argument(
        "--default-size", default="96,2000,500,5,2",
        help="IMAGE_SIZE,N_TRAIN,N_TEST,EPOCHS,FINE_TUNE_EPOCHS of that sweep: the defaults of "
        "synthetic_falls, train and prune (smaller only to test this script)",
    )  # fmt: skip
    parser.add_argument("--lab", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args()


def default_size(args: argparse.Namespace) -> argparse.Namespace | None:
    """The arguments of the default-size sweep (synthetic_falls' and train's defaults)."""
    if args.default_grid == "none":
        return None
    sparsities, modes = args.default_grid.split(":")
    image_size, n_train, n_test, epochs, fine_tune = map(int, args.default_size.split(","))
    return argparse.Namespace(sparsities=sparsities, modes=modes, image_size=image_size,
                              n_train=n_train, n_test=n_test, epochs=epochs,
                              fine_tune_epochs=fine_tune)  # fmt: skip


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
    """Run the grid with fallopt into a new store under `tmp`; returns its wall time and runs."""
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


def overhead(wall: float, runs: list, label: str) -> float:
    """Print where the sweep's time went; return its wall time over its TensorFlow seconds."""
    spent = {
        phase: sum(r.data.metrics[f"seconds_{phase}"] for r in runs)
        for phase in ("train", "convert", "inference", "tflm")
    }
    in_runs = sum(r.data.metrics["seconds_run"] for r in runs)
    tf_s = sum(spent.values())
    print(
        f"fallopt {label}: {wall:.1f} s; inside TensorFlow: "
        + ", ".join(f"{phase} {s:.1f} s" for phase, s in spent.items())
        + f"; inside its runs {in_runs:.1f} s; start-up, Hydra and the sweep record "
        f"{wall - in_runs:.1f} s; overhead {wall / tf_s:.2f}"
    )
    return wall / tf_s


def main() -> None:
    args = parse()
    if args.lab:
        lab(args)
        return
    large = default_size(args)
    figures = {}
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["FALLOPT_CACHE"] = f"{tmp}/cache"  # no stage reused from earlier runs
        dataset(args)  # generated once, outside both timings
        if large is not None:
            dataset(large)
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

        fallopt_s, runs = fallopt_sweep(args, Path(tmp) / "small")
        if len(runs) != n:
            sys.exit(f"the fallopt sweep finished {len(runs)} runs of {n}")
        accuracy = [r.data.metrics["tflite_test_accuracy"] for r in runs]
        print(f"lab      {lab_s:6.1f} s, TFLite test accuracy {min(lab_accuracy.values()):.3f}"
              f"..{max(lab_accuracy.values()):.3f}")  # fmt: skip
        print(f"fallopt  {fallopt_s:6.1f} s, TFLite test accuracy {min(accuracy):.3f}"
              f"..{max(accuracy):.3f}")  # fmt: skip
        figures["sweep_speedup_over_lab"] = lab_s / fallopt_s
        figures["sweep_overhead"] = overhead(fallopt_s, runs, "at this size")

        if large is not None:
            n = len(large.sparsities.split(",")) * len(large.modes.split(","))
            print(f"default size: {n} combinations, {large.image_size}x{large.image_size}x3, "
                  f"{large.n_train} + {large.n_test} images, {large.epochs} + "
                  f"{large.fine_tune_epochs} epochs")  # fmt: skip
            wall, runs = fallopt_sweep(large, Path(tmp) / "default")
            if len(runs) != n:
                sys.exit(f"the default-size sweep finished {len(runs)} runs of {n}")
            figures["sweep_overhead_default_size"] = overhead(wall, runs, "at the default size")
    for name, value in figures.items():
        print(f"{name}: {value:.2f}")


if __name__ == "__main__":
    main()
