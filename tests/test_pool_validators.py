"""ATC, DEV and MixVal in the evaluation pass (uda_ray.training.evaluate), exact under DDP; EnsV over a pool of kept
checkpoints (uda_ray.selection.ensv) and ranking by it; all of them end to end on a tiny pool, in-process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import TinySeg, tiny_experiment
from uda_ray.data.loading import val_loader
from uda_ray.selection.estimators import MIX_LAMBDA, atc, dev, mixval_counts, mixval_scores, neg_entropy
from uda_ray.training.evaluate import evaluate_source, evaluate_unlabeled

C, H, W = 5, 8, 12


class FakeSplit(torch.utils.data.Dataset):
    """n images (RGB 0..255) with labels (255 on the first row), named like a dataset's items."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.lbl = torch.randint(0, C, (n, H, W), generator=g)
        self.lbl[:, 0] = 255
        self.img = torch.rand(n, 3, H, W, generator=g) * 80 + self.lbl.clamp(max=C).unsqueeze(1) * 30.0
        self.image_dir = Path("/imgs")
        self.items = [(self.image_dir / f"{i:03d}.png", None) for i in range(n)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return {"img": self.img[i], "lbl": self.lbl[i], "name": f"{i:03d}.png"}


def _model() -> TinySeg:
    torch.manual_seed(0)
    return TinySeg(C).eval()


def _evaluate(rank: int = 0, world: int = 1, pixels: int = 10_000) -> dict:
    m, dev_ = _model(), torch.device("cpu")
    src = val_loader(FakeSplit(5, 1), 2, rank=rank, world_size=world, workers=0)
    tgt = val_loader(FakeSplit(4, 2), 3, rank=rank, world_size=world, workers=0)
    ev, samples = evaluate_source(m, src, C, dev_, pixels, 0)
    return {**evaluate_unlabeled(m, tgt, C, dev_, pixels, 0, samples), "src_val/pixel_acc": ev["pixel_acc"]}


@torch.no_grad()
def test_the_evaluation_reports_atc_dev_and_mixval_as_their_formulas_say():
    got = _evaluate()  # every pixel sampled: the formulas over all pixels, computed here independently
    m, src, tgt = _model(), FakeSplit(5, 1), FakeSplit(4, 2)
    out = m(src.img)
    logits = F.interpolate(out["out"], size=(H, W), mode="bilinear", align_corners=True)  # as upsample()
    valid = (src.lbl != 255)
    pix = logits.permute(0, 2, 3, 1)[valid]  # (n, C)
    y = src.lbl[valid]
    feat = F.interpolate(out["feat"], size=(H, W), mode="nearest").permute(0, 2, 3, 1)[valid]
    t_out = m(tgt.img)
    t_probs = t_out["out"].softmax(1)
    assert got["uv/atc"] == pytest.approx(atc(neg_entropy(pix.softmax(1)), pix.argmax(1) == y,
                                              neg_entropy(t_probs.permute(0, 2, 3, 1).reshape(-1, C))))
    t_feat = t_out["feat"].permute(0, 2, 3, 1).reshape(-1, t_out["feat"].shape[1])
    loss = F.cross_entropy(pix, y, reduction="none")
    assert got["uv/dev"] == pytest.approx(dev(feat, loss, t_feat), rel=1e-6)
    labels = t_probs.argmax(1)
    partner = torch.roll(torch.arange(4), -1)  # image i mixes with image i + 1 of the split (cyclic)
    mixed = m(MIX_LAMBDA * tgt.img + (1 - MIX_LAMBDA) * tgt.img[partner])["out"].argmax(1)
    want = mixval_scores(mixval_counts(mixed, labels, labels[partner]))
    assert {k: got[k] for k in want} == pytest.approx(want)
    assert 0.0 <= got["uv/atc"] <= 1.0 and set(want) == {"uv/mixval", "uv/mixval_intra", "uv/mixval_inter"}


def _shard_entry(rank: int, world: int, out: dict) -> None:
    out[rank] = _evaluate(rank, world, pixels=7)


@pytest.mark.ddp
def test_two_gloo_workers_compute_atc_dev_and_mixval_as_one_process_does():
    from tests.ddp import run_gloo

    one = _evaluate(pixels=7)
    got = run_gloo(_shard_entry, 2)
    for k in ("uv/atc", "uv/dev", "uv/mixval", "uv/mixval_intra", "uv/mixval_inter", "uv/snd"):
        assert got[0][k] == pytest.approx(one[k], rel=1e-9) and got[1][k] == pytest.approx(one[k], rel=1e-9), k


# ------------------------------------------------------------------------------------------------
# a tiny pool, end to end: two runs in-process, EnsV over their checkpoints, the validators table, `best`


@pytest.fixture(scope="module")
def pool(tmp_path_factory, synth_root):
    from uda_ray.build import build_experiment
    from uda_ray.training.loop import fit
    from uda_ray.training.sessions import LocalSession

    d = tmp_path_factory.mktemp("pool")
    runs = {}
    for name, lr in (("a", 0.01), ("b", 0.05)):
        cfg = build_experiment(tiny_experiment(synth_root, **{"optim.lr": lr, "data.target_holdout_fraction": 0.3}))
        s = LocalSession(d / name)
        fit(cfg, s)
        runs[name] = s.reports
    return d, runs


def test_a_run_reports_the_new_validators_at_every_evaluation(pool):
    _, runs = pool
    for r in runs["a"]:
        assert {"uv/atc", "uv/dev", "uv/mixval", "uv/mixval_intra", "uv/mixval_inter"} <= set(r)
        assert 0.0 <= r["uv/atc"] <= 1.0 and r["uv/dev"] > 0.0


def _sweep_from_runs(store: Path, pool_dir: Path, runs: dict) -> Path:
    """A sweep folder whose evals are the runs' reports, checkpoints pointing at their (kept) folders."""
    from uda_ray.results.tables import ResultsWriter

    d = store / "sw"
    w = ResultsWriter(d / "results", "sw", "uv/im", "max", 0)
    exp = {"seed": 0, "method": "source_only", "model": {"name": "bisenet_r18"},
           "data": {"source": "gta5", "target": "cityscapes"}, "train": {"max_steps": 4}}
    for name, reports in runs.items():
        for r in reports:
            ck = pool_dir / name / "checkpoints" / f"step_{r['step']:07d}"
            w.result(name, exp, {}, {**{k: v for k, v in r.items() if k != "checkpoint_path"},
                                     "checkpoint_path": str(ck)})
        w.end(name, exp, {}, "completed")
    (d / "sweep.json").write_text(json.dumps({"name": "sw", "objective": [{"metric": "uv/im", "mode": "max"}],
                                              "seed": 0, "status": "completed"}))
    return d


def test_ensv_scores_the_pool_and_best_validators_and_export_use_it(pool, tmp_path, capsys):
    from uda_ray.cli import main
    from uda_ray.results.tables import read_table
    from uda_ray.selection.ensv import pool_scores

    pool_dir, runs = pool
    d = _sweep_from_runs(tmp_path / "store", pool_dir, runs)
    st = ["--storage", str(tmp_path / "store")]
    assert main(["best", "sw", "--metric", "uv/ensv", *st]) == 2  # before the pool pass: one clear line
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "run `uda-ray ensv sw` first" in err[0]
    assert main(["ensv", "sw", *st]) == 0
    rows = {(r["trial_id"], r["step"]): r["uv/ensv"]
            for r in read_table(d / "results", "ensv")}
    assert len(rows) == 4 and all(0.0 <= v <= 1.0 for v in rows.values())
    cks = [str(pool_dir / t / "checkpoints" / f"step_{s:07d}") for t, s in sorted(rows)]
    assert [rows[k] for k in sorted(rows)] == pytest.approx(pool_scores(cks))  # the table holds the pool's scores
    capsys.readouterr()
    assert main(["best", "sw", "--metric", "uv/ensv", *st]) == 0
    top = max(rows, key=rows.get)
    out = capsys.readouterr().out
    assert "uv/ensv" in out and out.index(f" {top[0]} ") < out.index(f" {'b' if top[0] == 'a' else 'a'} ")
    assert main(["best", "sw", "--metric", "uv/ensv", "--export", str(tmp_path / "b.yaml"), *st]) == 0
    head = (tmp_path / "b.yaml").read_text().splitlines()[0]
    assert f"best trial {top[0]} of sweep sw: uv/ensv={rows[top]:.4f} at step {top[1]}" in head
    capsys.readouterr()
    assert main(["validators", "sw", *st]) == 0
    out = capsys.readouterr().out
    for v in ("uv/atc", "uv/dev", "uv/mixval", "uv/ensv", "uv/im", "worst"):
        assert v in out, v


def test_ensv_of_a_single_checkpoint_is_refused_and_a_run_cannot_select_by_it(tmp_path, synth_root):
    from uda_ray.build import build_experiment
    from uda_ray.errors import ConfigError, UserError
    from uda_ray.selection.ensv import check_pool

    with pytest.raises(UserError, match="needs a pool of at least 2 kept checkpoints; run r has 1"):
        check_pool([{"trial_id": "r", "step": 2, "checkpoint_path": "x"}], "run r")
    with pytest.raises(ConfigError, match="computed after a sweep"):
        build_experiment(tiny_experiment(synth_root, select="uv/ensv"))
    from uda_ray.search.space import Objective

    with pytest.raises(ConfigError, match="objective.metric: 'uv/ensv' needs a pool of checkpoints"):
        Objective(metric="uv/ensv")
    assert Objective(metric="uv/mixval").mode == "max" and Objective(metric="uv/dev").mode == "min"


def test_stage_best_by_ensv_picks_a_checkpoint_of_the_stage(pool):
    from uda_ray.pipelines.runner import best_of_stage
    from uda_ray.results.tables import read_table

    pool_dir, _ = pool
    best = best_of_stage(pool_dir / "a", "uv/ensv")
    rows = read_table(pool_dir / "a" / "results", "ensv")
    assert len(rows) == 2 and str(best) == max(rows, key=lambda r: r["uv/ensv"])["checkpoint_path"]
