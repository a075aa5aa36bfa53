"""`uda-ray report`: one self-contained HTML page about a sweep, a run or a pipeline.

Everything comes from the Parquet results tables (and, for the qualitative panel, the best checkpoint and
the target test images named in its config). Plots are matplotlib figures embedded as PNG data URIs; the
trial table is sorted by a few lines of inline JavaScript. The page loads nothing from the network.

Sections (each says why when it has nothing to show):
    learning curves of every trial for the objective and every other validator, early stops marked
    parameter vs objective (one scatter per searched parameter)
    parameter importance (Optuna's PED-ANOVA evaluator over the finished trials; Watanabe et al.,
        "PED-ANOVA: Efficiently Quantifying Hyperparameter Importance in Arbitrary Subspaces", IJCAI 2023)
    the Pareto front of a multi-objective sweep
    per-class IoU of the top trials (heatmap)
    test metric vs selection metric, one point per trial at its selected step
    predictions of the best checkpoint on a few target test images, in the Cityscapes palette
    the trial table (click a header to sort)

This module assembles the page; what it shows is computed in uda_ray.results.report_data and drawn in
uda_ray.results.figures.
"""

from __future__ import annotations

import html
import time
from pathlib import Path
from typing import Any

from uda_ray.errors import UserError
from uda_ray.results import figures
from uda_ray.results.report_data import (
    ReportData,
    baseline_gain,
    param_kinds,
    pareto_points,
    selected_rows,
    test_metric,
    trial_params,
)
from uda_ray.results.stats import finite
from uda_ray.results.tables import read_table
from uda_ray.results.text import baseline_line, fmt
from uda_ray.storage import layout, store
from uda_ray.target_labels import MARK, SHORT_MARK, row_marked

# ------------------------------------------------------------------------------------------------
# inputs


def load(kind: str, folder: Path) -> ReportData:
    import yaml

    folder = Path(folder)
    if kind == "pipeline":
        trials, evals, ious = [], [], []
        stages = sorted(layout.stages_with_evals(folder), key=lambda d: d.stat().st_mtime)
        for d in stages:  # one pseudo-trial per stage, named after it
            for t in read_table(layout.results_dir(d), "trials"):
                trials.append({**t, "trial_id": d.name})
            evals += [{**e, "trial_id": d.name} for e in read_table(layout.results_dir(d), "evals")]
            ious += [{**r, "trial_id": d.name} for r in read_table(layout.results_dir(d), "class_iou")]
    else:
        res = layout.results_dir(folder)
        trials, evals, ious = (read_table(res, t) for t in ("trials", "evals", "class_iou"))
    meta, space = {}, {}
    if kind == "sweep":
        meta = layout.read_meta(folder)
        if (folder / "space.yaml").is_file():
            space = (yaml.safe_load((folder / "space.yaml").read_text()) or {}).get("params") or {}
    objectives = meta.get("objective") or []
    if not objectives and trials:
        objectives = [{"metric": trials[0]["objective"], "mode": trials[0]["mode"]}]
    if not objectives:
        raise UserError(f"{folder}: no results yet")
    return ReportData(kind, folder.name, folder, trials, evals, ious, objectives, meta, space)


# ------------------------------------------------------------------------------------------------
# table + page


def table_rows(data: ReportData) -> tuple[list[str], list[list[Any]]]:
    sel = selected_rows(data)
    test = test_metric(data)
    pnames = list(param_kinds(data))
    cols = ["trial", "status", "method", "model", f"best {data.metric}", "best step", "final step"]
    cols += [f"{test} @ best"] if test and test != data.metric else []
    cols += [o["metric"] for o in data.objectives[1:]] + ["GFLOPs", "wall s", SHORT_MARK] + pnames
    rows = []
    for t in data.trials:
        r = sel.get(t["trial_id"], {})
        p = trial_params(t)
        row = [t["trial_id"], t.get("status"), t.get("method"), t.get("model"), r.get(data.metric),
               r.get("step"), t.get("final_step")]
        row += [r.get(test)] if test and test != data.metric else []
        row += [r.get(o["metric"]) for o in data.objectives[1:]]
        row += [t.get("model_gflops"), t.get("wall_time_s"), "yes" if row_marked(t) else "no"]
        row += [p.get(k) for k in pnames]
        rows.append(row)
    return cols, rows


def _cell(v: Any) -> str:
    if v is None or (isinstance(v, float) and not finite(v)):
        return '<td data-v="">-</td>'
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return f'<td data-v="{html.escape(str(v))}">{html.escape(str(v))}</td>'
    return f'<td data-v="{v!r}" class="num">{fmt(v)}</td>'


SORT_JS = """
document.querySelectorAll('table.sortable').forEach(function (table) {
  table.querySelectorAll('th').forEach(function (th, col) {
    th.addEventListener('click', function () {
      var body = table.tBodies[0];
      var rows = Array.prototype.slice.call(body.rows);
      var asc = th.getAttribute('data-order') !== 'asc';
      table.querySelectorAll('th').forEach(function (h) { h.removeAttribute('data-order'); });
      th.setAttribute('data-order', asc ? 'asc' : 'desc');
      rows.sort(function (a, b) {
        var x = a.cells[col].getAttribute('data-v'), y = b.cells[col].getAttribute('data-v');
        if (x === '' && y === '') return 0;
        if (x === '') return 1;
        if (y === '') return -1;
        var nx = parseFloat(x), ny = parseFloat(y);
        var c = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : x.localeCompare(y);
        return asc ? c : -c;
      });
      rows.forEach(function (r) { body.appendChild(r); });
    });
  });
});
"""


CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1400px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.15em; margin-top: 1.6em; border-bottom: 1px solid #ddd; }
p.note { color: #555; font-size: 0.9em; }
p.gt { background: #fde8e8; border: 1px solid #c33; padding: 4px 8px; } img.plot { max-width: 100%; }
table { border-collapse: collapse; font-size: 0.82em; } td, th { border: 1px solid #ccc; padding: 2px 6px; }
th { background: #f2f2f2; cursor: pointer; user-select: none; } td.num { text-align: right; }
th[data-order=asc]::after { content: " \\25B2"; } th[data-order=desc]::after { content: " \\25BC"; }
"""


def _section(title: str, img: str | None, note: str = "", sid: str = "") -> str:
    body = f'<img class="plot" id="{sid}" alt="{html.escape(title)}" src="{img}">' if img else ""
    return (f'<section id="sec-{sid}"><h2>{html.escape(title)}</h2>'
            + (f'<p class="note">{html.escape(note)}</p>' if note else "") + body + "</section>")


def render(data: ReportData, predictions: bool = True) -> str:
    """The whole page: a header, the sections (each says why when it has nothing to show), the trial table."""
    parts = [_header(data), _curves_section(data)]
    if data.kind == "sweep":
        parts += _sweep_sections(data)
    hm = figures.fig_class_iou(data)
    parts.append(_section("Per-class IoU of the top trials", hm,
                          f"At each trial's best step by {data.metric}." if hm else "no per-class IoU reported",
                          "classiou"))
    tv, why = figures.fig_test_vs_selection(data)
    parts.append(_section("Test vs selection metric", tv, why, "testsel"))
    if predictions:
        try:
            pr, why = figures.fig_predictions(data)
        except Exception as e:  # noqa: BLE001 - a report without this panel is still useful
            pr, why = None, f"could not run the best checkpoint: {type(e).__name__}: {e}"
        parts.append(_section("Predictions of the best checkpoint", pr, why, "predictions"))
    parts.append(_trials_table(data))
    return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            f"<title>uda-ray report: {html.escape(data.name)}</title><link rel='icon' href='data:,'>"
            f"<style>{CSS}</style></head><body>{''.join(parts)}<script>{SORT_JS}</script></body></html>")


def _header(data: ReportData) -> str:
    counts = {s: sum(t.get("status") == s for t in data.trials) for s in ("completed", "stopped_early",
                                                                          "errored", "running")}
    objs = ", ".join(f"{o['metric']} ({o['mode']})" for o in data.objectives)
    out = (f"<h1>{data.kind.capitalize()} {html.escape(data.name)}</h1>"
           f'<p class="note">{len(data.trials)} trial(s): ' + ", ".join(f"{v} {k.replace('_', ' ')}"
                                                                      for k, v in counts.items() if v)
           + f"; objective {html.escape(objs)}; folder {html.escape(str(data.folder))}; generated "
           + time.strftime("%Y-%m-%d %H:%M:%S", time.localtime()) + "</p>")
    gain = baseline_gain(data) if data.kind == "sweep" else None
    if gain:
        out += f'<p class="note" id="baseline"><strong>Baseline</strong>: {html.escape(baseline_line(gain))}</p>'
    marked = [t["trial_id"] for t in data.trials if row_marked(t)]
    if marked:
        out += (f'<p class="gt" id="target-gt"><strong>{MARK}</strong>: {len(marked)} of {len(data.trials)} '
                f"trial(s) ({html.escape(', '.join(marked[:20]))}{', ...' if len(marked) > 20 else ''}) saw the "
                "target's labels in training (an oracle, or a run started from one): not UDA results.</p>")
    return out


def _curves_section(data: ReportData) -> str:
    curves = figures.fig_curves(data)
    return _section("Learning curves", curves,
                    "Every trial's evaluations vs step. A red x marks the last evaluation of a trial the "
                    "scheduler stopped early; an open square, one that errored." if curves
                    else "no evaluations yet", "curves")


def _sweep_sections(data: ReportData) -> list[str]:
    """Parameters vs objective, parameter importance, and the Pareto front of a multi-objective sweep."""
    pv = figures.fig_params(data)
    out = [_section("Parameters vs objective", pv,
                    f"Each trial's best {data.metric} against each searched parameter."
                    if pv else "no scored trials or no searched parameters", "params")]
    imp, why = figures.importance(data)
    out.append(_section("Parameter importance", figures.fig_importance(imp) if imp else None, why, "importance"))
    if len(data.objectives) > 1:
        pf = figures.fig_pareto(data)
        front = [tid for tid, _, f, _ in pareto_points(data) if f]
        out.append(_section("Pareto front", pf, (f"{len(front)} non-dominated of the completed trials "
                                                 f"(values at their last evaluation): {', '.join(front)}")
                            if pf else "no completed trial has every objective yet", "pareto"))
    return out


def _trials_table(data: ReportData) -> str:
    cols, rows = table_rows(data)
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(_cell(v) for v in r) + "</tr>" for r in rows)
    return ('<section id="sec-table"><h2>Trials</h2><p class="note">Click a column header to sort.</p>'
            f'<table class="sortable" id="trials"><thead><tr>{head}</tr></thead><tbody>{body}</tbody>'
            "</table></section>")


def write_report(kind: str, folder: Path, out: Path, predictions: bool = True) -> Path:
    import os

    page = render(load(kind, folder), predictions=predictions)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, out)
    store.push(out)  # under a storage URI's staging folder: into the store
    return out
