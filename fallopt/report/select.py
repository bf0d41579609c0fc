"""Pick the model for the device: the most accurate run within the user's budgets."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd


@dataclass(frozen=True)
class Constraints:
    """Budgets from the command line; None means no limit."""

    max_size_kb: float | None = None
    min_fall_recall: float | None = None
    max_latency_ms: float | None = None

    def checks(self) -> dict[str, tuple[str, str, float]]:
        """Active constraints: name -> (table column, 'max' or 'min', limit)."""
        found = {
            "--max-size-kb": ("size_kb", "max", self.max_size_kb),
            "--min-fall-recall": ("fall_recall", "min", self.min_fall_recall),
            "--max-latency-ms": ("latency_ms", "max", self.max_latency_ms),
        }
        return {name: (col, kind, limit) for name, (col, kind, limit) in found.items()
                if limit is not None}  # fmt: skip

    def describe(self) -> str:
        """`--max-size-kb 300, --min-fall-recall 0.9`, or `none`."""
        return (
            ", ".join(f"{name} {limit:g}" for name, (_, _, limit) in self.checks().items())
            or "none"
        )


def _meets(table: pd.DataFrame, column: str, kind: str, limit: float) -> pd.Series:
    values = table[column]
    return values <= limit if kind == "max" else values >= limit  # NaN never meets a limit


@dataclass(frozen=True)
class Recommendation:
    """The chosen run (None if no run meets the constraints) and why, in one paragraph."""

    run_id: str | None
    message: str


def recommend(table: pd.DataFrame, constraints: Constraints) -> Recommendation:
    """The most accurate run (then the smallest) that meets every constraint.

    A run that recognises one class only (column `one_class`) is passed over for any run
    that meets the constraints and does not; when only such runs do, the message opens
    with a warning. When no run meets the constraints, the message says how many runs
    meet each constraint alone and which constraints bind: those whose removal alone would
    let a run through.
    """
    checks = constraints.checks()
    ok = pd.Series(True, index=table.index)
    for column, kind, limit in checks.values():
        ok &= _meets(table, column, kind, limit)
    feasible = table[ok & table["test_accuracy"].notna()]
    if not feasible.empty:
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
        return Recommendation(
            best["run_id"],
            f"{warning}Recommended: {best['label']} (run {best['run_id']}): test accuracy "
            f"{best['test_accuracy']:.3f}, fall recall {best['fall_recall']:.3f}, "
            f"{best['size_kb']:.1f} KiB gzipped, {best['latency_ms']:.2f} ms per image; "
            f"the most accurate of {among}.",
        )
    alone = {name: int(_meets(table, *check).sum()) for name, check in checks.items()}
    binding = []
    for name in checks:
        rest = pd.Series(True, index=table.index)
        for other, check in checks.items():
            if other != name:
                rest &= _meets(table, *check)
        if rest.any():
            binding.append(name)
    counts = "; ".join(f"{name} {checks[name][2]:g}: {n} of {len(table)} runs" for name, n in
                       alone.items())  # fmt: skip
    why = (
        f"relaxing {' or '.join(binding)} would admit a run"
        if binding
        else "no single constraint's removal would admit a run; relax several"
    )
    return Recommendation(None, f"No run meets all constraints ({counts}): {why}.")
