"""`uda-ray` command line: argument parsing, printing and exit codes over the Python API (uda_ray.api).
User errors: one line on stderr, exit status 2."""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
import time
from typing import Any

from uda_ray import api
from uda_ray.config import V2_SHIFT_DEFAULTS
from uda_ray.errors import UserError
from uda_ray.results import text
from uda_ray.selection import study
from uda_ray.storage import layout, store

EXIT_USER, EXIT_INTERRUPTED = 2, 130


def _hw(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise UserError(f"--size {text}: expected HxW, e.g. 512x1024") from None
    return h, w  # the API checks the sizes


def _ended(s: api.Sweep, top: int = 5) -> int | None:
    if s.status == api.INTERRUPTED:
        print(f"interrupted: `uda-ray resume {s.name}` continues it", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(text.sweep_ended(s, top))
    return None


def cmd_sweep(a: argparse.Namespace) -> int | None:
    if a.top < 1:
        raise UserError("--top must be >= 1")
    s = api.sweep(a.space, storage=a.storage, address=a.address, name=a.name, overrides=a.set,
                  warm_start=a.warm_start, mlflow=a.mlflow)
    return _ended(s, a.top)


def cmd_resume(a: argparse.Namespace) -> int | None:
    return _ended(api.resume(a.sweep, storage=a.storage, address=a.address))


def cmd_best(a: argparse.Namespace) -> None:
    if a.top < 1 or a.index < 1:
        raise UserError("--top and --index must be >= 1")
    print(text.leaderboard(api.leaderboard(a.sweep, storage=a.storage, top=max(a.top, a.index),
                                                 metric=a.metric, method=a.method)))
    if a.export:
        api.export_best(a.sweep, a.export, storage=a.storage, metric=a.metric, method=a.method, index=a.index)
        print(f"wrote {a.export}")


def cmd_ls(a: argparse.Namespace) -> None:
    given = a.storage or os.environ.get("UDA_RAY_STORAGE") or ""
    rows = api.ls(a.storage)
    print(text.sweeps_table(rows, store.redact(given) if store.is_uri(given) else api.storage_root(a.storage)))


def cmd_report(a: argparse.Namespace) -> None:
    t0 = time.time()
    out = api.report(a.name, storage=a.storage, out=a.out, predictions=not a.no_predictions)
    print(f"wrote {out} ({a.name}, {out.stat().st_size / 1e6:.1f} MB, {time.time() - t0:.1f}s)")


def cmd_validators(a: argparse.Namespace) -> None:
    if len(a.name) == 1:
        rows, path = api.validators(a.name[0], storage=a.storage)
        print(f"{study.format_table(rows)}\nwrote {path}")
        return
    per, pooled, across = api.validators_across(a.name, storage=a.storage)
    for name, rows in per.items():
        print(f"== {name} ==\n{study.format_table(rows)}\n")
    print(f"== pooled: the checkpoints of {', '.join(per)} as one pool ==\n{study.format_table(pooled)}\n")
    print(f"== across {', '.join(per)}, measured apart ==\n{study.format_across(across)}")


def cmd_ensv(a: argparse.Namespace) -> None:
    rows, path = api.ensv(a.name, storage=a.storage, device=a.device)
    print(f"uv/ensv of {len(rows)} kept checkpoints (agreement with the pool's mean-softmax prediction on the "
          "held-out target slice), best first:")
    for r in rows:
        print(f"  {r['trial_id']:<16} step {r['step']:>7}  {r['uv/ensv']:.4f}")
    print(f"wrote {path}; rank by it with `uda-ray best {a.name} --metric uv/ensv`")


def cmd_rerun(a: argparse.Namespace) -> None:
    summary = api.rerun(a.sweep, top=a.top, seeds=a.seeds, metric=a.metric, storage=a.storage, address=a.address)
    print(text.rerun_ended(summary, layout.results_dir(api.sweep_dir(a.sweep, a.storage))))


def cmd_train(a: argparse.Namespace) -> None:
    print(text.run_ended(api.train(a.experiment, storage=a.storage, overrides=a.set, name=a.name,
                                         address=a.address)))


def cmd_pipeline(a: argparse.Namespace) -> None:
    t0 = time.time()
    summary = api.pipeline(a.pipeline, storage=a.storage, report=a.report, address=a.address, overrides=a.set,
                           name=a.name, seeds=a.seeds)
    print(text.pipeline_ended(summary, time.time() - t0, a.report))


def cmd_evaluate(a: argparse.Namespace) -> None:
    result = api.evaluate(a.checkpoint, experiment=a.experiment, overrides=a.set, weights=a.weights,
                          device=a.device, storage=a.storage, out=a.out)
    print(text.evaluation_summary(result))
    if a.out:
        print(f"wrote {a.out}")


def cmd_reproduce(a: argparse.Namespace) -> int | None:
    from uda_ray import catalogue

    entries = catalogue.load_catalogue(a.catalogue)
    if a.list or a.markdown:
        print(catalogue.markdown_table(entries) if a.markdown else catalogue.listing(entries))
        return None
    if not a.entry:
        raise UserError("reproduce: name an ENTRY, or --list")
    inputs = dict(_key_value(v, "--with") for v in a.inputs)
    root = None if a.catalogue else catalogue.REPO_ROOT  # another catalogue's paths: from the working directory
    argv = catalogue.entry_argv(catalogue.find(entries, a.entry), inputs=inputs, overrides=a.set,
                                storage=a.storage, repo_root=root)
    print("uda-ray " + " ".join(shlex.quote(t) for t in argv))
    if a.dry_run:
        return None
    sub = parser().parse_args(argv)
    return sub.fn(sub)


def _key_value(text: str, flag: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise UserError(f"{flag} {text}: expected NAME=VALUE")
    return key, value


def cmd_data_synth(a: argparse.Namespace) -> None:
    t0 = time.time()
    out = api.synthetic_data(a.out, n_source=a.n_source, n_target=a.n_target, n_val=a.n_val, size_hw=_hw(a.size),
                             seed=a.seed, synthia=a.synthia, version=a.benchmark_version,
                             colour_shift=a.colour_shift, layout_shift=a.layout_shift)
    print(f"wrote {out} in {time.time() - t0:.1f}s")


def cmd_convert_weights(a: argparse.Namespace) -> None:
    print(text.converted_weights(api.convert_weights(a.src, a.dst, num_classes=a.num_classes)))


def cmd_profile(a: argparse.Namespace) -> None:
    print(text.profile_report(api.profile_model(a.model, size_hw=_hw(a.size), device=a.device, amp=a.amp)))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="uda-ray", description="Hyperparameter search for UDA segmentation on Ray.")
    p.add_argument("-v", "--verbose", action="store_true", help="log INFO messages")
    sub = p.add_subparsers(dest="cmd", required=True)
    _sweep_commands(sub)
    _run_commands(sub)
    _tool_commands(sub)
    return p


def _command(sub: Any, name: str, fn: Any, help: str, *positional: str, storage: bool = True,
             address: bool = False, overrides: bool = False) -> argparse.ArgumentParser:
    """A subcommand with its positional arguments and the shared options it takes."""
    sp = sub.add_parser(name, help=help)
    for arg in positional:
        sp.add_argument(arg)
    if storage:
        sp.add_argument("--storage", help="storage root (default $UDA_RAY_STORAGE or ./uda_ray_runs)")
    if address:
        sp.add_argument("--address", help="Ray cluster address (default $RAY_ADDRESS, else a local cluster)")
    if overrides:
        sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override the (base) experiment")
    sp.set_defaults(fn=fn)
    return sp


def _sweep_commands(sub: Any) -> None:
    sp = _command(sub, "sweep", cmd_sweep, "run a search space", "space", address=True, overrides=True)
    sp.add_argument("--name")
    sp.add_argument("--top", type=int, default=5)
    sp.add_argument("--warm-start", metavar="SWEEP",
                    help="seed the sampler with an earlier sweep's finished trials that fit this space")
    sp.add_argument("--mlflow", metavar="URI", help="also log every trial as an MLflow run (e.g. file:///abs/mlruns)")
    _command(sub, "resume", cmd_resume, "continue an interrupted sweep", "sweep", address=True)
    sp = _command(sub, "best", cmd_best, "the best trials of a sweep", "sweep")
    sp.add_argument("--top", type=int, default=5)
    sp.add_argument("--metric", help="rank by this reported metric (default: the sweep's objective)")
    sp.add_argument("--method")
    sp.add_argument("--export", metavar="FILE", help="write the winner as a runnable experiment YAML")
    sp.add_argument("--index", type=int, default=1,
                    help="export the N-th entry of the printed list (the Pareto front of a multi-objective sweep)")
    sp = _command(sub, "validators", cmd_validators,
                  "how well each validator tracks test mIoU (Spearman, selection regret, worst-model rate); "
                  "several names (e.g. one sweep per method): each, then pooled, then across them")
    sp.add_argument("name", nargs="+")
    sp = _command(sub, "ensv", cmd_ensv, "score the kept checkpoints of a sweep (or run) with EnsV: agreement "
                  "with the pool's ensemble on the held-out target slice (then best --metric uv/ensv)", "name")
    sp.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    sp = _command(sub, "rerun", cmd_rerun, "retrain a sweep's top configurations with new seeds: mean ± std",
                  "sweep", address=True)
    sp.add_argument("--top", type=int, default=3, help="configurations to retrain (default 3)")
    sp.add_argument("--seeds", type=int, default=3, help="new seeds per configuration (default 3)")
    sp.add_argument("--metric", help="rank configurations by this metric (default: the sweep's objective)")
    _command(sub, "ls", cmd_ls, "list sweeps")
    sp = _command(sub, "report", cmd_report, "one self-contained HTML page about a sweep, a run or a pipeline",
                  "name")
    sp.add_argument("--out", metavar="FILE.html", help="where to write it (default: NAME's folder/report.html)")
    sp.add_argument("--no-predictions", action="store_true",
                    help="skip running the best checkpoint on target images (e.g. data not on this machine)")


def _run_commands(sub: Any) -> None:
    sp = _command(sub, "train", cmd_train, "run one experiment (one run)", "experiment", address=True,
                  overrides=True)
    sp.add_argument("--name", help="run name (default: the experiment's name); an existing run resumes")
    sp = _command(sub, "pipeline", cmd_pipeline, "run the stages of a pipeline in order (skips completed ones)",
                  "pipeline", address=True)
    sp.add_argument("--report", metavar="FILE.md", help="write a markdown table of the stages' results")
    sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override every experiment stage; applied last (wins over the file's set: and the "
                         "stages' own set)")
    sp.add_argument("--name", help="the pipeline's folder name (default: the file's name), e.g. one per seed")
    sp.add_argument("--seeds", type=int, metavar="N", help="run it once per seed 0..N-1 (folders NAME_s0, ...); "
                    "--report then gives every stage's mean ± std over the seeds")
    sp = _command(sub, "evaluate", cmd_evaluate, "evaluate a checkpoint (test mIoU, per-class IoU, validators) "
                  "under its experiment's protocol, in-process (no Ray)")
    sp.add_argument("checkpoint", help="a uda_ray checkpoint (folder with state.pt, or the file); with "
                                       "--experiment, a weights file")
    sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override the protocol: data.* and train.eval_batch_size of a checkpoint's experiment "
                         "(any key with --experiment)")
    sp.add_argument("--experiment", metavar="EXPERIMENT.yaml",
                    help="evaluate CHECKPOINT as a weights file (a state_dict of the segmenter, e.g. a published "
                         "model after convert-weights) under this experiment")
    sp.add_argument("--weights", choices=["model", "teacher"], default="model",
                    help="a checkpoint's segmenter (default) or its EMA teacher")
    sp.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    sp.add_argument("--out", metavar="FILE.json", help="also write the metrics as JSON")
    _reproduce_command(sub)


def _reproduce_command(sub: Any) -> None:
    sp = _command(sub, "reproduce", cmd_reproduce, "the command that reproduces a paper's table row "
                  "(experiments/reproduce/catalogue.yaml): list the entries, print one, or run it", overrides=True)
    sp.add_argument("entry", nargs="?", help="a catalogue entry id (see --list)")
    sp.add_argument("--list", action="store_true", help="list every entry: paper, table, row, reported number, "
                                                         "command or why none, what differs, time estimate")
    sp.add_argument("--markdown", action="store_true", help="print the catalogue as experiments/README.md's table")
    sp.add_argument("--with", dest="inputs", action="append", default=[], metavar="NAME=VALUE",
                    help="fill the entry's {NAME} placeholder (e.g. a published checkpoint file)")
    sp.add_argument("--dry-run", action="store_true", help="print the command, do not run it")
    sp.add_argument("--catalogue", metavar="FILE.yaml", help="another catalogue (default experiments/reproduce/"
                    "catalogue.yaml); its paths are relative to the working directory")


def _tool_commands(sub: Any) -> None:
    sp = sub.add_parser("data", help="datasets")
    ds = sp.add_subparsers(dest="data_cmd", required=True).add_parser(
        "synth", help="write the synthetic domain-shift benchmark")
    ds.add_argument("--out", required=True)
    for k, v in (("--n-source", 200), ("--n-target", 200), ("--n-val", 50), ("--seed", 0)):
        ds.add_argument(k, type=int, default=v)
    ds.add_argument("--size", default="128x256", help="HxW")
    ds.add_argument("--synthia", action="store_true", help="also write a SYNTHIA-layout source")
    ds.add_argument("--benchmark-version", type=int, choices=[1, 2], default=2,
                    help="2 (default): appearance, layout, lighting and sensor shift (docs/benchmark.md); 1: the "
                         "original shift")
    ds.add_argument("--colour-shift", type=float, default=None,
                    help="version 2: how far the target's class colours move from the game's, 0-1 (default "
                         f"{V2_SHIFT_DEFAULTS['colour_shift']:g})")
    ds.add_argument("--layout-shift", type=float, default=None,
                    help="version 2: how far the target's camera and street layout move from the game's, 0-1 "
                         f"(default {V2_SHIFT_DEFAULTS['layout_shift']:g})")
    ds.set_defaults(fn=cmd_data_synth)
    sp = _command(sub, "convert-weights", cmd_convert_weights, "convert an AdaptSegNet / ADVENT / CPSL DeepLab-v2 "
                  "checkpoint to this project's keys (layout detected from its keys)", storage=False)
    sp.add_argument("src", help="the original .pth / CPSL .pkl (e.g. DeepLab_resnet_pretrained_imagenet.pth, "
                    "a trained model)")
    sp.add_argument("dst", help="the converted .pth to write (not overwritten)")
    sp.add_argument("--num-classes", type=int, default=None,
                    help="keep only classifiers with this many outputs (the init files' other heads are dropped)")
    sp = _command(sub, "profile", cmd_profile, "params, GFLOPs and latency of a model", "model", storage=False)
    sp.add_argument("--size", default="512x1024", help="HxW")
    sp.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    sp.add_argument("--amp", action="store_true")


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    api.show_progress()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        return args.fn(args) or 0  # a command returns an exit status only when it is not 0
    except UserError as e:
        print(f"uda-ray: error: {e}", file=sys.stderr)
        if type(e).__name__ == "ClusterUnreachable":  # ray.init still retries in a thread: do not wait
            sys.stderr.flush()
            os._exit(EXIT_USER)
        return EXIT_USER
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        if "ray" in sys.modules and sys.modules["ray"].is_initialized():
            sys.modules["ray"].shutdown()  # the local cluster this command started ends with it


if __name__ == "__main__":
    sys.exit(main())
