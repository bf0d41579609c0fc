"""What a compression stage made besides its model file, in one shape for every stage."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Outcome:
    """A prune or cluster stage's result, stored in its cache entry and logged by each run.

    `metrics` are logged on every run that uses the stage (e.g. `sparsity_conv1`,
    `channels_conv1`, `clusters_dense1`); `rows` are its per-layer table (one dict per
    layer, the same keys in each), logged as `<stage>_per_layer.csv`; `summary` is the
    log line saying what changed.
    """

    history: dict[str, list[float]]
    metrics: dict[str, float]
    rows: list[dict[str, Any]]
    summary: str

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> Outcome:
        """The outcome a cache entry's meta.json holds (see `as_meta`)."""
        return cls(meta["history"], meta["metrics"], meta["rows"], meta["summary"])

    def as_meta(self) -> dict[str, Any]:
        """JSON-able, for the stage's meta.json."""
        return {"history": self.history, "metrics": self.metrics, "rows": self.rows,
                "summary": self.summary}  # fmt: skip


def write_table(rows: list[dict[str, Any]], path: Path) -> Path:
    """The rows as CSV, columns in the first row's order."""
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else [])
        writer.writeheader()
        writer.writerows(rows)
    return path
