"""A run's identity: everything that determines its results, hashed.

A sweep skips a job whose config hash already FINISHED, so the hash must change whenever the
results would: the config's keys that the chosen options use (a key an option ignores, like
`prune.power` under constant pruning, must not cost a rerun), the content of input files (a
pickle replaced at the same path), the version of a data generator, and the version of
fallopt's own results. Keys that say how to run rather than what (`EXECUTION_KEYS`) are left
out, and so is the thread count: see README, "Reproducibility".
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from enum import Enum
from pathlib import Path
from typing import Any

# Bump when a change to fallopt alters the results of an unchanged config (training, metrics,
# conversion): earlier FINISHED runs must then not be reused.
RESULTS_VERSION = 3

# Top-level keys that say how to run rather than what: they do not change a run's identity.
EXECUTION_KEYS = (
    "tracking", "force", "dry_run", "keep_going", "threads", "objectives", "verbose", "deploy"
)  # fmt: skip


def section(node: Any) -> Any:
    """A config dataclass as plain data, without the fields that do not decide results.

    A dataclass may define `ignored() -> set[str]`: fields its chosen option does not use
    (`quant.fine_tune_epochs` outside QAT), so that configs meaning the same thing hash the
    same, and paths whose content its `sources()` fingerprints instead.
    """
    if dataclasses.is_dataclass(node):
        ignored = node.ignored() if hasattr(node, "ignored") else set()
        return {
            f.name: section(getattr(node, f.name))
            for f in dataclasses.fields(node)
            if f.name not in ignored
        }
    if isinstance(node, Enum):
        return node.value
    if isinstance(node, list | tuple):
        return [section(v) for v in node]
    return node


def digest(content: Any, length: int = 12) -> str:
    """A short SHA-256 of JSON-able content, independent of key order."""
    blob = json.dumps(content, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


@functools.lru_cache(maxsize=64)
def _file_digest(path: Path, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's content (hashed once per process while size and mtime hold).

    A missing file has no digest: "missing", so the loader, not the hash, reports it.
    """
    p = Path(path).resolve()
    try:
        stat = p.stat()
    except OSError:
        return "missing"
    return _file_digest(p, stat.st_size, stat.st_mtime_ns)


def identity(cfg: Any) -> dict[str, Any]:
    """What determines a run's results: config sections, input sources, results version.

    `cfg` is a validated `FalloptConfig`; its dataset may define `sources()`, the content
    fingerprints of what it reads (files, a generator's version).
    """
    content = {k: v for k, v in section(cfg).items() if k not in EXECUTION_KEYS}
    return {
        **content,
        "sources": {"dataset": cfg.dataset.sources(), "model": cfg.model.sources()},
        "results_version": RESULTS_VERSION,
    }


def config_hash(cfg: Any) -> str:
    """The run's identity as a short hash: a sweep skips configs FINISHED under it."""
    return digest(identity(cfg))
