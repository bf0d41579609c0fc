"""A stage cache on disk: train a baseline (or prune it) once, reuse it everywhere.

An entry is a directory named by the hash of everything that determines the stage's result
(`stage_key`). Writers hold an exclusive lock per entry, so parallel jobs of one sweep wait
for the first to finish instead of training the same model twice. Entries are written to a
temporary directory and renamed into place, and every file carries a checksum in
`meta.json`: a truncated or corrupt entry is detected and rebuilt, never used.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
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


@dataclass(frozen=True)
class Entry:
    """A complete cache entry: its directory and its metadata."""

    path: Path
    meta: dict[str, Any]


class RemoteStore(Protocol):
    """A store shared by machines that do not share this cache's disk (see stage_store.py)."""

    def fetch(self, name: str, dest: Path) -> bool:
        """Copy entry `name`'s files into `dest`; False if the store has no such entry."""
        ...

    def publish(self, name: str, src: Path) -> None:
        """Upload a complete entry."""
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
        metadata. Returns the entry and whether it was reused.
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
            try:
                if self.remote is not None and self.remote.fetch(name, tmp):
                    entry = self._valid(tmp)
                    if entry is not None:
                        self._install(tmp, final)
                        log.info("[cache] %s fetched from the shared store", name)
                        return Entry(final, entry.meta), True
                    shutil.rmtree(tmp)
                    tmp.mkdir()
                meta = build(tmp)
                files = {p.name: _sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
                meta = {**meta, "key": key, "kind": kind, "files": files}
                (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
                self._install(tmp, final)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            if self.remote is not None:
                self.remote.publish(name, final)
            return Entry(final, meta), False

    @staticmethod
    def _install(tmp: Path, final: Path) -> None:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
