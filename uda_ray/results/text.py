"""Text for people: the tables and lines the command line prints (plain strings, so notebooks can use them)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from uda_ray.results.stats import finite
from uda_ray.storage import layout
from uda_ray.target_labels import MARK, row_marked

# Figures a model's own paper publishes, printed beside ours by `profile_report`. Ours count only convolutions,
# matmuls and attention (torch's FlopCounterMode), not element-wise ops (BN, activations, adds, pooling), so
# they come out somewhat lower for the same network.
PAPER_FIGURES: dict[str, dict] = {
    "enet": {
        "params": 0.37e6,
        "gflops": 3.83,
        "size": (360, 640),
        "source": "Paszke et al. 2016, ENet (arXiv:1606.02147), Table 3: FLOPs for a 3x640x360 input",
    },
}


def fmt(v: Any, digits: int = 4) -> str:
    """A float to `digits` significant digits, anything else as str: 0.012345 -> 0.01235."""
    return f"{v:.{digits}g}" if isinstance(v, float) else str(v)


def points(v: Any, digits: int = 1) -> str:
    """A fraction (an mIoU, an IoU, a pixel accuracy) in points, x100 to `digits` decimals: 0.4567 -> 45.7;
    "-" when it is not a finite number (uda_ray.results.stats.finite)."""
    return f"{100 * v:.{digits}f}" if finite(v) else "-"


def rho(v: Any) -> str:
    """A correlation to two decimals with its sign: +0.83; "-" when it is not a finite number (undefined)."""
    return f"{v:+.2f}" if finite(v) else "-"


def params_text(params_json: str | None, digits: int = 4) -> str:
    """A trial's searched parameters (the JSON of a `trials` row's `params`) as `name=value, ...`."""
    return ", ".join(f"{k}={fmt(v, digits)}" for k, v in json.loads(params_json or "{}").items())


def _params(r: dict) -> str:
    return params_text(r["params"])


def best_table(rows: list[dict], method: str | None = None) -> str:
    """`uda_ray.best` rows, best first, with test mIoU beside another ranking metric."""
    if not rows:
        return "no evaluated trials yet" + (f" for method {method}" if method else "")
    lines = [f"top {len(rows)} by {rows[0]['rank_metric']} ({rows[0]['rank_mode']}):"]
    for i, r in enumerate(rows, 1):
        test = "" if r["rank_metric"] == "test/miou" else (
            f"  test/miou={r['rank_test_miou']:.4f}" if r["rank_test_miou"] is not None else "  test/miou: absent")
        gt = f"  [{MARK}]" if row_marked(r) else ""
        lines.append(f"{i:>2}. {r['trial_id']}  {r['rank_metric']}={r['rank_value']:.4f} @ step {r['rank_step']}"
                     f"{test}  [{r['status']}]  {r['method']}  {_params(r)}{gt}")
        if not r.get("rank_checkpoint_kept", True):
            lines.append(f"    {not_kept_note(r)}")
    return "\n".join(lines)


def not_kept_note(r: dict) -> str:
    """For a `uda_ray.best` row whose best step lost its checkpoint: why, and the kept alternative."""
    why = (f"the checkpoint of step {r['rank_step']} was not kept (the run keeps its best by "
           f"{r.get('objective') or 'its selection metric'})")
    if r.get("kept_step") is None:
        return f"{why}; no checkpoint of this trial is left"
    test = f", test/miou={r['kept_test_miou']:.4f}" if r.get("kept_test_miou") is not None else ""
    return (f"{why}; best kept by {r['rank_metric']}: step {r['kept_step']} ({r['rank_metric']}="
            f"{r['kept_value']:.4f}{test}) {r['kept_checkpoint']}")


def pareto_table(objectives: list[dict], constraints: list[dict], rows: list[dict],
                 method: str | None = None) -> str:
    """The Pareto front among `uda_ray.pareto` rows, and the infeasible trials."""
    front = [r for r in rows if r["on_front"]]
    if not front:
        return ("no completed trial on a Pareto front yet" + (f" for method {method}" if method else "")
                + (f" ({sum(not r['feasible'] for r in rows)} completed but infeasible)" if rows else ""))
    names = ", ".join(f"{o['metric']} ({o['mode']})" for o in objectives)
    cons = "; constraints " + ", ".join(f"{c['metric']} {c['op']} {c['bound']:g}" for c in constraints) \
        if constraints else ""
    lines = [f"Pareto front: {len(front)} of {len(rows)} completed trials over {names}{cons}:"]
    for i, r in enumerate(front, 1):
        vals = "  ".join(f"{o['metric']}={v:.4g}" for o, v in zip(objectives, r["values"]))
        lines.append(f"{i:>2}. {r['trial_id']}  {vals}  @ step {r['step']}  {r['method']}/{r['model']}  {_params(r)}")
    bad = [r for r in rows if not r["feasible"]]
    if bad:
        lines.append("infeasible: " + ", ".join(f"{r['trial_id']} ({'; '.join(r['violated'])})" for r in bad))
    return "\n".join(lines)


def sweeps_table(sweeps: list[dict], root: Path) -> str:
    """`uda_ray.ls` rows (of the sweeps under storage `root`) as a table."""
    from uda_ray.training.progress import describe

    if not sweeps:
        return f"no sweeps under {root}"
    lines = [f"{'sweep':<32} {'status':<22} {'trials':>6} {'done':>5} {'early':>5} {'err':>4} {'best':>8}"]
    for s in sweeps:
        best = f"{s['best']:.4f}" if s["best"] is not None else "-"
        lines.append(f"{s['name']:<32} {s['status']:<22} {s['trials']:>6} {s['completed']:>5} "
                     f"{s['stopped_early']:>5} {s['errored']:>4} {best:>8}")
        for tid, p in (s.get("progress") or {}).items():  # each running trial's heartbeat, between evaluations
            lines.append(f"    {tid}: {describe(p)}")
    return "\n".join(lines)


def metrics_line(m: dict, select: str) -> str:
    """`select=v test/miou=v` — a test metric the run does not report is said to be absent."""
    return " ".join(f"{k}={m[k]:.4f}" if isinstance(m.get(k), float) else f"{k}: absent"
                    for k in dict.fromkeys((select, "test/miou")))


def leaderboard(board: dict) -> str:
    """`uda_ray.api.leaderboard`'s answer: the Pareto front or the best trials (and, in a sweep with a
    baseline, the winner's gain over it)."""
    if board["kind"] == "pareto":
        return pareto_table(board["objectives"], board["constraints"], board["rows"], board["method"])
    gain = board.get("baseline_gain")
    return best_table(board["rows"], board["method"]) + (f"\n{baseline_line(gain)}" if gain else "")


def baseline_line(g: dict) -> str:
    """One line on the winner against the sweep's baseline trial (uda_ray.results.queries.gain_over_baseline):
    `winner A vs baseline B: uv/im +0.0123, test/miou +2.1 points`."""
    b, m = g["baseline"], g.get("metric") or "the objective"
    if g["state"] == "no_evaluation":
        return f"baseline {b}: no evaluation of {m} yet, no gain to state"
    if g["state"] == "baseline_wins":
        test = f", test/miou={points(g['baseline_test'])}" if finite(g.get("baseline_test")) else ""
        return f"the baseline {b} wins: {m}={g['baseline_value']:.4f}{test}; no trial beat the base configuration"
    test = f", test/miou {g['test_gain']:+.1f} points" if g.get("test_gain") is not None else ""
    return f"winner {g['winner']} vs baseline {b}: {m} {g['gain']:+.4f}{test}"


def sweep_ended(s: Any, top: int = 5) -> str:
    """How long a finished (not interrupted) `uda_ray.api.Sweep` ran, its best trials, and its pick against
    choosing by the test labels (when it has them)."""
    started = s.meta.get("resumed") or s.meta["created"]
    lines = [f"sweep '{s.name}' {s.status.replace('_', ' ')} in {s.meta['finished'] - started:.0f}s"
             + (" (since the resume)" if s.meta.get("resumed") else ""), best_table(s.best(top=top))]
    gain = s.baseline_gain() if hasattr(s, "baseline_gain") else None
    if gain:
        lines.append(baseline_line(gain))
    oracle = s.vs_oracle()
    if oracle:
        lines.append(oracle)
    return "\n".join(lines)


def run_ended(m: dict) -> str:
    """`uda_ray.api.train`'s last metrics, its latest checkpoint and its results folder."""
    return (f"done: step {m.get('step')} " + metrics_line(m, m["select_metric"])
            + f"\nlatest checkpoint: {m['checkpoint_path']}\nresults: {layout.results_dir(m['run_dir'])}"
            + (f"\n{MARK}: an oracle, not a UDA result" if m.get("target_ground_truth") else ""))


def pipeline_ended(summary: list[dict], seconds: float, report: str | None = None) -> str:
    """How long `uda_ray.api.pipeline` took, then a line per stage: its kind and, once it ran, its selection
    metric; and the markdown `report` it wrote."""
    lines = [f"pipeline done in {seconds:.0f}s"]
    for row in summary:
        done = f" {metrics_line(row, row['select_metric'])} @ step {row['step']}" if row.get("step") else ""
        gt = f"  [{MARK}]" if row.get("target_ground_truth") else ""
        stage = f"{row['stage']} (seed {row['seed']})" if "seed" in row else row["stage"]
        lines.append(f"  {stage:<24} {row['kind']:<14}{done}{gt}")
    return "\n".join(lines + ([f"wrote {report}"] if report else []))


def converted_weights(s: dict) -> str:
    """`uda_ray.api.convert_weights`'s summary, with how to use the written file."""
    heads = ", ".join(f"{k} -> {v}" for k, v in s["classifiers"].items()) or "none"
    dropped = "".join(f"; dropped {k} ({v})" for k, v in s["dropped"].items())
    kwargs = ", ".join(f"model.kwargs.{k}: {str(v).lower() if isinstance(v, bool) else v}"
                       for k, v in s.get("kwargs", {"style": "caffe"}).items())
    return (f"wrote {s['written']}: {s['layout']}, {s['keys']} tensors; classifiers: {heads}{dropped}. "
            f"Use it with {kwargs} and model.pretrained: {s['written']}")


def rerun_ended(summary: list[dict], results: Path) -> str:
    """`uda_ray.api.rerun`'s mean ± std per configuration, and where its tables are (the sweep's `results`)."""
    return (f"{rerun_table(summary)}\n"
            f"tables: {results / 'reruns.parquet'}, {results / 'rerun_summary.parquet'}")


def _mean_std(mean: Any, std: Any, in_points: bool = True) -> str:
    if not finite(mean):
        return "-"
    if in_points:
        return f"{points(mean)} ± {points(std)}" if finite(std) else f"{points(mean)} (1 seed)"
    return f"{fmt(float(mean))} ± {fmt(float(std), 2)}" if finite(std) else f"{fmt(float(mean))} (1 seed)"


def rerun_table(summary: list[dict]) -> str:
    """A `rerun_summary` (uda_ray.selection.seed_variance.summarize) as text: mean ± sample std per
    configuration, mIoU in points (x100), a label-free selection metric in its own units."""
    if not summary:
        return "no reruns"
    s0 = summary[0]
    sel, test = s0["selection_metric"], s0["test_metric"]
    sel_points = sel.endswith("miou")
    lines = [f"mean ± sample std over seeds (mIoU in points); selected checkpoint = best {sel} of each run",
             f"{'#':>2} {'trial':<10} {'runs':>4} {sel + ' @sel':>18} {test + ' @sel':>18} {test + ' final':>18}"
             f" {'sweep trial: ' + test:>22}  params"]
    for s in summary:
        lines.append(f"{s['rank']:>2} {s['trial_id']:<10} {s['n_runs']:>4} "
                     f"{_mean_std(s['sel_value_mean'], s['sel_value_std'], sel_points):>18} "
                     f"{_mean_std(s['test_at_sel_mean'], s['test_at_sel_std']):>18} "
                     f"{_mean_std(s['final_test_mean'], s['final_test_std']):>18} "
                     f"{points(s['trial_test_at_sel']):>22}  {params_text(s['params'], 3)}")
    return "\n".join(lines)


def profile_report(result: dict) -> str:
    """A few lines for a `uda_ray.models.profile.profile` result, with the model paper's figures where it gives them."""
    h, w = result["size"]
    lines = [
        f"{result['name']} @ {h}x{w} on {result['device']}{' (amp)' if result['amp'] else ''}",
        f"  params   {result['params'] / 1e6:10.3f} M",
        f"  GFLOPs   {result['gflops']:10.2f}   (FlopCounterMode: multiply-add = 2 FLOPs)",
        f"  latency  {result['latency_ms']:10.1f} ms",
        f"  fps      {result['fps']:10.1f}",
    ]
    if "params_with_resnet_fc" in result:
        lines.insert(2, f"  params   {result['params_with_resnet_fc'] / 1e6:10.3f} M   "
                        f"({result['params_with_resnet_fc_note']})")
    paper = PAPER_FIGURES.get(result["name"])
    if paper is not None:
        ph, pw = paper["size"]
        lines.append(f"  paper    {paper['params'] / 1e6:10.3f} M params, {paper['gflops']:.2f} GFLOPs @ {ph}x{pw}")
        lines.append(f"  source   {paper['source']}")
    return "\n".join(lines)


def evaluation_summary(result: dict) -> str:
    """The lines `uda-ray evaluate` prints: the headline metrics, the validators, the per-class IoU."""
    m = result["metrics"]
    step = f" at step {result['step']}" if result.get("step") is not None else ""
    lines = [f"{result['source']}{step}: {result['method']}/{result['model']} on {result['target_root']}"
             + (f"  [{MARK}]" if result.get("target_ground_truth") else "")]
    if "test/miou" in m:
        lines.append(f"test mIoU {_pct(m['test/miou'])}%  pixel accuracy {_pct(m.get('test/pixel_acc'))}%")
    for k in ("test/miou16", "test/miou13", "test/miou18", "test/acc_img", "src_val/miou", "src_val/pixel_acc",
              "sel/miou"):
        if k in m:
            lines.append(f"{k} {_pct(m[k])}%")
    uv = [k for k in m if k.startswith("uv/")]
    if uv:
        lines.append("validators: " + "  ".join(f"{k} {_num(m[k])}" for k in uv))
    ious = [(k.removeprefix("test/iou/"), v) for k, v in m.items() if k.startswith("test/iou/")]
    if ious:
        lines.append("per-class IoU (test, %):")
        lines.extend(f"  {name:<14} {_pct(v)}" for name, v in ious)
    return "\n".join(lines)


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.2f}"


def _num(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4g}"
