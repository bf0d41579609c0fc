"""Reading a folder of JPEGs: the seeds' per-image loop against fallopt's decode cache.

Makes (or reuses, `--dir`) a folder of `--images` JPEGs of 240x320 from real frames (the
GMDCSA-24 crops, upscaled, shifted and flipped so no two files are alike) in two class
folders, then runs each flow in a fresh process, so each peak is its own:

  seeds         for each file: PIL open, resize, np.asarray(float32) appended to a list
                (and np.array(list) with --stack, as the seeds did: 24 GB at 20,000)
  fallopt cold  decode_images into a fresh cache, on 1 thread and on --threads threads
  fallopt warm  the same call again: maps the cache, opens no image file

Peak RSS is VmHWM after imports are done (reset then), so it counts file-backed pages of
the cache fallopt maps; peak anon (MiB) is sampled every 20 ms and leaves those out (the
page cache can drop them). Every flow resizes with the same filter (--filter). The host is
shared: each row's load average tells whether other processes took cores meanwhile.

python scripts/bench_decode.py [--images 20000] [--size 224] [--threads N] [--dir DIR]
    [--stack] [--keep]
Prints `name: value` lines last.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FALLOPT_SHARED", REPO.parent / "shared"))
FRAMES = SHARED / "data" / "gmdcsa24" / "data_train_96_96_3.pickle"
HEIGHT, WIDTH = 240, 320
MIB = 2**20
FILTERS = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


def _status(field: str) -> int:
    """A /proc/self/status memory field in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _cpu_seconds() -> float:
    """User + system CPU time of this process, all its threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def generate(folder: Path, n: int, threads: int) -> None:
    """n JPEGs 240x320 from the real frames, in `fall/` and `no_fall/`, on `threads` threads."""
    marker = folder / ".bench_decode.json"
    spec = {"images": n, "height": HEIGHT, "width": WIDTH, "frames": str(FRAMES)}
    if marker.exists() and json.loads(marker.read_text()) == spec:
        print(f"reusing {n:,} JPEGs in {folder}")
        return
    with FRAMES.open("rb") as f:  # the lab's own file, not one from elsewhere
        raw = pickle.load(f)
    frames, labels = np.asarray(raw["data"]), np.asarray(raw["labels"])
    for name in ("fall", "no_fall"):
        (folder / name).mkdir(parents=True, exist_ok=True)

    def one(k: int) -> None:
        i = k % len(frames)
        big = Image.fromarray(frames[i]).resize((WIDTH + 32, HEIGHT + 32), Image.BICUBIC)
        dx, dy = (k * 7) % 33, (k * 13) % 33
        img = big.crop((dx, dy, dx + WIDTH, dy + HEIGHT))
        if (k // len(frames)) % 2:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        cls = "fall" if labels[i] == 1 else "no_fall"
        img.save(folder / cls / f"{k:06d}.jpg", quality=90)

    start, step = time.perf_counter(), max(1, n // 10)
    with ThreadPoolExecutor(threads) as pool:
        for done, _ in enumerate(pool.map(one, range(n), chunksize=64), 1):
            if done % step == 0 or done == n:
                print(f"  generated {done:,}/{n:,} JPEGs ({time.perf_counter() - start:.0f} s)")
    marker.write_text(json.dumps(spec))


def jpegs(folder: Path) -> list[Path]:
    return sorted(folder.glob("*/*.jpg"))


def seeds_flow(folder: Path, size: int, resample: int, stack: bool) -> dict:
    """The seeds' loop: one image at a time into a Python list of float32 arrays."""
    out = []
    for f in jpegs(folder):
        img = Image.open(f).resize((size, size), resample)
        out.append(np.asarray(img, dtype=np.float32))
    if stack:
        out = np.array(out)
    return {"images": len(out), "opened": len(out), "decoded": len(out)}


def fallopt_flow(folder: Path, size: int, name: str, cache: Path, threads: int) -> dict:
    """fallopt: decode_images into `cache`; counts the image files it opens."""
    from fallopt.data.images import decode_images, list_images

    opened = [0]
    real_open = Image.open

    def counting_open(*args, **kwargs):
        opened[0] += 1
        return real_open(*args, **kwargs)

    Image.open = counting_open
    files = list_images(folder)
    out = decode_images(
        files, folder, size=(size, size), channels=3, resize_filter=name, cache_dir=cache,
        what="bench", workers=threads,
    )  # fmt: skip
    # Read every row once, as training does: the mapped pages count in RSS as they would then.
    for i in range(0, len(out.x), 256):
        out.x[i : i + 256].max()
    decoded = 0 if out.from_cache else len(files) - len(out.skipped)
    return {"images": len(out.x), "opened": opened[0], "decoded": decoded}


def child(args: argparse.Namespace) -> None:
    """One flow in this process; prints seconds and peaks as JSON."""
    if args.child != "seeds":
        import fallopt.data.images  # noqa: F401  (imported before the peak is reset)
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    before, anon = _status("VmRSS"), [_status("RssAnon")]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.02):
            anon[0] = max(anon[0], _status("RssAnon"))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start, cpu = time.perf_counter(), _cpu_seconds()
    if args.child == "seeds":
        result = seeds_flow(args.dir, args.size, FILTERS[args.filter], args.stack)
    else:
        result = fallopt_flow(args.dir, args.size, args.filter, args.cache, args.threads)
    seconds, cpu = time.perf_counter() - start, _cpu_seconds() - cpu
    done.set()
    sampler.join()
    anon[0] = max(anon[0], _status("RssAnon"))
    peaks = {"before": before, "peak": _status("VmHWM"), "anon": anon[0]}
    print(
        json.dumps({**result, **peaks, "seconds": seconds, "cpu": cpu, "load": os.getloadavg()[0]})
    )


def run_child(args: argparse.Namespace, flow: str, cache: Path | None, threads: int) -> dict:
    command = [
        sys.executable, __file__, "--child", flow, "--dir", str(args.dir), "--size",
        str(args.size), "--filter", args.filter, "--threads", str(threads),
    ]  # fmt: skip
    command += ["--cache", str(cache)] if cache else []
    command += ["--stack"] if args.stack else []
    # This checkout's fallopt, whatever an installed one points at.
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path}
    proc = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env)
    if proc.returncode != 0:
        sys.exit(f"the {flow} flow failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20000)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--filter", choices=list(FILTERS), default="bilinear")
    parser.add_argument("--dir", type=Path, help="make the JPEGs here, or reuse them")
    parser.add_argument("--stack", action="store_true", help="seeds: also np.array(list)")
    parser.add_argument("--keep", action="store_true", help="keep the JPEGs and caches")
    parser.add_argument("--child", choices=["seeds", "fallopt"], help=argparse.SUPPRESS)
    parser.add_argument("--cache", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    made = args.dir is None
    args.dir = args.dir or Path(tempfile.mkdtemp(prefix="bench_decode_", dir="/tmp"))
    caches = Path(tempfile.mkdtemp(prefix="bench_decode_cache_", dir="/tmp"))
    try:
        generate(args.dir, args.images, args.threads)
        n = len(jpegs(args.dir))
        print(
            f"host: {os.cpu_count()} CPUs; {n:,} JPEGs {HEIGHT}x{WIDTH} in {args.dir} -> "
            f"{args.size}x{args.size}x3 ({args.filter}); uint8 result "
            f"{n * args.size * args.size * 3 / MIB:,.0f} MiB, float32 4x that"
        )
        rows = {"seeds' loop": run_child(args, "seeds", None, 1)}
        rows["fallopt cold, 1 thread"] = run_child(args, "fallopt", caches / "one", 1)
        shutil.rmtree(caches / "one")  # gigabytes at full size
        cold = f"fallopt cold, {args.threads} threads"
        rows[cold] = run_child(args, "fallopt", caches / "many", args.threads)
        rows["fallopt warm"] = run_child(args, "fallopt", caches / "many", args.threads)
    finally:
        if not args.keep:
            shutil.rmtree(caches, ignore_errors=True)
            if made:
                shutil.rmtree(args.dir, ignore_errors=True)

    # CPU s over wall s is the cores a flow kept busy; the load average (1 min, at the end
    # of each flow) says whether other processes competed for them.
    print(
        f"{'flow':24s} {'decoded':>7s} {'opened':>7s} {'wall s':>7s} {'CPU s':>6s} "
        f"{'images/s':>8s} {'peak RSS MiB':>12s} {'above start':>11s} {'peak anon':>9s} "
        f"{'load':>4s}"
    )
    for name, r in rows.items():
        print(
            f"{name:24s} {r['decoded']:7,d} {r['opened']:7,d} {r['seconds']:7.1f} "
            f"{r['cpu']:6.1f} {r['images'] / r['seconds']:8,.0f} {r['peak'] / MIB:12,.0f} "
            f"{(r['peak'] - r['before']) / MIB:11,.0f} {r['anon'] / MIB:9,.0f} {r['load']:4.1f}"
        )
    seeds, one, many, warm = rows.values()

    def growth(r: dict) -> float:
        return r["peak"] - r["before"]

    figures = {
        "decode_speedup_over_seeds": seeds["seconds"] / many["seconds"],
        "decode_memory_over_seeds": growth(many) / growth(seeds),
        "decode_threads_speedup": one["seconds"] / many["seconds"],
        "decode_warm_speedup_over_seeds": seeds["seconds"] / warm["seconds"],
        "decode_warm_seconds": warm["seconds"],
        "decode_warm_opened_files": warm["opened"],
    }
    print(
        f"fallopt cold / seeds: {figures['decode_speedup_over_seeds']:.2f}x the images/s, "
        f"{figures['decode_memory_over_seeds']:.2f}x the peak RSS growth; "
        f"{args.threads} threads / 1: {figures['decode_threads_speedup']:.2f}x; "
        f"warm: {warm['seconds']:.2f} s, {warm['opened']} files opened, "
        f"{figures['decode_warm_speedup_over_seeds']:.0f}x faster than the seeds"
    )
    for name, value in figures.items():
        print(f"{name}: {value:.2f}")


if __name__ == "__main__":
    main()
