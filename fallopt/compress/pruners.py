"""The pruning methods, by `prune.method`: how each checks a config and builds its stage.

A method is a `Pruner`: `check` runs before the MLflow run opens (it refuses what the method
cannot do, naming the layer), `build` makes the stage's model file and its `Outcome`. Adding
a method is one class here plus its `PruneMethod` value and YAML option.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from fallopt.compress.outcome import Outcome
from fallopt.compress.schedule import Schedule, plan_schedule
from fallopt.config import PruneConfig, PruneMethod, TrainConfig
from fallopt.data import Dataset, InputRule
from fallopt.train import EpochHook, steps_per_epoch

if TYPE_CHECKING:
    import tf_keras


class Pruner(Protocol):
    """One pruning method."""

    def check(
        self, model: tf_keras.Model, prune: PruneConfig, data: Dataset, train: TrainConfig
    ) -> Schedule | None:
        """Refuse, before training, what this method cannot do; its schedule, if it has one."""
        ...

    def build(
        self,
        baseline_file: Path,
        data: Dataset,
        prune: PruneConfig,
        schedule: Schedule | None,
        train: TrainConfig,
        seed: int,
        out_file: Path,
        on_epoch_end: EpochHook | None,
        rule: InputRule,
    ) -> Outcome:
        """Prune and fine-tune a fresh copy of the baseline, verify it, save it to `out_file`."""
        ...


class Magnitude:
    """tfmot's magnitude pruning (ConstantSparsity, PolynomialDecay): zeros in place."""

    def check(
        self, model: tf_keras.Model, prune: PruneConfig, data: Dataset, train: TrainConfig
    ) -> Schedule:
        """The schedule in steps; refuses a scope or map that selects no prunable layer."""
        from fallopt.compress.prune import check_m_by_n, layer_targets

        schedule = plan_schedule(prune, steps_per_epoch(len(data.train), train.batch_size))
        targets = layer_targets(model, prune)
        if prune.m_by_n is not None:
            check_m_by_n(model, list(targets), prune.m_by_n)
        return schedule

    def build(
        self,
        baseline_file: Path,
        data: Dataset,
        prune: PruneConfig,
        schedule: Schedule | None,
        train: TrainConfig,
        seed: int,
        out_file: Path,
        on_epoch_end: EpochHook | None,
        rule: InputRule,
    ) -> Outcome:
        """Prune with tfmot during the fine-tune; sparsity is verified per layer."""
        from fallopt.compress.prune import prune_and_fine_tune

        assert schedule is not None  # check() made it
        result = prune_and_fine_tune(baseline_file, data.train, data.val, prune, schedule, train,
                                     seed, out_file, on_epoch_end, rule)  # fmt: skip
        return result.outcome()


class Channels:
    """Whole filters and units removed: a thinner model (`fallopt.compress.channels`)."""

    def check(
        self, model: tf_keras.Model, prune: PruneConfig, data: Dataset, train: TrainConfig
    ) -> None:
        """Refuses a model it cannot rebuild thinner, naming the layer; no schedule."""
        from fallopt.compress.channels import check_prunable

        check_prunable(model, prune.scope)

    def build(
        self,
        baseline_file: Path,
        data: Dataset,
        prune: PruneConfig,
        schedule: Schedule | None,
        train: TrainConfig,
        seed: int,
        out_file: Path,
        on_epoch_end: EpochHook | None,
        rule: InputRule,
    ) -> Outcome:
        """The thin model is checked exact before its fine-tune."""
        from fallopt.compress.channels import prune_channels

        return prune_channels(baseline_file, data.train, data.val, prune, train, seed, out_file,
                              on_epoch_end, rule)  # fmt: skip


PRUNERS: dict[PruneMethod, Pruner] = {
    PruneMethod.constant: Magnitude(),
    PruneMethod.polynomial: Magnitude(),
    PruneMethod.channels: Channels(),
}
