"""How well does each validator pick checkpoints on the synthetic benchmark? A Ray-free, in-process sweep.

    python benchmarks/validator_trust_local.py [--trials 8] [--steps 120] [--eval-every 30] [--seed 0] [--ensv]

Runs `--trials` configurations of AdaptSegNet-style adversarial adaptation (experiments/
synthetic_bisenet_r18_adversarial_fc.yaml) on the built-in synthetic benchmark v1, one after another in this
process (LocalSession), with randomly drawn (seeded) learning rate, adversarial weight and discriminator
type (fc / dsc), and prints uda_ray.selection.study's validators table over every (trial, step): Spearman rank
correlation of each validator with test mIoU, the regret of its pick and whether it is in the bottom quarter.
With --ensv, the trials' kept checkpoints are then scored as one pool by EnsV (uda_ray.selection.ensv) and
uv/ensv joins the table. The data goes to $UDA_RAY_DATA (or ./uda_ray_data), the runs to a temporary folder.
"""

from __future__ import annotations

import dataclasses
import math
import random
import tempfile
import time
from pathlib import Path

from _common import parse, parser

from uda_ray.build import load_experiment
from uda_ray.data.loading import prepare
from uda_ray.selection.study import format_table, validators_table
from uda_ray.training.loop import fit
from uda_ray.training.sessions import LocalSession

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = parser(__doc__, threads=1)
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--eval-every", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ensv", action="store_true", help="score the kept checkpoints as a pool with EnsV")
    args = parse(ap)
    rng = random.Random(args.seed)
    evals = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.trials):
            over = {"train.max_steps": args.steps, "train.eval_every": args.eval_every, "train.profile": False,
                    "data.loader_workers": 0,
                    # measured on benchmark v1 (docs/selection.md); v2 is the default for new runs
                    "data.synthetic.version": 1,
                    "optim.lr": math.exp(rng.uniform(math.log(5e-3), math.log(5e-2))),
                    "method_cfg.lambda_adv": math.exp(rng.uniform(math.log(1e-4), math.log(1e-1))),
                    "method_cfg.discriminator": rng.choice(["fc", "dsc"])}
            cfg = load_experiment(ROOT / "experiments" / "synthetic_bisenet_r18_adversarial_fc.yaml", over)
            cfg = dataclasses.replace(cfg, data=prepare(cfg.data))
            t0 = time.time()
            s = LocalSession(Path(tmp) / f"t{i}")
            fit(cfg, s)
            for r in s.reports:
                evals.append({**r, "trial_id": f"t{i}"})
            last = s.reports[-1]
            print(f"t{i} {over['method_cfg.discriminator']} lr={over['optim.lr']:.3g} "
                  f"lambda_adv={over['method_cfg.lambda_adv']:.3g}: test/miou={last['test/miou']:.4f} "
                  f"uv/snd={last['uv/snd']:.4f} ({time.time() - t0:.0f}s)", flush=True)
        if args.ensv:
            evals = with_ensv(evals, [Path(tmp) / f"t{i}" for i in range(args.trials)])
    print(format_table(validators_table(evals)))


def with_ensv(evals: list[dict], runs: list[Path]) -> list[dict]:
    """The eval rows with uv/ensv at every kept checkpoint of the runs, scored as one pool."""
    from uda_ray.selection.ensv import pool_scores, run_pool

    pool = [m for r in runs for m in run_pool(r)]
    t0 = time.time()
    scores = {(m["trial_id"], m["step"]): v for m, v in zip(pool, pool_scores([m["checkpoint_path"] for m in pool]))}
    print(f"EnsV over {len(pool)} kept checkpoints: {time.time() - t0:.0f}s", flush=True)
    return [{**e, "uv/ensv": scores[k]} if (k := (e["trial_id"], e["step"])) in scores else e for e in evals]


if __name__ == "__main__":
    main()
