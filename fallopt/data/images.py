"""Decode image files once, in parallel, into a memory-mapped uint8 cache.

Decoding and resizing 20,000 JPEGs of 240x320 took 45 s in a per-image loop here, and
every run of a sweep would do it again; held as float32 in a list, as notebooks do, they
also take 4x their uint8 size in RAM (11.6 GB), twice that once stacked. Here the files
are decoded on a pool of threads straight into the rows of one file, `pixels.u8`, under a
key made of the files' names, sizes and mtimes and the decoding options. The next call
with the same files maps that file read-only and decodes nothing; RAM never holds more
than one uint8 copy, and the page cache can drop it.

Threads, not processes: a fork of a process that has loaded TensorFlow can deadlock.
Pillow releases the GIL while it decodes and resizes, but not while it parses a JPEG's
markers or hands pixels out, so 2 threads were 1.3-1.5x as fast as 1 on 2 idle cores (240x320
JPEGs to 224x224; `scripts/bench_decode.py`). EXIF orientation is not applied, as Keras'
image_dataset_from_directory does not apply it either.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import PIL
from PIL import Image, UnidentifiedImageError

from fallopt.errors import DataError

log = logging.getLogger(__name__)

# Bump whenever decoding changes the pixels it produces or the entry layout: old entries
# would be served as they are. Pillow's version is part of the key too (its resize and JPEG
# decoder change between releases), so a cache never disagrees with a fresh decode.
DECODER_VERSION = 1

RESIZE_FILTERS: dict[str, int] = {
    "bilinear": Image.Resampling.BILINEAR,  # as Keras' image_dataset_from_directory
    "nearest": Image.Resampling.NEAREST,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,  # each output pixel the mean of its area
}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")

# Modes whose one sample per pixel is a gray level ("I" and "I;16*" hold 16-bit PNGs).
_GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "F"})
_SKIP_HINT = "replace or delete it, or set dataset.skip_bad=true to skip unreadable images"


def list_images(folder: Path) -> list[Path]:
    """Image files directly or recursively under `folder`, sorted by relative path.

    The suffix is matched case-insensitively (`.JPG` from cameras). Sorting by the relative
    posix path keeps the order, and so the labels and splits, the same on every machine.
    Hidden files and folders are left out: `._x.jpg` (macOS metadata in zip archives) and
    `.ipynb_checkpoints/` are not images of the data set. Symlinked folders are not entered.
    """
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder; set the data set's path to a folder of images")
    found = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [
            Path(root, name)
            for name in names
            if not name.startswith(".") and name.lower().endswith(IMAGE_SUFFIXES)
        ]
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


@dataclass(frozen=True)
class Decoded:
    """The decoded images and what decoding them did.

    Attributes:
        x: (n_kept, h, w, c) uint8, a read-only `np.memmap` of the cache file.
        kept: int64 indices into `files` of the rows of x (all unless `skip_bad` dropped some).
        resized: kept files whose size differed from the target.
        converted: kept files whose mode differed from the target (`L` or `RGB`).
        skipped: (file relative to `base`, reason) of each unreadable file skipped.
        from_cache: True when this call decoded nothing.
    """

    x: np.ndarray
    kept: np.ndarray
    resized: int
    converted: int
    skipped: tuple[tuple[str, str], ...]
    from_cache: bool


def _channels_of(mode: str) -> int:
    return 1 if mode in _GRAY_MODES or mode.startswith("I;16") else 3


def convert_mode(img: Image.Image, channels: int) -> tuple[Image.Image, bool]:
    """`img` as `L` or `RGB`, and whether that took a conversion. Alpha is dropped."""
    target = "L" if channels == 1 else "RGB"
    if img.mode == target:
        return img, False
    if img.mode == "I" or img.mode.startswith("I;16"):
        # 16-bit samples: convert("L") would clip them at 255, so scale 0..65535 to 0..255.
        wide = np.clip(np.asarray(img), 0, 65535).astype(np.uint32)
        img = Image.fromarray(((wide * 255 + 32767) // 65535).astype(np.uint8))
        return (img if channels == 1 else img.convert("RGB")), True
    # Alpha is dropped anyway; a palette's transparency would only make convert() warn.
    img.info.pop("transparency", None)
    return img.convert(target), True


def _reason(e: Exception) -> str:
    if isinstance(e, UnidentifiedImageError):
        return "not an image format Pillow recognises"
    text = " ".join(str(e).split()) or type(e).__name__
    return text if isinstance(e, OSError) else f"{type(e).__name__}: {text}"


@dataclass
class _Tally:
    """What one chunk of files did: counts, and the unreadable files by index."""

    resized: int = 0
    converted: int = 0
    bad: list[tuple[int, str]] = field(default_factory=list)


def _decode_chunk(
    files: Sequence[Path],
    rows: range,
    x: np.ndarray,
    resample: int,
    stop: threading.Event,
) -> _Tally:
    """Decode `files[rows]` into `x[rows]`. Runs on a pool thread; Pillow drops the GIL."""
    h, w, c = x.shape[1:]
    tally = _Tally()
    for i in rows:
        if stop.is_set():
            break
        try:
            with Image.open(files[i]) as img:
                img.load()  # decodes now, so a truncated file raises here (LOAD_TRUNCATED off)
                img, converted = convert_mode(img, c)
                resized = img.size != (w, h)
                if resized:
                    img = img.resize((w, h), resample)
                # Not np.asarray(img): that copies the bytes once more, holding the GIL.
                pixels = np.frombuffer(img.tobytes(), np.uint8)
        except Exception as e:  # corrupt files raise OSError, SyntaxError, ValueError...
            tally.bad.append((i, _reason(e)))
            continue
        x[i] = pixels.reshape(h, w, c)
        tally.resized += resized
        tally.converted += converted
    return tally


def _relative(files: Sequence[Path], base: Path) -> list[str]:
    """Each file's path relative to `base`, with posix separators (the key's names)."""
    start = os.path.abspath(base)
    prefix = start.rstrip(os.sep) + os.sep
    names = []
    for f in files:
        path = os.path.abspath(f)
        rel = path[len(prefix) :] if path.startswith(prefix) else os.path.relpath(path, start)
        names.append(rel.replace(os.sep, "/"))
    return names


def _key(
    files: Sequence[Path],
    names: list[str],
    size: tuple[int, int] | None,
    channels: int | None,
    resize_filter: str,
    what: str,
    base: Path,
) -> str:
    """A hash of the options and every file's relative name, size and mtime.

    A None size or channel count enters as None: the first file's name, size and mtime are
    in the key, which pins the header they are read from, and so a hit opens no file.
    """
    options = {
        "v": DECODER_VERSION,
        "pillow": PIL.__version__,
        "size": size,
        "channels": channels,
        "filter": resize_filter,
    }
    h = hashlib.sha256(json.dumps(options, sort_keys=True).encode())
    for f, name in zip(files, names, strict=True):
        try:
            st = os.stat(f)
        except FileNotFoundError:
            raise DataError(
                f"{f}: no such file, though listed among the {what} images under {base}; "
                "restore it or list the folder again"
            ) from None
        except OSError as e:
            raise DataError(f"{f}: cannot be read ({e.strerror}); make it readable") from None
        # NUL ends each field: names cannot contain it, so no two file lists hash alike.
        h.update(f"{name}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    return h.hexdigest()[:32]


def _bad_file(path: Path, reason: str) -> DataError:
    return DataError(f"{path}: cannot be decoded as an image ({reason}); {_SKIP_HINT}")


def _read_entry(entry: Path, files: Sequence[Path], warn: bool) -> tuple[Decoded, list[int]] | None:
    """The published entry at `entry` and its skipped indices, or None if absent or damaged.

    Only the sizes are checked: a checksum would read gigabytes on every hit, and entries
    are flushed before they are renamed into place, so a whole one is never half written.
    """
    try:
        index = json.loads((entry / "index.json").read_text())
        shape = tuple(index["shape"])
        pixels = entry / "pixels.u8"
        if pixels.stat().st_size != math.prod(shape):
            raise ValueError(f"pixels.u8 does not hold {shape} bytes")
        if index["n_files"] != len(files):
            raise ValueError(f"it lists {index['n_files']} files, not {len(files)}")
        skipped = [(int(i), str(rel), str(reason)) for i, rel, reason in index["skipped"]]
        kept = np.setdiff1d(np.arange(len(files)), [i for i, _, _ in skipped]).astype(np.int64)
        x = np.memmap(pixels, dtype=np.uint8, mode="r", shape=shape)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as e:
        if warn:
            log.warning("[data] decode cache entry %s is damaged (%s): decoding again", entry, e)
        return None
    skips = tuple((rel, reason) for _, rel, reason in skipped)
    found = Decoded(x, kept, index["resized"], index["converted"], skips, from_cache=True)
    return found, [i for i, _, _ in skipped]


class _Progress:
    """A bar on a terminal's stderr redrawn in place, else a log line every 10% after 2 s."""

    def __init__(self, total: int, what: str) -> None:
        self.total, self.what, self.start = total, what, time.perf_counter()
        self.tty = sys.stderr.isatty()
        self.shown, self.decile = 0.0, 0

    def update(self, done: int) -> None:
        now = time.perf_counter()
        rate = done / max(now - self.start, 1e-9)
        if self.tty:
            if now - self.shown >= 0.2 or done == self.total:
                self.shown = now
                pct = done / self.total
                bar = "#" * int(pct * 30)
                count = f"{done}/{self.total} {rate:,.0f} images/s"
                sys.stderr.write(f"\r[data] {self.what} [{bar:<30}] {pct:4.0%} {count}")
                sys.stderr.flush()
        elif done * 10 // self.total > self.decile:
            self.decile = done * 10 // self.total
            if now - self.start < 2:  # a quick decode needs only its first and last line
                return
            log.info(
                "[data] %s: %d%% decoded (%d/%d, %.0f images/s)",
                self.what, self.decile * 10, done, self.total, rate,
            )  # fmt: skip

    def close(self) -> None:
        if self.tty:
            sys.stderr.write("\r\033[K")  # clear the bar's line for the log lines after it
            sys.stderr.flush()


def _none_decode(files: Sequence[Path], what: str, base: Path, first: str) -> DataError:
    return DataError(
        f"{base}: none of the {len(files)} {what} images can be decoded (first: {files[0]}: "
        f"{first}); replace them with PNG, JPEG or BMP images"
    )


def _first_header(
    files: Sequence[Path], skip_bad: bool, what: str, base: Path
) -> tuple[tuple[int, int], int]:
    """(height, width) and channel count of the first file whose header opens."""
    first = ""
    for f in files:
        try:
            with Image.open(f) as img:
                return (img.height, img.width), _channels_of(img.mode)
        except Exception as e:  # a bad file: the next one sets the shape
            if not skip_bad:
                raise _bad_file(f, _reason(e)) from None
            first = first or _reason(e)
    raise _none_decode(files, what, base, first)


def _allocate(path: Path, nbytes: int) -> None:
    """Create `path` with its blocks reserved: writing a full disk through a map is SIGBUS."""
    with path.open("wb") as f:
        f.truncate(nbytes)
        try:
            os.posix_fallocate(f.fileno(), 0, nbytes)
        except AttributeError:  # macOS has none: the file stays sparse
            pass
        except OSError as e:
            if e.errno == errno.ENOSPC:  # others (a file system without it) are harmless
                raise DataError(
                    f"{path.parent}: no space for {nbytes / 2**30:.1f} GiB of decoded images; "
                    "free some, or point $FALLOPT_CACHE at a larger disk"
                ) from None


def _remove_stale(root: Path, key: str) -> None:
    """Delete the temporary directories of killed decoders (OOM, kill -9): gigabytes each.

    One is stale when no process holds its key's lock; we hold `key`'s, so its are.
    """
    for tmp in root.glob(".*.*.tmp"):
        other = tmp.name.split(".")[1]
        if other == key:
            shutil.rmtree(tmp, ignore_errors=True)
            continue
        with (root / f"{other}.lock").open("a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # being decoded right now
            shutil.rmtree(tmp, ignore_errors=True)


def _decode_into(
    tmp: Path,
    files: Sequence[Path],
    shape: tuple[int, int, int, int],
    resample: int,
    skip_bad: bool,
    threads: int,
    what: str,
) -> _Tally:
    """Decode every file into `tmp/pixels.u8` on `threads` threads; the tally of them all.

    Stops at the first unreadable file unless `skip_bad`, and returns with what was found
    then (the caller raises for the lowest index among them).
    """
    pixels = tmp / "pixels.u8"
    _allocate(pixels, math.prod(shape))
    x = np.memmap(pixels, dtype=np.uint8, mode="r+", shape=shape)
    n = len(files)
    # Enough chunks per thread to balance uneven files, few enough to keep overhead low.
    chunk = max(1, min(64, math.ceil(n / (threads * 8))))
    total, stop, progress = _Tally(), threading.Event(), _Progress(n, what)
    pool = ThreadPoolExecutor(threads, thread_name_prefix="decode")
    try:
        pending: set[Future[_Tally]] = {
            pool.submit(_decode_chunk, files, range(i, min(i + chunk, n)), x, resample, stop)
            for i in range(0, n, chunk)
        }
        done = 0
        while pending:
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in finished:
                part = future.result()
                total.resized += part.resized
                total.converted += part.converted
                total.bad += part.bad
                done += chunk
            progress.update(min(done, n))
            if total.bad and not skip_bad:
                break
    finally:
        stop.set()  # a failure or Ctrl-C: running chunks stop at their next file
        pool.shutdown(wait=True, cancel_futures=True)
        progress.close()
    x.flush()  # on disk before the rename publishes it: a power cut cannot publish zeros
    del x
    return total


def _compact(pixels: Path, shape: tuple[int, int, int, int], kept: np.ndarray) -> None:
    """Move the kept rows up over the skipped ones, in place, and cut the file after them."""
    x = np.memmap(pixels, dtype=np.uint8, mode="r+", shape=shape)
    for row, i in enumerate(kept):
        if row != i:
            x[row] = x[i]
    x.flush()
    del x
    os.truncate(pixels, len(kept) * math.prod(shape[1:]))


def decode_images(
    files: Sequence[Path],
    base: Path,
    *,
    size: tuple[int, int] | None,
    channels: int | None,
    resize_filter: str = "bilinear",
    skip_bad: bool = False,
    cache_dir: Path,
    what: str = "images",
    workers: int | None = None,
) -> Decoded:
    """Decode `files` to (n, h, w, c) uint8 rows, once: later calls map the cached result.

    Args:
        files: the images, in the order of the rows.
        base: the folder the files are named relative to in the cache key and in `skipped`:
            the same tree moved elsewhere (`mv` keeps mtimes) is still a cache hit.
        size: (height, width) every image is resized to; None: the first file's.
        channels: 1 (`L`) or 3 (`RGB`); None: the first file's (1 for gray modes).
        resize_filter: a key of RESIZE_FILTERS.
        skip_bad: leave out files Pillow cannot decode instead of raising.
        cache_dir: entries go to `cache_dir/images/<key>/`.
        what: names the images in log lines and errors (`train`, `cats`).
        workers: decoding threads; None: one per CPU.

    Raises:
        DataError: no files, a missing file, an undecodable one (unless `skip_bad`; then if
            all are), or no space for the cache.
    """
    if resize_filter not in RESIZE_FILTERS:
        raise ValueError(f"resize_filter {resize_filter!r} is not one of {list(RESIZE_FILTERS)}")
    if channels not in (None, 1, 3):
        raise ValueError(f"channels must be 1, 3 or None, not {channels!r}")
    if size is not None and (len(size) != 2 or min(size) < 1):
        raise ValueError(f"size must be (height, width) >= 1, not {size!r}")
    if not files:
        raise DataError(
            f"{base}: no {what} images found; expected files ending in "
            f"{', '.join(IMAGE_SUFFIXES)} (any case) under it"
        )
    files = [Path(f) for f in files]
    names = _relative(files, base)
    size = None if size is None else (int(size[0]), int(size[1]))
    key = _key(files, names, size, channels, resize_filter, what, base)
    root = cache_dir / "images"
    entry = root / key

    def cached(warn: bool) -> Decoded | None:
        found = _read_entry(entry, files, warn)
        if found is None:
            return None
        decoded, skipped = found
        if skipped and not skip_bad:
            raise _bad_file(files[skipped[0]], decoded.skipped[0][1])
        left_out = f" ({len(skipped)} unreadable skipped)" if skipped else ""
        log.info(
            "[data] %s: %d images from the decode cache %s%s", what, len(decoded.x), entry,
            left_out,
        )  # fmt: skip
        return decoded

    # Published entries are complete (renamed into place), so a hit needs no lock.
    hit = cached(warn=False)
    if hit is not None:
        return hit
    try:
        root.mkdir(parents=True, exist_ok=True)
        lock = (root / f"{key}.lock").open("w")
    except OSError as e:
        raise DataError(
            f"{root}: cannot write the decode cache there ({e.strerror}); point $FALLOPT_CACHE "
            "at a writable folder"
        ) from None
    with lock:
        # Parallel jobs of a sweep: the first decodes, the others wait here and then read it.
        fcntl.flock(lock, fcntl.LOCK_EX)
        hit = cached(warn=True)
        if hit is not None:
            return hit
        shutil.rmtree(entry, ignore_errors=True)  # damaged, if there
        _remove_stale(root, key)
        if size is None or channels is None:
            first_size, first_channels = _first_header(files, skip_bad, what, base)
            size, channels = size or first_size, channels or first_channels
        shape = (len(files), size[0], size[1], channels)
        threads = max(1, min(workers or os.cpu_count() or 1, len(files)))
        tmp = root / f".{key}.{os.getpid()}.tmp"
        tmp.mkdir()
        try:
            log.info(
                "[data] decoding %d %s images on %d threads into %s", len(files), what, threads,
                entry,
            )  # fmt: skip
            start = time.perf_counter()
            resample = RESIZE_FILTERS[resize_filter]
            tally = _decode_into(tmp, files, shape, resample, skip_bad, threads, what)
            bad = sorted(tally.bad)
            if bad and not skip_bad:
                raise _bad_file(files[bad[0][0]], bad[0][1])
            if len(bad) == len(files):
                raise _none_decode(files, what, base, bad[0][1])
            kept = np.setdiff1d(np.arange(len(files)), [i for i, _ in bad]).astype(np.int64)
            if bad:
                _compact(tmp / "pixels.u8", shape, kept)
            seconds = time.perf_counter() - start
            index = {
                "version": DECODER_VERSION,
                "n_files": len(files),
                "shape": [len(kept), *shape[1:]],
                "resized": tally.resized,
                "converted": tally.converted,
                "skipped": [[i, names[i], reason] for i, reason in bad],
            }
            (tmp / "index.json").write_text(json.dumps(index))
            os.rename(tmp, entry)  # atomic: an entry is whole or absent
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    log.info(
        "[data] decoded %d %s images in %.1f s (%.0f images/s)", len(files), what, seconds,
        len(files) / max(seconds, 1e-9),
    )  # fmt: skip
    if bad:
        log.warning(
            "[data] %s: skipped %d unreadable images (dataset.skip_bad), first %s: %s",
            what, len(bad), names[bad[0][0]], bad[0][1],
        )  # fmt: skip
    x = np.memmap(entry / "pixels.u8", dtype=np.uint8, mode="r", shape=tuple(index["shape"]))
    skipped = tuple((names[i], reason) for i, reason in bad)
    return Decoded(x, kept, tally.resized, tally.converted, skipped, from_cache=False)


def listing_digest(files: Sequence[Path], base: Path) -> str:
    """A hash of every file's name relative to `base`, size and mtime; reads no image.

    A run's fingerprint of a set of images (the `sources` of file-based data sets): the
    decode cache's key (`_key`) without the decoding options.
    """
    return _key(files, _relative(files, base), None, None, "", "listed", base)
