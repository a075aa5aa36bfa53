"""Text for people: the tables and lines the command line prints (plain strings, so notebooks can use them)."""

from __future__ import annotations

import json
from typing import Any


def fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _params(r: dict) -> str:
    return ", ".join(f"{k}={fmt(v)}" for k, v in json.loads(r["params"]).items())


def best_table(rows: list[dict], method: str | None = None) -> str:
    """`uda_ray.best` rows, best first, with test mIoU beside another ranking metric."""
    if not rows:
        return "no evaluated trials yet" + (f" for method {method}" if method else "")
    lines = [f"top {len(rows)} by {rows[0]['rank_metric']} ({rows[0]['rank_mode']}):"]
    for i, r in enumerate(rows, 1):
        test = "" if r["rank_metric"] == "test/miou" else (
            f"  test/miou={r['rank_test_miou']:.4f}" if r["rank_test_miou"] is not None else "  test/miou: absent")
        lines.append(f"{i:>2}. {r['trial_id']}  {r['rank_metric']}={r['rank_value']:.4f} @ step {r['rank_step']}"
                     f"{test}  [{r['status']}]  {r['method']}  {_params(r)}")
    return "\n".join(lines)


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


def sweeps_table(sweeps: list[dict]) -> str:
    """`uda_ray.ls` rows as a table."""
    from uda_ray.progress import describe

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
