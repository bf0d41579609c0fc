"""A fast `--help`: Hydra lists config groups by deep-copying its config repository per call.

`python -m fallopt.run --help` made 133 identical copies (5.4 of its 6.4 s here). The group
listing only reads the repository, so one copy per (config, overrides) serves every call.
"""

from __future__ import annotations

from typing import Any


def share_group_listing_repository() -> None:
    """Patch Hydra's ConfigLoaderImpl.get_group_options to build its repository once.

    Leaves Hydra untouched if its internals have changed: help is then slow, not wrong.
    """
    try:
        from hydra._internal.config_loader_impl import ConfigLoaderImpl
        from hydra.core.object_type import ObjectType
    except ImportError:
        return
    if not hasattr(ConfigLoaderImpl, "_parse_overrides_and_create_caching_repo"):
        return

    def get_group_options(
        self: Any,
        group_name: str,
        results_filter: ObjectType | None = ObjectType.CONFIG,
        config_name: str | None = None,
        overrides: list[str] | None = None,
    ) -> list[str]:
        repos = self.__dict__.setdefault("_fallopt_listing_repos", {})
        key = (config_name, tuple(overrides or ()))
        if key not in repos:
            repos[key] = self._parse_overrides_and_create_caching_repo(
                config_name, list(overrides or ())
            )[1]
        return repos[key].get_group_options(group_name, results_filter)

    ConfigLoaderImpl.get_group_options = get_group_options
