"""Each loader reads its format, and every kind of bad file is refused with a clear message."""

from __future__ import annotations

import collections
import os
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest

from fallopt.data import load_dataset, safe_pickle
from fallopt.data.cauca import CaucaConfig
from fallopt.data.dataset import Split, as_images, hold_out, limit
from fallopt.data.digits import DigitsConfig
from fallopt.data.hds import HdsConfig
from fallopt.data.synthetic_falls import SyntheticFallsConfig
from fallopt.errors import DataError

from .conftest import SHARED, cauca_dict, write_pickle


def _cauca(tmp_path, train=None, test=None):
    return CaucaConfig(
        train_path=str(write_pickle(tmp_path / "train.pickle", train or cauca_dict(40))),
        test_path=str(write_pickle(tmp_path / "test.pickle", test or cauca_dict(20, seed=1))),
    )


def test_cauca_reads_the_lab_format(tmp_path):
    data = load_dataset(_cauca(tmp_path), val_split=0.25, seed=0)
    assert data.class_names == ("no_fall", "fall")
    assert (len(data.train), len(data.val), len(data.test)) == (30, 10, 20)
    assert data.input_shape == (16, 16, 3)
    assert data.train.x.dtype == np.uint8 and data.train.y.dtype == np.int64
    # Validation is a stratified split of the train pickle.
    assert np.bincount(data.val.y).tolist() == [5, 5]


def test_cauca_flat_rows_are_reshaped_with_the_files_dimensions(tmp_path):
    flat = cauca_dict(40)
    flat["data"] = flat["data"].reshape(40, -1)
    data = load_dataset(_cauca(tmp_path, train=flat), val_split=0.25, seed=0)
    assert data.input_shape == (16, 16, 3)


def test_cauca_float_pixels_in_unit_range_become_uint8(tmp_path):
    payload = cauca_dict(40)
    payload["data"] = payload["data"].astype(np.float32) / 255.0
    data = load_dataset(_cauca(tmp_path, train=payload), val_split=0.25, seed=0)
    assert data.train.x.dtype == np.uint8 and data.train.x.max() > 200


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (cauca_dict(40, labels=None) | {"labels": [0, 1] * 19}, "38 labels for 40 images"),
        ({k: v for k, v in cauca_dict(40).items() if k != "labels"}, r"missing keys \['labels'\]"),
        (cauca_dict(40, labels=[i % 3 for i in range(40)]), r"labels \[2\] are outside \[0, 1\]"),
        (cauca_dict(40, labels=[1] * 40), "only class 1 occurs"),
        (cauca_dict(40, width=32), "file says height=16, width=32"),
        (cauca_dict(40, data=np.full((40, 16, 16, 3), np.nan)), "NaN or inf"),
        (cauca_dict(40, data=np.zeros((40, 16))), "not a stack of images"),
        (cauca_dict(40, data=np.full((40, 16, 16, 3), 300.0)), r"outside \[0, 255\]"),
        (cauca_dict(40, data=np.ones((40, 16, 16, 3), bool)), "dtype bool is not numeric"),
        (cauca_dict(40, labels=[0.5, 1.0] * 20), "labels of dtype float64 are not integers"),
        ([1, 2, 3], "holds a list, not a dict"),
    ],
    ids=[
        "length",
        "keys",
        "label-range",
        "one-class",
        "shape",
        "nan",
        "ndim",
        "range",
        "dtype",
        "label-dtype",
        "not-dict",
    ],
)
def test_cauca_bad_contents_name_file_problem_and_format(tmp_path, payload, message):
    path = write_pickle(tmp_path / "bad.pickle", payload)
    cfg = CaucaConfig(train_path=str(path), test_path=str(path))
    with pytest.raises(DataError, match=message) as e:
        load_dataset(cfg, val_split=0.25, seed=0)
    assert str(path) in str(e.value)
    assert "expected the lab's CAUCA format" in str(e.value) or "not a dict" in str(e.value)


def test_missing_file_names_it(tmp_path):
    cfg = CaucaConfig(train_path=str(tmp_path / "nope.pickle"), test_path="x")
    with pytest.raises(DataError, match=r"nope\.pickle: no such file"):
        load_dataset(cfg, val_split=0.25, seed=0)


def test_not_a_pickle_and_truncated_pickle(tmp_path):
    text = tmp_path / "text.pickle"
    text.write_text("data,labels\n1,2\n")
    truncated = tmp_path / "cut.pickle"
    truncated.write_bytes(pickle.dumps(cauca_dict(40))[:500])
    for path in (text, truncated):
        with pytest.raises(DataError, match=str(path)):
            load_dataset(CaucaConfig(train_path=str(path), test_path=str(path)), 0.25, 0)


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_a_pickle_that_runs_code_is_refused_and_not_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write_pickle(tmp_path / "evil.pickle", {"data": _Exploit()})
    with pytest.raises(DataError, match=r"refused to load global (posix|os)\.system"):
        load_dataset(CaucaConfig(train_path=str(path), test_path=str(path)), 0.25, 0)
    assert not (tmp_path / "pwned").exists()


def _load_cauca(path: Path) -> None:
    load_dataset(CaucaConfig(train_path=str(path), test_path=str(path)), 0.25, 0)


def _ops(obj: object) -> bytes:
    """The opcodes that push `obj`, without a pickle's header and STOP."""
    return pickle.dumps(obj, 3)[2:-1]


def _calling(module: str, name: str, *args: object) -> bytes:
    """A pickle that calls module.name(*args), as a hand-made hostile file would."""
    return b"\x80\x03" + _ops(getattr(sys.modules[module], name)) + _ops(args) + b"R."


_RECONSTRUCT = np.zeros(1).__reduce__()[0]  # the function pickles name to rebuild arrays
_ONE_STRING_3000_TIMES = {"data": ["x" * 1000] * 3000, "labels": [0, 1], "width": 1}


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (  # 28 bytes that allocated 2 GB
            _calling("builtins", "bytearray", 2_000_000_000),
            r"refused bytearray\(2000000000\): 2,000,000,000 bytes beyond the file's own, over "
            r"the limit of 1,048,6\d\d bytes \(the file's size \+ 1,048,576\)",
        ),
        (  # 64 GiB: a bare MemoryError
            _calling("builtins", "bytearray", 2**36),
            r"refused bytearray\(68719476736\): .* over the limit",
        ),
        (
            _calling(_RECONSTRUCT.__module__, "_reconstruct", np.ndarray, (2**36,), b"b"),
            r"refused an empty array of shape \(68719476736,\): .* over the limit",
        ),
        (_calling("numpy", "ndarray", (2**36,)), "refused to call numpy.ndarray directly"),
        (  # "hex" doubles its input, and calls nest
            _calling("_codecs", "encode", b"ab", "hex"),
            r"refused _codecs.encode of a bytes with 'hex'",
        ),
        (  # BINBYTES8 declaring 1 TiB
            b"\x80\x04\x8e" + (2**40).to_bytes(8, "little") + b"x.",
            "the pickle reads 1,099,511,627,776 bytes where 2 remain",
        ),
        (  # protocol 5's BYTEARRAY8 allocates before it reads
            b"\x80\x05\x96" + (2**40).to_bytes(8, "little") + b"x.",
            "BYTEARRAY8 declares 1,099,511,627,776 bytes in a file of 13",
        ),
        (  # numpy would pad every reference into a 3000 x 1000 array of 4-byte characters
            pickle.dumps(_ONE_STRING_3000_TIMES),
            r"refused another reference to a str: 1,000 bytes beyond the file's own "
            r"\(1,05\d,\d+ in all\), over the limit",
        ),
    ],
    ids=[
        "bytearray-2GB",
        "bytearray-64GiB",
        "reconstruct",
        "ndarray",
        "codec",
        "length",
        "ba8",
        "str",
    ],
)
def test_a_pickle_asking_for_more_memory_than_it_holds_is_refused(tmp_path, content, message):
    path = tmp_path / "greedy.pickle"
    path.write_bytes(content)
    with pytest.raises(DataError, match=message) as e:
        _load_cauca(path)
    assert str(e.value).startswith(f"{path}: ")


def test_shared_nested_lists_are_refused_before_numpy_expands_them(tmp_path):
    # 10**7 numbers in 250 bytes: each level holds the one list below it ten times. Converting
    # it took 0.9 s and 280 MB; each level more, ten times that.
    data = [0] * 10
    for _ in range(6):
        data = [data] * 10
    path = write_pickle(tmp_path / "laughs.pickle", cauca_dict(2, data=data))
    assert path.stat().st_size < 300
    with pytest.raises(
        DataError, match=r"laughs\.pickle: .*refused a second reference to one list"
    ):
        _load_cauca(path)


@pytest.mark.parametrize("key", ["data", "labels"])
def test_text_is_refused_before_numpy_pads_every_string_to_the_longest(tmp_path, key):
    # 104 KB without any shared reference; np.asarray of it took 963 MB.
    text = ["a" * 100_000] + ["b"] * 2_000
    path = write_pickle(tmp_path / "text.pickle", cauca_dict(2, **{key: text}))
    with pytest.raises(DataError, match=rf"text\.pickle key '{key}': .*cannot be read"):
        _load_cauca(path)


def _dtype_with_state(state: tuple) -> bytes:
    """A pickled dtype('V8') whose BUILD state is `state`."""
    reduced = np.dtype("V8").__reduce__()
    return b"\x80\x03" + _ops(reduced[0]) + _ops(reduced[1]) + b"R" + _ops(state) + b"b."


@pytest.mark.parametrize(
    ("content", "message"),
    [
        # Object arrays rebuild from a list of items; numpy segfaults if it is short.
        (pickle.dumps(cauca_dict(2, data=np.zeros((2, 4, 4, 3), object))), "refused dtype"),
        # A dtype's state could claim Python objects (flags 63) or 2**40-byte items.
        (_dtype_with_state((3, "|", None, None, None, 8, 1, 63)), "refused to change dtype"),
        (_dtype_with_state((3, "|", None, None, None, 2**40, 1, 0)), "refused to change dtype"),
    ],
    ids=["object-array", "object-flags", "itemsize"],
)
def test_dtypes_holding_python_objects_are_refused(tmp_path, content, message):
    path = tmp_path / "objects.pickle"
    path.write_bytes(content)
    with pytest.raises(DataError, match=rf"objects\.pickle: not a safe pickle .*{message}"):
        _load_cauca(path)


def test_running_out_of_memory_while_unpickling_names_the_file(tmp_path, monkeypatch):
    def no_memory(*args: object) -> None:
        raise MemoryError("Unable to allocate 64.0 GiB")

    path = write_pickle(tmp_path / "big.pickle", cauca_dict(4))
    monkeypatch.setattr(sys.modules[_RECONSTRUCT.__module__], _RECONSTRUCT.__name__, no_memory)
    with pytest.raises(DataError, match=r"big\.pickle: does not fit in memory .*64\.0 GiB"):
        _load_cauca(path)


# What legitimate pickles of arrays hold, at every protocol (0-2 name Python 2's modules).
_LEGITIMATE = {
    "images": np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3),
    "labels": [0, 1],
    "keys": ["shared", "shared"],  # a string referenced twice
    "big_endian_fortran": np.asfortranarray(np.arange(6, dtype=">f4").reshape(3, 2)),
    "scalar": np.int64(5),
    "ordered": collections.OrderedDict(a=1),
    "buffer": bytearray(b"xy"),
    "empty": np.zeros((0, 3), np.uint8),
    "text": np.array(["ab"]),
    "pair": ((), ()),
}
# As Python 2's cPickle wrote {'data': array([0, 1, 255], uint8)}: a latin1 str holds the bytes.
_PYTHON_2 = (
    b"\x80\x02}q\x00U\x04dataq\x01cnumpy.core.multiarray\n_reconstruct\nq\x02cnumpy\nndarray\n"
    b"q\x03K\x00\x85U\x01b\x87Rq\x04(K\x01K\x03\x85cnumpy\ndtype\nq\x05U\x02u1K\x00K\x01\x87Rq"
    b"\x06(K\x03U\x01|NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb\x89U\x03\x00\x01\xfftbs."
)


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_legitimate_pickles_of_every_protocol_load_as_pickle_loads_them(tmp_path, protocol):
    path = tmp_path / "ok.pickle"
    path.write_bytes(pickle.dumps(_LEGITIMATE, protocol))
    loaded, expected = safe_pickle.load(path, "anything"), pickle.loads(path.read_bytes())
    assert loaded.keys() == expected.keys()
    for key, value in expected.items():
        assert type(loaded[key]) is type(value)
        if isinstance(value, np.ndarray):
            assert loaded[key].dtype == value.dtype and np.array_equal(loaded[key], value)
            assert loaded[key].flags.f_contiguous == value.flags.f_contiguous
        else:
            assert loaded[key] == value


def test_python_2_pickles_load(tmp_path):
    path = tmp_path / "py2.pickle"
    path.write_bytes(_PYTHON_2)
    assert safe_pickle.load(path, "anything")["data"].tolist() == [0, 1, 255]


def test_gmdcsa24_real_pickles_load():
    folder = SHARED / "data" / "gmdcsa24"
    if not folder.is_dir():
        pytest.skip(f"real GMDCSA-24 data not found at {folder} (set FALLOPT_SHARED)")
    cfg = CaucaConfig(
        train_path=str(folder / "data_train_96_96_3.pickle"),
        test_path=str(folder / "data_test_96_96_3.pickle"),
    )
    data = load_dataset(cfg, val_split=0.2, seed=0)
    assert data.input_shape == (96, 96, 3)
    assert (len(data.train) + len(data.val), len(data.test)) == (1985, 1086)


def test_train_and_test_of_different_sizes_are_refused(tmp_path):
    with pytest.raises(DataError, match="use the train and test pickles of one size"):
        load_dataset(_cauca(tmp_path, test=cauca_dict(20, size=24)), 0.25, 0)


def test_hds_real_file_is_read_as_the_lab_prepared_it(hds_pickle):
    data = load_dataset(HdsConfig(path=str(hds_pickle)), val_split=0.2, seed=0)
    assert data.class_names == ("ellipse", "rectangle", "triangle")
    assert data.input_shape == (14, 14, 1)
    assert len(data.train) + len(data.val) + len(data.test) == 4500
    assert np.bincount(data.test.y).tolist() == [300, 300, 300]  # stratified 20%


def test_hds_wrong_labels_are_refused(tmp_path):
    path = write_pickle(
        tmp_path / "hds.pickle",
        {"train_data": np.zeros((30, 14, 14), np.uint8), "train_labels": np.arange(30) % 3},
    )
    with pytest.raises(DataError, match=r"labels \[0\] are outside \[1, 2, 3\]"):
        load_dataset(HdsConfig(path=str(path)), 0.2, 0)


def test_digits_ship_with_scikit_learn():
    data = load_dataset(DigitsConfig(), val_split=0.2, seed=0)
    assert data.num_classes == 10 and data.input_shape == (8, 8, 1)
    assert len(data.train) + len(data.val) + len(data.test) == 1797
    assert data.train.x.max() == 255


def test_limit_caps_pool_and_test_keeping_classes(tmp_path):
    data = load_dataset(DigitsConfig(limit=100), val_split=0.2, seed=0)
    assert len(data.train) + len(data.val) == 100 and len(data.test) == 100
    assert len(np.unique(data.train.y)) == 10


def test_limit_too_small_for_a_split_says_what_to_change():
    with pytest.raises(DataError, match="raise dataset.limit"):
        load_dataset(DigitsConfig(limit=12), val_split=0.2, seed=0)


def test_synthetic_limit_generates_only_what_is_used(tmp_path):
    cfg = SyntheticFallsConfig(
        image_size=24, n_train=200, n_test=100, limit=30, cache_dir=str(tmp_path)
    )
    data = load_dataset(cfg, val_split=0.2, seed=0)
    assert (len(data.train) + len(data.val), len(data.test)) == (30, 30)
    assert sorted(p.name.split("-n")[-1] for p in tmp_path.glob("*.npz")) == ["30.npz", "30.npz"]


def test_limit_is_stratified_and_deterministic():
    y = np.array([0] * 90 + [1] * 10)
    split = Split(np.zeros((100, 2, 2, 1), np.uint8), y)
    a, b = limit(split, 20, seed=1), limit(split, 20, seed=1)
    assert np.bincount(a.y).tolist() == [18, 2]
    assert np.array_equal(a.y, b.y)


def test_integer_pixels_outside_uint8_are_refused():
    with pytest.raises(DataError, match=r"outside \[0, 255\]"):
        as_images(np.full((2, 4, 4, 1), 1000, np.int32), "x", "fmt")


def test_splits_are_views_in_file_order_with_the_classes_kept():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(101, 3, 3, 1), dtype=np.uint8)
    y = np.arange(101) % 3
    ids = {x[i].tobytes(): i for i in range(101)}  # each image names its row in the file
    pool = x.copy()
    train, val, _ = hold_out(Split(pool, y.copy()), 0.25, seed=0, what="t", by_group=True)
    assert train.x.base is pool and val.x.base is pool  # reordered in place: no copy
    for part in (train, val):
        rows = [ids[image.tobytes()] for image in part.x]
        assert rows == sorted(rows)  # file order within each part
        assert np.array_equal(part.y, y[rows])  # labels follow their images
    assert len(val) == 26 and np.bincount(val.y).tolist() == [9, 9, 8]
    assert sorted(ids[i.tobytes()] for i in np.concatenate([train.x, val.x])) == list(range(101))
    frozen = x.copy()
    frozen.flags.writeable = False  # e.g. a memory-mapped file: split by copying instead
    copied, _, _ = hold_out(Split(frozen, y), 0.25, seed=0, what="t", by_group=True)
    assert np.array_equal(copied.x, train.x) and not np.shares_memory(copied.x, frozen)
