"""The storage plan: where sweeps, runs and pipelines live under the storage root, and what a name refers to.

    <root>/<sweep>/                       a sweep; its sweep.json (read_meta / write_meta) marks it
    <root>/<sweep>/results/               its Parquet tables (trials, evals, class_iou, validators, reruns, ...)
    <root>/<sweep>/train/train-<trial>/   a trial's run folder (checkpoints, config.yaml, progress)
    <root>/<sweep>/reruns/<run>/          seed reruns of its top configurations (uda_ray.selection.seed_variance)
    <root>/runs/<name>/                   a `uda-ray train` run, with its results/
    <root>/pipelines/<name>/<stage>/      a pipeline's stages (runs or actions' outputs), each with its results/;
    <root>/pipelines/<name>/results/      the pipeline's own tables (validators)
    <root>/data/                          generated datasets (the synthetic benchmark), unless $UDA_RAY_DATA
    <folder>/report.html                  `uda-ray report`'s page about a sweep, run or pipeline folder

Every folder of the plan is made by a function here. A cloud URI root (`s3://bucket/prefix`, any URI a pyarrow
filesystem serves) is this node's staging folder of it (uda_ray.storage.store): `root` brings down the store's
files but checkpoints and datasets, and each writer pushes what it writes (`write_meta` here; the tables, the
Optuna journal, checkpoints and Tune's state where they are written). What a run or a Tune experiment keeps
inside its own folder (checkpoints, tune/, the Optuna journal) is the business of the code that writes it.

Names: NAME is a sweep (<root>/NAME), a run (runs/NAME) or a pipeline (pipelines/NAME); in an experiment,
`run:NAME` and `sweep:NAME` refer to a run's or a sweep's folder (`reference`). This module only locates
folders and reads or writes sweep.json; it imports nothing of the package but its errors.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from uda_ray.errors import UserError
from uda_ray.storage import store

RESULTS = "results"  # the results tables' folder of a sweep, a run, a pipeline stage, a rerun, a pipeline
SWEEP_FILE = "sweep.json"
RUNS, PIPELINES, RERUNS, TRIALS, DATA = "runs", "pipelines", "reruns", "train", "data"
DEFAULT_ROOT = "uda_ray_runs"
REFERENCES = ("run:", "sweep:")  # experiment values naming another run's or sweep's folder


# ------------------------------------------------------------------------------------------------
# the root and the folders under it


def root(storage: str | os.PathLike | None = None) -> Path:
    """The storage root: `storage`, else $UDA_RAY_STORAGE, else ./uda_ray_runs (absolute); a folder, or a path
    where one can be made (UserError otherwise). Nothing is created. A storage URI (`s3://bucket/prefix?...`):
    this node's staging folder of it, with the store's files but checkpoints and datasets brought down
    (UserError, one line, for a URI no filesystem serves, an unreachable endpoint or a missing bucket)."""
    given = str(storage or os.environ.get("UDA_RAY_STORAGE") or DEFAULT_ROOT)
    if store.is_uri(given):
        staging = store.open_store(given).staging
        store.pull(staging, skip=bulky)
        return staging
    if given.startswith("file://"):
        given = given[len("file://"):]
    r = Path(given).expanduser().absolute()
    if r.exists() and not r.is_dir():
        raise UserError(f"storage {r}: not a folder")
    existing = r
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"storage {r}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"storage {r}: {existing} is not writable")
    return r


def bulky(rel: str) -> bool:
    """What a command's pull leaves in the store (a store-relative posix path): checkpoints (a trial pulls its
    own run folder's when it starts) and generated datasets."""
    parts = rel.split("/")
    return parts[0] == DATA or any(p.startswith(("checkpoint_", ".")) or p == "checkpoints" for p in parts)


def data_dir(root: Path) -> Path:
    """Where generated datasets go: $UDA_RAY_DATA, else <root>/data."""
    return Path(os.environ["UDA_RAY_DATA"]) if os.environ.get("UDA_RAY_DATA") else Path(root) / DATA


def sweep_dir(root: Path, name: str) -> Path:
    return Path(root) / name


def trial_dir(sweep: Path, trial_id: str) -> Path:
    """The run folder of a sweep's trial."""
    return Path(sweep) / TRIALS / f"{TRIALS}-{trial_id}"


def reruns_dir(sweep: Path) -> Path:
    """The folder holding the seed reruns of a sweep (each a run folder named after its trial and seed)."""
    return Path(sweep) / RERUNS


def rerun_dir(sweep: Path, name: str) -> Path:
    return reruns_dir(sweep) / name


def runs_dir(root: Path) -> Path:
    """The folder holding the `uda-ray train` runs (the `storage` a run is trained under)."""
    return Path(root) / RUNS


def run_dir(root: Path, name: str) -> Path:
    return runs_dir(root) / name


def pipeline_dir(root: Path, name: str) -> Path:
    return Path(root) / PIPELINES / name


def stage_dir(pipeline: Path, stage: str) -> Path:
    """A pipeline stage's folder (a run folder, or an action's output)."""
    return Path(pipeline) / stage


def results_dir(folder: Path) -> Path:
    """The results tables of a sweep, run, stage, rerun or pipeline folder."""
    return Path(folder) / RESULTS


def report_file(folder: Path) -> Path:
    """Where `uda-ray report` writes the page about a sweep, run or pipeline folder by default."""
    return Path(folder) / "report.html"


def has_evals(folder: Path) -> bool:
    """A run (or stage) folder that has evaluated at least once."""
    return (results_dir(folder) / "evals.parquet").exists()


def stages_with_evals(pipeline: Path) -> list[Path]:
    """The stage folders of a pipeline that have evaluated, by name."""
    return sorted(p.parent.parent for p in Path(pipeline).glob(f"*/{RESULTS}/evals.parquet"))


# ------------------------------------------------------------------------------------------------
# sweep.json


def is_sweep(folder: Path) -> bool:
    return (Path(folder) / SWEEP_FILE).is_file()


def sweep_folders(root: Path) -> list[Path]:
    """Every sweep under the root, by name."""
    return sorted(p.parent for p in Path(root).glob(f"*/{SWEEP_FILE}"))


def read_meta(sweep: Path) -> dict:
    """A sweep's record (what was asked, its status, its driver); UserError (one line) if unreadable."""
    path = Path(sweep) / SWEEP_FILE
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"{path}: not readable JSON ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
                        ) from None
    if not isinstance(meta, dict) or "name" not in meta:
        raise UserError(f"{path}: not a sweep record (no 'name')")
    return meta


def write_meta(sweep: Path, meta: dict) -> None:
    """Replace a sweep's record atomically."""
    tmp = Path(sweep) / f".{SWEEP_FILE}.tmp"
    tmp.write_text(json.dumps(meta, indent=2))
    os.replace(tmp, Path(sweep) / SWEEP_FILE)
    store.push(Path(sweep) / SWEEP_FILE)


# ------------------------------------------------------------------------------------------------
# names


def find_sweep(root: Path, name: str) -> Path:
    """The folder of the existing sweep `name`; UserError naming the known sweeps if there is none."""
    d = sweep_dir(root, name)
    if not is_sweep(d):
        known = [p.name for p in sweep_folders(root)]
        raise UserError(f"unknown sweep '{name}' under {root}"
                        + (f" (known: {', '.join(known)})" if known else " (no sweeps there)"))
    return d


def find(root: Path, name: str) -> tuple[str, Path]:
    """NAME -> (kind, folder) of something with results: a folder given by path, else a sweep <root>/NAME, a
    run runs/NAME, a pipeline pipelines/NAME (the first that exists, in that order). For `uda-ray report`."""
    root = Path(root)
    cands = [("sweep", sweep_dir(root, name)), ("run", run_dir(root, name)), ("pipeline", pipeline_dir(root, name))]
    p = Path(name)
    if p.is_dir():
        cands.insert(0, ("sweep" if is_sweep(p) else "run" if results_dir(p).is_dir() else "pipeline", p))
    for kind, d in cands:
        if (kind == "sweep" and is_sweep(d)) or (kind == "run" and has_evals(d)) or \
                (kind == "pipeline" and d.is_dir() and stages_with_evals(d)):
            return kind, d
    raise UserError(f"nothing called '{name}' under {root}: no sweep ({name}/{SWEEP_FILE}), run ({RUNS}/{name}) "
                    f"or pipeline ({PIPELINES}/{name}) with results")


def find_evals(root: Path, name: str) -> tuple[str, Path, list[Path]]:
    """NAME -> (kind, the results folder for tables about it, the results folders holding its evals): a sweep
    <root>/NAME, else a pipeline pipelines/NAME (every stage with evals), else a run runs/NAME. For the
    validator study (`uda-ray validators`). UserError (one line) naming the known sweeps and pipelines."""
    root = Path(root)
    if is_sweep(sweep_dir(root, name)):
        return "sweep", results_dir(sweep_dir(root, name)), [results_dir(sweep_dir(root, name))]
    pdir = pipeline_dir(root, name)
    if pdir.is_dir() and name:
        return "pipeline", results_dir(pdir), [results_dir(d) for d in stages_with_evals(pdir)]
    if name and has_evals(run_dir(root, name)):
        return "run", results_dir(run_dir(root, name)), [results_dir(run_dir(root, name))]
    pipes = pdir.parent
    known = sorted({p.name for p in sweep_folders(root)} | {p.name for p in pipes.glob("*") if p.is_dir()})
    raise UserError(f"unknown sweep or pipeline '{name}' under {root}"
                    + (f" (known: {', '.join(known)})" if known else " (none there)"))


def is_reference(value: Any) -> bool:
    return isinstance(value, str) and value.startswith(REFERENCES)


def reference(root: Path, ref: str) -> tuple[str, str, Path]:
    """`run:NAME` -> ("run", NAME, runs/NAME); `sweep:NAME` -> ("sweep", NAME, <root>/NAME). Whether the folder
    holds what the reference needs is for its reader to say."""
    kind, _, name = ref.partition(":")
    if f"{kind}:" not in REFERENCES:
        raise ValueError(f"not a reference: {ref!r}")
    return kind, name, run_dir(root, name) if kind == "run" else sweep_dir(root, name)
