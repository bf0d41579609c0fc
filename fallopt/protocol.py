"""The protocol between a sweep's jobs, its parent run and its readers (summary, report).

Jobs find the sweep's parent run through the environment (or, on other machines, by its
`fallopt.sweep_dir` tag) and record their outcome on it as tags `fallopt.job.<num>` holding
JSON. Readers use only this module, never the Hydra job module that writes.
"""

from __future__ import annotations

import json
from typing import Any

from mlflow.tracking import MlflowClient

from fallopt import track

PARENT_ENV = "FALLOPT_PARENT_RUN_ID"
TOTAL_ENV = "FALLOPT_SWEEP_TOTAL"
START_ENV = "FALLOPT_SWEEP_START"
JOB_TAG = "fallopt.job."
SWEEP_DIR_TAG = "fallopt.sweep_dir"

_CUT = " [cut here; the run's tag fallopt.error and the job's log hold it whole]"


def record_json(value: dict[str, Any]) -> str:
    """The record as JSON within MLflow's tag size, its long texts cut, never mid-JSON."""
    for key in ("error", "overrides"):  # the error first: TensorFlow's run to pages
        if len(json.dumps(value)) <= track.MAX_TAG:
            break
        # The longest prefix that fits; JSON escapes make characters count unevenly.
        text, lo, hi = value[key], 0, len(value[key])
        while lo < hi:
            mid = (lo + hi + 1) // 2
            fits = len(json.dumps({**value, key: text[:mid] + _CUT})) <= track.MAX_TAG
            lo, hi = (mid, hi) if fits else (lo, mid - 1)
        value = {**value, key: text[:lo] + _CUT}
    return json.dumps(value)


def job_outcomes(client: MlflowClient, parent: str) -> dict[int, dict[str, Any]]:
    """Outcomes the jobs recorded on the parent, by job number.

    A record that is not valid JSON (written by an older fallopt, which cut long errors
    mid-JSON) reads as a failure whose error says so, rather than breaking every reader.
    """
    outcomes = {}
    for key, text in client.get_run(parent).data.tags.items():
        if not key.startswith(JOB_TAG):
            continue
        try:
            outcome = json.loads(text)
        except json.JSONDecodeError:
            outcome = {"outcome": "failed", "run_id": None, "overrides": "", "error": text}
        outcomes[int(key[len(JOB_TAG) :])] = outcome
    return outcomes
