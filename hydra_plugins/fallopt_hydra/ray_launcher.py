"""`hydra/launcher=ray`: Hydra's Ray launcher, made to work on a real cluster.

hydra-ray-launcher 1.2 hands every job to `ray.remote` and waits for them in order. This
subclass (fallopt/conf/hydra/launcher/ray.yaml selects it) changes four things; the work is
done in `fallopt.launching`:

- **Joining a running cluster works.** The plugin sets `object_store_memory` for the
  local instance it starts, and Ray refuses that key (and `num_cpus`, `resources`, ...) when
  joining: such keys are dropped, with a warning, when `hydra.launcher.ray.init.address`
  (or RAY_ADDRESS) names a cluster. A head that does not answer is reported in seconds,
  before the sweep's parent run is opened (`check_config`, called by the sweep record).
- **Jobs on other machines join the sweep.** The sweep's parent run, job count and start
  time (protocol.py) reach them through Hydra's `hydra.job.env_set`, not through the
  driver's environment, which a cluster's workers do not inherit.
- **A lost job does not lose the sweep.** Jobs are collected as they finish. Ray retries a
  job whose node or worker process died (`max_retries`, Ray's default 3); one lost for good
  is recorded as failed on the parent, its run ended KILLED, and the others go on, so
  re-running the sweep finishes exactly the missing combinations.
- Each job's run is tagged with the Ray node that ran it (`fallopt.ray_node`, track.py).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, configure_log, setup_globals
from hydra_plugins.hydra_ray_launcher.ray_launcher import RayLauncher as HydraRayLauncher
from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger("fallopt.ray")


class RayLauncher(HydraRayLauncher):
    """Hydra's Ray launcher for real clusters (see the module's docstring)."""

    @staticmethod
    def check_config(config: DictConfig) -> None:
        """Before the sweep opens its parent run (sweep.py): the cluster must answer."""
        from fallopt.launching import check_head

        check_head(config.hydra.launcher.ray.init.get("address"))

    def launch(
        self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
    ) -> Sequence[JobReturn]:
        """Run the jobs on Ray and return their results in job order."""
        import ray
        from hydra_plugins.hydra_ray_launcher._launcher_util import launch_job_on_ray

        from fallopt.launching import ExitAsError, check_head, describe_nodes, init_options
        from fallopt.protocol import PARENT_ENV, START_ENV, TOTAL_ENV

        setup_globals()
        assert self.config is not None and self.hydra_context is not None
        assert self.task_function is not None
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        init = OmegaConf.to_container(self.ray_cfg.init, resolve=True)
        assert isinstance(init, dict)
        target = check_head(init.get("address"))
        if not ray.is_initialized():
            ray.init(**init_options(init, connecting=target is not None))
        where = f"the cluster at {target}" if target else "a local Ray instance"
        log.info("[ray] %d jobs on %s: %s", len(job_overrides), where, describe_nodes(ray.nodes()))

        protocol = {k: os.environ[k] for k in (PARENT_ENV, TOTAL_ENV, START_ENV) if k in os.environ}
        jobs = {}
        for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
            sweep_config = self.hydra_context.config_loader.load_sweep_config(
                self.config, list(overrides)
            )
            with open_dict(sweep_config):
                sweep_config.hydra.job.id = f"job_id_for_{idx}"
                sweep_config.hydra.job.num = idx
                sweep_config.hydra.job.env_set.update(protocol)
            ref = launch_job_on_ray(self.hydra_context, self.ray_cfg.remote, sweep_config,
                                    ExitAsError(self.task_function),
                                    Singleton.get_state())  # fmt: skip
            jobs[ref] = (idx, overrides, sweep_config)
        return self._collect(jobs)

    def _collect(self, jobs: dict[Any, tuple[int, Sequence[str], DictConfig]]) -> list[JobReturn]:
        """Each job's result as it finishes; a job lost with its node or worker is recorded.

        A job that stops the sweep (keep_going=false) cancels the others and ends the sweep
        with its exit code, as with Hydra's own launcher.
        """
        import ray

        from fallopt.launching import JobExit, record_lost

        results: dict[int, JobReturn] = {}
        pending = list(jobs)

        def stop() -> None:
            for other in pending:
                ray.cancel(other, force=True)

        while pending:
            (ref,), pending = ray.wait(pending, num_returns=1)
            idx, overrides, sweep_config = jobs[ref]
            try:
                results[idx] = ray.get(ref)
            except ray.exceptions.RayTaskError:  # an error outside the job: fallopt's or Ray's
                stop()
                raise
            except ray.exceptions.RayError as e:
                reason = record_lost(sweep_config, idx, overrides, e)
                if sweep_config.get("keep_going", True) is False:
                    stop()
                    raise RuntimeError(f"{reason}; keep_going=false stops the sweep") from e
                results[idx] = JobReturn(  # answered like a failed job (None), not raised
                    overrides=list(overrides), cfg=sweep_config, hydra_cfg=sweep_config,
                    status=JobStatus.COMPLETED, _return_value=None,
                )  # fmt: skip
                continue
            if results[idx].status is JobStatus.FAILED:
                stop()
                error = results[idx]._return_value
                if isinstance(error, JobExit):
                    for line in error.errors:
                        log.error("%s", line)
                    raise SystemExit(error.code)
                break  # Hydra's sweeper raises the job's error
        return [results[idx] for idx in sorted(results)]
