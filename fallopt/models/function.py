"""A model built by the user's own function: `model=python model.target=package.module:function`.

The function takes `(input_shape, num_classes)` and returns an uncompiled tf_keras model
(Keras 2: `import tf_keras as keras`, which tfmot needs); fallopt trains it as it trains its
own architectures. The module's source file is part of the run's identity: an edited
function is a new run.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from typing import Any

from omegaconf import MISSING

from fallopt.backend import keras
from fallopt.config import ModelConfig, require
from fallopt.errors import ConfigError
from fallopt.identity import file_digest


def _split(target: str) -> tuple[str, str]:
    module, _, function = target.partition(":")
    return module, function


@dataclass
class FunctionConfig(ModelConfig):
    """`target`: "package.module:function", importable from the working directory."""

    name: str = "python"
    target: str = MISSING

    def __post_init__(self) -> None:
        super().__post_init__()
        module, function = _split(self.target)
        ok = bool(module) and function.isidentifier()
        require(ok, "model.target", self.target, 'must be "package.module:function"')

    def sources(self) -> dict[str, str]:
        """The module's source file (found without importing it, so no code runs yet)."""
        try:
            spec = importlib.util.find_spec(_split(self.target)[0])
        except (ImportError, ValueError):
            spec = None
        return {"module": file_digest(spec.origin) if spec and spec.origin else "missing"}


def build(cfg: FunctionConfig, input_shape: tuple[int, int, int], num_classes: int) -> Any:
    """Call the user's function and check what it returns.

    Raises:
        ConfigError: the module or function cannot be found, or it returns something other
            than a tf_keras model with one output per class.
    """
    module_name, function_name = _split(cfg.target)
    where = f"model.target={cfg.target}"
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(
            f"{where}: cannot import {module_name} ({e}); run from the folder that holds it, "
            "or add that folder to PYTHONPATH"
        ) from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise ConfigError(f"{where}: {module_name} has no function {function_name}")
    model = function(input_shape, num_classes)
    if not isinstance(model, keras().Model):
        raise ConfigError(
            f"{where} returned {type(model).__module__}.{type(model).__name__}, not a tf_keras "
            "model: build it with `import tf_keras as keras` (tfmot needs Keras 2)"
        )
    if model.output_shape[-1] != num_classes:
        raise ConfigError(
            f"{where} returned a model of {model.output_shape[-1]} outputs for {num_classes} "
            "classes: end it with Dense(num_classes, activation='softmax')"
        )
    return model


SCHEMA = FunctionConfig
