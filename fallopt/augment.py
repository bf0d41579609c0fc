"""Random changes to training images, batch by batch (`train.augment`).

Importable without TensorFlow: config validation calls `check_augment` before it loads. Random
values are drawn in numpy from a generator made for each batch from the seed and a key
(`Augmenter.draw`), so a batch's change depends on nothing drawn before it. Flips mirror the
uint8 pixels exactly; rotation and zoom are one affine warp per image, done by TensorFlow on
the float batch (`Augmenter.warp`), so each image is interpolated once.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from fallopt.errors import ConfigError

if TYPE_CHECKING:
    import tensorflow as tf

    from fallopt.config import TrainConfig


@dataclass(frozen=True)
class Augmentation:
    """One random change: what it draws per image, and how those values change the pixels.

    Exactly one of `pixels` and `geometry` is set. `pixels(images, params)` changes a uint8
    batch exactly; `geometry(params)` gives each image's (n, 2, 2) linear map about the image
    centre, in (column, row) pixel coordinates, rows pointing down. The maps of all listed
    augmentations are multiplied into one warp, so each image is interpolated only once.
    """

    draw: Callable[[np.random.Generator, int, Augmenter], np.ndarray]
    pixels: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None
    geometry: Callable[[np.ndarray], np.ndarray] | None = None


def _coin(rng: np.random.Generator, n: int, _: Augmenter) -> np.ndarray:
    return rng.random(n) < 0.5


def _mirror(axis: int) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    def mirror(images: np.ndarray, flip: np.ndarray) -> np.ndarray:
        out = images.copy()
        out[flip] = np.flip(images[flip], axis)
        return out

    return mirror


def _angle(rng: np.random.Generator, n: int, aug: Augmenter) -> np.ndarray:
    return rng.uniform(-aug.rotation_degrees, aug.rotation_degrees, n)


def _factor(rng: np.random.Generator, n: int, aug: Augmenter) -> np.ndarray:
    return rng.uniform(1 - aug.zoom, 1 + aug.zoom, n)


def _rotation(degrees: np.ndarray) -> np.ndarray:
    """Counter-clockwise as the image is shown (row 0 on top), as np.rot90 and PIL turn."""
    t = np.deg2rad(degrees)
    cos, sin = np.cos(t), np.sin(t)
    return np.stack([np.stack([cos, sin], -1), np.stack([-sin, cos], -1)], -2)


def _scaling(factors: np.ndarray) -> np.ndarray:
    return factors[:, None, None] * np.eye(2)


# Draw order is this order, whatever order `train.augment` lists them in.
AUGMENTATIONS: dict[str, Augmentation] = {
    "flip_left_right": Augmentation(_coin, pixels=_mirror(2)),
    "flip_up_down": Augmentation(_coin, pixels=_mirror(1)),
    "rotate": Augmentation(_angle, geometry=_rotation),
    "zoom": Augmentation(_factor, geometry=_scaling),
}


def check_augment(names: list[str]) -> None:
    """Refuse unknown or repeated names, before TensorFlow loads."""
    unknown = [n for n in names if n not in AUGMENTATIONS]
    if unknown or len(set(names)) != len(names):
        raise ConfigError(
            f"train.augment={names} is invalid: choose each at most once from {list(AUGMENTATIONS)}"
        )


@dataclass(frozen=True)
class Augmenter:
    """Random flips, rotation and zoom of training batches, the same for the same seed and key.

    Each image is flipped with probability 1/2 per listed flip, turned by a uniform angle in
    +/- `rotation_degrees` (counter-clockwise positive) and scaled about its centre by a uniform
    factor in 1 +/- `zoom` (above 1 zooms in). Pixels the turn or a zoom out brings in from
    outside the image are filled by reflecting it at its border, as Keras' RandomRotation and
    RandomZoom do by default (fill_mode 'reflect'); interpolation is bilinear.

    A batch's random values come from `np.random.default_rng((seed, key))` alone, not from a
    generator advanced call by call, so they do not depend on which batches were drawn before
    it, or by whom (`fallopt.train.batches` gets a key per batch and epoch from tf.data).
    """

    names: tuple[str, ...]
    rotation_degrees: float = 15.0
    zoom: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        check_augment(list(self.names))

    @classmethod
    def from_config(cls, cfg: TrainConfig, seed: int) -> Augmenter | None:
        """The augmenter `cfg.augment` asks for, or None if it lists nothing."""
        if not cfg.augment:
            return None
        return cls(tuple(cfg.augment), cfg.rotation_degrees, cfg.zoom, seed)

    @property
    def warps(self) -> bool:
        """Whether images are interpolated (rotate or zoom), not only mirrored."""
        return any(AUGMENTATIONS[n].geometry is not None for n in self.names)

    def describe(self) -> str:
        """E.g. 'flip_left_right, rotate (+/-15 deg)', for the log."""
        detail = {
            "rotate": f" (+/-{self.rotation_degrees:g} deg)",
            "zoom": f" (x{1 - self.zoom:g} to x{1 + self.zoom:g})",
        }
        return ", ".join(n + detail.get(n, "") for n in self.names)

    def draw(self, n: int, key: int) -> dict[str, np.ndarray]:
        """Each listed augmentation's values for n images, from the generator `key` selects."""
        rng = np.random.default_rng((self.seed % 2**64, int(key) % 2**64))
        order = sorted(self.names, key=list(AUGMENTATIONS).index)
        return {name: AUGMENTATIONS[name].draw(rng, n, self) for name in order}

    def prepare(self, images: np.ndarray, key: int) -> tuple[np.ndarray, np.ndarray]:
        """`change` a uint8 batch (n, h, w, c) by the values `draw` gives for `key`."""
        return change(images, self.draw(len(images), key))

    def warp(self, images: tf.Tensor, transforms: tf.Tensor) -> tf.Tensor:
        """Resample a float batch (n, h, w, c) with `prepare`'s transforms; untouched if none."""
        if not self.warps:
            return images
        import tensorflow as tf

        return tf.raw_ops.ImageProjectiveTransformV3(
            images=images,
            transforms=transforms,
            output_shape=tf.shape(images)[1:3],
            fill_value=tf.constant(0.0),  # unused: REFLECT fills every pixel from the image
            interpolation="BILINEAR",
            fill_mode="REFLECT",
        )

    def apply(self, images: np.ndarray, key: int) -> np.ndarray:
        """A uint8 batch augmented as a training batch keyed by `key` is: float32, 0..255."""
        flipped, transforms = self.prepare(images, key)
        return np.asarray(self.warp(flipped.astype(np.float32), transforms))


def change(images: np.ndarray, params: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Flip a uint8 batch (n, h, w, c) and compute each image's warp, as `params` say.

    `params` holds per-image values by augmentation name, as `Augmenter.draw` gives them.
    Returns the flipped uint8 batch and its (n, 8) float32 transforms, as
    `ImageProjectiveTransformV3` takes them: each maps an output pixel to the input point it
    samples (the identity if nothing warps).
    """
    n, h, w = images.shape[:3]
    linear = np.broadcast_to(np.eye(2), (n, 2, 2))
    for name, values in params.items():
        aug = AUGMENTATIONS[name]
        if aug.pixels is not None:
            images = aug.pixels(images, values)
        else:
            linear = aug.geometry(values) @ linear
    inverse = np.linalg.inv(linear)  # output -> input, the direction the warp samples in
    centre = np.array([(w - 1) / 2, (h - 1) / 2])
    offset = centre - inverse @ centre
    transforms = np.concatenate(
        [inverse[:, 0], offset[:, :1], inverse[:, 1], offset[:, 1:], np.zeros((n, 2))], 1
    )
    return images, transforms.astype(np.float32)
