"""train.augment: random flips, rotation and zoom of training batches only, seeded."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from fallopt.augment import AUGMENTATIONS, Augmenter, change, check_augment
from fallopt.config import TrainConfig
from fallopt.data import Split, to_float
from fallopt.errors import ConfigError
from fallopt.train import batches, fit, seed_everything

ALL = tuple(AUGMENTATIONS)


def _images(n: int = 8, size: int = 16, channels: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, channels), np.uint8)


def test_check_augment_names_the_known_augmentations():
    check_augment(["rotate", "flip_left_right"])
    for bad in (["shear"], ["zoom", "zoom"]):
        with pytest.raises(ConfigError, match="flip_left_right', 'flip_up_down', 'rotate', 'zoom"):
            check_augment(bad)
    with pytest.raises(ConfigError, match="train.augment"):
        TrainConfig(augment=["blur"])
    assert Augmenter.from_config(TrainConfig(), seed=0) is None
    cfg = TrainConfig(augment=["zoom", "rotate"], rotation_degrees=10, zoom=0.2)
    assert Augmenter.from_config(cfg, seed=3) == Augmenter(("zoom", "rotate"), 10, 0.2, 3)
    assert (
        Augmenter(("zoom", "rotate"), 10, 0.2).describe()
        == "zoom (x0.8 to x1.2), rotate (+/-10 deg)"
    )


def test_flips_mirror_exactly_about_half_the_images():
    x = _images(n=64)
    for name, axis in (("flip_left_right", 2), ("flip_up_down", 1)):
        aug = Augmenter((name,))
        flipped = 0
        for key in range(20):
            out, transforms = aug.prepare(x, key)
            assert out.dtype == np.uint8 and not aug.warps
            same = np.all(out == x, axis=(1, 2, 3))
            mirrored = np.all(out == np.flip(x, axis), axis=(1, 2, 3))
            assert np.all(same ^ mirrored)  # each image either untouched or exactly mirrored
            flipped += mirrored.sum()
            np.testing.assert_array_equal(transforms, np.tile([1, 0, 0, 0, 1, 0, 0, 0], (64, 1)))
        assert 0.45 < flipped / (20 * 64) < 0.55
        np.testing.assert_array_equal(aug.apply(x, 3), aug.prepare(x, 3)[0])


def test_identity_warp_gives_the_input_back():
    aug = Augmenter(("rotate", "zoom"))
    x = _images()
    identity = np.tile(np.array([1, 0, 0, 0, 1, 0, 0, 0], np.float32), (len(x), 1))
    np.testing.assert_array_equal(aug.warp(x.astype(np.float32), identity), x)


def _warped(image: np.ndarray, degrees: float = 0.0, zoom: float = 1.0) -> np.ndarray:
    """One (h, w, c) float image turned by `degrees` and zoomed by `zoom` about its centre."""
    _, transforms = change(image[None], {"rotate": np.array([degrees]), "zoom": np.array([zoom])})
    return np.asarray(Augmenter(("rotate", "zoom")).warp(image[None], transforms))[0]


def test_rotation_turns_counter_clockwise_about_the_centre():
    x = _images(n=1, size=9, channels=1)[0].astype(np.float32)
    np.testing.assert_allclose(_warped(x, 90), np.rot90(x), atol=1e-3)
    np.testing.assert_allclose(_warped(x, -90), np.rot90(x, -1), atol=1e-3)
    np.testing.assert_allclose(_warped(x, 180), np.rot90(x, 2), atol=1e-3)

    # A smooth asymmetric image turned 20 degrees as PIL turns it (counter-clockwise about the
    # centre, bilinear), away from the border, where PIL fills black and fallopt reflects.
    rows, cols = np.mgrid[0:32, 0:32].astype(np.float32)
    smooth = 4 * rows + 2 * cols + 40 * np.sin(cols / 5)
    pil = np.asarray(Image.fromarray(smooth).rotate(20, resample=Image.BILINEAR))
    inside = (rows - 15.5) ** 2 + (cols - 15.5) ** 2 < 12**2
    np.testing.assert_allclose(
        _warped(smooth[..., None], 20)[..., 0][inside], pil[inside], atol=0.5
    )


def test_zoom_scales_about_the_centre_and_reflects_outside():
    rows, cols = np.mgrid[0:16, 0:16].astype(np.float32)
    ramp = (3 * rows + cols)[..., None]  # linear: bilinear interpolation is exact inside
    np.testing.assert_allclose(_warped(ramp), ramp, atol=1e-4)
    centre = 7.5
    for zoom in (1.25, 0.8):
        r, c = centre + (rows - centre) / zoom, centre + (cols - centre) / zoom
        inside = (r >= 0) & (r <= 15) & (c >= 0) & (c <= 15)
        got = _warped(ramp, zoom=zoom)[..., 0]
        np.testing.assert_allclose(got[inside], (3 * r + c)[inside], atol=1e-3)
    # Zoomed out, the border shows the image reflected about its edge (d c b a | a b c d).
    r, c = centre + (rows - centre) / 0.5, centre + (cols - centre) / 0.5
    reflected = np.where(c < 0, -1 - c, np.where(c > 15, 31 - c, c))
    reflected_rows = np.where(r < 0, -1 - r, np.where(r > 15, 31 - r, r))
    expected = 3 * reflected_rows.clip(0, 15) + reflected.clip(0, 15)
    np.testing.assert_allclose(_warped(ramp, zoom=0.5)[..., 0], expected, atol=1e-3)


def test_same_seed_same_batches_new_ones_each_epoch_and_validation_untouched():
    x = _images(n=20)
    split = Split(x, np.arange(20))  # labels name the images: they show the order
    aug = Augmenter(ALL, seed=5)

    def run(seed: int, augmenter: Augmenter | None = aug) -> list[tuple[np.ndarray, np.ndarray]]:
        seed_everything(seed)
        ds = batches(split, 6, shuffle=True, seed=5, augmenter=augmenter)
        return [
            tuple(np.concatenate(part) for part in zip(*ds.as_numpy_iterator(), strict=True))
            for _ in range(2)
        ]

    first, again, plain = run(1), run(1), run(1, None)
    for (images, order), (images_again, order_again), (unchanged, plain_order) in zip(
        first, again, plain, strict=True
    ):
        np.testing.assert_array_equal(images, images_again)
        np.testing.assert_array_equal(order, order_again)
        np.testing.assert_array_equal(order, plain_order)  # the shuffle is unchanged
        np.testing.assert_array_equal(unchanged, to_float(x[order]))
        assert images.shape == x.shape and images.min() >= 0 and images.max() <= 1
        assert not np.allclose(images, unchanged, atol=0.05)
    # Each epoch changes the same image differently.
    epochs = [images[np.argsort(order)] for images, order in first]
    assert not np.allclose(epochs[0], epochs[1], atol=0.05)
    # Without an augmenter every pass gives exactly the images, as validation needs.
    for _ in range(2):
        unshuffled = np.concatenate([i for i, _ in batches(split, 6).as_numpy_iterator()])
        np.testing.assert_array_equal(unshuffled, to_float(x))


def test_fit_augments_training_batches_only(monkeypatch, caplog):
    from fallopt.compress.quantize import representative_images
    from fallopt.evaluate import evaluate_keras
    from fallopt.models import build_model
    from fallopt.models.conv import ConvNetConfig

    rng = np.random.default_rng(0)
    train = Split(rng.integers(0, 200, (24, 12, 12, 1), np.uint8), np.arange(24) % 2)
    val = Split(np.full((10, 12, 12, 1), 255, np.uint8), np.arange(10) % 2)  # unlike any train
    seen: list[np.ndarray] = []
    prepare = Augmenter.prepare

    def spy(self: Augmenter, images: np.ndarray, key: int) -> tuple[np.ndarray, np.ndarray]:
        seen.append(images)
        return prepare(self, images, key)

    monkeypatch.setattr(Augmenter, "prepare", spy)
    seed_everything(0)
    model = build_model(ConvNetConfig(name="t", filters=[2], kernel_size=3), (12, 12, 1), 2)
    cfg = TrainConfig(batch_size=8, augment=["flip_left_right", "rotate"])
    with caplog.at_level("INFO", logger="fallopt.train"):
        history = fit(model, train, val, cfg, 1, seed=0)
    assert "[train] augmenting training batches: flip_left_right, rotate (+/-15 deg)" in caplog.text
    # Keras validated on the images as they are: the loss fallopt computes on them after.
    assert history["val_loss"][0] == pytest.approx(evaluate_keras(model, val).loss, rel=1e-4)
    assert len(seen) == 3  # the three training batches, once each
    assert sorted(np.concatenate(seen).max(axis=(1, 2, 3))) == sorted(train.x.max(axis=(1, 2, 3)))

    # Evaluation and int8 calibration never augment.
    seen.clear()
    evaluate_keras(model, val)
    np.testing.assert_array_equal(representative_images(val, 4, 0), np.ones((4, 12, 12, 1)))
    assert seen == []
