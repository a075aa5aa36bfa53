"""The markdown tables of runs that a pipeline writes beside its stages (`pipeline --report`): one seed, or the
mean ± std of each stage over several seeds (`pipeline --seeds N --report`)."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from uda_ray.metric_names import DEFAULT_SELECTION, mode_of
from uda_ray.results.stats import finite
from uda_ray.results.tables import read_table
from uda_ray.results.text import points
from uda_ray.storage import layout
from uda_ray.target_labels import MARK, SHORT_MARK, row_marked


def markdown_report(title: str, run_dirs: list[tuple[str, Path]], note: str = "", selection: str | None = None) -> str:
    """A markdown table of runs (label, folder holding results/) built from their Parquet tables: the test
    mIoU (in %) of the checkpoint `selection` picks (default: metric_names.DEFAULT_SELECTION; a label-free
    validator) beside the test-label oracle's (the best test mIoU of the run), the final test mIoU, pixel
    accuracy, model cost, and per-class IoU at the oracle's step. A line under the table names the label protocol
    of the numbers (data.label_set: cityscapes19, or synthia16 where every mIoU is the 16-class model's)."""
    selection = selection or DEFAULT_SELECTION
    pick = max if mode_of(selection) == "max" else min
    lines = [f"# {title}", "", note, ""] if note else [f"# {title}", ""]
    lines += [f"| run | method | model | steps | selected by {selection}: test mIoU (step) | "
              "oracle: best test mIoU (step) | final mIoU | pixel acc | GFLOPs |",
              "|---|---|---|---|---|---|---|---|---|"]
    runs = [r for label, d in run_dirs if (r := _run(label, layout.results_dir(d), selection, pick)) is not None]
    lines += [r["line"] for r in runs]
    return "\n".join(lines + _below(runs, "Per-class IoU (%) at each run's best test step")) + "\n"


def _below(runs: list[dict], per_class: str) -> list[str]:
    """The lines under a table of runs: the label protocol of its numbers, the runs trained on target ground
    truth, and the per-class IoU table (titled `per_class`)."""
    lines: list[str] = []
    protocols = {r["label"]: r["protocol"] for r in runs}  # run label -> data.label_set
    if protocols:
        kinds = sorted(set(protocols.values()))
        lines += ["", f"Label protocol (data.label_set): {kinds[0]} for every run." if len(kinds) == 1 else
                  "Label protocol (data.label_set): " + ", ".join(f"{k}: {v}" for k, v in protocols.items()) + "."]
    marked = [r["label"] for r in runs if r["marked"]]  # runs trained on target ground truth
    if marked:
        lines += ["", f"{MARK} ({SHORT_MARK}): {', '.join(marked)}. Oracles or runs started from one, not UDA "
                  "results: they saw the target's labels in training."]
    if runs:
        lines += _per_class([(r["shown"], r["ious"]) for r in runs], per_class)
    return lines


def _run(label: str, results: Path, selection: str, pick: Callable) -> dict | None:
    """One run's table line, its per-class IoU at the oracle's step, its label protocol and whether it saw the
    target's labels; None when it has no trial or no evaluation with a test mIoU."""
    trials = read_table(results, "trials")
    if not trials:
        return None
    t = trials[0]
    evals = [e for e in read_table(results, "evals") if e.get("test/miou") is not None]
    if not evals:
        return None
    best = max(evals, key=lambda e: e["test/miou"])
    last = max(evals, key=lambda e: e["step"])
    scored = [e for e in evals if finite(e.get(selection))]
    chosen = pick(scored, key=lambda e: e[selection]) if scored else None
    sel = f"{points(chosen['test/miou'])} ({chosen['step']})" if chosen else "-"
    marked = row_marked(t)
    shown = f"{label} ({SHORT_MARK})" if marked else label
    line = (f"| {shown} | {t['method']} | {t['model']} | {last['step']} | {sel} | "
            f"{points(best['test/miou'])} ({best['step']}) | {points(last['test/miou'])} | "
            f"{points(last['test/pixel_acc'])} | {last.get('model/gflops') or float('nan'):.2f} |")
    ious = {r["class_name"]: r["iou"] for r in read_table(results, "class_iou") if r["step"] == best["step"]}
    return {"label": label, "shown": shown, "line": line, "ious": ious, "marked": marked,
            "protocol": t.get("config.data.label_set") or "cityscapes19",  # older tables: 19 classes
            "method": t["method"], "model": t["model"], "steps": last["step"],
            "selected": chosen["test/miou"] if chosen else None, "oracle": best["test/miou"],
            "final": last["test/miou"]}


def markdown_seeds_report(title: str, stages: list[tuple[str, list[Path]]], note: str = "",
                          selection: str | None = None, control: str | None = None) -> str:
    """`markdown_report` over seeds: per stage (label, its run folder at each seed), the mean ± sample std over
    the seeds of the test mIoU (in %) of the checkpoint `selection` picks, of the test-label oracle's and of the
    final one, each seed's values beside them (in the order given), and the per-class IoU at each seed's oracle
    step averaged over the seeds. With `control` (a stage's label), one more column: each stage's selected test
    mIoU minus the control's at the same seed (paired), mean ± std and per seed. A stage with no evaluated run is
    left out; one with fewer runs says so."""
    selection = selection or DEFAULT_SELECTION
    pick = max if mode_of(selection) == "max" else min
    per_seed = {label: [_run(label, layout.results_dir(d), selection, pick) for d in dirs] for label, dirs in stages}
    base = [r["selected"] if r else None for r in per_seed.get(control, [])] if control else []
    lines = [f"# {title}", "", note, ""] if note else [f"# {title}", ""]
    vs = f" vs {control} (paired): selected, mean ± std (per seed) |" if control else ""
    lines += [f"| run | method | model | steps | seeds | selected by {selection}: test mIoU, mean ± std (per seed) | "
              f"oracle: best test mIoU, mean ± std (per seed) | final mIoU, mean ± std |{vs}",
              "|---|---|---|---|---|---|---|---|" + ("---|" if control else "")]
    shown_runs: list[dict] = []
    for label, seeds in per_seed.items():
        runs = [r for r in seeds if r is not None]
        if not runs:
            continue
        first = runs[0]
        line = (f"| {first['shown']} | {first['method']} | {first['model']} | {first['steps']} | {len(runs)} | "
                f"{_spread([r['selected'] for r in runs])} | {_spread([r['oracle'] for r in runs])} | "
                f"{_spread([r['final'] for r in runs], each=False)} |")
        if control:
            diffs = [r["selected"] - b if r and finite(r["selected"]) and finite(b) else None
                     for r, b in zip(seeds, base)]
            line += " - |" if label == control else f" {_spread(diffs, signed=True)} |"
        lines.append(line)
        classes = {c for r in runs for c in r["ious"]}
        ious = {c: statistics.fmean(v) for c in classes
                if (v := [r["ious"][c] for r in runs if finite(r["ious"].get(c))])}
        shown_runs.append({**first, "ious": ious})
    return "\n".join(lines + _below(shown_runs, "Per-class IoU (%) at each run's best test step, mean over its "
                                              "seeds")) + "\n"


def _spread(values: list, each: bool = True, signed: bool = False) -> str:
    """mean ± sample std in points, then each value ("-" for a missing one): 45.2 ± 0.8 (44.3 / 45.6 / 45.7);
    `signed`: differences, each with its sign (+6.1 ± 0.8 (+5.2 / +6.4 / +6.7))."""
    vals = [v for v in values if finite(v)]
    if not vals:
        return "-"
    num = _signed if signed else points
    std = f" ± {points(statistics.stdev(vals))}" if len(vals) > 1 else ""
    per = f" ({' / '.join(num(v) for v in values)})" if each and len(values) > 1 else ""
    return f"{num(statistics.fmean(vals))}{std}{per}"


def _signed(v: Any) -> str:
    """A difference in points with its sign: +6.1, -0.4; 0.0 (no sign) when it rounds to zero."""
    text = points(v)
    return text if text == "-" or float(text) < 0 else ("0.0" if float(text) == 0 else f"+{text}")


def _per_class(per_class: list[tuple[str, dict]], what: str) -> list[str]:
    from uda_ray.data.labels import CLASSES

    lines = ["", f"{what} (- = class absent from labels and predictions):",
             "", "| run | " + " | ".join(CLASSES) + " |", "|---|" + "---|" * len(CLASSES)]
    for label, ious in per_class:
        lines.append(f"| {label} | " + " | ".join(points(ious.get(c), digits=0) for c in CLASSES) + " |")
    return lines
