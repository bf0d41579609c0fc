"""Decoding image files into the memory-mapped cache: pixels, shapes, cache keys, bad files."""

from __future__ import annotations

import errno
import fcntl
import io
import logging
import os
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fallopt.data import images, safe_pickle
from fallopt.data.images import RESIZE_FILTERS, decode_images, list_images, listing_digest
from fallopt.errors import DataError


def _rgb(seed: int, h: int = 12, w: int = 16) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _write(path: Path, pixels: np.ndarray, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(pixels)
    (img.convert(mode) if mode else img).save(path)
    return path


def _folder(root: Path, n: int = 6, h: int = 12, w: int = 16) -> list[Path]:
    return [_write(root / f"c{i % 2}" / f"{i:02d}.png", _rgb(i, h, w)) for i in range(n)]


def _decode(files: list[Path], base: Path, tmp_path: Path, **kw) -> images.Decoded:
    kw = {"size": None, "channels": None, "cache_dir": tmp_path / "cache", **kw}
    return decode_images(files, base, **kw)


def _no_open(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("an image file was opened")

    monkeypatch.setattr(Image, "open", refuse)


def _truncate(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def test_list_images_finds_suffixes_in_any_case_sorted_by_relative_path(tmp_path):
    for name in ["b/2.PNG", "b/10.jpg", "a/x.JPEG", "top.bmp", "a/deep/y.png"]:
        _write(tmp_path / name, _rgb(0))
    for name in ["notes.txt", "a/.hidden.png", ".ipynb_checkpoints/z.png", "b/pic.gif"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    found = [p.relative_to(tmp_path).as_posix() for p in list_images(tmp_path)]
    assert found == ["a/deep/y.png", "a/x.JPEG", "b/10.jpg", "b/2.PNG", "top.bmp"]
    with pytest.raises(DataError, match="missing: no such folder"):
        list_images(tmp_path / "missing")


def test_same_size_pngs_decode_exactly_into_a_read_only_memmap(tmp_path):
    files = _folder(tmp_path / "data")
    out = _decode(files, tmp_path / "data", tmp_path)
    assert out.x.shape == (6, 12, 16, 3) and out.x.dtype == np.uint8
    for row, f in zip(out.x, files, strict=True):
        np.testing.assert_array_equal(row, np.asarray(Image.open(f)))
    assert (out.resized, out.converted, out.skipped, out.from_cache) == (0, 0, (), False)
    np.testing.assert_array_equal(out.kept, np.arange(6))
    assert out.kept.dtype == np.int64
    assert isinstance(out.x, np.memmap) and not out.x.flags.writeable
    with pytest.raises(ValueError, match="read-only"):
        out.x[0, 0, 0, 0] = 1


@pytest.mark.parametrize("name", list(RESIZE_FILTERS))
def test_resize_uses_the_named_filter(tmp_path, name):
    files = [_write(tmp_path / f"{i}.png", _rgb(i, 30, 40)) for i in range(2)]
    files.append(_write(tmp_path / "2.png", _rgb(2, 9, 12)))  # upscaled too
    out = _decode(files, tmp_path, tmp_path, size=(10, 14), resize_filter=name)
    assert out.x.shape == (3, 10, 14, 3) and out.resized == 3
    for row, f in zip(out.x, files, strict=True):
        expected = Image.open(f).resize((14, 10), RESIZE_FILTERS[name])
        np.testing.assert_array_equal(row, np.asarray(expected))


def test_resize_filter_names_match_the_config_choices():
    from fallopt import config

    names = getattr(config, "RESIZE_FILTERS", None)
    if names is None:
        pytest.skip("fallopt.config has no RESIZE_FILTERS")
    assert list(names) == list(RESIZE_FILTERS)


def test_size_none_takes_the_first_files_and_counts_the_others(tmp_path):
    files = [
        _write(tmp_path / "0.png", _rgb(0, 10, 12)),
        _write(tmp_path / "1.png", _rgb(1, 20, 20)),
        _write(tmp_path / "2.png", _rgb(2, 10, 12)),
    ]
    out = _decode(files, tmp_path, tmp_path)
    assert out.x.shape == (3, 10, 12, 3) and out.resized == 1
    np.testing.assert_array_equal(out.x[2], np.asarray(Image.open(files[2])))


def test_gray_and_rgb_are_converted_to_the_first_files_channels(tmp_path):
    gray = _write(tmp_path / "0.png", _rgb(0), "L")
    rgb = _write(tmp_path / "1.png", _rgb(1))
    rgba = _write(tmp_path / "2.png", np.dstack([_rgb(2), np.full((12, 16), 7, np.uint8)]))
    palette = _write(tmp_path / "3.png", _rgb(3), "P")
    files = [gray, rgb, rgba, palette]

    one = _decode(files, tmp_path, tmp_path)
    assert one.x.shape == (4, 12, 16, 1) and one.converted == 3
    for row, f in zip(one.x, files, strict=True):
        np.testing.assert_array_equal(row[..., 0], np.asarray(Image.open(f).convert("L")))

    three = _decode(files, tmp_path, tmp_path, channels=3)
    assert three.x.shape == (4, 12, 16, 3) and three.converted == 3  # all but the RGB file
    np.testing.assert_array_equal(three.x[0], np.repeat(one.x[0], 3, axis=-1))
    np.testing.assert_array_equal(three.x[2], np.asarray(Image.open(rgba))[..., :3])
    np.testing.assert_array_equal(three.x[3], np.asarray(Image.open(palette).convert("RGB")))

    first_rgb = _decode(files[1:] + files[:1], tmp_path, tmp_path)
    assert first_rgb.x.shape[-1] == 3


def test_16_bit_png_is_scaled_to_0_255_not_clipped(tmp_path):
    wide = (np.arange(12 * 16).reshape(12, 16) * 345).astype(np.uint16)  # 0 .. 65,895 -> wraps
    wide[-1, -1], wide[0, 0] = 65535, 0
    path = tmp_path / "16.png"
    Image.fromarray(wide).save(path)
    assert Image.open(path).mode.startswith("I")
    expected = np.rint(wide / 257.0).astype(np.uint8)

    out = _decode([path], tmp_path, tmp_path)
    assert out.x.shape == (1, 12, 16, 1) and out.converted == 1
    np.testing.assert_array_equal(out.x[0, ..., 0], expected)
    assert out.x.max() == 255 and len(np.unique(out.x)) > 100  # convert("L") leaves ~2 values

    rgb = _decode([path], tmp_path, tmp_path, channels=3)
    np.testing.assert_array_equal(rgb.x[0], np.repeat(expected[..., None], 3, axis=-1))


def test_a_second_call_maps_the_cache_and_opens_no_image(tmp_path, monkeypatch, caplog):
    files = _folder(tmp_path / "data")
    first = _decode(files, tmp_path / "data", tmp_path, size=(8, 8), what="train")
    _no_open(monkeypatch)
    with caplog.at_level(logging.INFO, logger="fallopt.data.images"):
        again = _decode(files, tmp_path / "data", tmp_path, size=(8, 8), what="train")
    assert again.from_cache and not first.from_cache
    np.testing.assert_array_equal(again.x, first.x)
    assert (again.resized, again.converted) == (first.resized, first.converted) == (6, 0)
    assert "train: 6 images from the decode cache" in caplog.text
    assert not again.x.flags.writeable


def test_decode_logs_its_start_and_rate(tmp_path, caplog):
    files = _folder(tmp_path / "data", n=4)
    with caplog.at_level(logging.INFO, logger="fallopt.data.images"):
        _decode(files, tmp_path / "data", tmp_path, what="cats", workers=2)
    assert "[data] decoding 4 cats images on 2 threads into " in caplog.text
    assert "[data] decoded 4 cats images in " in caplog.text


def test_a_touched_or_changed_file_is_decoded_again(tmp_path):
    files = _folder(tmp_path / "data")
    base = tmp_path / "data"
    first = _decode(files, base, tmp_path)

    st = files[2].stat()
    os.utime(files[2], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    touched = _decode(files, base, tmp_path)
    assert not touched.from_cache
    np.testing.assert_array_equal(touched.x, first.x)

    _write(files[3], 255 - _rgb(3))  # same size in bytes or not: new pixels
    os.utime(files[3], ns=(st.st_atime_ns, st.st_mtime_ns + 2 * 10**9))
    changed = _decode(files, base, tmp_path)
    assert not changed.from_cache
    np.testing.assert_array_equal(changed.x[3], 255 - _rgb(3))


def test_added_and_removed_files_change_the_result(tmp_path):
    base = tmp_path / "data"
    files = _folder(base)
    first = _decode(list_images(base), base, tmp_path)
    _write(base / "c0" / "99.png", _rgb(99))
    added = _decode(list_images(base), base, tmp_path)
    assert not added.from_cache and len(added.x) == len(first.x) + 1
    files[0].unlink()
    listed = list_images(base)
    removed = _decode(listed, base, tmp_path)
    assert not removed.from_cache and len(removed.x) == len(first.x)
    np.testing.assert_array_equal(removed.x[listed.index(base / "c0" / "99.png")], _rgb(99))
    np.testing.assert_array_equal(removed.x[0], _rgb(2))


def test_a_moved_tree_hits_the_cache(tmp_path, monkeypatch):
    _folder(tmp_path / "before")
    first = _decode(list_images(tmp_path / "before"), tmp_path / "before", tmp_path)
    os.rename(tmp_path / "before", tmp_path / "after")  # as `mv`: mtimes kept
    _no_open(monkeypatch)
    moved = _decode(list_images(tmp_path / "after"), tmp_path / "after", tmp_path)
    assert moved.from_cache
    np.testing.assert_array_equal(moved.x, first.x)


def test_listing_digest_follows_names_sizes_and_mtimes_not_where_the_tree_is(tmp_path):
    _folder(tmp_path / "a")
    digest = listing_digest(list_images(tmp_path / "a"), tmp_path / "a")
    os.rename(tmp_path / "a", tmp_path / "b")
    files = list_images(tmp_path / "b")
    assert listing_digest(files, tmp_path / "b") == digest
    st = files[0].stat()
    os.utime(files[0], ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    assert listing_digest(files, tmp_path / "b") != digest


def test_a_renamed_file_is_a_new_key(tmp_path):
    files = _folder(tmp_path / "data")
    _decode(files, tmp_path / "data", tmp_path)
    renamed = files[0].with_name("renamed.png")
    os.rename(files[0], renamed)
    again = _decode([renamed, *files[1:]], tmp_path / "data", tmp_path)
    assert not again.from_cache


def test_a_truncated_png_is_named_with_the_fix(tmp_path):
    files = _folder(tmp_path / "data")
    _truncate(files[3])
    with pytest.raises(DataError) as e:
        _decode(files, tmp_path / "data", tmp_path)
    message = str(e.value)
    assert message.startswith(f"{files[3]}: cannot be decoded as an image (")
    assert "truncated" in message and "dataset.skip_bad=true" in message
    assert "\n" not in message


def test_a_non_image_first_file_is_named_when_its_size_is_needed(tmp_path):
    files = _folder(tmp_path / "data")
    files[0].write_bytes(b"not a png at all")
    with pytest.raises(DataError, match=f"^{files[0]}: cannot be decoded as an image"):
        _decode(files, tmp_path / "data", tmp_path)


def test_skip_bad_leaves_out_unreadable_files_and_the_cache_remembers(tmp_path, monkeypatch):
    base = tmp_path / "data"
    files = _folder(base, n=8)
    _truncate(files[2])
    files[5].write_bytes(b"garbage")
    out = _decode(files, base, tmp_path, skip_bad=True)
    np.testing.assert_array_equal(out.kept, [0, 1, 3, 4, 6, 7])
    assert [name for name, _ in out.skipped] == ["c0/02.png", "c1/05.png"]
    assert "truncated" in out.skipped[0][1]
    assert out.x.shape == (6, 12, 16, 3)
    for row, i in zip(out.x, out.kept, strict=True):  # the kept rows moved up, in order
        np.testing.assert_array_equal(row, _rgb(int(i)))

    _no_open(monkeypatch)
    again = _decode(files, base, tmp_path, skip_bad=True)
    assert again.from_cache and again.skipped == out.skipped
    np.testing.assert_array_equal(again.kept, out.kept)
    with pytest.raises(DataError, match=f"^{files[2]}: cannot be decoded .*truncated"):
        _decode(files, base, tmp_path, skip_bad=False)


def test_skip_bad_with_every_file_bad_is_an_error(tmp_path):
    files = _folder(tmp_path / "data", n=3)
    for f in files:
        f.write_bytes(b"garbage")
    with pytest.raises(DataError, match="none of the 3 cats images can be decoded"):
        _decode(files, tmp_path / "data", tmp_path, skip_bad=True, what="cats", size=(4, 4))
    with pytest.raises(DataError, match="none of the 3 cats images can be decoded"):
        _decode(files, tmp_path / "data", tmp_path, skip_bad=True, what="cats")


def test_missing_and_empty_are_named(tmp_path):
    files = _folder(tmp_path / "data")
    files[1].unlink()
    with pytest.raises(DataError, match=f"^{files[1]}: no such file"):
        _decode(files, tmp_path / "data", tmp_path, skip_bad=True)
    with pytest.raises(DataError, match=f"^{tmp_path / 'data'}: no dogs images found"):
        _decode([], tmp_path / "data", tmp_path, what="dogs")


def test_progress_is_a_bar_on_a_terminal_and_deciles_in_a_log(monkeypatch, caplog):
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    bar = images._Progress(200, "cats")
    bar.update(100)
    bar.update(200)
    bar.close()
    assert "\r[data] cats [###############" in terminal.getvalue()
    assert "100% 200/200" in terminal.getvalue()

    monkeypatch.setattr(sys, "stderr", io.StringIO())
    log = images._Progress(200, "cats")
    with caplog.at_level(logging.INFO, logger="fallopt.data.images"):
        log.update(30)  # quick so far: no line
        log.start -= 5
        log.update(50)
        log.update(55)  # the same decile: no second line
    assert "[data] cats: 20% decoded (50/200, " in caplog.text
    assert caplog.text.count("% decoded") == 1


def test_an_unwritable_cache_is_named(tmp_path):
    files = _folder(tmp_path / "data", n=2)
    (tmp_path / "cache").write_text("a file, not a folder")
    with pytest.raises(DataError, match="cannot write the decode cache there"):
        _decode(files, tmp_path / "data", tmp_path)


def test_a_full_disk_is_named_before_any_decoding(tmp_path, monkeypatch):
    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    files = _folder(tmp_path / "data", n=2)
    with pytest.raises(DataError, match="no space for 0.0 GiB of decoded images; free some"):
        _decode(files, tmp_path / "data", tmp_path)
    assert _leftovers(tmp_path) == []


def _leftovers(tmp_path: Path) -> list[str]:
    root = tmp_path / "cache" / "images"
    return sorted(p.name for p in root.iterdir() if not p.name.endswith(".lock"))


def test_a_failure_inside_decoding_leaves_no_entry_or_temp_dir(tmp_path, monkeypatch):
    files = _folder(tmp_path / "data")
    real = images._decode_chunk

    def fail(files, rows, *args):
        if 3 in rows:
            raise RuntimeError("disk on fire")
        return real(files, rows, *args)

    monkeypatch.setattr(images, "_decode_chunk", fail)
    with pytest.raises(RuntimeError, match="disk on fire"):
        _decode(files, tmp_path / "data", tmp_path, workers=2)
    assert _leftovers(tmp_path) == []

    monkeypatch.setattr(images, "_decode_chunk", real)
    _truncate(files[4])
    with pytest.raises(DataError):
        _decode(files, tmp_path / "data", tmp_path, workers=2)
    assert _leftovers(tmp_path) == []
    out = _decode(files, tmp_path / "data", tmp_path, skip_bad=True)
    assert not out.from_cache and len(_leftovers(tmp_path)) == 1


def test_a_killed_decoders_temp_dirs_go_unless_their_key_is_locked(tmp_path):
    root = tmp_path / "cache" / "images"
    for name in ("a" * 32, "b" * 32):
        (root / f".{name}.999.tmp").mkdir(parents=True)
        (root / f".{name}.999.tmp" / "pixels.u8").write_bytes(b"half")
    with (root / f"{'b' * 32}.lock").open("w") as busy:
        fcntl.flock(busy, fcntl.LOCK_EX)  # another process decoding b right now
        _decode(_folder(tmp_path / "data", n=2), tmp_path / "data", tmp_path)
        assert [p.name for p in root.glob(".*.tmp")] == [f".{'b' * 32}.999.tmp"]


def test_a_damaged_entry_is_decoded_again(tmp_path, caplog):
    files = _folder(tmp_path / "data")
    first = _decode(files, tmp_path / "data", tmp_path)
    (entry,) = _leftovers(tmp_path)
    pixels = tmp_path / "cache" / "images" / entry / "pixels.u8"
    del first
    os.truncate(pixels, 100)
    again = _decode(files, tmp_path / "data", tmp_path)
    assert not again.from_cache and "damaged" in caplog.text
    np.testing.assert_array_equal(again.x[5], _rgb(5))


def test_two_threads_wait_on_the_lock_and_decode_once(tmp_path, monkeypatch):
    files = _folder(tmp_path / "data", n=20)
    decodes = []
    real = images._decode_into

    def counted(*args):
        decodes.append(1)
        return real(*args)

    monkeypatch.setattr(images, "_decode_into", counted)
    results = [None, None]

    def run(slot: int) -> None:
        results[slot] = _decode(files, tmp_path / "data", tmp_path)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(decodes) == 1
    assert sorted(r.from_cache for r in results) == [False, True]
    np.testing.assert_array_equal(results[0].x, results[1].x)


def test_two_workers_give_what_one_gives(tmp_path):
    files = [_write(tmp_path / "d" / f"{i:02d}.png", _rgb(i, 12 + i % 3, 16)) for i in range(40)]
    _write(tmp_path / "d" / "gray.png", _rgb(40), "L")
    files.append(tmp_path / "d" / "gray.png")
    one = _decode(files, tmp_path / "d", tmp_path / "one", size=(10, 10), workers=1)
    two = _decode(files, tmp_path / "d", tmp_path / "two", size=(10, 10), workers=2)
    np.testing.assert_array_equal(one.x, two.x)
    assert (one.resized, one.converted) == (two.resized, two.converted) == (41, 1)


def test_real_hds_shapes_round_trip_through_png_files(tmp_path, hds_pickle):
    raw = safe_pickle.load(hds_pickle, "the lab's HDS pickle")
    x, labels = np.asarray(raw["train_data"])[:50], np.asarray(raw["train_labels"])[:50]
    assert x.dtype == np.uint8 and x.shape == (50, 14, 14)
    base = tmp_path / "hds"
    files = [_write(base / str(label) / f"{i:03d}.png", img) for i, (img, label) in
             enumerate(zip(x, labels, strict=True))]  # fmt: skip
    listed = list_images(base)
    out = _decode(listed, base, tmp_path, what="hds")
    assert out.x.shape == (50, 14, 14, 1) and (out.resized, out.converted) == (0, 0)
    order = [files.index(p) for p in listed]
    np.testing.assert_array_equal(out.x[..., 0], x[order])


def test_cache_directory_holds_only_published_entries_after_success(tmp_path):
    files = _folder(tmp_path / "data")
    _decode(files, tmp_path / "data", tmp_path)
    (entry,) = _leftovers(tmp_path)
    assert sorted(p.name for p in (tmp_path / "cache" / "images" / entry).iterdir()) == [
        "index.json",
        "pixels.u8",
    ]
