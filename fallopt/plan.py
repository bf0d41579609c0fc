"""A dry run's plan: what a job would do, without importing TensorFlow or logging anything.

Skip it (already FINISHED, and in which run), or run it, saying for each stage whether it
would be trained or reused (cached, in the shared store, or built by an earlier job of the
same sweep in this process).
"""

from __future__ import annotations

from mlflow.entities import Run

from fallopt.cache import clustered_key, pruned_key
from fallopt.config import ClusterMethod, FalloptConfig, PruneMethod
from fallopt.data import load_dataset
from fallopt.stage_store import stage_cache
from fallopt.stages import baseline_key_for

# Stages this process's dry-run jobs would build: later jobs of the sweep reuse them.
_planned: set[str] = set()


def plan(cfg: FalloptConfig, what: str, done: Run | None) -> str:
    """One line: `what` (the job's overrides), then `skip, ...` or `run; <stage> <status>, ...`.

    Loads the data (to hash it, as the stage keys do) but imports no TensorFlow.
    """
    if done is not None:
        return f"{what}: skip, FINISHED in run {done.info.run_id}"
    data = load_dataset(cfg.dataset, cfg.train.val_split, cfg.seed)
    cache = stage_cache(cfg.tracking)
    keys = {"baseline": baseline_key_for(data, cfg.model, cfg.train, cfg.seed)}
    if cfg.prune.method is not PruneMethod.none:
        keys["pruned"] = pruned_key(keys["baseline"], cfg.prune, cfg.train, cfg.seed)
    if cfg.cluster.method is not ClusterMethod.none:
        previous = list(keys.values())[-1]
        keys["clustered"] = clustered_key(previous, cfg.cluster, cfg.train, cfg.seed)
    steps = []
    for kind, key in keys.items():
        status = cache.status(kind, key)
        if status == "missing":
            status = "reuse (built by an earlier job)" if key in _planned else "train"
            _planned.add(key)
        else:
            status = {"cached": "reuse (cached)", "shared": "reuse (shared store)"}[status]
        steps.append(f"{kind} {status}")
    if cfg.quant.mode.aware:
        steps.append(f"{cfg.quant.mode.value} fine-tune")
    return f"{what}: run; {', '.join(steps)}"
