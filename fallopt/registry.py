"""Extension by module: a package's sources are the modules in it that define `SCHEMA`.

`fallopt.data` and `fallopt.models` find their sources this way, so adding one is a module
(its `SCHEMA` config dataclass and its function) plus a YAML preset, and no list to edit.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterable
from types import ModuleType
from typing import Any


def discover(package: str, path: Iterable[str], function: str) -> dict[str, ModuleType]:
    """The modules of `package` that define `SCHEMA` and `function`, by module name."""
    found = {}
    for info in pkgutil.iter_modules(path):
        module = importlib.import_module(f"{package}.{info.name}")
        if hasattr(module, "SCHEMA") and hasattr(module, function):
            found[info.name] = module
    return found


def owner(cfg: Any, modules: dict[str, ModuleType]) -> ModuleType:
    """The module whose `SCHEMA` `cfg` is an instance of."""
    for module in modules.values():
        if type(cfg) is module.SCHEMA:
            return module
    raise TypeError(f"no source for {type(cfg).__name__}; known: {sorted(modules)}")
