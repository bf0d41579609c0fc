"""`python -m fallopt.report --target BOARD`: which run fits the board, on a store by hand.

Runs are written with test_report_audit's Store (no TensorFlow, no TFLM), then given the
device figures a run logs since issue 16; budgets below are the packaged boards'.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from mlflow.entities import Metric, RunTag
from PIL import Image

from fallopt import target as boards
from fallopt.config import KIB
from fallopt.report.__main__ import EXIT_NO_MODEL
from fallopt.report.select import NO_FIGURES

from .test_report_audit import Store, _one_error

HYBRID = "skipped: TFLM cannot run this model: Hybrid models are not supported on TFLite Micro"
# name: accuracy (also fall recall), gzipped KiB, .tflite KiB, arena KiB (None: not measured).
# On nano33ble (256 KiB RAM, 1 MiB flash, 64 KiB runtime): A over RAM, B over flash, C and
# D fit, E (dynamic range) and F (before TFLM figures) cannot be judged, G over RAM and,
# on stm32h747, over the 512 KiB largest block though within its 1 MiB RAM.
RUNS: dict[str, tuple[float, float, float | None, float | None]] = {
    "A": (0.95, 350, 400, 300),
    "B": (0.93, 250, 1000, 200),
    "C": (0.91, 150, 300, 120),
    "D": (0.88, 50, 100, 60),
    "E": (0.98, 100, 200, None),
    "F": (0.99, 300, None, None),
    "G": (0.965, 450, 500, 600),
}


class Board:
    """A store holding RUNS as one sweep, and each name's run id."""

    def __init__(self, root: Path) -> None:
        self.store = Store(root)
        self.parent = self.store.sweep()
        self.ids = {name: self._run(self.parent, name, i) for i, name in enumerate(RUNS)}

    def _run(self, parent: str, name: str, i: int) -> str:
        accuracy, gzip_kib, tflite_kib, arena_kib = RUNS[name]
        mode = "dynamic" if name == "E" else "int8"
        run_id = self.store.run(parent, sparsity=i / 10, mode=mode, accuracy=accuracy, kib=gzip_kib)
        if tflite_kib is None:  # a run from before: none of the new figures
            return run_id
        metrics = {"tflite_size_bytes": tflite_kib * KIB, "macs": 1e6 * (i + 1),
                   "flash_bytes": tflite_kib * KIB + 64 * KIB}  # fmt: skip
        # Made for another board: the report must judge the figures, not the fits tag.
        tags = {"fallopt.tflm": HYBRID, "fallopt.target": "stm32h747", "fallopt.fits": "yes"}
        if arena_kib is not None:
            metrics["tflm_arena_bytes"] = arena_kib * KIB
            tags["fallopt.tflm"] = "tflm_arena_bytes: minimal arena"
        now = int(time.time() * 1000)
        self.store.client.log_batch(
            run_id,
            metrics=[Metric(k, v, now, 0) for k, v in metrics.items()],
            tags=[RunTag(k, v) for k, v in tags.items()],
        )
        return run_id

    def report(self, out: Path, *args: str, parent: str = "") -> tuple[int, str]:
        """The report's exit code and its recommendation, as report.md has it."""
        code = self.store.main("--parent-run", parent or self.parent, "--out", str(out), *args)
        return code, (out / "report.md").read_text().splitlines()[4]


@pytest.fixture(scope="module")
def board(tmp_path_factory: pytest.TempPathFactory) -> Board:
    return Board(tmp_path_factory.mktemp("boards"))


@pytest.fixture(scope="module")
def nano(board: Board, tmp_path_factory: pytest.TempPathFactory) -> tuple[int, str, Path]:
    """The report with --target nano33ble: exit code, recommendation, folder."""
    out = tmp_path_factory.mktemp("nano33ble")
    return *board.report(out, "--target", "nano33ble"), out


def expected(name: str, target: str) -> boards.Fit | None:
    """target.verdict on RUNS[name]'s figures; None for a run without them."""
    _, _, tflite_kib, arena_kib = RUNS[name]
    if tflite_kib is None:
        return None
    arena = None if arena_kib is None else int(arena_kib * KIB)
    t = boards.load(target)
    why = HYBRID.removeprefix("skipped: ")  # the one run without an arena was refused
    refused = why if arena is None else None
    return boards.verdict(arena, boards.flash_needed(int(tflite_kib * KIB), t), t, why, refused)


def _relaxing(message: str) -> str:
    return message.split("relaxing ", 1)[1].split(" would admit")[0]


def test_the_most_accurate_run_that_fits_is_recommended_with_its_ram_and_flash(board, nano):
    fitting = [n for n in RUNS if (fit := expected(n, "nano33ble")) and fit.fits]
    best = max(fitting, key=lambda n: RUNS[n][0])
    assert best == "C"  # A, E, F and G are more accurate but do not fit or cannot be judged
    code, line, _ = nano
    assert code == 0
    assert f"(run {board.ids[best]})" in line
    assert "on nano33ble: arena 120 KiB, RAM 120 KiB of 256 KiB, flash 364 KiB of 1,024 KiB" in line
    # Logged beside, not over, the sweep's other reports.
    client, parent = board.store.client, board.parent
    tags = client.get_run(parent).data.tags
    assert tags["fallopt.recommended_run_id.nano33ble"] == board.ids[best]
    logged = {a.path for a in client.list_artifacts(parent, "report/nano33ble")}
    assert "report/nano33ble/report.html" in logged


def test_the_fits_column_is_target_verdicts_text_and_the_arena_figure_a_png(board, nano):
    out = nano[2]
    md = (out / "report.md").read_text().splitlines()
    head = next(i for i, line in enumerate(md) if line.startswith("| model"))
    columns = [c.strip() for c in md[head].strip("|").split("|")]
    assert {"TFLM arena (KiB)", "MACs (millions)", "fits nano33ble"} <= set(columns)
    cells = {}
    for line in md[head + 2 : head + 2 + len(RUNS)]:
        row = dict(zip(columns, (c.strip() for c in line.strip("|").split("|")), strict=True))
        cells[row["MLflow run"]] = row
    for name, run_id in board.ids.items():
        fit = expected(name, "nano33ble")
        assert cells[run_id]["fits nano33ble"] == (fit.text if fit else f"unknown: {NO_FIGURES}")
    assert cells[board.ids["F"]]["TFLM arena (KiB)"] == "–"  # the old run is listed, blank
    assert cells[board.ids["A"]]["fits nano33ble"].startswith("no: RAM 300 KiB > 256 KiB")
    png = out / "accuracy_vs_arena.png"
    assert Image.open(png).format == "PNG"
    assert "![accuracy_vs_arena](accuracy_vs_arena.png)" in md
    assert 'alt="accuracy against TFLM arena"' in (out / "report.html").read_text()


def test_without_target_the_device_columns_show_and_no_verdict(board, tmp_path):
    out = tmp_path
    code, line = board.report(out)
    assert code == 0 and f"(run {board.ids['F']})" in line  # the old run competes on accuracy
    md = (out / "report.md").read_text()
    assert "| TFLM arena (KiB) | flash: .tflite + TFLM runtime (KiB) | MACs (millions) |" in md
    assert "fits " not in md and (out / "accuracy_vs_arena.png").is_file()


@pytest.mark.parametrize(
    ("args", "binds", "not_named"),
    [
        # A (RAM) and C (recall) are each one budget away: RAM binds, flash does not.
        (["--min-fall-recall", "0.95"], "--target nano33ble RAM (256 KiB)", "flash"),
        # Only B meets size and recall, and its flash is over: flash binds, RAM does not.
        (["--min-fall-recall", "0.93", "--max-size-kb", "300"], "--target nano33ble flash", "RAM"),
    ],
)
def test_when_nothing_fits_the_message_names_the_binding_budget(
    board, tmp_path, args, binds, not_named
):
    code, line = board.report(tmp_path, "--target", "nano33ble", *args)
    assert code == EXIT_NO_MODEL
    relaxing = _relaxing(line)
    assert binds in relaxing and not_named not in relaxing
    # E (dynamic range) and F (old) meet the recall, yet never fit: the message says why.
    assert "2 of 7 runs cannot be judged against nano33ble and never fit" in line


def test_the_largest_ram_block_binds_on_stm32h747(board, tmp_path):
    fit = expected("G", "stm32h747")
    assert fit.binding == ("arena",)  # 600 KiB + 0 reserved is within its 1 MiB of RAM
    code, line = board.report(tmp_path / "ok", "--target", "stm32h747")
    assert code == 0 and f"(run {board.ids['A']})" in line  # not G, though more accurate
    args = ["--target", "stm32h747", "--min-fall-recall", "0.96"]  # only E, F and G meet it
    code, line = board.report(tmp_path / "strict", *args)
    assert code == EXIT_NO_MODEL
    relaxing = _relaxing(line)
    assert "--target stm32h747 arena (512 KiB, largest RAM block)" in relaxing
    assert "--target stm32h747 RAM" not in relaxing


def test_runs_without_an_arena_never_fit_and_the_message_says_why(board, tmp_path):
    parent = board.store.sweep()  # a sweep of dynamic-range runs only: TFLM runs none
    for i in range(2):
        run_id = board.store.run(parent, sparsity=i / 2, mode="dynamic", accuracy=0.9)
        board.store.client.set_tag(run_id, "fallopt.tflm", HYBRID)
    code, line = board.report(tmp_path, "--target", "nano33ble", parent=parent)
    assert code == EXIT_NO_MODEL
    assert "No run meets all constraints" in line
    assert "2 of 2 runs cannot be judged against nano33ble and never fit" in line
    assert "Hybrid models are not supported on TFLite Micro" in line


def test_an_unknown_target_is_one_line_naming_the_boards(board, caplog):
    assert board.store.main("--target", "arduino-uno") == 2
    line = _one_error(caplog)
    assert "arduino-uno" in line and all(name in line for name in boards.names())


def test_a_ram_reserve_for_the_application_moves_the_choice(board, tmp_path, caplog):
    # C's 120 KiB arena + 150 KiB reserved > 256 KiB; D's 60 KiB + 150 still fits.
    code, line = board.report(tmp_path / "r", "--target", "nano33ble", "--ram-reserved-kb", "150")
    assert code == 0 and f"(run {board.ids['D']})" in line
    assert "RAM 210 KiB of 256 KiB" in line and "150 KiB reserved" in line
    assert board.store.main("--target", "nano33ble", "--ram-reserved-kb", "300") == 2
    assert "must be below target.ram_bytes=262144" in _one_error(caplog)
    caplog.clear()
    assert board.store.main("--ram-reserved-kb", "10") == 2
    assert "--ram-reserved-kb needs a board" in _one_error(caplog)
