"""Pick the model for the device: the most accurate run within the user's budgets.

The budgets are the command line's (`--max-size-kb` ...) and, with `--target`, the board's
RAM, largest RAM block and flash, judged from each run's own TFLM arena and `.tflite` size
(not from its `fallopt.fits` tag: the run may have been made for another board).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd

from fallopt import target as boards
from fallopt.config import KIB, TargetConfig

NO_FIGURES = "no TFLM figures logged (a run from before fallopt measured them)"


@dataclass(frozen=True)
class Check:
    """One budget: the table's `column` must be at most (`max`) or at least `limit`."""

    name: str  # what to relax: "--max-size-kb", "--target nano33ble RAM (256 KiB)"
    text: str  # with its limit: "--max-size-kb 300", "--target nano33ble RAM (256 KiB)"
    column: str
    kind: str
    limit: float

    def meets(self, table: pd.DataFrame) -> pd.Series:
        """Which runs are within the budget; NaN never is."""
        values = table[self.column]
        return values <= self.limit if self.kind == "max" else values >= self.limit


@dataclass(frozen=True)
class Constraints:
    """Budgets from the command line; None means no limit, and no board."""

    max_size_kb: float | None = None
    min_fall_recall: float | None = None
    max_latency_ms: float | None = None
    target: TargetConfig | None = None

    def checks(self) -> list[Check]:
        """The active budgets, the board's last."""
        flags = (
            ("--max-size-kb", "size_kb", "max", self.max_size_kb),
            ("--min-fall-recall", "fall_recall", "min", self.min_fall_recall),
            ("--max-latency-ms", "latency_ms", "max", self.max_latency_ms),
        )
        found = [Check(flag, f"{flag} {limit:g}", column, kind, limit)
                 for flag, column, kind, limit in flags if limit is not None]  # fmt: skip
        return found + self.board_checks()

    def board_checks(self) -> list[Check]:
        """The board's budgets, named as `target.verdict` names them (arena, RAM, flash)."""
        t = self.target
        if t is None:
            return []
        reserved = f"{boards.kib(t.ram_reserved_bytes)} reserved" if t.ram_reserved_bytes else ""
        budgets = (
            ("arena", "tflm_arena_bytes", t.arena_max_bytes, "largest RAM block"),
            ("RAM", "ram_needed", t.ram_bytes, reserved),
            ("flash", "flash_needed", t.flash_bytes, ""),
        )
        found = []
        for what, column, limit, note in budgets:
            if limit is not None:
                text = f"--target {t.name} {what} ({boards.kib(limit)}{note and ', ' + note})"
                found.append(Check(text, text, column, "max", limit))
        return found

    def describe(self) -> str:
        """`--max-size-kb 300, --target nano33ble RAM (256 KiB), ...`, or `none`."""
        texts = [check.text for check in self.checks()]
        if self.target is not None and not self.board_checks():
            texts.append(f"--target {self.target.name} (no budget: a run with a TFLM arena fits)")
        return ", ".join(texts) or "none"


def arena_budget(target: TargetConfig) -> int | None:
    """The largest arena the board takes: its RAM less the reserve, or its largest block."""
    limits = [target.arena_max_bytes]
    if target.ram_bytes is not None:
        limits.append(target.ram_bytes - target.ram_reserved_bytes)
    return min((limit for limit in limits if limit is not None), default=None)


def _why_unknown(tflm_tag: str) -> str:
    # The run's tag reads "skipped: <why>"; its fallopt.fits verdict has the bare reason.
    return tflm_tag.removeprefix("skipped: ") or NO_FIGURES


def _fit(arena: float, flash: float, tflm_tag: str, target: TargetConfig) -> boards.Fit:
    if math.isnan(flash):  # no .tflite size logged
        return boards.Fit(None, f"unknown: {NO_FIGURES}")
    measured = None if math.isnan(arena) else int(arena)
    why = _why_unknown(tflm_tag)
    refused = why if why.startswith(boards.TFLM_REFUSED) else None
    return boards.verdict(measured, int(flash), target, why, refused)


def judge(table: pd.DataFrame, target: TargetConfig | None) -> None:
    """Add what a board's budgets check, in place, when there is a board.

    Columns `ram_needed` (arena + reserve), `flash_needed` (`.tflite` + TFLM runtime, also
    as `flash_kb`), `fit` (`target.verdict`'s text, as a run's `fallopt.fits` tag reads) and
    `fits` (True, False, or None when no arena was measured).
    """
    if target is None:
        return
    table["ram_needed"] = boards.ram_needed(table["tflm_arena_bytes"], target)
    table["flash_needed"] = boards.flash_needed(table["tflite_size_bytes"], target)
    table["flash_kb"] = table["flash_needed"] / KIB
    fits = [
        _fit(arena, flash, tag, target)
        for arena, flash, tag in zip(
            table["tflm_arena_bytes"], table["flash_needed"], table["tflm"], strict=True
        )
    ]
    table["fit"] = [f.text for f in fits]
    table["fits"] = pd.Series([f.fits for f in fits], index=table.index, dtype=object)


def _usage(row: pd.Series, target: TargetConfig) -> str:
    """`on nano33ble: arena 120 KiB, RAM 120 KiB of 256 KiB, flash 300 KiB of 1,024 KiB`."""

    def of(figure: str, value: float, limit: int | None, where: str = "") -> str:
        budget = f" of {boards.kib(limit)}{where}" if limit is not None else ""
        return f"{figure} {boards.kib(value)}{budget}"

    parts = [
        of("arena", row["tflm_arena_bytes"], target.arena_max_bytes, " largest RAM block"),
        of("RAM", row["ram_needed"], target.ram_bytes),
        of("flash", row["flash_needed"], target.flash_bytes),
    ]
    return f"on {target.name}: {', '.join(parts)}"


def _measured(table: pd.DataFrame) -> pd.Series:
    """Runs with the figures a board is judged on (`judge`'s columns)."""
    return table["tflm_arena_bytes"].notna() & table["flash_needed"].notna()


def _nothing_fits(
    table: pd.DataFrame, checks: list[Check], judged: pd.Series, target: TargetConfig | None
) -> str:
    """How many runs meet each budget alone, which budgets bind, and which runs cannot fit."""
    counts = "; ".join(f"{check.text}: {int(check.meets(table).sum())} of {len(table)} runs"
                       for check in checks)  # fmt: skip
    binding = []
    for check in checks:
        rest = judged.copy()
        for other in checks:
            if other is not check:
                rest &= other.meets(table)
        if rest.any():
            binding.append(check.name)
    unjudged = ""
    if target is not None:
        missing = table[~_measured(table)]
        if not missing.empty:
            first = missing.iloc[0]
            unjudged = (
                f"{len(missing)} of {len(table)} runs cannot be judged against {target.name} "
                f"and never fit (e.g. {first['label']}: {_why_unknown(first['tflm'])})"
            )
    if not judged.any():
        why, unjudged = unjudged or "no run has a test accuracy", ""
    elif binding:
        why = f"relaxing {' or '.join(binding)} would admit a run"
    else:
        why = "no single constraint's removal would admit a run; relax several"
    counts = f" ({counts})" if counts else ""
    return f"No run meets all constraints{counts}: {why}." + (f" {unjudged}." if unjudged else "")


@dataclass(frozen=True)
class Recommendation:
    """The chosen run (None if no run meets the constraints) and why, in one paragraph."""

    run_id: str | None
    message: str


def recommend(table: pd.DataFrame, constraints: Constraints) -> Recommendation:
    """The most accurate run (then the smallest) that meets every constraint.

    With a board (`judge` added its columns), a run without a TFLM arena or `.tflite` size
    never fits. A run that recognises one class only (column `one_class`) is passed over
    for any run that meets the constraints and does not; when only such runs do, the
    message opens with a warning. When no run meets the constraints, the message says how
    many runs meet each constraint alone and which constraints bind: those whose removal
    alone would let a run through.
    """
    checks = constraints.checks()
    target = constraints.target
    judged = table["test_accuracy"].notna()
    if target is not None:
        judged &= _measured(table)
    ok = judged.copy()
    for check in checks:
        ok &= check.meets(table)
    feasible = table[ok]
    if feasible.empty:
        return Recommendation(None, _nothing_fits(table, checks, judged, target))
    one_class = (
        feasible["one_class"].fillna("") != ""
        if "one_class" in feasible
        else pd.Series(False, index=feasible.index)
    )
    ranked = feasible.sort_values(["test_accuracy", "size_kb"], ascending=[False, True])
    useful = ranked[~one_class.loc[ranked.index]]
    best = (useful if not useful.empty else ranked).iloc[0]
    passed_over = ranked.index.get_loc(best.name)  # all ranked above it recognise one class
    among = f"{len(feasible)} of {len(table)} runs meeting constraints: "
    among += constraints.describe()
    if useful.empty:
        warning = (
            "WARNING: every run meeting the constraints recognises one class only (recall "
            f"0 for every other class); this one recognises only {best['one_class']}. "
        )
    else:
        warning = ""
        if passed_over:
            among = (
                f"{len(useful)} runs that recognise more than one class among the {among} "
                f"({passed_over} more accurate run(s) recognise one class only)"
            )
    board = f"; {_usage(best, target)}" if target is not None else ""
    return Recommendation(
        best["run_id"],
        f"{warning}Recommended: {best['label']} (run {best['run_id']}): test accuracy "
        f"{best['test_accuracy']:.3f}, fall recall {best['fall_recall']:.3f}, "
        f"{best['size_kb']:.1f} KiB gzipped, {best['latency_ms']:.2f} ms per image{board}; "
        f"the most accurate of {among}.",
    )
