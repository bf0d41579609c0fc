"""Training is reproducible per seed; metrics match hand computations."""

from __future__ import annotations

import numpy as np
import pytest

from fallopt.config import TrainConfig
from fallopt.data import Split
from fallopt.evaluate import evaluate_probabilities
from fallopt.models import build_model
from fallopt.models.conv import ConvNetConfig
from fallopt.train import batches, seed_everything, train_model

from .conftest import bright_squares


def test_binary_metrics_by_hand():
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 0])
    p_fall = np.array([0.1, 0.2, 0.9, 0.4, 0.8, 0.7, 0.3, 0.6, 0.9, 0.2])
    ev = evaluate_probabilities(y, np.stack([1 - p_fall, p_fall], axis=1))
    # true no_fall: 4 right, 1 false alarm; true fall: 4 caught, 1 missed
    assert ev.confusion.tolist() == [[4, 1], [1, 4]]
    m = ev.metrics(("no_fall", "fall"), positive=1)
    assert m["test_accuracy"] == pytest.approx(0.8)
    assert m["test_fall_recall"] == pytest.approx(0.8)
    assert m["test_false_alarm_rate"] == pytest.approx(0.2)
    assert m["test_precision_fall"] == pytest.approx(0.8)
    p_true = np.where(y == 1, p_fall, 1 - p_fall)
    assert m["test_loss"] == pytest.approx(-np.mean(np.log(p_true)))


def test_multiclass_has_per_class_scores_and_no_fall_metrics():
    y = np.array([0, 1, 2, 2])
    probs = np.eye(3)[[0, 1, 1, 2]]
    m = evaluate_probabilities(y, probs).metrics(("a", "b", "c"))
    assert m["test_recall_c"] == pytest.approx(0.5) and m["test_precision_b"] == pytest.approx(0.5)
    assert "test_fall_recall" not in m and "test_false_alarm_rate" not in m


def test_the_event_metrics_follow_the_positive_class():
    """A mask detector's event is `with_mask`, not "fall"; any class can be it, in any count."""
    y = np.array([0, 0, 1, 1, 1, 2, 2, 2])
    predicted = np.array([0, 1, 1, 1, 0, 2, 1, 2])
    m = evaluate_probabilities(y, np.eye(3)[predicted]).metrics(("a", "with_mask", "c"), positive=1)
    assert m["test_with_mask_recall"] == pytest.approx(2 / 3)
    # images of a and c: 5, of which 2 were called with_mask
    assert m["test_false_alarm_rate"] == pytest.approx(2 / 5)
    assert "test_fall_recall" not in m


def _tiny_run(seed: int):
    train, val = bright_squares(48, 32)
    cfg = ConvNetConfig(name="t", filters=[4], kernel_size=3, dense_units=[8])
    seed_everything(seed)
    model = build_model(cfg, (12, 12, 1), 2)
    history = train_model(
        model,
        train,
        val,
        TrainConfig(epochs=2, batch_size=8),
        seed,
    )
    return model, history


def test_same_seed_gives_identical_weights_and_history():
    (m1, h1), (m2, h2) = _tiny_run(1), _tiny_run(1)
    assert h1 == h2
    for w1, w2 in zip(m1.get_weights(), m2.get_weights(), strict=True):
        np.testing.assert_array_equal(w1, w2)
    m3, _ = _tiny_run(2)
    assert not np.array_equal(m1.get_weights()[0], m3.get_weights()[0])


def test_epoch_hook_sees_every_epoch():
    seen = []
    rng = np.random.default_rng(0)
    split = Split(rng.integers(0, 256, (16, 8, 8, 1), dtype=np.uint8), np.arange(16) % 2)
    model = build_model(ConvNetConfig(name="t", filters=[2], kernel_size=3), (8, 8, 1), 2)
    train_model(
        model,
        split,
        split,
        TrainConfig(epochs=3, batch_size=8),
        0,
        lambda e, logs: seen.append((e, sorted(logs))),
    )
    assert [e for e, _ in seen] == [0, 1, 2]
    assert seen[0][1] == ["accuracy", "loss", "val_accuracy", "val_loss"]


def test_batches_shuffle_every_image_once_per_epoch_as_tf_data_would():
    import tensorflow as tf

    x = np.arange(20 * 2 * 2, dtype=np.uint8).reshape(20, 2, 2, 1)  # image i holds 4i..4i+3
    split = Split(x, np.arange(20) % 2)
    ds = batches(split, 6, shuffle=True, seed=3)
    epochs = [[(images.numpy(), labels.numpy()) for images, labels in ds] for _ in range(2)]
    orders = []
    for epoch in epochs:
        assert [len(labels) for _, labels in epoch] == [6, 6, 6, 2]
        images = np.concatenate([i for i, _ in epoch])
        assert images.dtype == np.float32 and images.max() <= 1.0
        order = np.rint(images[:, 0, 0, 0] * 255 / 4).astype(int)
        assert sorted(order) == list(range(20))  # every image once
        assert np.array_equal(np.concatenate([lab for _, lab in epoch]), order % 2)
        orders.append(order)
    assert not np.array_equal(*orders)  # reshuffled each epoch
    # The order tf.data gives when it shuffles the images themselves (the former pipeline).
    slices = tf.data.Dataset.from_tensor_slices(x).shuffle(20, seed=3)
    assert [int(i[0, 0, 0]) // 4 for i in slices.as_numpy_iterator()] == list(orders[0])
    unshuffled = np.concatenate([i for i, _ in batches(split, 6).as_numpy_iterator()])
    np.testing.assert_allclose(unshuffled, x / np.float32(255), rtol=1e-6)


def test_a_model_that_predicts_one_class_for_every_image_is_named():
    from fallopt.task import _one_class

    y = np.array([0, 0, 0, 1, 1])
    always_no_fall = np.tile([0.9, 0.1], (5, 1))
    warning = _one_class(evaluate_probabilities(y, always_no_fall), ("no_fall", "fall"), "m")
    assert warning == (
        "m predicts 'no_fall' for every test image: its accuracy is that class's share, "
        "it has learned nothing"
    )
    mixed = np.array([[0.9, 0.1]] * 4 + [[0.2, 0.8]])
    assert _one_class(evaluate_probabilities(y, mixed), ("no_fall", "fall"), "m") is None
