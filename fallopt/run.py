"""`python -m fallopt.run`: one Hydra job is one tracked run; `-m` sweeps.

Exit codes: 0 done; 1 unexpected error (Hydra prints it; HYDRA_FULL_ERROR=1 for the full
trace); 2 bad config, data or tracking store (one line naming the culprit and the fix).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from fallopt import config
from fallopt.errors import FalloptError

log = logging.getLogger("fallopt")

EXIT_USER_ERROR = 2


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float:
    """Validate the composed config, then run it; returns validation accuracy for sweepers."""
    try:
        settings = config.validate(cfg)
        from fallopt.task import run_experiment  # TensorFlow and MLflow load only now

        hydra_cfg = HydraConfig.get()
        output_dir = Path(hydra_cfg.runtime.output_dir)
        # Named by what differs: MLflow's random names repeat once `random` is seeded.
        overrides = " ".join(o for o in hydra_cfg.overrides.task if "tracking." not in o)
        settings.tracking.run_name = settings.tracking.run_name or overrides or None
        resolved = config.resolved_dict(cfg)
        from fallopt.sweep import parent_run_id

        metrics = run_experiment(
            settings, resolved, config.config_hash(cfg), output_dir, parent_run_id()
        )
    except FalloptError as e:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        log.error("%s", e)
        sys.exit(EXIT_USER_ERROR)
    return metrics["val_accuracy"]


if __name__ == "__main__":
    main()
