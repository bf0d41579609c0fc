"""Data sets from a user's files: image folders, CSV lists, CIFAR-10 batches, and groups."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fallopt.data import load_dataset
from fallopt.data.cauca import CaucaConfig
from fallopt.data.cifar10 import Cifar10Config
from fallopt.data.csv_files import CsvConfig
from fallopt.data.image_folder import ImageFolderConfig
from fallopt.errors import DataError

from .conftest import SHARED


def _png(path: Path, pixels: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.squeeze()).save(path)
    return path


def _folder(root: Path, counts: dict[str, int], size: int = 8, seed: int = 0) -> dict[str, list]:
    """Class folders of random RGB PNGs; returns each class's pixels in file order."""
    rng = np.random.default_rng(seed)
    written: dict[str, list] = {}
    for name, n in counts.items():
        for i in range(n):
            pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            _png(root / name / f"img{i:03d}.png", pixels)
            written.setdefault(name, []).append(pixels)
    return written


def _rows(x: np.ndarray) -> set[bytes]:
    return {row.tobytes() for row in x}


def test_a_flat_folder_is_classes_by_sorted_name_with_a_stratified_test_split(tmp_path):
    written = _folder(tmp_path / "imgs", {"zebra": 10, "ant": 10, "mole": 10})
    data = load_dataset(ImageFolderConfig(path=str(tmp_path / "imgs")), 0.25, 0)
    assert data.class_names == ("ant", "mole", "zebra")
    assert len(data.train) + len(data.val) + len(data.test) == 30 and len(data.test) == 6
    assert data.input_shape == (8, 8, 3)
    for split in data.splits().values():  # every image is its own file's pixels, label right
        for c, name in enumerate(data.class_names):
            assert _rows(split.x[split.y == c]) <= _rows(np.stack(written[name]))
    assert data.positive is None  # no class is an event unless named


def test_train_test_val_folders_are_the_splits(tmp_path):
    root = tmp_path / "imgs"
    _folder(root / "train", {"a": 6, "b": 6})
    _folder(root / "test", {"a": 3, "b": 2}, seed=1)
    _folder(root / "val", {"a": 2, "b": 2}, seed=2)
    data = load_dataset(ImageFolderConfig(path=str(root)), 0.25, 0)
    assert (len(data.train), len(data.val), len(data.test)) == (12, 4, 5)
    assert data.test.y.tolist() == [0, 0, 0, 1, 1]


def test_test_and_val_folders_take_the_training_images_shape(tmp_path):
    """Without dataset.image_size, the first training image sets the shape for every split."""
    root = tmp_path / "imgs"
    _folder(root / "train", {"a": 6, "b": 6}, size=8)
    _folder(root / "test", {"a": 2, "b": 2}, size=12, seed=1)
    data = load_dataset(ImageFolderConfig(path=str(root)), 0.25, 0)
    assert data.test.x.shape[1:] == data.train.x.shape[1:] == (8, 8, 3)
    assert "test: 4 resized to 8x8 (bilinear)" in data.describe()


def test_class_names_fix_the_order_and_take_a_subset(tmp_path):
    _folder(tmp_path / "imgs", {"a": 6, "b": 6, "c": 6})
    cfg = ImageFolderConfig(path=str(tmp_path / "imgs"), class_names=["c", "a"])
    data = load_dataset(cfg, 0.25, 0)
    assert data.class_names == ("c", "a") and len(data.train) + len(data.val) + len(data.test) == 12


def test_mixed_sizes_and_modes_are_resized_converted_and_counted(tmp_path):
    root = tmp_path / "imgs"
    rng = np.random.default_rng(0)
    for i in range(6):
        _png(root / "a" / f"{i}.png", rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
        _png(root / "b" / f"{i}.png", rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    _png(root / "a" / "big.png", rng.integers(0, 256, (16, 12, 3), dtype=np.uint8))
    _png(root / "b" / "gray.png", rng.integers(0, 256, (8, 8), dtype=np.uint8))
    data = load_dataset(ImageFolderConfig(path=str(root), test_split=0.3), 0.25, 0)
    assert data.input_shape == (8, 8, 3)
    assert "1 resized to 8x8 (bilinear)" in data.describe()
    assert "1 converted to 3 channel(s)" in data.describe()
    small = ImageFolderConfig(path=str(root), test_split=0.3, image_size=[4, 6], channels=1)
    assert load_dataset(small, 0.25, 0).input_shape == (4, 6, 1)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda root: root.mkdir(), "no class folders"),
        (lambda root: (root / "a").mkdir(parents=True), "/a: no images"),
        (
            lambda root: (root / "nope").write_text("x"),
            "no such folder",
        ),
    ],
    ids=["empty folder", "class without images", "not a folder"],
)
def test_bad_folders_are_named(tmp_path, make, message):
    root = tmp_path / "imgs"
    if message == "/a: no images":
        _folder(root, {"b": 4})
    make(root if message != "no such folder" else tmp_path)
    with pytest.raises(DataError, match=message):
        load_dataset(ImageFolderConfig(path=str(root)), 0.25, 0)


def test_a_corrupt_png_is_named_or_skipped_and_counted(tmp_path):
    root = tmp_path / "imgs"
    _folder(root, {"a": 6, "b": 6})
    bad = root / "b" / "img003.png"
    bad.write_bytes(bad.read_bytes()[:40])  # truncated mid-stream
    with pytest.raises(DataError, match=r"img003\.png: cannot be decoded.*dataset\.skip_bad"):
        load_dataset(ImageFolderConfig(path=str(root)), 0.25, 0)
    data = load_dataset(ImageFolderConfig(path=str(root), skip_bad=True), 0.25, 0)
    assert len(data.train) + len(data.val) + len(data.test) == 11
    assert "1 unreadable, skipped" in data.describe()


def test_a_test_class_the_training_data_lacks_is_refused(tmp_path):
    root = tmp_path / "imgs"
    _folder(root / "train", {"a": 4, "b": 4})
    _folder(root / "test", {"a": 2, "b": 2, "c": 2})
    with pytest.raises(DataError, match=r"test/c: class 'c' is not among the training classes"):
        load_dataset(ImageFolderConfig(path=str(root)), 0.25, 0)


def test_group_pattern_keeps_each_group_whole(tmp_path):
    root = tmp_path / "imgs"
    rng = np.random.default_rng(0)
    for video in range(8):
        for frame in range(5):
            name = "fall" if video % 2 else "adl"
            pixels = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            _png(root / name / f"v{video}_f{frame}.png", pixels)
    cfg = ImageFolderConfig(path=str(root), group_pattern=r"/(v\d+)_", test_split=0.25)
    data = load_dataset(cfg, 0.25, 0)
    parts = [set(s.groups.tolist()) for s in data.splits().values()]
    assert all(p for p in parts) and not (parts[0] & parts[1] or parts[0] & parts[2])
    assert "by group" in data.describe() and data.positive == 1  # "fall" is the event
    loose = ImageFolderConfig(path=str(root), group_pattern=r"/(v\d+)_", split_by_group=False)
    assert "groups ignored" in load_dataset(loose, 0.25, 0).describe()
    with pytest.raises(
        DataError,
        match=r"v0_f0\.png: dataset\.group_pattern=.* does not match its path 'adl/v0_f0\.png'",
    ):
        load_dataset(ImageFolderConfig(path=str(root), group_pattern=r"x(\d)"), 0.25, 0)


def test_positive_class_names_the_event(tmp_path):
    _folder(tmp_path / "imgs", {"with_mask": 6, "without_mask": 6})
    cfg = ImageFolderConfig(path=str(tmp_path / "imgs"), positive_class="with_mask")
    assert load_dataset(cfg, 0.25, 0).positive == 0
    cfg = ImageFolderConfig(path=str(tmp_path / "imgs"), positive_class="mask")
    with pytest.raises(DataError, match=r"positive_class='mask' is not a class.*with_mask"):
        load_dataset(cfg, 0.25, 0)


def _csv(path: Path, rows: list[tuple], header: str = "filename,label") -> Path:
    path.write_text(header + "\n" + "".join(",".join(map(str, r)) + "\n" for r in rows))
    return path


def test_csv_lists_relative_paths_and_sorts_integer_labels_numerically(tmp_path):
    rng = np.random.default_rng(0)
    rows = []
    for i in range(24):
        label = (2, 10, 9)[i % 3]
        _png(tmp_path / "pics" / f"{i}.png", rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
        rows.append((f"pics/{i}.png", label))
    train = _csv(tmp_path / "train.csv", rows[:18])
    test = _csv(tmp_path / "test.csv", rows[18:])
    data = load_dataset(CsvConfig(train_csv=str(train), test_csv=str(test)), 0.25, 0)
    assert data.class_names == ("2", "9", "10") and len(data.test) == 6
    first = np.asarray(Image.open(tmp_path / "pics" / "18.png"))
    assert data.test.x[0].tobytes() == first.tobytes() and data.test.y[0] == 0


def test_csv_string_labels_and_groups(tmp_path):
    rng = np.random.default_rng(0)
    rows = []
    for i in range(24):
        _png(tmp_path / f"{i}.jpg", rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
        rows.append((f"{i}.jpg", "with_mask" if i % 2 else "no_mask", f"person{i // 4}"))
    train = _csv(tmp_path / "train.csv", rows, header="filename,label,person")
    cfg = CsvConfig(train_csv=str(train), group_column="person", positive_class="with_mask")
    data = load_dataset(cfg, 0.25, 0)
    assert data.class_names == ("no_mask", "with_mask") and data.positive == 1
    train_groups, test_groups = set(data.train.groups), set(data.test.groups)
    assert train_groups and test_groups and not train_groups & test_groups


@pytest.mark.parametrize(
    ("content", "key", "message"),
    [
        ("file,label\na.png,x\n", {}, r"no column 'filename'.*dataset\.path_column"),
        ("filename,label\nmissing.png,x\n", {}, r"train\.csv row 2: 'missing\.png' does not exist"),
        ("filename,label\na.png,\n", {}, r"row 2: no 'label'"),
        ("\x00\xff\xfe garbage", {}, r"train\.csv: (cannot be read|no column)"),
        ("filename,label\n", {}, "lists no images"),
    ],
    ids=["missing column", "missing file", "empty label", "not a csv", "no rows"],
)
def test_bad_csvs_are_named_with_the_row(tmp_path, content, key, message):
    _png(tmp_path / "a.png", np.zeros((8, 8, 3), np.uint8))
    (tmp_path / "train.csv").write_bytes(content.encode("latin1"))
    with pytest.raises(DataError, match=message):
        load_dataset(CsvConfig(train_csv=str(tmp_path / "train.csv"), **key), 0.25, 0)


def test_a_csv_test_label_the_training_data_lacks_is_refused(tmp_path):
    for i in range(6):
        _png(tmp_path / f"{i}.png", np.full((8, 8, 3), i, np.uint8))
    train = _csv(tmp_path / "train.csv", [(f"{i}.png", "ab"[i % 2]) for i in range(4)])
    test = _csv(tmp_path / "test.csv", [("4.png", "a"), ("5.png", "z")])
    with pytest.raises(DataError, match=r"test\.csv row 3: label 'z' is not among"):
        load_dataset(CsvConfig(train_csv=str(train), test_csv=str(test)), 0.5, 0)


def _cifar(root: Path, n: int = 20, bytes_keys: bool = True) -> np.ndarray:
    """CIFAR-10's python layout, written as Python 3 does (bytes keys) or Python 2 (str)."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    key = (lambda k: k.encode()) if bytes_keys else (lambda k: k)
    names = [f"class{i}" for i in range(10)]
    with (root / "batches.meta").open("wb") as f:
        pickle.dump({key("label_names"): names}, f, protocol=2)
    images = rng.integers(0, 256, (6 * n, 32, 32, 3), dtype=np.uint8)
    for b, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        x = images[b * n : (b + 1) * n]
        rows = x.transpose(0, 3, 1, 2).reshape(n, -1)  # red plane, green, blue
        with (root / name).open("wb") as f:
            pickle.dump({key("data"): rows, key("labels"): [i % 10 for i in range(n)]}, f, 2)
    return images


@pytest.mark.parametrize("bytes_keys", [True, False], ids=["python3", "python2"])
def test_cifar10_batches_are_read_through_the_safe_unpickler(tmp_path, bytes_keys):
    images = _cifar(tmp_path / "cifar-10-batches-py", bytes_keys=bytes_keys)
    data = load_dataset(Cifar10Config(path=str(tmp_path / "cifar-10-batches-py")), 0.2, 0)
    assert data.class_names[3] == "class3" and data.input_shape == (32, 32, 3)
    assert len(data.test) == 20 and len(data.train) + len(data.val) == 100
    assert data.test.x.tobytes() == images[100:].tobytes()  # pixels in place, not planes


def test_cifar10_missing_batch_is_named(tmp_path):
    _cifar(tmp_path / "c")
    (tmp_path / "c" / "data_batch_4").unlink()
    with pytest.raises(DataError, match=r"data_batch_4: missing.*cifar-10-python\.tar\.gz"):
        load_dataset(Cifar10Config(path=str(tmp_path / "c")), 0.2, 0)


def test_a_pickle_with_groups_shared_by_train_and_test_is_refused(tmp_path):
    from .conftest import cauca_dict, write_pickle

    groups = [f"video{i % 4}" for i in range(40)]
    train = write_pickle(tmp_path / "train.pickle", cauca_dict(40, groups=groups))
    test = write_pickle(tmp_path / "test.pickle", cauca_dict(20, seed=1, groups=groups[:20]))
    with pytest.raises(DataError, match=r"groups \['video0'.*in both the training and the test"):
        load_dataset(CaucaConfig(train_path=str(train), test_path=str(test)), 0.25, 0)


def test_real_fall_frames_validate_by_video(tmp_path):
    root = SHARED / "data" / "gmdcsa24"
    if not root.is_dir():
        pytest.skip(f"{root} not found")
    cfg = CaucaConfig(
        train_path=str(root / "data_train_96_96_3.pickle"),
        test_path=str(root / "data_test_96_96_3.pickle"),
        train_groups=str(root / "groups_train.json"),
        test_groups=str(root / "groups_test.json"),
    )
    data = load_dataset(cfg, 0.2, 0)
    videos = json.loads((root / "groups_train.json").read_text())
    assert len(data.train) + len(data.val) == len(videos)
    assert not set(data.train.groups) & set(data.val.groups)
    assert {0, 1} <= set(data.val.y.tolist())
    assert "by group" in data.describe()


def test_pickled_images_are_resized_and_converted_like_files(tmp_path):
    from .conftest import cauca_dict, write_pickle

    train = write_pickle(tmp_path / "train.pickle", cauca_dict(40, size=16))
    test = write_pickle(tmp_path / "test.pickle", cauca_dict(20, size=16, seed=1))
    cfg = CaucaConfig(train_path=str(train), test_path=str(test), image_size=[8, 6], channels=1)
    data = load_dataset(cfg, 0.25, 0)
    assert data.input_shape == (8, 6, 1)
    original = cauca_dict(20, size=16, seed=1)["data"][0]
    expected = Image.fromarray(original).convert("L").resize((6, 8), Image.Resampling.BILINEAR)
    assert data.test.x[0, ..., 0].tobytes() == np.asarray(expected).tobytes()
    assert "20 images resized 16x16 to 8x6 (bilinear) and 3 channels converted to 1" in (
        data.describe()
    )


@pytest.mark.slow  # a full run; the loader itself is tested above
def test_cifar_cnn_finally_has_its_data(compose_cfg, tmp_path, tracking_uri):
    from .test_run import _run

    _cifar(tmp_path / "cifar-10-batches-py", n=40)
    *_, run = _run(compose_cfg, tmp_path, tracking_uri, "dataset=cifar10",
                   f"dataset.path={tmp_path / 'cifar-10-batches-py'}", "model=cifar_cnn",
                   "train.epochs=1", "prune=none", "quant=int8")  # fmt: skip
    assert run.info.status == "FINISHED" and run.data.metrics["n_test"] == 40
    assert run.data.metrics["params_total"] == 167_562  # the README's figure at 32x32x3
    assert run.data.tags["fallopt.classes"].split(",")[9] == "class9"
