"""Where a run's model comes from: one module per source, found by name.

A source is a module here that defines `SCHEMA`, its config dataclass (a `ModelConfig`), and
`build(cfg, input_shape, num_classes) -> tf_keras.Model`. It may define `fit_baseline`, with
the signature of `fallopt.train.train_model` after the model's config, when its baseline
trains otherwise (e.g. a frozen backbone's head, then an unfrozen fine-tune). Its YAML presets in
`fallopt/conf/model/` extend `/schema/model/<module>`. Adding a source is that module plus
a YAML file: nothing else lists the sources. Modules import no TensorFlow until they build.
"""

from __future__ import annotations

from functools import cache
from types import ModuleType
from typing import TYPE_CHECKING, Any

from fallopt.registry import discover, owner

# A layer a source names `fixed_*` is fixed preprocessing built into the model (VGG's colour
# conversion): its weights are not learned, and pruning never selects it.
FIXED_PREFIX = "fixed_"

if TYPE_CHECKING:
    import tf_keras

    from fallopt.config import ModelConfig


@cache
def sources() -> dict[str, ModuleType]:
    """Every model source module, by name."""
    return discover(__name__, __path__, "build")


def schemas() -> dict[str, type[ModelConfig]]:
    """The config schema of every source, by source name."""
    return {name: module.SCHEMA for name, module in sources().items()}


def source(cfg: ModelConfig) -> ModuleType:
    """The module of the source `cfg` is a config of."""
    return owner(cfg, sources())


def build_model(cfg: ModelConfig, input_shape: tuple[int, int, int], num_classes: int) -> Any:
    """The uncompiled model `cfg` describes, for images of `input_shape` and `num_classes`."""
    model: tf_keras.Model = source(cfg).build(cfg, input_shape, num_classes)
    return model


def fit_baseline(
    cfg: ModelConfig, model: tf_keras.Model, *args: Any, **kwargs: Any
) -> dict[str, list[float]]:
    """Train a baseline as its source does: `train_model(model, *args, **kwargs)` by default."""
    from fallopt.train import train_model

    fit = getattr(source(cfg), "fit_baseline", None)
    return fit(cfg, model, *args, **kwargs) if fit else train_model(model, *args, **kwargs)
