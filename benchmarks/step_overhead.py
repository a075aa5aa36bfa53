"""Training-step overhead of uda_ray's method/loop machinery vs a plain PyTorch step.

    python benchmarks/step_overhead.py [--model bisenet_r18] [--batch 8] [--height 64] [--width 128]
                                        [--repeats 6] [--steps 3] [--threads 1]

Both sides train the same model (two copies of one initialization) with the same loss (CE on the main output +
the model's aux heads, as `seg_loss`) and the same optimizer (SGD with the model's param groups) on the same
preloaded batch:

- plain: `model(x)`, loss, `backward()`, `opt.step()` — a hand-written PyTorch step;
- uda_ray: what the loop does per step without the data loader: `uda_ray.training.step.train_step` (poly learning
  rates, the uint8 batch copied and converted, the `source_only` method's step) and `LossLog.add`, the log
  read back every 10 steps as at logging time.

Also times the machinery alone (the same loop step around a method whose step does nothing), which is
what the overhead is made of, free of the compute's noise, and the plain step on a third copy (a control:
the difference between two identical steps is the noise floor). Minimum of interleaved repetitions.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from _common import best_of, change, parse, parser, plain_optimizer, plain_step

from uda_ray.config import OptimConfig
from uda_ray.methods import METHODS
from uda_ray.models import MODELS
from uda_ray.training.step import LossLog, train_step


def main() -> None:
    ap = parser(__doc__, repeats=6, threads=1, image=(8, 64, 128))
    ap.add_argument("--model", default="bisenet_r18")
    ap.add_argument("--steps", type=int, default=3, help="steps per timed repetition")
    a = parse(ap)
    dev = torch.device("cpu")
    optim = OptimConfig(name="sgd", lr=1e-3, momentum=0.9, weight_decay=5e-4)
    torch.manual_seed(0)
    model = MODELS[a.model](num_classes=19)
    plain_model = copy.deepcopy(model)
    method = METHODS["source_only"](model, METHODS["source_only"].Config(), optim, num_classes=19, device=dev)
    aux = tuple(getattr(plain_model, "aux_weights", ()))
    g = torch.Generator().manual_seed(0)
    img = torch.randint(0, 256, (a.batch, 3, a.height, a.width), generator=g, dtype=torch.uint8)
    lbl = torch.randint(0, 19, (a.batch, a.height, a.width), generator=g, dtype=torch.uint8)
    x, y = img.float(), lbl.long()  # the plain step gets ready float tensors
    src = {"img": img, "lbl": lbl}

    def plain_steps(m: torch.nn.Module) -> Callable[[], None]:
        opt = plain_optimizer(m, optim)

        def run() -> None:
            for _ in range(a.steps):
                plain_step(m, opt, x, y, aux)
        return run

    log, step = LossLog(), [0]

    def loop_steps(meth: object) -> Callable[[], None]:
        def run() -> None:
            for _ in range(a.steps):
                log.add(step[0], train_step(meth, src, None, step[0], 10**6, dev))
                step[0] += 1
                if step[0] % 10 == 0:
                    log.averages()
        return run

    class Nothing(METHODS["source_only"]):
        def train_step(self, batch, step):  # noqa: ANN001, ANN201
            return {"loss/seg_src": batch.src_img[0, 0, 0, 0]}

    empty = Nothing(copy.deepcopy(plain_model), Nothing.Config(), optim, num_classes=19, device=dev)
    # the plain step again, on a third copy of the model (control): the noise floor of the comparison
    control_model = copy.deepcopy(plain_model)
    best = best_of({"plain": plain_steps(plain_model), "uda_ray": loop_steps(method),
                    "machinery": loop_steps(empty), "control": plain_steps(control_model)}, repeats=a.repeats)
    per = {k: v / a.steps for k, v in best.items()}
    print(f"{a.model}, batch {a.batch} at {a.height}x{a.width}, source CE + aux, SGD, CPU, "
          f"{torch.get_num_threads()} threads; per step, minimum of {a.repeats} interleaved repetitions:")
    print(f"  plain PyTorch step            {per['plain'] * 1000:9.2f} ms")
    print(f"  uda_ray loop + method step    {per['uda_ray'] * 1000:9.2f} ms   "
          f"overhead {change(per['uda_ray'], per['plain'])}")
    print(f"  plain step again (control)    {per['control'] * 1000:9.2f} ms   "
          f"difference {change(per['control'], per['plain'])} (the noise floor)")
    print(f"  machinery alone (empty step)  {per['machinery'] * 1000:9.3f} ms   "
          f"= {100 * per['machinery'] / per['plain']:.3f}% of the plain step")


if __name__ == "__main__":
    main()
