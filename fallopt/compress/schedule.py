"""Pruning schedules in steps, checked against tfmot's step semantics before any training.

Measured with tfmot 0.8.1: during a fine-tune of N batches the pruning step runs 1..N, and
masks are updated at the steps s >= begin with (s - begin) % frequency == 0 (and s <= end).
So the default frequency of 100 never prunes a 10-step fine-tune, and PolynomialDecay
reaches its final sparsity only if an update lands exactly on its end step.
"""

from __future__ import annotations

from dataclasses import dataclass

from fallopt.config import PruneConfig, PruneMethod, ScheduleUnit
from fallopt.errors import ConfigError


@dataclass(frozen=True)
class Schedule:
    """A schedule in fine-tune steps (1..total_steps); `end_step` None means no end."""

    method: PruneMethod
    target: float
    initial: float
    power: float
    begin_step: int
    end_step: int | None
    frequency: int
    total_steps: int

    def update_steps(self) -> list[int]:
        """The steps at which tfmot will recompute the masks."""
        last = self.total_steps if self.end_step is None else min(self.end_step, self.total_steps)
        first = max(self.begin_step, 1)
        return [s for s in range(first, last + 1) if (s - self.begin_step) % self.frequency == 0]


def _to_steps(value: float, unit: ScheduleUnit, steps_per_epoch: int) -> int:
    return round(value * steps_per_epoch) if unit is ScheduleUnit.epochs else int(value)


def plan_schedule(cfg: PruneConfig, steps_per_epoch: int) -> Schedule:
    """Turn the prune config into steps and refuse schedules that cannot reach the target.

    Args:
        cfg: the prune config (not `none`).
        steps_per_epoch: batches per fine-tune epoch, ceil(n_train / batch_size).

    Raises:
        ConfigError: saying why the schedule would miss its target and what to change.
    """
    total = steps_per_epoch * cfg.fine_tune_epochs
    begin = _to_steps(cfg.begin, cfg.unit, steps_per_epoch)
    where = (
        f"(prune.fine_tune_epochs={cfg.fine_tune_epochs} x {steps_per_epoch} steps per epoch "
        f"= steps 1..{total})"
    )
    if begin > total:
        raise ConfigError(
            f"prune.begin={cfg.begin} {cfg.unit.value} is step {begin}, after the fine-tune "
            f"ends {where}: lower prune.begin or raise prune.fine_tune_epochs"
        )
    if cfg.end is None:
        end = None
        if cfg.method is PruneMethod.polynomial:  # the last update step on the grid
            end = begin + (total - begin) // cfg.frequency * cfg.frequency
    else:
        end = _to_steps(cfg.end, cfg.unit, steps_per_epoch)
        if end <= begin:
            raise ConfigError(
                f"prune.end={cfg.end} (step {end}) is not after prune.begin={cfg.begin} "
                f"(step {begin}): the schedule would never prune"
            )
        if end > total:
            raise ConfigError(
                f"prune.end={cfg.end} {cfg.unit.value} is step {end}, after the fine-tune ends "
                f"{where}: the target would never be reached. Lower prune.end or raise "
                "prune.fine_tune_epochs"
            )
    schedule = Schedule(
        method=cfg.method,
        target=cfg.sparsity,
        initial=cfg.initial_sparsity,
        power=cfg.power,
        begin_step=begin,
        end_step=end,
        frequency=cfg.frequency,
        total_steps=total,
    )
    updates = schedule.update_steps()
    if not updates:
        raise ConfigError(
            f"prune.frequency={cfg.frequency} is larger than the steps available after "
            f"prune.begin {where}: the masks would never be updated and nothing pruned. Use "
            f"prune.frequency<={max(total - max(begin, 1) + 1, 1)}"
        )
    if cfg.method is PruneMethod.polynomial and end is not None and updates[-1] != end:
        raise ConfigError(
            f"prune.end (step {end}) is not on the update grid of prune.begin (step {begin}) "
            f"and prune.frequency={cfg.frequency}: the last update is step {updates[-1]}, so "
            "the final sparsity would be missed. Make (end - begin) a multiple of the frequency"
        )
    return schedule
