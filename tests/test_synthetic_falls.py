"""The embedded default data: deterministic, balanced, cached, varied, held-out subjects."""

from __future__ import annotations

import numpy as np
import pytest

from fallopt.data import synthetic_falls as sf


def test_shapes_dtype_and_balanced_labels():
    x, y, activities = sf.generate(40, seed=0, size=32)
    assert x.shape == (40, 32, 32, 3) and x.dtype == np.uint8
    assert np.bincount(y).tolist() == [20, 20]
    # Labels follow CAUCA: the five falls are 1, the five daily activities 0.
    for a, label in zip(activities, y, strict=True):
        assert (sf.ACTIVITIES[a] in sf.FALL_ACTIVITIES) == bool(label)
    assert set(activities.tolist()) == set(range(10))


def test_same_seed_same_images_and_prefix_stability():
    a, _, _ = sf.generate(12, seed=3, size=24)
    b, _, _ = sf.generate(20, seed=3, size=24)
    assert np.array_equal(a, b[:12])
    c, _, _ = sf.generate(12, seed=4, size=24)
    assert not np.array_equal(a, c)


def test_test_split_is_other_images_of_other_subjects():
    train, _, _ = sf.generate(10, seed=0, split="train", size=24)
    test, _, _ = sf.generate(10, seed=0, split="test", size=24)
    assert not any(np.array_equal(t, u) for t in train for u in test)
    train_subjects = {sf.make_subject(0, 0, s) for s in range(sf.SUBJECTS_PER_SPLIT)}
    test_subjects = {sf.make_subject(0, 1, s) for s in range(sf.SUBJECTS_PER_SPLIT)}
    assert not train_subjects & test_subjects


def test_images_vary_within_a_class():
    x, _, activities = sf.generate(30, seed=0, size=32)
    walks = x[activities == sf.ACTIVITIES.index("walk")].astype(float)
    assert walks.std(axis=0).mean() > 20  # backgrounds, poses and lighting differ


def test_grayscale_and_other_sizes():
    x, _, _ = sf.generate(10, seed=0, size=48, channels=1)
    assert x.shape == (10, 48, 48, 1)


def test_unknown_split_is_refused():
    with pytest.raises(ValueError, match="split must be one of"):
        sf.generate(10, split="validation")


def test_cache_is_reused_and_a_corrupt_file_is_rebuilt(tmp_path):
    x1, y1 = sf.load_or_generate(tmp_path, 10, 0, "train", 24, 3)
    path = sf.cache_path(tmp_path, 10, 0, "train", 24, 3)
    assert path.is_file()
    stamp = path.stat().st_mtime_ns
    x2, _ = sf.load_or_generate(tmp_path, 10, 0, "train", 24, 3)
    assert path.stat().st_mtime_ns == stamp and np.array_equal(x1, x2)

    path.write_bytes(path.read_bytes()[:200])  # truncated, as after a crash or full disk
    x3, y3 = sf.load_or_generate(tmp_path, 10, 0, "train", 24, 3)
    assert np.array_equal(x1, x3) and np.array_equal(y1, y3)
    assert not list(tmp_path.glob("*.tmp.npz"))
