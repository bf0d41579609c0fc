"""`hydra/sweeper=basic`, replaced: Hydra's basic sweeper, composing each job once.

Hydra's BasicSweeper composes every job's config to check the batch before launching it, and
the launcher then composes it again to run it: 0.1 s each time for fallopt's config, a fifth
of a small job's overhead. This sweeper's config loader (`fallopt.composing.ComposeOnce`)
hands the launcher the config the check composed, and composes the defaults once for all
jobs that differ only in values.
"""

from __future__ import annotations

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


class Sweeper(BasicSweeper):
    """Hydra's BasicSweeper (grids, `hydra.sweeper.params`), composing each job once."""

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        """Set up the launcher with a config loader that composes each job once."""
        from fallopt.composing import ComposeOnce

        once = HydraContext(
            config_loader=ComposeOnce(hydra_context.config_loader),
            callbacks=hydra_context.callbacks,
        )
        super().setup(hydra_context=once, task_function=task_function, config=config)
