"""The figures of the HTML report (uda_ray.results.report): matplotlib (Agg) figures as PNG data URIs, and
the parameter importances (Optuna's PED-ANOVA; Watanabe et al., "PED-ANOVA: Efficiently Quantifying
Hyperparameter Importance in Arbitrary Subspaces", IJCAI 2023). Each `fig_*` returns None (or None and why)
when it has nothing to draw."""

from __future__ import annotations

import base64
import io
import math
from typing import Any

from uda_ray.results.report_data import (
    ReportData,
    best_checkpoint,
    evals_by_trial,
    param_kinds,
    pareto_points,
    selected_rows,
    selection_vs_test,
    test_metric,
    trial_params,
)
from uda_ray.results.stats import finite
from uda_ray.results.text import rho

# Cityscapes' own colours of the 19 train ids (cityscapesScripts, labels.py); ignore (255) is black.
CITYSCAPES_PALETTE = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
    (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
    (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
)
# evaluation metrics drawn as learning curves, by prefix
CURVE_PREFIXES = ("test/", "src_val/", "sel/", "uv/")
MAX_CURVE_PANELS = 9


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
            if k.startswith(CURVE_PREFIXES) and "/iou/" not in k and finite(v):
                keys[k] = None
    return [k for k in keys if any(finite(e.get(k)) for e in data.evals)][:MAX_CURVE_PANELS]


BULK = 50  # more trials than this: a panel's curves are one collection (one artist per trial took 5 minutes at 1,000)


def _curves_bulk(ax: Any, by: dict[str, list[dict]], status: dict, m: str, cmap: Any) -> None:
    """Every trial's curve of metric `m` as one LineCollection, their ends stopped early (x) or errored (square)
    as one scatter each."""
    from matplotlib.collections import LineCollection

    segs, colours, ends = [], [], {"stopped_early": [], "errored": []}
    for j, (tid, rows) in enumerate(by.items()):
        pts = [(r["step"], r[m]) for r in rows if finite(r.get(m))]
        if pts:
            segs.append(pts)
            colours.append(cmap(j / max(len(by) - 1, 1)))
            ends.get(status.get(tid), []).append(pts[-1])
    ax.add_collection(LineCollection(segs, colors=colours, linewidths=0.8, alpha=0.6))
    ax.autoscale()
    if ends["stopped_early"]:
        ax.scatter(*zip(*ends["stopped_early"]), marker="x", s=30, color="crimson", linewidths=1.5, zorder=3)
    if ends["errored"]:
        ax.scatter(*zip(*ends["errored"]), marker="s", s=25, facecolors="none", edgecolors="black", zorder=3)


def fig_curves(data: ReportData) -> str | None:
    metrics = curve_metrics(data)
    if not metrics:
        return None
    plt = _plt()
    status = {t["trial_id"]: t.get("status") for t in data.trials}
    by = evals_by_trial(data)
    ncol = min(3, len(metrics))
    nrow = math.ceil(len(metrics) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.6 * ncol, 3.2 * nrow), squeeze=False)
    cmap = plt.get_cmap("tab10" if len(by) <= 10 else "viridis")
    for i, m in enumerate(metrics):
        ax = axes[i // ncol][i % ncol]
        if len(by) > BULK:
            _curves_bulk(ax, by, status, m, cmap)
        for j, (tid, rows) in enumerate(by.items() if len(by) <= BULK else ()):
            pts = [(r["step"], r[m]) for r in rows if finite(r.get(m))]
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


def fig_params(data: ReportData) -> str | None:
    kinds = param_kinds(data)
    rows = [(t, trial_params(t)) for t in data.trials if finite(t.get("best_value"))]
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
    done = [t for t in data.trials if t.get("status") == "completed" and finite(t.get("best_value"))]
    if len(dists) < 2:
        return None, "fewer than two searched parameters"
    if len(done) < 4:
        return None, f"only {len(done)} completed trial(s); PED-ANOVA needs at least 4"
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.create_study(direction="maximize" if data.mode == "max" else "minimize")
    for t in done:
        p = trial_params(t)
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
            grid.append([ious.get(c) if finite(ious.get(c)) else math.nan for c in CLASSES])
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
    test = test_metric(data)
    if test is None:
        return None, "no test-split metric was reported"
    if data.metric == test:
        return None, f"the selection metric is the test metric itself ({test})"
    pts, corr = selection_vs_test(data, test)
    if not pts:
        return None, f"no evaluation reported both {data.metric} and {test}"
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    allp = [(e[data.metric], e[test]) for e in data.evals if finite(e.get(data.metric)) and finite(e.get(test))]
    ax.scatter(*zip(*allp), s=10, c="lightgrey", label="every evaluation")
    ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=30, c="tab:blue", label="selected step of each trial")
    ax.set_xlabel(f"{data.metric} (selection, {data.mode})", fontsize=9)
    ax.set_ylabel(f"{test} (test)", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    note = f"{len(pts)} trials; Spearman rank correlation of selection and test: " + (
        f"{rho(corr)} (sign-adjusted: +1 = the selection metric ranks trials as the test does)" if finite(corr)
        else "n/a (fewer than 2 trials, or one of the two the same for every trial)")
    return _png(fig), note


def colourize(lbl: Any) -> Any:
    """(H, W) train ids -> (H, W, 3) uint8 in the Cityscapes palette; ignore and unknown ids black."""
    import numpy as np

    lut = np.zeros((256, 3), np.uint8)
    lut[: len(CITYSCAPES_PALETTE)] = CITYSCAPES_PALETTE
    return lut[np.clip(np.asarray(lbl), 0, 255).astype(np.int64)]


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
