"""A stage cache on disk: train a baseline (or prune it) once, reuse it everywhere.

An entry is a directory named by the hash of everything that determines the stage's result
(`stage_key`). Writers hold an exclusive lock per entry, so parallel jobs of one sweep wait
for the first to finish instead of training the same model twice. Entries are written to a
temporary directory and renamed into place, and every file carries a checksum in
`meta.json`: a truncated or corrupt entry is detected and rebuilt, never used.

Machines that do not share this disk share entries through a `RemoteStore`: a local miss is
fetched from it (and checked against its checksums like any entry), and a stage nobody has
published is claimed there first, so one builder in the whole cluster trains it while the
others wait for it (see stage_store.py).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from fallopt.identity import digest, section

log = logging.getLogger(__name__)

# Bump whenever a stage changes what it produces or what its meta.json holds: old entries
# would be reused as they are.
STAGE_VERSION = 6


def stage_key(kind: str, payload: dict[str, Any]) -> str:
    """A short, stable hash of a stage's inputs."""
    return digest({"kind": kind, "v": STAGE_VERSION, **payload}, length=16)


def baseline_key(fingerprint: str, classes: list[str], model: Any, train: Any, seed: int) -> str:
    """The baseline stage's key: f(data, model, train, seed), keys the options ignore left out."""
    return stage_key(
        "baseline",
        {
            "data": fingerprint,
            "classes": list(classes),
            "model": section(model),
            "model_sources": model.sources(),
            "train": section(train),
            "seed": seed,
        },
    )


def pruned_key(base_key: str, prune: Any, train: Any, seed: int) -> str:
    """The pruned stage's key: f(baseline, prune, train, seed)."""
    payload = {"baseline": base_key, "prune": section(prune), "train": section(train)}
    return stage_key("pruned", {**payload, "seed": seed})


def clustered_key(previous_key: str, cluster: Any, train: Any, seed: int) -> str:
    """The clustered stage's key: f(the pruned stage, or the baseline, cluster, train, seed)."""
    payload = {"previous": previous_key, "cluster": section(cluster), "train": section(train)}
    return stage_key("clustered", {**payload, "seed": seed})


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# Where a process got an entry from (tags `fallopt.<kind>_from`).
BUILT, CACHED, FETCHED = "built", "cache", "store"

WAIT_POLL_SECONDS = 2.0  # how often a waiting worker looks for the entry another one builds
_WAIT_LOG_SECONDS = 60.0


@dataclass(frozen=True)
class Entry:
    """A complete cache entry: its directory, its metadata and where this process got it.

    `origin` is BUILT (here, now), CACHED (this disk) or FETCHED (the shared store, its
    files checked against their checksums).
    """

    path: Path
    meta: dict[str, Any]
    origin: str = CACHED


class Claim(Protocol):
    """The right to build one entry for the whole cluster, until published or released."""

    def publish(self, src: Path) -> None:
        """Upload the complete entry; only then can others fetch it."""
        ...

    def release(self, error: str) -> None:
        """Give the claim up unpublished (the build failed): another worker may build."""
        ...


class RemoteStore(Protocol):
    """A store shared by machines that do not share this cache's disk (see stage_store.py)."""

    def fetch(self, name: str, dest: Path) -> bool:
        """Copy entry `name`'s files into `dest`; False if the store has no such entry."""
        ...

    def claim(self, name: str) -> Claim | str:
        """Claim the building of `name`; or, if a live worker builds it, who that is."""
        ...

    def discard(self, name: str) -> None:
        """Retire the entry last fetched as `name` (its files failed their checksums)."""
        ...

    def has(self, name: str) -> bool:
        """Whether the store holds a complete entry `name`."""
        ...


class StageCache:
    """Directory of stage entries, `<root>/<kind>-<key>/`, optionally backed by a shared store.

    With a `remote`, a local miss is looked up there before building, and what is built is
    published there, so workers on other machines reuse it.
    """

    def __init__(self, root: Path, remote: RemoteStore | None = None) -> None:
        self.root = root
        self.remote = remote

    def status(self, kind: str, key: str) -> str:
        """`cached`, `shared` (in the remote store only) or `missing`, without building."""
        name = f"{kind}-{key}"
        if self._valid(self.root / name) is not None:
            return "cached"
        if self.remote is not None and self.remote.has(name):
            return "shared"
        return "missing"

    def _valid(self, path: Path) -> Entry | None:
        try:
            meta = json.loads((path / "meta.json").read_text())
            for name, digest in meta["files"].items():
                if _sha256(path / name) != digest:
                    raise ValueError(f"checksum mismatch for {name}")
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("[cache] %s is corrupt (%s): rebuilding it", path, e)
            return None
        return Entry(path, meta)

    @contextmanager
    def _lock(self, name: str) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with (self.root / f"{name}.lock").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def get_or_build(
        self, kind: str, key: str, build: Callable[[Path], dict[str, Any]]
    ) -> tuple[Entry, bool]:
        """Return the entry for (kind, key), building it with `build(tmp_dir)` if needed.

        `build` writes its files into the directory it is given and returns JSON-able
        metadata. Returns the entry and whether it was reused (from this disk or the store).
        """
        name = f"{kind}-{key}"
        final = self.root / name
        with self._lock(name):
            entry = self._valid(final)
            if entry is not None:
                return entry, True
            for stale in self.root.glob(f".{name}.*.tmp"):  # left by a killed builder
                shutil.rmtree(stale, ignore_errors=True)
            tmp = self.root / f".{name}.{os.getpid()}.tmp"
            tmp.mkdir(parents=True)
            claim = None
            try:
                if self.remote is not None:
                    fetched, claim = self._fetch_or_claim(name, tmp)
                    if fetched is not None:
                        self._install(tmp, final)
                        return Entry(final, fetched.meta, FETCHED), True
                try:
                    meta = build(tmp)
                    files = {p.name: _sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
                    meta = {**meta, "key": key, "kind": kind, "files": files}
                    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
                    self._install(tmp, final)
                except BaseException as e:
                    if claim is not None:
                        claim.release(f"{type(e).__name__}: {e}")
                    raise
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            if claim is not None:
                claim.publish(final)
            return Entry(final, meta, BUILT), False

    def _fetch_or_claim(self, name: str, tmp: Path) -> tuple[Entry | None, Claim | None]:
        """The published entry, fetched into `tmp` and checked; else this worker's claim.

        While another live worker builds it, wait for its upload rather than train it twice.
        """
        assert self.remote is not None
        waiting_since = logged = None
        while True:
            if self.remote.fetch(name, tmp):
                entry = self._valid(tmp)
                if entry is not None:
                    log.info("[cache] %s fetched from the shared store, %d files checked "
                             "against their checksums", name, len(entry.meta["files"]))  # fmt: skip
                    return entry, None
                log.warning("[cache] %s in the shared store fails its checksums: retired, and "
                            "built anew unless another worker already does", name)  # fmt: skip
                self.remote.discard(name)
                shutil.rmtree(tmp)
                tmp.mkdir()
            claim = self.remote.claim(name)
            if not isinstance(claim, str):
                return None, claim
            now = time.monotonic()
            waiting_since = waiting_since or now
            if logged is None or now - logged >= _WAIT_LOG_SECONDS:
                log.info("[cache] %s is being built by %s: waiting for it (%.0f s so far)",
                         name, claim, now - waiting_since)  # fmt: skip
                logged = now
            time.sleep(WAIT_POLL_SECONDS)

    @staticmethod
    def _install(tmp: Path, final: Path) -> None:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
