"""Where a run's model comes from: one module per source, found by name.

A source is a module here that defines `SCHEMA`, its config dataclass (a `ModelConfig`), and
`build(cfg, input_shape, num_classes) -> tf_keras.Model`. Its YAML presets in
`fallopt/conf/model/` extend `/schema/model/<module>`. Adding a source is that module plus
a YAML file: nothing else lists the sources. Modules import no TensorFlow until they build.
"""

from __future__ import annotations

import importlib
import pkgutil
from functools import cache
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import tf_keras

    from fallopt.config import ModelConfig


@cache
def sources() -> dict[str, ModuleType]:
    """Every model source module, by name."""
    found = {}
    for info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{info.name}")
        if hasattr(module, "SCHEMA") and hasattr(module, "build"):
            found[info.name] = module
    return found


def schemas() -> dict[str, type[ModelConfig]]:
    """The config schema of every source, by source name."""
    return {name: module.SCHEMA for name, module in sources().items()}


def build_model(cfg: ModelConfig, input_shape: tuple[int, int, int], num_classes: int) -> Any:
    """The uncompiled model `cfg` describes, for images of `input_shape` and `num_classes`."""
    for module in sources().values():
        if type(cfg) is module.SCHEMA:
            model: tf_keras.Model = module.build(cfg, input_shape, num_classes)
            return model
    raise TypeError(f"no model source for {type(cfg).__name__}; known: {sorted(sources())}")
