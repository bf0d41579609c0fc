"""A stage store shared through MLflow, for workers that do not share a disk (Ray clusters).

Each stage entry becomes one MLflow run in the experiment `<experiment>.stages`, tagged
`fallopt.stage=<kind>-<key>`, with the entry's files as artifacts under `entry/`. The run is
marked FINISHED only after every file is uploaded, and only FINISHED runs are fetched, so a
worker killed mid-upload never publishes a partial entry; fetched files are still checked
against the checksums in their `meta.json` (see cache.py).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from mlflow.tracking import MlflowClient

from fallopt import track
from fallopt.cache import StageCache
from fallopt.config import TrackingConfig
from fallopt.data import default_cache_dir

log = logging.getLogger(__name__)

STAGE_TAG = "fallopt.stage"
_ENTRY = "entry"


class MlflowStageStore:
    """Stage entries as FINISHED MLflow runs with their files as artifacts."""

    def __init__(self, tracking: TrackingConfig) -> None:
        self.experiment = f"{tracking.experiment}.stages"
        self._experiment_id = track.connect(tracking, self.experiment)
        self._client = MlflowClient(tracking.uri)
        for run_id in track.reap_dead_runs(self._experiment_id):
            log.info("[cache] upload %s was left RUNNING by a killed process: KILLED", run_id)

    def _run_id(self, name: str) -> str | None:
        runs = track.find_runs(self._experiment_id, {STAGE_TAG: name}, status="FINISHED")
        return runs[0].info.run_id if runs else None

    def has(self, name: str) -> bool:
        """Whether a complete entry `name` was published."""
        return self._run_id(name) is not None

    def fetch(self, name: str, dest: Path) -> bool:
        """Download entry `name`'s files into `dest`; False if none was published."""
        run_id = self._run_id(name)
        if run_id is None:
            return False
        downloaded = Path(self._client.download_artifacts(run_id, _ENTRY, str(dest)))
        for path in downloaded.iterdir():
            shutil.move(str(path), dest / path.name)
        downloaded.rmdir()
        return True

    def publish(self, name: str, src: Path) -> None:
        """Upload a complete entry; the run is FINISHED only once every file is there."""
        run = self._client.create_run(
            self._experiment_id,
            run_name=name,
            tags={STAGE_TAG: name, "fallopt.role": "stage", **track.owner_tags()},
        )
        status = "FAILED"
        try:
            self._client.log_artifacts(run.info.run_id, str(src), _ENTRY)
            status = "FINISHED"
        finally:
            self._client.set_terminated(run.info.run_id, status)
        log.info("[cache] %s published to experiment %r", name, self.experiment)


def stage_cache(tracking: TrackingConfig) -> StageCache:
    """The stage cache under `$FALLOPT_CACHE/stages`, shared through MLflow if configured."""
    remote = MlflowStageStore(tracking) if tracking.share_stages else None
    return StageCache(default_cache_dir() / "stages", remote)
