"""Where a run's model comes from: a conv template, a Keras file, a Keras Application.

Each source is one module here with a schema in `fallopt.config`; `build_model` builds the
model its config describes.
"""

from fallopt.models.conv import build_model, feature_map_sizes

__all__ = ["build_model", "feature_map_sizes"]
