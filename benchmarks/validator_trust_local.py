"""How well does each validator pick checkpoints on the synthetic benchmark? A Ray-free, in-process sweep.

    python benchmarks/validator_trust_local.py [--trials 8] [--steps 120] [--eval-every 30] [--seed 0]

Runs `--trials` configurations of AdaptSegNet-style adversarial adaptation (experiments/
synthetic_bisenet_r18_adversarial_fc.yaml) on the built-in synthetic benchmark, one after another in this
process (LocalSession), with randomly drawn (seeded) learning rate, adversarial weight and discriminator
type (fc / dsc), and prints uda_ray.selection.study's validators table over every (trial, step): Spearman rank
correlation of each validator with test mIoU and the regret of its pick. The data goes to $UDA_RAY_DATA (or
./uda_ray_data), the runs to a temporary folder.
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
    args = parse(ap)
    rng = random.Random(args.seed)
    evals = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.trials):
            over = {"train.max_steps": args.steps, "train.eval_every": args.eval_every, "train.profile": False,
                    "data.loader_workers": 0,
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
    print(format_table(validators_table(evals)))


if __name__ == "__main__":
    main()
