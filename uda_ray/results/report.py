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
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from uda_ray.errors import UserError
from uda_ray.results.tables import read_table
from uda_ray.target_labels import MARK, SHORT_MARK, row_marked
from uda_ray.training.checkpoint import STATE_FILE

# Cityscapes' own colours of the 19 train ids (cityscapesScripts, labels.py); ignore (255) is black.
CITYSCAPES_PALETTE = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
    (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
    (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
)
# evaluation metrics drawn as learning curves, by prefix
CURVE_PREFIXES = ("test/", "src_val/", "sel/", "uv/")
TEST_METRICS = ("test/miou",)
END_STATES = ("completed", "stopped_early", "errored")
MAX_CURVE_PANELS = 9


@dataclass
class ReportData:
    kind: str  # sweep | run | pipeline
    name: str
    folder: Path
    trials: list[dict]
    evals: list[dict]
    class_iou: list[dict]
    objectives: list[dict]  # [{"metric", "mode"}]
    meta: dict = field(default_factory=dict)
    space: dict = field(default_factory=dict)  # raw `params:` of the search space, when there is one

    @property
    def metric(self) -> str:
        return self.objectives[0]["metric"]

    @property
    def mode(self) -> str:
        return self.objectives[0]["mode"]


# ------------------------------------------------------------------------------------------------
# inputs


def resolve(root: Path, name: str) -> tuple[str, Path]:
    """NAME -> (kind, folder): a sweep <root>/NAME, a run <root>/runs/NAME, a pipeline <root>/pipelines/NAME,
    or a folder given by path."""
    root = Path(root)
    cands = [("sweep", root / name), ("run", root / "runs" / name), ("pipeline", root / "pipelines" / name)]
    p = Path(name)
    if p.is_dir():
        cands.insert(0, ("sweep" if (p / "sweep.json").is_file() else
                         "run" if (p / "results").is_dir() else "pipeline", p))
    for kind, d in cands:
        if kind == "sweep" and (d / "sweep.json").is_file():
            return kind, d
        if kind == "run" and (d / "results" / "evals.parquet").exists():
            return kind, d
        if kind == "pipeline" and d.is_dir() and any(d.glob("*/results/evals.parquet")):
            return kind, d
    raise UserError(f"nothing called '{name}' under {root}: no sweep ({name}/sweep.json), run (runs/{name}) "
                    f"or pipeline (pipelines/{name}) with results")


def load(kind: str, folder: Path) -> ReportData:
    import yaml

    folder = Path(folder)
    if kind == "pipeline":
        trials, evals, ious = [], [], []
        stages = sorted((p.parent.parent for p in folder.glob("*/results/evals.parquet")),
                        key=lambda d: d.stat().st_mtime)
        for d in stages:  # one pseudo-trial per stage, named after it
            for t in read_table(d / "results", "trials"):
                trials.append({**t, "trial_id": d.name})
            evals += [{**e, "trial_id": d.name} for e in read_table(d / "results", "evals")]
            ious += [{**r, "trial_id": d.name} for r in read_table(d / "results", "class_iou")]
    else:
        res = folder / "results"
        trials, evals, ious = (read_table(res, t) for t in ("trials", "evals", "class_iou"))
    meta, space = {}, {}
    if kind == "sweep":
        meta = json.loads((folder / "sweep.json").read_text())
        if (folder / "space.yaml").is_file():
            space = (yaml.safe_load((folder / "space.yaml").read_text()) or {}).get("params") or {}
    objectives = meta.get("objective") or []
    if not objectives and trials:
        objectives = [{"metric": trials[0]["objective"], "mode": trials[0]["mode"]}]
    if not objectives:
        raise UserError(f"{folder}: no results yet")
    return ReportData(kind, folder.name, folder, trials, evals, ious, objectives, meta, space)


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _evals_by_trial(data: ReportData) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for e in sorted(data.evals, key=lambda e: e["step"]):
        out.setdefault(e["trial_id"], []).append(e)
    return out


def selected_rows(data: ReportData) -> dict[str, dict]:
    """Each trial's eval row at its best value of the (first) objective."""
    out = {}
    pick = max if data.mode == "max" else min
    for tid, rows in _evals_by_trial(data).items():
        scored = [r for r in rows if _finite(r.get(data.metric))]
        if scored:
            out[tid] = pick(scored, key=lambda r: r[data.metric])
    return out


def _test_metric(data: ReportData) -> str | None:
    for m in TEST_METRICS:
        if any(_finite(e.get(m)) for e in data.evals):
            return m
    return None


def _params(t: dict) -> dict:
    try:
        return json.loads(t.get("params") or "{}")
    except (TypeError, ValueError):
        return {}


# ------------------------------------------------------------------------------------------------
# figures


def _png(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def curve_metrics(data: ReportData) -> list[str]:
    keys: dict[str, None] = {o["metric"]: None for o in data.objectives if not o["metric"].startswith("model/")}
    for e in data.evals:
        for k, v in e.items():
            if k.startswith(CURVE_PREFIXES) and "/iou/" not in k and _finite(v):
                keys[k] = None
    return [k for k in keys if any(_finite(e.get(k)) for e in data.evals)][:MAX_CURVE_PANELS]


def fig_curves(data: ReportData) -> str | None:
    metrics = curve_metrics(data)
    if not metrics:
        return None
    plt = _plt()
    status = {t["trial_id"]: t.get("status") for t in data.trials}
    by = _evals_by_trial(data)
    ncol = min(3, len(metrics))
    nrow = math.ceil(len(metrics) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.6 * ncol, 3.2 * nrow), squeeze=False)
    cmap = plt.get_cmap("tab10" if len(by) <= 10 else "viridis")
    for i, m in enumerate(metrics):
        ax = axes[i // ncol][i % ncol]
        for j, (tid, rows) in enumerate(by.items()):
            pts = [(r["step"], r[m]) for r in rows if _finite(r.get(m))]
            if not pts:
                continue
            colour = cmap(j % 10) if len(by) <= 10 else cmap(j / max(len(by) - 1, 1))
            ax.plot(*zip(*pts), "-o", ms=3, lw=1.2, color=colour, label=tid if i == 0 else None)
            if status.get(tid) == "stopped_early":
                ax.plot(*pts[-1], "x", ms=9, mew=2, color="crimson")
            elif status.get(tid) == "errored":
                ax.plot(*pts[-1], "s", ms=7, mfc="none", color="black")
        ax.set_title(m + ("  (objective)" if m in [o["metric"] for o in data.objectives] else ""), fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for k in range(len(metrics), nrow * ncol):
        axes[k // ncol][k % ncol].axis("off")
    handles, labels = axes[0][0].get_legend_handles_labels()
    extra = []
    if any(s == "stopped_early" for s in status.values()):
        extra.append(plt.Line2D([], [], ls="", marker="x", color="crimson", mew=2, label="stopped early (ASHA)"))
    if any(s == "errored" for s in status.values()):
        extra.append(plt.Line2D([], [], ls="", marker="s", mfc="none", color="black", label="errored"))
    if len(handles) <= 20 or extra:
        fig.legend(handles[:20] + extra, labels[:20] + [h.get_label() for h in extra], loc="lower center",
                   ncol=min(8, len(handles[:20]) + len(extra)), fontsize=7, bbox_to_anchor=(0.5, 1.0))
    fig.tight_layout()
    return _png(fig)


def _param_kinds(data: ReportData) -> dict[str, str]:
    kinds = {}
    for k, spec in data.space.items():
        if isinstance(spec, dict) and len(spec) == 1:
            kinds[k] = next(iter(spec))
    for t in data.trials:
        for k, v in _params(t).items():
            kinds.setdefault(k, "choice" if isinstance(v, (str, bool)) else "uniform")
    return kinds


def fig_params(data: ReportData) -> str | None:
    kinds = _param_kinds(data)
    rows = [(t, _params(t)) for t in data.trials if _finite(t.get("best_value"))]
    if not kinds or not rows:
        return None
    plt = _plt()
    names = list(kinds)
    ncol = min(3, len(names))
    nrow = math.ceil(len(names) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 3.0 * nrow), squeeze=False)
    colours = {"completed": "tab:blue", "stopped_early": "tab:orange", "errored": "black", "running": "tab:green"}
    for i, k in enumerate(names):
        ax = axes[i // ncol][i % ncol]
        pts = [(p[k], t["best_value"], t.get("status")) for t, p in rows if k in p]
        if kinds[k] == "choice":
            cats = list(dict.fromkeys(str(v) for v, _, _ in pts))
            xs = [cats.index(str(v)) + 0.08 * ((hash(str(y)) % 7) - 3) / 3 for v, y, _ in pts]
            ax.set_xticks(range(len(cats)), cats, rotation=20, fontsize=7)
        else:
            xs = [v for v, _, _ in pts]
            if kinds[k] == "loguniform":
                ax.set_xscale("log")
        ax.scatter(xs, [y for _, y, _ in pts], c=[colours.get(s, "grey") for _, _, s in pts], s=22)
        ax.set_title(k, fontsize=9)
        ax.set_ylabel(f"best {data.metric}", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for k in range(len(names), nrow * ncol):
        axes[k // ncol][k % ncol].axis("off")
    fig.legend(handles=[plt.Line2D([], [], ls="", marker="o", color=c, label=s.replace("_", " "))
                        for s, c in colours.items() if any(t.get("status") == s for t, _ in rows)],
               loc="lower center", ncol=4, fontsize=7, bbox_to_anchor=(0.5, 1.0))
    fig.tight_layout()
    return _png(fig)


def importance(data: ReportData) -> tuple[dict[str, float] | None, str]:
    """PED-ANOVA importances over the completed trials (their best objective value); (None, why) if not."""
    import optuna

    if not data.space:
        return None, "no search space (a single run or a pipeline)"
    dists: dict[str, Any] = {}
    for k, spec in data.space.items():
        if not (isinstance(spec, dict) and len(spec) == 1):
            continue
        kind, vals = next(iter(spec.items()))
        if kind == "choice":
            dists[k] = optuna.distributions.CategoricalDistribution(vals)
        elif kind == "int":
            dists[k] = optuna.distributions.IntDistribution(int(vals[0]), int(vals[1]))
        else:
            dists[k] = optuna.distributions.FloatDistribution(float(vals[0]), float(vals[1]),
                                                              log=kind == "loguniform")
    done = [t for t in data.trials if t.get("status") == "completed" and _finite(t.get("best_value"))]
    if len(dists) < 2:
        return None, "fewer than two searched parameters"
    if len(done) < 4:
        return None, f"only {len(done)} completed trial(s); PED-ANOVA needs at least 4"
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.create_study(direction="maximize" if data.mode == "max" else "minimize")
    for t in done:
        p = _params(t)
        if set(p) != set(dists):
            continue
        try:
            study.add_trial(optuna.trial.create_trial(params=p, distributions=dists, value=t["best_value"]))
        except ValueError:  # a value outside the (current) space
            continue
    try:
        imp = optuna.importance.get_param_importances(
            study, evaluator=optuna.importance.PedAnovaImportanceEvaluator())
    except Exception as e:  # noqa: BLE001 - shown on the page instead of the plot
        return None, f"PED-ANOVA failed: {e}"
    return dict(imp), f"PED-ANOVA over {len(study.trials)} completed trials (best {data.metric} of each)"


def fig_importance(imp: dict[str, float]) -> str:
    plt = _plt()
    names = list(imp)[::-1]
    fig, ax = plt.subplots(figsize=(6, 0.45 * len(names) + 1))
    ax.barh(names, [imp[n] for n in names], color="tab:blue")
    ax.set_xlabel("importance (PED-ANOVA, sums to 1)", fontsize=8)
    ax.tick_params(labelsize=8)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return _png(fig)


def pareto_points(data: ReportData) -> list[tuple[str, list[float], bool, bool]]:
    """(trial, objective values at its last evaluation, on the front?, feasible?) of the completed trials; the
    front is taken among the trials that meet the sweep's constraints."""
    from uda_ray.results.tables import non_dominated
    from uda_ray.search.space import Constraint

    ms = [o["metric"] for o in data.objectives]
    cons = [Constraint(**c) for c in data.meta.get("constraints") or []]
    status = {t["trial_id"]: t.get("status") for t in data.trials}
    pts = []
    for tid, rows in _evals_by_trial(data).items():
        if status.get(tid) != "completed" or not all(_finite(rows[-1].get(m)) for m in ms):
            continue
        last = rows[-1]
        pts.append((tid, [last[m] for m in ms], all(c.violation(last.get(c.metric)) <= 0 for c in cons)))
    front = non_dominated([(tid, v) for tid, v, ok in pts if ok], [o["mode"] for o in data.objectives])
    return [(tid, v, tid in front, ok) for tid, v, ok in pts]


def fig_pareto(data: ReportData) -> str | None:
    pts = pareto_points(data)
    if len(data.objectives) < 2 or not pts:
        return None
    plt = _plt()
    (mx, my) = data.objectives[1]["metric"], data.objectives[0]["metric"]
    fig, ax = plt.subplots(figsize=(6, 4.2))
    dom = [v for _, v, f, ok in pts if ok and not f]
    bad = [v for _, v, _, ok in pts if not ok]
    if dom:
        ax.scatter([v[1] for v in dom], [v[0] for v in dom], c="grey", s=25, label="dominated")
    if bad:
        ax.scatter([v[1] for v in bad], [v[0] for v in bad], marker="x", c="grey", s=30,
                   label="violates a constraint")
    front = sorted(((v[1], v[0], tid) for tid, v, f, _ in pts if f))
    ax.plot([x for x, _, _ in front], [y for _, y, _ in front], "-o", color="crimson", label="Pareto front")
    for x, y, tid in front:
        ax.annotate(tid, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel(f"{mx} ({data.objectives[1]['mode']})", fontsize=9)
    ax.set_ylabel(f"{my} ({data.objectives[0]['mode']})", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _png(fig)


def fig_class_iou(data: ReportData, top: int = 10) -> str | None:
    from uda_ray.data.labels import CLASSES

    sel = selected_rows(data)
    ranked = sorted(sel.items(), key=lambda kv: kv[1][data.metric], reverse=data.mode == "max")[:top]
    grid, labels = [], []
    for tid, row in ranked:
        ious = {r["class_name"]: r["iou"] for r in data.class_iou if r["trial_id"] == tid and r["step"] == row["step"]}
        if ious:
            grid.append([ious.get(c) if _finite(ious.get(c)) else math.nan for c in CLASSES])
            labels.append(f"{tid} @ {row['step']}")
    if not grid:
        return None
    plt = _plt()
    import numpy as np

    a = np.array(grid, dtype=float) * 100
    fig, ax = plt.subplots(figsize=(11, 0.42 * len(grid) + 1.8))
    im = ax.imshow(np.ma.masked_invalid(a), cmap="viridis", vmin=0, vmax=100, aspect="auto")
    ax.set_xticks(range(len(CLASSES)), CLASSES, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    for i in range(a.shape[0]):
        for j in range(a.shape[1]):
            if math.isfinite(a[i, j]):
                ax.text(j, i, f"{a[i, j]:.0f}", ha="center", va="center", fontsize=6,
                        color="white" if a[i, j] < 55 else "black")
    fig.colorbar(im, ax=ax, label="IoU (%)", fraction=0.03)
    fig.tight_layout()
    return _png(fig)


def fig_test_vs_selection(data: ReportData) -> tuple[str | None, str]:
    test = _test_metric(data)
    if test is None:
        return None, "no test-split metric was reported"
    if data.metric == test:
        return None, f"the selection metric is the test metric itself ({test})"
    sel = selected_rows(data)
    pts = [(r[data.metric], r[test], tid) for tid, r in sel.items() if _finite(r.get(test))]
    if not pts:
        return None, f"no evaluation reported both {data.metric} and {test}"
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    allp = [(e[data.metric], e[test]) for e in data.evals if _finite(e.get(data.metric)) and _finite(e.get(test))]
    ax.scatter(*zip(*allp), s=10, c="lightgrey", label="every evaluation")
    ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=30, c="tab:blue", label="selected step of each trial")
    ax.set_xlabel(f"{data.metric} (selection, {data.mode})", fontsize=9)
    ax.set_ylabel(f"{test} (test)", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    rank_corr = _spearman([p[0] for p in pts], [p[1] for p in pts])
    sign = 1 if data.mode == "max" else -1
    note = f"{len(pts)} trials; Spearman rank correlation of selection and test: " + (
        f"{sign * rank_corr:+.2f} (sign-adjusted: +1 = the selection metric ranks trials as the test does)"
        if rank_corr is not None else "n/a (fewer than 3 trials)")
    return _png(fig), note


def _spearman(x: list[float], y: list[float]) -> float | None:
    if len(x) < 3:
        return None

    def ranks(v: list[float]) -> list[float]:
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        for pos, i in enumerate(order):
            r[i] = float(pos)
        return r

    rx, ry = ranks(x), ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sx = math.sqrt(sum((a - mx) ** 2 for a in rx))
    sy = math.sqrt(sum((b - my) ** 2 for b in ry))
    return cov / (sx * sy) if sx and sy else None


def colourize(lbl: Any) -> Any:
    """(H, W) train ids -> (H, W, 3) uint8 in the Cityscapes palette; ignore and unknown ids black."""
    import numpy as np

    lut = np.zeros((256, 3), np.uint8)
    lut[: len(CITYSCAPES_PALETTE)] = CITYSCAPES_PALETTE
    return lut[np.clip(np.asarray(lbl), 0, 255).astype(np.int64)]


def best_checkpoint(data: ReportData) -> tuple[str, Path] | None:
    sel = selected_rows(data)
    ranked = sorted(sel.items(), key=lambda kv: kv[1][data.metric], reverse=data.mode == "max")
    for tid, row in ranked:
        ck = row.get("checkpoint_path")
        if ck and (Path(ck) / STATE_FILE).is_file():
            return tid, Path(ck)
    return None


def fig_predictions(data: ReportData, n_images: int = 3) -> tuple[str | None, str]:
    """Input | prediction | label of the best checkpoint on the first few target test images."""
    import numpy as np
    import torch

    from uda_ray.build import build_experiment, build_method
    from uda_ray.data.loading import build_datasets
    from uda_ray.methods.base import upsample
    from uda_ray.training.checkpoint import load_state

    found = best_checkpoint(data)
    if found is None:
        return None, "no checkpoint of the best trials is on disk"
    tid, ck = found
    state = load_state(ck)
    cfg = build_experiment(state["config"], str(ck))
    try:
        sets = build_datasets(cfg.data, source=False, target=False, target_labels=False)
        ds = sets["test"] if "test" in sets else sets["holdout"]  # an unlabeled target: its held-out images
    except Exception as e:  # noqa: BLE001 - the data may live on another machine
        return None, f"target test images not readable here ({str(e).splitlines()[0]})"
    method = build_method(cfg, lambda m: m, "cpu")
    method.load_state_dict(state["method"])
    model = method.eval_model().eval()
    n = min(n_images, len(ds))
    plt = _plt()
    fig, axes = plt.subplots(n, 3, figsize=(10, 1.0 + 2.2 * n * max(0.35, ds[0]["lbl"].shape[0] /
                                                                     max(ds[0]["lbl"].shape[1], 1))),
                             squeeze=False)
    with torch.no_grad():
        for i in range(n):
            item = ds[i]
            lbl = item["lbl"]
            logits = model(item["img"].unsqueeze(0))["out"]
            pred = upsample(logits, tuple(lbl.shape[-2:])).argmax(1)[0].numpy()
            img = item["img"].permute(1, 2, 0).numpy()
            img = np.clip(img if img.max() > 1.5 else img * 255, 0, 255).astype(np.uint8)
            has_label = bool((lbl.numpy() != 255).any())
            panels = [(img, "input"), (colourize(pred), "prediction"),
                      (colourize(lbl.numpy()) if has_label else None, "label" if has_label else "no label")]
            for j, (a, title) in enumerate(panels):
                ax = axes[i][j]
                if a is not None:
                    ax.imshow(a, interpolation="nearest")
                ax.set_title(title, fontsize=8)
                ax.axis("off")
    fig.tight_layout()
    step = int(state.get("step", 0))
    return _png(fig), f"trial {tid}, checkpoint at step {step} ({ck})"


# ------------------------------------------------------------------------------------------------
# table + page


def table_rows(data: ReportData) -> tuple[list[str], list[list[Any]]]:
    sel = selected_rows(data)
    test = _test_metric(data)
    pnames = list(_param_kinds(data))
    cols = ["trial", "status", "method", "model", f"best {data.metric}", "best step", "final step"]
    cols += [f"{test} @ best"] if test and test != data.metric else []
    cols += [o["metric"] for o in data.objectives[1:]] + ["GFLOPs", "wall s", SHORT_MARK] + pnames
    rows = []
    for t in data.trials:
        r = sel.get(t["trial_id"], {})
        p = _params(t)
        row = [t["trial_id"], t.get("status"), t.get("method"), t.get("model"), r.get(data.metric),
               r.get("step"), t.get("final_step")]
        row += [r.get(test)] if test and test != data.metric else []
        row += [r.get(o["metric"]) for o in data.objectives[1:]]
        row += [t.get("model_gflops"), t.get("wall_time_s"), "yes" if row_marked(t) else "no"]
        row += [p.get(k) for k in pnames]
        rows.append(row)
    return cols, rows


def _cell(v: Any) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return '<td data-v="">-</td>'
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return f'<td data-v="{html.escape(str(v))}">{html.escape(str(v))}</td>'
    text = f"{v:.4g}" if isinstance(v, float) else str(v)
    return f'<td data-v="{v!r}" class="num">{text}</td>'


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
    counts = {s: sum(t.get("status") == s for t in data.trials) for s in ("completed", "stopped_early",
                                                                          "errored", "running")}
    objs = ", ".join(f"{o['metric']} ({o['mode']})" for o in data.objectives)
    parts = [f"<h1>{data.kind.capitalize()} {html.escape(data.name)}</h1>",
             f'<p class="note">{len(data.trials)} trial(s): ' + ", ".join(f"{v} {k.replace('_', ' ')}"
                                                                       for k, v in counts.items() if v)
             + f"; objective {html.escape(objs)}; folder {html.escape(str(data.folder))}; generated "
             + time.strftime("%Y-%m-%d %H:%M:%S", time.localtime()) + "</p>"]
    marked = [t["trial_id"] for t in data.trials if row_marked(t)]
    if marked:
        parts.append(f'<p class="gt" id="target-gt"><strong>{MARK}</strong>: {len(marked)} of {len(data.trials)} '
                     f"trial(s) ({html.escape(', '.join(marked[:20]))}{', ...' if len(marked) > 20 else ''}) saw the "
                     "target's labels in training (an oracle, or a run started from one): not UDA results.</p>")
    curves = fig_curves(data)
    parts.append(_section("Learning curves", curves,
                          "Every trial's evaluations vs step. A red x marks the last evaluation of a trial the "
                          "scheduler stopped early; an open square, one that errored." if curves
                          else "no evaluations yet", "curves"))
    if data.kind == "sweep":
        pv = fig_params(data)
        parts.append(_section("Parameters vs objective", pv,
                              f"Each trial's best {data.metric} against each searched parameter."
                              if pv else "no scored trials or no searched parameters", "params"))
        imp, why = importance(data)
        parts.append(_section("Parameter importance", fig_importance(imp) if imp else None, why, "importance"))
        if len(data.objectives) > 1:
            pf = fig_pareto(data)
            front = [tid for tid, _, f, _ in pareto_points(data) if f]
            parts.append(_section("Pareto front", pf, (f"{len(front)} non-dominated of the completed trials "
                                                       f"(values at their last evaluation): {', '.join(front)}")
                                  if pf else "no completed trial has every objective yet", "pareto"))
    hm = fig_class_iou(data)
    parts.append(_section("Per-class IoU of the top trials", hm,
                          f"At each trial's best step by {data.metric}." if hm else "no per-class IoU reported",
                          "classiou"))
    tv, why = fig_test_vs_selection(data)
    parts.append(_section("Test vs selection metric", tv, why, "testsel"))
    if predictions:
        try:
            pr, why = fig_predictions(data)
        except Exception as e:  # noqa: BLE001 - a report without this panel is still useful
            pr, why = None, f"could not run the best checkpoint: {type(e).__name__}: {e}"
        parts.append(_section("Predictions of the best checkpoint", pr, why, "predictions"))
    cols, rows = table_rows(data)
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(_cell(v) for v in r) + "</tr>" for r in rows)
    parts.append('<section id="sec-table"><h2>Trials</h2><p class="note">Click a column header to sort.</p>'
                 f'<table class="sortable" id="trials"><thead><tr>{head}</tr></thead><tbody>{body}</tbody>'
                 "</table></section>")
    return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            f"<title>uda-ray report: {html.escape(data.name)}</title><link rel='icon' href='data:,'>"
            f"<style>{CSS}</style></head><body>{''.join(parts)}<script>{SORT_JS}</script></body></html>")


def write_report(kind: str, folder: Path, out: Path, predictions: bool = True) -> Path:
    import os

    page = render(load(kind, folder), predictions=predictions)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, out)
    return out
