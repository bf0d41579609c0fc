"""Composing a sweep's job configs: each job once, and the defaults once per distinct choice.

Hydra's BasicSweeper composes every job's config to check the batch before launching it,
and the launcher composes it again to run it: 0.1 s each time for fallopt's config, mostly
Hydra walking the defaults list. `ComposeOnce` (installed by fallopt's sweeper plugin) keeps
the checked config for the launch, and composes the defaults once per distinct set of the
overrides that can change them. Jobs differing only in values (`prune.sparsity=0.2` against
`0.5`) share that composition: the job's values are set on a copy exactly as Hydra sets them
after composing (`ConfigLoaderImpl._apply_overrides_to_config`), 5 ms instead of 100.
tests/test_composing.py holds the result equal to Hydra's own, override kind by kind. One
difference is meant: a job launches with the config its batch was checked with, so what
Hydra reads from the process (`hydra.job.env_copy`, the working directory) is read when the
batch is checked, not after the jobs before it ran.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from typing import Any

from hydra._internal.config_loader_impl import ConfigLoaderImpl, get_overrides_dirname
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, OverrideType
from omegaconf import DictConfig, OmegaConf, open_dict

from fallopt.memo import Memo

# Compositions kept for reuse: a grid cycles through its choices of config groups, and each
# kept config holds a whole Hydra config.
KEPT_COMPOSITIONS = 16


class ComposeOnce:
    """A Hydra config loader composing each job's config once, and sharing its defaults."""

    def __init__(self, loader: ConfigLoaderImpl) -> None:
        self._loader = loader
        self._composed: dict[tuple[int, tuple[str, ...]], DictConfig] = {}  # checked, to launch
        self._defaults: Memo[tuple[int, tuple[str, ...]], DictConfig] = Memo(KEPT_COMPOSITIONS)
        self._repos: Memo[tuple[int, tuple[str, ...]], Any] = Memo(KEPT_COMPOSITIONS)
        self.full_compositions = 0  # how often Hydra composed (tests count them)

    def load_sweep_config(
        self, master_config: DictConfig, sweep_overrides: Sequence[str]
    ) -> DictConfig:
        """The job's config: composed now, or kept from the batch check."""
        key = (id(master_config), tuple(sweep_overrides))
        kept = self._composed.pop(key, None)
        if kept is not None:
            return kept
        config = self._compose(master_config, list(sweep_overrides))
        self._composed[key] = config
        return copy.deepcopy(config)  # the checker's copy: whatever it does stays its own

    def _compose(self, master: DictConfig, overrides: list[str]) -> DictConfig:
        """Hydra's `load_sweep_config`, the defaults composed once per set that shapes them.

        Only when every override either shapes the defaults (a config group, or Hydra's own)
        or sets a value: any other (`+key=`, `~key`, a dict) is applied in the list's order
        among the values, so such a job is left to Hydra whole.
        """
        try:
            parsed = OverridesParser.create().parse_overrides(overrides)
        except Exception:
            return self._hydra(master, overrides)  # Hydra's own error
        repo = self._repo(master, tuple(o.input_line for o in parsed if o.is_hydra_override()))
        values: list[Override] = []
        shaping: list[Override] = []
        for o in parsed:
            (values if _only_sets_a_value(o, repo) else shaping).append(o)
        if not values or not all(_shapes_defaults(o, repo) for o in shaping):
            return self._hydra(master, overrides)
        lines = [o.input_line for o in shaping]
        try:
            composed = self._defaults.get((id(master), tuple(lines)),
                                          lambda: self._hydra(master, lines))  # fmt: skip
            config = copy.deepcopy(composed)
            ConfigLoaderImpl._apply_overrides_to_config(values, config)
        except Exception:
            return self._hydra(master, overrides)  # Hydra's own error, for the first bad one
        # What Hydra reads from the process, as it is now; and derives from the whole list.
        with open_dict(config.hydra):
            for key in config.hydra.job.env_copy:
                config.hydra.job.env_set[key] = os.environ[key]
        config.hydra.runtime.cwd = os.getcwd()
        task = [o for o in parsed if not o.is_hydra_override()]
        config.hydra.overrides.task = [o.input_line for o in task]
        dirname = config.hydra.job.config.override_dirname
        config.hydra.job.override_dirname = get_overrides_dirname(
            overrides=task,
            kv_sep=dirname.kv_sep,
            item_sep=dirname.item_sep,
            exclude_keys=dirname.exclude_keys,
        )
        OmegaConf.copy_cache(from_config=master, to_config=config)
        return config

    def _hydra(self, master: DictConfig, overrides: list[str]) -> DictConfig:
        self.full_compositions += 1
        return self._loader.load_sweep_config(master, overrides)

    def _repo(self, master: DictConfig, hydra_overrides: tuple[str, ...]) -> Any:
        """The config repository Hydra composes from: only Hydra's overrides can change it."""
        return self._repos.get(
            (id(master), hydra_overrides),
            lambda: self._loader._parse_overrides_and_create_caching_repo(
                master.hydra.job.config_name,
                [*OmegaConf.to_container(master.hydra.overrides.hydra), *hydra_overrides],
            )[1],
        )

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)

    def __reduce__(self) -> tuple:
        return (ComposeOnce, (self._loader,))  # launchers ship it to workers: not the configs


def _only_sets_a_value(override: Override, repo: Any) -> bool:
    """A plain `key=value` Hydra applies after composing, changing no defaults list.

    The test is Hydra's own (`defaults_list.Overrides`): not a config group in `repo`, and
    not a dict. Additions, deletions, packages, sweeps and Hydra's keys are left to Hydra.
    """
    return (
        override.type == OverrideType.CHANGE
        and override.package is None
        and not override.is_sweep_override()
        and not override.is_hydra_override()
        and not isinstance(override.value(), dict)
        and not repo.group_exists(override.key_or_group)
    )


def _shapes_defaults(override: Override, repo: Any) -> bool:
    """A config group's choice (`quant=int8`, `+group=x`, `~group`) or any of Hydra's keys."""
    if override.is_hydra_override():
        return True
    return not isinstance(override.value(), dict) and repo.group_exists(override.key_or_group)
