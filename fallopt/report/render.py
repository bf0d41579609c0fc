"""The report as a self-contained HTML page (images inlined, sortable table) and Markdown."""

from __future__ import annotations

import base64
import html
from typing import TYPE_CHECKING

import pandas as pd

from fallopt.report.runs import one_line

if TYPE_CHECKING:
    from fallopt.report.build import Report

# Table column -> (header, format). Sizes and ratios are the .tflite file's.
COLUMNS: dict[str, tuple[str, str]] = {
    "label": ("model · pruning · quantization", "{}"),
    "test_accuracy": ("test accuracy", "{:.3f}"),
    "fall_recall": ("fall recall", "{:.3f}"),
    "false_alarm_rate": ("false-alarm rate", "{:.3f}"),
    "size_kb": ("gzipped .tflite (KiB)", "{:.1f}"),
    "compression": ("smaller than float32 baseline (×)", "{:.2f}"),
    "latency_ms": ("latency (ms/image)", "{:.2f}"),
    "arena_kb": ("TFLM arena (KiB)", "{:.1f}"),
    "flash_kb": ("flash: .tflite + TFLM runtime (KiB)", "{:.1f}"),
    "macs_m": ("MACs (millions)", "{:.2f}"),
    "disagreement": ("Keras vs TFLite disagreement", "{:.1%}"),
    "one_class": ("recognises one class only (recall 0 for the others)", "{}"),
    "pareto_size": ("Pareto (size)", "{}"),
    "pareto_latency": ("Pareto (latency)", "{}"),
    "run_id": ("MLflow run", "{}"),
}

_SORT_JS = """
document.querySelectorAll('#runs th').forEach((th, col) => th.addEventListener('click', () => {
  const body = th.closest('table').tBodies[0];
  const asc = th.dataset.asc !== 'true'; th.dataset.asc = asc;
  const key = r => { const v = r.cells[col].dataset.v; const n = parseFloat(v);
                     return isNaN(n) ? v : n; };
  [...body.rows].sort((a, b) => (key(a) > key(b) ? 1 : key(a) < key(b) ? -1 : 0) * (asc ? 1 : -1))
    .forEach(r => body.appendChild(r));
}));
"""
_CSS = """
body { font-family: sans-serif; margin: 2em; max-width: 1400px; }
table { border-collapse: collapse; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: right; }
th { cursor: pointer; background: #f3f3f3; } td:first-child { text-align: left; }
tr.pareto { background: #eaf2fb; } .rec { background: #e8f5e9; padding: 1em; }
img { max-width: 100%; } .figs { display: grid; grid-template-columns: 1fr 1fr; gap: 1em; }
"""


def columns(report: Report) -> dict[str, tuple[str, str]]:
    """COLUMNS, and with a board the verdict on each run after its MACs."""
    target = report.constraints.target
    if target is None:
        return COLUMNS
    found = {}
    for column, spec in COLUMNS.items():
        found[column] = spec
        if column == "macs_m":
            found["fit"] = (f"fits {target.name}", "{}")
    return found


def _cell(fmt: str, value: object) -> str:
    if isinstance(value, float) and pd.isna(value):
        return "–"
    if isinstance(value, bool):
        return "yes" if value else ""
    return fmt.format(value)


def _img(path: object, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()  # type: ignore[attr-defined]
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def run_counts(report: Report) -> str:
    """`6 finished; 3 failed`: every run the report was asked about, not only those shown."""
    failed = f"; {len(report.failures)} failed" if report.failures else ""
    return f"{len(report.table)} finished{failed}"


def _runs_heading(report: Report) -> str:
    return run_counts(report) + (", listed below" if report.failures else "")


def _failed_html(report: Report) -> str:
    if not report.failures:
        return ""
    rows = "".join(
        f"<tr><td>{html.escape(f.what)}</td><td>{html.escape(one_line(f.error))}</td>"
        f"<td>{html.escape(f.run_id or '–')}</td></tr>"
        for f in report.failures
    )
    return (
        f'<h2>Failed ({len(report.failures)}): not in the table above</h2>\n<table id="failed">'
        f"<thead><tr><th>combination</th><th>error</th><th>MLflow run</th></tr></thead>"
        f"<tbody>{rows}</tbody></table>"
    )


def write_html(report: Report, title: str) -> None:
    """One file with everything inlined: it opens offline and can be mailed."""
    shown = columns(report)
    head = "".join(f"<th>{html.escape(h)}</th>" for h, _ in shown.values())
    rows = []
    for _, row in report.table.iterrows():
        cells = "".join(
            f'<td data-v="{html.escape(str(row[c]))}">{html.escape(_cell(fmt, row[c]))}</td>'
            for c, (_, fmt) in shown.items()
        )
        rows.append(f'<tr class="{"pareto" if row["pareto_size"] else ""}">{cells}</tr>')
    f = report.figures
    constraints = html.escape(report.constraints.describe())
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title><style>{_CSS}</style></head>
<body><h1>{html.escape(title)}</h1>
<div class="rec" id="recommendation"><b>Constraints:</b> {constraints}
<p>{html.escape(report.recommendation.message)}</p></div>
<h2>Pareto fronts</h2><div class="figs" id="pareto">
{_img(f["pareto_size"], "Pareto front: accuracy against gzipped size")}
{_img(f["pareto_latency"], "Pareto front: accuracy against latency")}</div>
<h2>Does it fit the board? TFLM arena RAM</h2>
{_img(f["accuracy_vs_arena"], "accuracy against TFLM arena")}
<h2>Against sparsity, per quantization mode</h2><div class="figs">
{_img(f["accuracy_vs_sparsity"], "accuracy against sparsity")}
{_img(f["size_vs_sparsity"], "size against sparsity")}</div>
<h2>Confusion matrices of the Pareto-optimal runs (accuracy vs size)</h2>
{_img(f["confusion"], "confusion matrices")}
<h2>All runs ({_runs_heading(report)}; click a header to sort)</h2>
<table id="runs"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>
{_failed_html(report)}
<p>Accuracy, recall, sizes and latency are those of each run's .tflite file as evaluated by
LiteRT on the test set; latency is on the host CPU, not the device. The arena is TFLM's
minimal tensor arena for the file (reference kernels); flash adds an estimate of TFLM's
runtime code.</p>
<script>{_SORT_JS}</script></body></html>
"""
    report.html.write_text(page)


def _md(text: str) -> str:
    return one_line(text).replace("|", "\\|")


def write_markdown(report: Report, title: str) -> None:
    """A summary for a pull request or a lab report: recommendation, table, figure files."""
    shown = columns(report)
    lines = [f"# {title}", "", f"Constraints: {report.constraints.describe()}", "",
             report.recommendation.message, "", f"All runs ({_runs_heading(report)}):", "",
             "| " + " | ".join(h for h, _ in shown.values()) + " |",
             "|" + "---|" * len(shown)]  # fmt: skip
    for _, row in report.table.iterrows():
        lines.append("| " + " | ".join(_md(_cell(fmt, row[c])) for c, (_, fmt) in shown.items())
                     + " |")  # fmt: skip
    if report.failures:
        lines += ["", f"Failed ({len(report.failures)}): not in the table above", "",
                  "| combination | error | MLflow run |", "|---|---|---|"]  # fmt: skip
        lines += [
            f"| {_md(f.what)} | {_md(f.error)} | {f.run_id or '–'} |" for f in report.failures
        ]
    lines += ["", *[f"![{name}]({path.name})" for name, path in report.figures.items()], ""]
    report.markdown.write_text("\n".join(lines))
