"""Random changes to training images, batch by batch (`train.augment`).

Placeholder: names only. The implementation is being written.
"""

from __future__ import annotations

from fallopt.errors import ConfigError

AUGMENTATIONS = ("flip_left_right", "flip_up_down", "rotate", "zoom")


def check_augment(names: list[str]) -> None:
    """Refuse unknown or repeated names, before TensorFlow loads."""
    unknown = [n for n in names if n not in AUGMENTATIONS]
    if unknown or len(set(names)) != len(names):
        raise ConfigError(
            f"train.augment={names} is invalid: choose each at most once from {list(AUGMENTATIONS)}"
        )
