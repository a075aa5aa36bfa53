"""Training-step overhead of uda_ray's method/loop machinery vs a plain PyTorch step.

    python benchmarks/step_overhead.py [--model bisenet_r18] [--batch 8] [--height 64] [--width 128]
                                        [--repeats 6] [--steps 3] [--threads 1]

Both sides train the same model (two copies of one initialization) with the same loss (CE on the main output +
the model's aux heads, as `seg_loss`) and the same optimizer (SGD with the model's param groups) on the same
preloaded batch:

- plain: `model(x)`, loss, `backward()`, `opt.step()` — a hand-written PyTorch step;
- uda_ray: what the loop does per step without the data loader: `uda_ray.loop.train_step` (poly learning
  rates, the uint8 batch copied and converted, the `source_only` method's step) and `LossLog.add`, the log
  read back every 10 steps as at logging time.

Also times the machinery alone (the same loop step around a method whose step does nothing), which is
what the overhead is made of, free of the compute's noise, and the plain step on a third copy (a control:
the difference between two identical steps is the noise floor). Minimum of interleaved repetitions.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import best_of  # noqa: E402

from uda_ray.config import OptimConfig  # noqa: E402
from uda_ray.loop import LossLog, train_step  # noqa: E402
from uda_ray.methods import METHODS  # noqa: E402
from uda_ray.methods.base import build_optimizer, seg_loss  # noqa: E402
from uda_ray.models import MODELS  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="bisenet_r18")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--height", type=int, default=64)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=6)
    ap.add_argument("--steps", type=int, default=3, help="steps per timed repetition")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: least disturbed by other jobs)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    dev = torch.device("cpu")
    optim = OptimConfig(name="sgd", lr=1e-3, momentum=0.9, weight_decay=5e-4)
    torch.manual_seed(0)
    model = MODELS[a.model](num_classes=19)
    plain_model = copy.deepcopy(model)
    method = METHODS["source_only"](model, METHODS["source_only"].Config(), optim, num_classes=19, device=dev)
    groups = plain_model.param_groups(optim.lr) if hasattr(plain_model, "param_groups") else plain_model.parameters()
    plain_opt = build_optimizer(groups, optim)
    aux = tuple(getattr(plain_model, "aux_weights", ()))
    g = torch.Generator().manual_seed(0)
    img = torch.randint(0, 256, (a.batch, 3, a.height, a.width), generator=g, dtype=torch.uint8)
    lbl = torch.randint(0, 19, (a.batch, a.height, a.width), generator=g, dtype=torch.uint8)
    x, y = img.float(), lbl.long()  # the plain step gets ready float tensors
    src = {"img": img, "lbl": lbl}

    def plain() -> None:
        for _ in range(a.steps):
            plain_model.train()
            plain_opt.zero_grad(set_to_none=True)
            loss = seg_loss(plain_model(x), y, aux)
            loss.backward()
            plain_opt.step()

    log, step = LossLog(), [0]

    def ours() -> None:
        for _ in range(a.steps):
            log.add(step[0], train_step(method, src, None, step[0], 10**6, dev))
            step[0] += 1
            if step[0] % 10 == 0:
                log.averages()

    class Nothing(METHODS["source_only"]):
        def train_step(self, batch, step):  # noqa: ANN001, ANN201
            return {"loss/seg_src": batch.src_img[0, 0, 0, 0]}

    empty = Nothing(copy.deepcopy(plain_model), Nothing.Config(), optim, num_classes=19, device=dev)

    def machinery() -> None:
        for _ in range(a.steps):
            log.add(step[0], train_step(empty, src, None, step[0], 10**6, dev))
            step[0] += 1
            if step[0] % 10 == 0:
                log.averages()

    control_model = copy.deepcopy(plain_model)
    control_opt = build_optimizer(control_model.param_groups(optim.lr) if hasattr(control_model, "param_groups")
                                  else control_model.parameters(), optim)

    def control() -> None:  # the plain step again, on a third copy: the noise floor of the comparison
        for _ in range(a.steps):
            control_model.train()
            control_opt.zero_grad(set_to_none=True)
            loss = seg_loss(control_model(x), y, aux)
            loss.backward()
            control_opt.step()

    best = best_of({"plain": plain, "uda_ray": ours, "machinery": machinery, "control": control},
                   repeats=a.repeats)
    per = {k: v / a.steps for k, v in best.items()}
    print(f"{a.model}, batch {a.batch} at {a.height}x{a.width}, source CE + aux, SGD, CPU, "
          f"{torch.get_num_threads()} threads; per step, minimum of {a.repeats} interleaved repetitions:")
    print(f"  plain PyTorch step            {per['plain'] * 1000:9.2f} ms")
    print(f"  uda_ray loop + method step    {per['uda_ray'] * 1000:9.2f} ms   "
          f"overhead {100 * (per['uda_ray'] / per['plain'] - 1):+.2f}%")
    print(f"  plain step again (control)    {per['control'] * 1000:9.2f} ms   "
          f"difference {100 * (per['control'] / per['plain'] - 1):+.2f}% (the noise floor)")
    print(f"  machinery alone (empty step)  {per['machinery'] * 1000:9.3f} ms   "
          f"= {100 * per['machinery'] / per['plain']:.3f}% of the plain step")


if __name__ == "__main__":
    main()
