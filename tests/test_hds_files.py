"""The lab's hand-drawn shapes as a user has them: PNG files in class folders, or CSV lists.

The issue's acceptance: `dataset=image_folder ... model=hds_cnn dataset.image_size=[14,14]
dataset.channels=1 train.epochs=10 prune=none quant=none` reaches the lab's accuracy (>= 0.85;
the lab reported 0.884), with the classes and the test folder's file count.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fallopt.data import safe_pickle
from fallopt.data.hds import CLASS_NAMES

from .test_run import _run

RUN = ["model=hds_cnn", "dataset.image_size=[14,14]", "dataset.channels=1", "train.epochs=10",
       "prune=none", "quant=none"]  # fmt: skip


@pytest.fixture(scope="module")
def hds_files(tmp_path_factory) -> Path:
    """hds_data.pickle written as PNGs in train/<class>/ and test/<class>/ (80/20, stratified),
    and as train.csv / test.csv listing the same files (the course's `filename,label`).
    """
    from .conftest import HDS_PICKLE

    if not HDS_PICKLE.is_file():
        pytest.skip(f"real HDS data not found at {HDS_PICKLE}")
    raw = safe_pickle.load(HDS_PICKLE, "hds")
    x, y = np.asarray(raw["train_data"]), np.asarray(raw["train_labels"]) - 1
    test = np.zeros(len(y), bool)
    rng = np.random.default_rng(0)
    for c in range(3):
        members = np.flatnonzero(y == c)
        test[rng.choice(members, len(members) // 5, replace=False)] = True
    root = tmp_path_factory.mktemp("hds_files")
    rows = {"train": [], "test": []}
    for i in range(len(y)):
        split = "test" if test[i] else "train"
        name = f"{split}/{CLASS_NAMES[y[i]]}/{i:04d}.png"
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(x[i]).save(root / name)
        rows[split].append(f"{name},{CLASS_NAMES[y[i]]}\n")
    for split, lines in rows.items():
        (root / f"{split}.csv").write_text("filename,label\n" + "".join(lines))
    return root


def _check(run, root: Path, files: list[Path]) -> None:
    metrics, tags = run.data.metrics, run.data.tags
    assert run.info.status == "FINISHED"
    assert tags["fallopt.classes"] == "ellipse,rectangle,triangle"
    assert metrics["n_test"] == len(list((root / "test").rglob("*.png"))) == 900
    assert metrics["test_accuracy"] >= 0.85  # the lab: 0.884
    inputs = {i.dataset.name: i.dataset for i in run.inputs.dataset_inputs}
    assert set(inputs) >= {f"{tags['fallopt.dataset']}-{s}" for s in ("train", "val", "test")}
    # The test split's logged digest, computed again from the PNG files in the order read.
    x = np.stack([np.asarray(Image.open(f))[..., None] for f in files])
    y = np.array([CLASS_NAMES.index(f.parent.name) for f in files], np.int64)
    h = hashlib.sha256()
    for array in (x, y):
        h.update(str(array.shape).encode())
        h.update(array.tobytes())
    assert inputs[f"{tags['fallopt.dataset']}-test"].digest == h.hexdigest()[:16]


@pytest.mark.slow
def test_hds_as_an_image_folder_reaches_the_labs_accuracy(
    compose_cfg, tmp_path, tracking_uri, hds_files
):
    *_, run = _run(compose_cfg, tmp_path, tracking_uri, "dataset=image_folder",
                   f"dataset.path={hds_files}", *RUN)  # fmt: skip
    by_path = sorted((hds_files / "test").rglob("*.png"), key=lambda f: f.as_posix())
    _check(run, hds_files, by_path)


@pytest.mark.slow  # the same files through the other reader
def test_hds_as_csv_lists_reaches_the_labs_accuracy(compose_cfg, tmp_path, tracking_uri, hds_files):
    *_, run = _run(compose_cfg, tmp_path, tracking_uri, "dataset=csv",
                   f"dataset.train_csv={hds_files / 'train.csv'}",
                   f"dataset.test_csv={hds_files / 'test.csv'}", *RUN)  # fmt: skip
    rows = (hds_files / "test.csv").read_text().splitlines()[1:]
    _check(run, hds_files, [hds_files / row.split(",")[0] for row in rows])


def test_a_corrupt_png_among_them_is_named(compose_cfg, tmp_path, tracking_uri, hds_files):
    import shutil

    from fallopt.config import validate
    from fallopt.data import load_dataset
    from fallopt.errors import DataError

    root = tmp_path / "copy"
    shutil.copytree(hds_files / "train", root / "train")
    shutil.copytree(hds_files / "test", root / "test")
    bad = sorted((root / "train" / "triangle").glob("*.png"))[7]
    bad.write_bytes(bad.read_bytes()[:30])
    cfg = validate(compose_cfg("dataset=image_folder", f"dataset.path={root}", *RUN))
    with pytest.raises(DataError, match=f"{bad.name}: cannot be decoded"):
        load_dataset(cfg.dataset, cfg.train.val_split, cfg.seed)
