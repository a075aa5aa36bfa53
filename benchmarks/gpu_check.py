"""GPU check (Ray-free): a BiSeNet-R18 adversarial UDA step and BiSeNet-R18 inference on one CUDA device.

    python benchmarks/gpu_check.py [--batch 8] [--steps 20] [--peak-tflops-fp32 X --peak-tflops-bf16 Y
                                    --peak-tflops-fp16 Z]

1. One AdaptSegNet step (`adversarial`, FC discriminator; segmenter CE on source + adversarial loss on target,
   then the discriminator's step) at 1024x512 source + 1024x512 target, batch `--batch`, through the training
   loop's own step (`uda_ray.training.step.train_step`: uint8 batches converted on the device, losses left there), in
   fp32 (cuDNN convolutions may use TF32, PyTorch's default), with `train.amp: bf16` and with `train.amp: fp16`
   (one gradient scaler per optimizer; the fp16 line also gives each scaler's scale after the run: 65536 halved
   once per skipped step, doubled after 2000 clean ones). Prints step time,
   images/s (source + target images), peak memory and model FLOP utilization: the FLOPs of one step counted
   by `torch.utils.flop_counter.FlopCounterMode` (forward and backward, multiply-add = 2) divided by the step
   time and by the card's peak (a table of known cards' dense tensor-core peaks, or the --peak-* options).
2. BiSeNet-R18 inference frames/s at 1024x2048, batch 1, fp16 autocast (`uda_ray.models.profile.measure_latency`).

Without a CUDA device it exits with status 2 and says so.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

# Dense (no sparsity) peak TFLOPS: (TF32 tensor core, BF16/FP16 tensor core), from the vendors' data sheets.
PEAKS = {
    "H200": (494.7, 989.4), "H100 80GB HBM3": (494.7, 989.4), "H100 PCIe": (378.0, 756.0),
    "A100": (156.0, 312.0), "L40S": (183.0, 362.0), "L4": (60.0, 121.0), "A10G": (35.0, 70.0),
    "A10": (62.5, 125.0), "RTX 4090": (82.6, 165.2), "RTX 3090": (35.6, 71.0), "V100": (15.7, 125.0),
}


def card_peaks(name: str) -> tuple[float, float] | None:
    for key, peaks in PEAKS.items():
        if key in name:
            return peaks
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--peak-tflops-fp32", type=float, help="the card's fp32 (TF32) peak, if not in the table")
    ap.add_argument("--peak-tflops-bf16", type=float, help="the card's bf16 peak, if not in the table")
    ap.add_argument("--peak-tflops-fp16", type=float, help="the card's fp16 peak (default: its bf16 peak)")
    ap.add_argument("--cpu-dry-run", action="store_true",
                    help="exercise this script on the CPU at 128x64 (no figures worth reading)")
    a = ap.parse_args()
    if not torch.cuda.is_available() and not a.cpu_dry_run:
        print("gpu_check: no CUDA device visible (torch.cuda.is_available() is False); this check needs one",
              file=sys.stderr)
        return 2
    from torch.utils.flop_counter import FlopCounterMode

    from uda_ray.config import OptimConfig
    from uda_ray.methods import METHODS
    from uda_ray.models import MODELS
    from uda_ray.models.profile import measure_latency
    from uda_ray.training.step import train_step

    dry = a.cpu_dry_run
    dev = torch.device("cpu" if dry else "cuda")
    cuda = torch.cuda if not dry else None
    name = "CPU (dry run)" if dry else torch.cuda.get_device_name(dev)
    known = card_peaks(name)
    peak = {"off": a.peak_tflops_fp32 or (known[0] if known else None),
            "bf16": a.peak_tflops_bf16 or (known[1] if known else None)}
    peak["fp16"] = a.peak_tflops_fp16 or peak["bf16"]
    print(f"{name}, torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN TF32 "
          f"{torch.backends.cudnn.allow_tf32}, matmul TF32 {torch.backends.cuda.matmul.allow_tf32}")
    if dry:
        a.warmup, a.steps = 1, 2
    g = torch.Generator().manual_seed(0)
    h, w, b = (64, 128, 2) if dry else (512, 1024, a.batch)

    def items() -> dict:
        img = torch.randint(0, 256, (b, 3, h, w), generator=g, dtype=torch.uint8)
        lbl = torch.randint(0, 19, (b, h, w), generator=g, dtype=torch.uint8)
        return {"img": img, "lbl": lbl} if dry else {"img": img.pin_memory(), "lbl": lbl.pin_memory()}

    src, tgt = items(), items()
    optim = OptimConfig(name="sgd", lr=2.5e-4, momentum=0.9, weight_decay=5e-4)
    cls = METHODS["adversarial"]
    for amp in ("off", "bf16", "fp16"):
        torch.manual_seed(0)
        method = cls(MODELS["bisenet_r18"](num_classes=19), cls.Config(discriminator="fc"), optim, num_classes=19,
                     device=dev, amp=amp)
        for i in range(a.warmup):
            train_step(method, src, tgt, i, 10**6, dev, amp)
        with FlopCounterMode(display=False) as counter:
            train_step(method, src, tgt, a.warmup, 10**6, dev, amp)
        flops = counter.get_total_flops()
        if cuda:
            cuda.synchronize()
            cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        for i in range(a.steps):
            losses = train_step(method, src, tgt, a.warmup + 1 + i, 10**6, dev, amp)
        if cuda:
            cuda.synchronize()
        step = (time.perf_counter() - t0) / a.steps
        assert all(torch.isfinite(v).all() for v in losses.values()), losses
        tflops = flops / step / 1e12
        mfu = f"{100 * tflops / peak[amp]:.1f}% of {peak[amp]:.0f} TFLOPS" if peak[amp] else "card peak unknown"
        print(f"adversarial step, BiSeNet-R18 + FC D, batch {b} source + {b} target at {w}x{h}, amp {amp}: "
              f"{step * 1000:.1f} ms/step, {2 * b / step:.1f} images/s, peak memory "
              f"{cuda.max_memory_allocated() / 2**30 if cuda else float('nan'):.2f} GiB, "
              f"{flops / 1e12:.2f} TFLOP/step, "
              f"{tflops:.1f} TFLOPS achieved, MFU {mfu}" + (
                  f", loss scales: segmenter {method.scaling.scaler(method.opt).get_scale():g}, "
                  f"D {method.scaling.scaler(method.d_opts['main']).get_scale():g}" if amp == "fp16" else ""))
        del method
        if cuda:
            cuda.empty_cache()
    model = MODELS["bisenet_r18"](num_classes=19)
    ih, iw = (64, 128) if dry else (1024, 2048)
    lat = measure_latency(model, (ih, iw), device=str(dev), amp=True, warmup=2 if dry else 10, iters=2 if dry else 50)
    print(f"BiSeNet-R18 inference at {iw}x{ih}, batch 1, fp16 autocast: {lat['latency_ms']:.2f} ms, "
          f"{lat['fps']:.1f} FPS")
    return 0


if __name__ == "__main__":
    sys.exit(main())
