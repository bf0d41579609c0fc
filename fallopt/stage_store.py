"""A stage store shared through MLflow, for workers that do not share a disk (Ray clusters).

Each stage entry becomes one MLflow run in the experiment `<experiment>.stages`, tagged
`fallopt.stage=<kind>-<key>`, with the entry's files as artifacts under `entry/`.

- **One builder in the cluster.** A worker about to build an entry first claims it (see
  `MlflowStageStore.claim`): the oldest live claim, a RUNNING run of the entry, wins; the
  others wait for its upload. The builder's run beats a heartbeat tag, so a builder that
  dies on another host is noticed within `track.STALE_SECONDS` (on this host, or on a dead
  Ray node, at once), its claim is ended KILLED, and a waiting worker takes over.
- **Nothing partial is ever fetched.** The run is marked FINISHED only after every file is
  uploaded, and only FINISHED runs are fetched; fetched files are still checked against the
  checksums in their `meta.json` (see cache.py).
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

from mlflow.entities import Run
from mlflow.exceptions import MlflowException

from fallopt import track
from fallopt.cache import StageCache
from fallopt.config import TrackingConfig
from fallopt.data import default_cache_dir

log = logging.getLogger(__name__)

STAGE_TAG = "fallopt.stage"
_ENTRY = "entry"
# How long a new claim waits before it looks at its rivals: longer than opening a run takes
# (its start time is taken before the store has it), so that no rival is missed.
CLAIM_SETTLE_SECONDS = 1.0


class _Claim:
    """This worker's claim on building one entry: its RUNNING run, beating until it ends."""

    def __init__(self, store: MlflowStageStore, run_id: str, name: str) -> None:
        self._store, self.run_id, self._name = store, run_id, name
        self._heartbeat = track.Heartbeat(store.uri, run_id)

    def publish(self, src: Path) -> None:
        """Upload the entry's files; the run is FINISHED only once every file is there.

        The heartbeat goes on during the upload, however long it takes.
        """
        client, status = self._store.client, "FAILED"
        try:
            client.log_artifacts(self.run_id, str(src), _ENTRY)
            status = "FINISHED"
        finally:
            self._heartbeat.stop()
            client.set_terminated(self.run_id, status)
        log.info("[cache] %s published to experiment %r", self._name, self._store.experiment)

    def release(self, error: str) -> None:
        """End the claim FAILED (the build failed), so that another worker may build."""
        self._heartbeat.stop()
        try:
            self._store.client.set_tag(self.run_id, "fallopt.error", error[: track.MAX_TAG])
            self._store.client.set_terminated(self.run_id, "FAILED")
        except MlflowException as e:  # its heartbeat has stopped: others take over anyway
            log.warning("[cache] cannot end the claim on %s: %s", self._name, e.message)


class MlflowStageStore:
    """Stage entries as FINISHED MLflow runs with their files as artifacts."""

    def __init__(self, tracking: TrackingConfig) -> None:
        self.experiment = f"{tracking.experiment}.stages"
        self.uri = tracking.uri
        self._experiment_id = track.connect(tracking, self.experiment)
        self.client = track.client(tracking.uri)
        self._fetched: dict[str, str] = {}  # entry name -> the run its files came from
        for run_id in track.reap_dead_runs(self._experiment_id):
            log.info("[cache] upload %s was left RUNNING by a killed process: KILLED", run_id)

    def _runs(self, name: str, status: str) -> list[Run]:
        """The entry's runs of a status, newest first."""
        return track.find_runs(self._experiment_id, {STAGE_TAG: name}, status=status)

    def has(self, name: str) -> bool:
        """Whether a complete entry `name` was published."""
        return bool(self._runs(name, "FINISHED"))

    def fetch(self, name: str, dest: Path) -> bool:
        """Download entry `name`'s files into `dest`; False if none was published."""
        published = self._runs(name, "FINISHED")
        if not published:
            return False
        run_id = published[0].info.run_id
        downloaded = Path(self.client.download_artifacts(run_id, _ENTRY, str(dest)))
        for path in downloaded.iterdir():
            shutil.move(str(path), dest / path.name)
        downloaded.rmdir()
        self._fetched[name] = run_id
        return True

    def discard(self, name: str) -> None:
        """Retire the entry last fetched as `name`: its files failed their checksums.

        Its run ends FAILED, so no worker fetches it again and the next claim rebuilds it.
        """
        run_id = self._fetched.pop(name, None)
        if run_id is not None:
            self.client.set_tag(run_id, "fallopt.error", "its files failed their checksums")
            self.client.set_terminated(run_id, "FAILED")

    def claim(self, name: str) -> _Claim | str:
        """Claim the building of `name`: this worker's claim, or who holds the winning one.

        A live claim already there is waited for, without a claim of this worker's. Else this
        worker opens one, lets `CLAIM_SETTLE_SECONDS` pass, so that every claim opened at the
        same time is in the store, and looks again: among the live claims the oldest wins
        (start time, then run id: every worker computes the same answer). Claims of dead
        writers are ended KILLED on the way; a losing claim is ended and deleted.
        """
        live = track.live_runs(self._runs(name, "RUNNING"))
        if live:
            return track.describe_owner(_oldest(live))
        mine = self.client.create_run(
            self._experiment_id,
            run_name=name,
            tags={
                STAGE_TAG: name,
                "fallopt.role": "stage",
                track.HEARTBEAT_TAG: f"{time.time():.0f}",
                **track.owner_tags(),
            },
        )
        time.sleep(CLAIM_SETTLE_SECONDS)
        rivals = [r for r in self._runs(name, "RUNNING") if r.info.run_id != mine.info.run_id]
        first = _oldest([mine, *track.live_runs(rivals)])
        if first is mine and not self.has(name):
            return _Claim(self, mine.info.run_id, name)
        self.client.set_terminated(mine.info.run_id, "FAILED")
        self.client.delete_run(mine.info.run_id)  # a losing claim leaves nothing to see
        if first is mine:  # published between this worker's fetch and its claim
            return "a worker that has just published it"
        return track.describe_owner(first)


def _oldest(claims: list[Run]) -> Run:
    return min(claims, key=lambda r: (r.info.start_time, r.info.run_id))


def stage_cache(tracking: TrackingConfig) -> StageCache:
    """The stage cache under `$FALLOPT_CACHE/stages`, shared through MLflow if configured."""
    remote = MlflowStageStore(tracking) if tracking.share_stages else None
    return StageCache(default_cache_dir() / "stages", remote)
