"""Parquet results tables: `trials`, `evals`, `class_iou` — written durably, queried afterwards.

Under <sweep>/results/ (or <run>/results/):

    trials.parquet      one file, one row per trial, rewritten atomically (temporary file, fsync, rename)
    evals.parquet/      a folder of Parquet segments (Spark-style), one row per (trial, step)
    class_iou.parquet/  the same, one row per (trial, step, class)

At any moment a reader sees whole files only, each key at most once, and every row written before it
looked; plain pyarrow / pandas (`read_parquet(".../evals.parquet")`), polars and DuckDB
(`".../evals.parquet/*.parquet"`) read them without uda_ray. A result rewrites only the last segment of
each table (bounded size), never the whole table, so its cost stays flat as a sweep grows. A step already
recorded (replayed by a resumed trial) keeps its first row: a resume adds no duplicates. The fixed columns
have a declared Arrow type and every reported metric is float64: a value of another type is an error,
never a silent cast to text.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from uda_ray.config import experiment_dict, flatten
from uda_ray.errors import UserError
from uda_ray.metric_names import REPORTED_PREFIXES, SCHEMA_VERSION, check_metric, mode_of, upgrade_row
from uda_ray.target_labels import MARK, SHORT_MARK, row_marked, trains_on_target_gt

TABLES = {"trials": ("trial_id",), "evals": ("trial_id", "step"), "class_iou": ("trial_id", "step", "class_name")}
APPEND_ONLY = ("evals", "class_iou")
# on the first evaluation after the run restarted from a checkpoint (a dead worker, a resumed driver): the step
# it resumed from and how many restarts the run has had so far
RESTART_KEYS = ("resumed_from", "restarts")
# where rank 0 of the run trained for that evaluation: the Ray node's id and IP (absent outside Ray)
NODE_KEYS = ("node_id", "node_ip")
SEGMENT_ROWS = {"evals": 1024, "class_iou": 8192}  # rows per segment of the append-only tables

_STR, _INT, _FLOAT, _BOOL = pa.string(), pa.int64(), pa.float64(), pa.bool_()
FIXED: dict[str, dict[str, pa.DataType]] = {
    "evals": {"schema_version": _INT, "sweep": _STR, "trial_id": _STR, "step": _INT, "checkpoint_path": _STR,
              "reported_at": _FLOAT, "resumed_from": _INT, "restarts": _INT, "node_id": _STR, "node_ip": _STR},
    "class_iou": {"schema_version": _INT, "sweep": _STR, "trial_id": _STR, "step": _INT, "class_name": _STR,
                  "iou": _FLOAT},
    "trials": {"schema_version": _INT, "sweep": _STR, "trial_id": _STR, "status": _STR, "method": _STR,
               "model": _STR, "source": _STR, "target": _STR, "seed": _INT, "max_steps": _INT, "objective": _STR,
               "mode": _STR, "search_seed": _INT, "params": _STR, "config_json": _STR, "uda_ray_version": _STR,
               "torch_version": _STR, "ray_version": _STR, "started_at": _FLOAT, "updated_at": _FLOAT,
               "best_value": _FLOAT, "best_step": _INT, "best_checkpoint": _STR, "final_value": _FLOAT,
               "final_step": _INT, "last_checkpoint": _STR, "n_evals": _INT, "wall_time_s": _FLOAT,
               "restarts": _INT, "resumed_from": _INT, "node_id": _STR, "node_ip": _STR, "error": _STR,
               "target_ground_truth": _BOOL},
}


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(table: pa.Table, path: Path) -> None:
    """Atomically (re)place one Parquet file; the temporary name is hidden, so readers skip it."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pq.write_table(table, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _cell(v: Any) -> Any:
    """Parquet-friendly scalar: lists/dicts as JSON text, NaN kept as float."""
    if isinstance(v, (list, tuple, dict)):
        return json.dumps(v)
    if hasattr(v, "item") and not isinstance(v, (str, bytes)):
        return v.item()
    return v


def _typed(vals: list, typ: pa.DataType, column: str) -> pa.Array:
    """A declared column: ints widen to floats, nothing is turned into text."""
    out = []
    for v in vals:
        v = _cell(v)
        if v is None:
            out.append(None)
        elif typ == _FLOAT and isinstance(v, (int, float)) and not isinstance(v, bool):
            out.append(float(v))
        elif typ == _INT and isinstance(v, int) and not isinstance(v, bool):
            out.append(v)
        elif typ == _INT and isinstance(v, float) and v.is_integer():
            out.append(int(v))
        elif typ == _STR and isinstance(v, str) or typ == _BOOL and isinstance(v, bool):
            out.append(v)
        else:
            raise TypeError(f"results column '{column}' is {typ}, got {v!r}")
    return pa.array(out, type=typ)


def rows_to_table(rows: list[dict], declared: dict[str, pa.DataType] | None = None,
                  columns: list[str] | None = None) -> pa.Table:
    """Rows with possibly different keys -> one table over the union of columns (missing = null).

    `declared` columns get their declared type; any other column is inferred, and a column whose values
    mix types (a searched choice of a number and a word) is stored as text."""
    declared = declared or {}
    cols: dict[str, None] = dict.fromkeys(columns or [])
    for r in rows:
        cols.update(dict.fromkeys(r))
    arrays = {}
    for c in cols:
        vals = [r.get(c) for r in rows]
        if c in declared:
            arrays[c] = _typed(vals, declared[c], c)
            continue
        vals = [_cell(v) for v in vals]
        try:
            arrays[c] = pa.array(vals)
        except (pa.ArrowInvalid, pa.ArrowTypeError):  # mixed types in one column: keep as text
            arrays[c] = pa.array([None if v is None else str(v) for v in vals])
    return pa.table(arrays) if arrays else pa.table({})


def _metric_type(table: str, column: str) -> pa.DataType:
    fixed = FIXED[table].get(column)
    if fixed is not None:
        return fixed
    if column.startswith(REPORTED_PREFIXES):
        return _FLOAT
    raise TypeError(f"results table '{table}' has no column '{column}'")


class SegmentTable:
    """One append-only keyed table: the folder `<dir>/<name>.parquet/` of segments `part-NNNNNN.parquet`.

    Only the last segment takes new rows: it is rewritten whole (temporary file, fsync, rename) with each
    batch until it holds `SEGMENT_ROWS[name]` rows, then the next one starts. A row lives in exactly one
    segment and a segment only grows, so a reader listing the folder at any moment sees each key at most
    once and every row written before it listed; the cost of a result is bounded by the segment size, not
    by the table. All segments share one schema (plain readers take it from the first file): a new column
    is added to every segment, the first one last."""

    def __init__(self, directory: Path, name: str) -> None:
        self.dir, self.name, self.key = Path(directory), name, TABLES[name]
        self.path = self.dir / f"{name}.parquet"
        self.keys: set[tuple] = set()
        self.pending: list[dict] = []
        self.schema: pa.Schema | None = None
        self.segments: list[str] = []
        self.open_table: pa.Table | None = None  # the last segment (rewritten with each batch)
        self._load()

    def _seg(self, i: int) -> str:
        return f"part-{i:06d}.parquet"

    def _load(self) -> None:
        if self.path.is_file():  # the one-file layout of earlier versions
            self._convert_one_file()
        if not self.path.is_dir():
            return
        self.segments = sorted(p.name for p in self.path.glob("part-*.parquet"))
        if not self.segments:
            return
        schemas = [pq.read_schema(self.path / f) for f in self.segments]
        self.schema = pa.unify_schemas(schemas)
        if any(not sc.equals(self.schema) for sc in schemas):  # a driver died while adding a column
            self._widen(self.schema, [f for f, sc in zip(self.segments, schemas) if not sc.equals(self.schema)])
        t = pq.read_table(self.path, columns=list(self.key), schema=self.schema)
        self.keys = set(zip(*(t.column(k).to_pylist() for k in self.key)))
        self.open_table = pq.read_table(self.path / self.segments[-1], schema=self.schema)

    def _convert_one_file(self) -> None:
        rows = [upgrade_row(r) if (r.get("schema_version") or 1) < 2 else r
                for r in pq.read_table(self.path).to_pylist()]
        staging = self.dir / f".{self.name}.parquet.convert"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        columns = list(dict.fromkeys(c for r in rows for c in r))
        schema = pa.schema([(c, _metric_type(self.name, c)) for c in columns])
        _atomic_write(rows_to_table(rows, dict(zip(schema.names, schema.types)), columns), staging / self._seg(0))
        aside = self.dir / f".{self.name}.parquet.one-file"
        os.replace(self.path, aside)
        os.replace(staging, self.path)
        aside.unlink()
        _fsync_dir(self.dir)

    def rows(self) -> list[dict]:
        return pq.read_table(self.path, schema=self.schema).to_pylist() if self.segments else []

    def insert(self, rows: Iterable[dict]) -> list[dict]:
        """Queue the rows whose key is new; returns them."""
        new = []
        for r in rows:
            k = tuple(r[c] for c in self.key)
            if k not in self.keys:
                self.keys.add(k)
                new.append(r)
        self.pending += new
        return new

    def flush(self) -> None:
        if not self.pending:
            return
        rows, self.pending = self.pending, []
        columns = list(self.schema.names) if self.schema is not None else []
        known = set(columns)
        for r in rows:
            for c in r:
                if c not in known:
                    known.add(c)
                    columns.append(c)
        schema = pa.schema([(c, _metric_type(self.name, c)) for c in columns])
        new = rows_to_table(rows, dict(zip(schema.names, schema.types)), columns).select(columns)
        self.path.mkdir(parents=True, exist_ok=True)
        if self.open_table is None or self.open_table.num_rows >= SEGMENT_ROWS[self.name]:
            self.segments.append(self._seg(len(self.segments)))
            self.open_table = None
        new_column = self.schema is not None and not schema.equals(self.schema)
        self.schema = schema
        parts = [_conform(self.open_table, schema)] if self.open_table is not None else []
        self.open_table = pa.concat_tables([*parts, new])
        _atomic_write(self.open_table, self.path / self.segments[-1])
        if new_column:
            self._widen(schema, self.segments[:-1])

    def _widen(self, schema: pa.Schema, segments: list[str]) -> None:
        """Add the columns of `schema` (null) to `segments`, the first segment last (readers take its schema)."""
        self.schema = schema
        for name in sorted(segments, reverse=True):
            _atomic_write(_conform(pq.read_table(self.path / name), schema), self.path / name)


def _conform(t: pa.Table, schema: pa.Schema) -> pa.Table:
    """`t` with the columns of `schema`, in its order (missing ones null)."""
    return pa.table({c: (t.column(c) if c in t.column_names else pa.nulls(len(t), schema.field(c).type))
                     for c in schema.names}, schema=schema)


class TableStore:
    """The tables of one results folder. `trials` is kept in memory (keyed, small) and rewritten;
    `evals` and `class_iou` are append-only (a known key keeps its first row)."""

    def __init__(self, directory: Path, trials_every_s: float = 0.0) -> None:
        self.dir = Path(directory)
        self.rows: dict[str, dict[tuple, dict]] = {"trials": {}}
        self.evals_by_trial: dict[str, list[dict]] = {}
        for r in read_table(self.dir, "trials"):
            self.rows["trials"][(r["trial_id"],)] = r
        self.append_only = {t: SegmentTable(self.dir, t) for t in APPEND_ONLY}
        for r in self.append_only["evals"].rows():
            self.evals_by_trial.setdefault(r["trial_id"], []).append(r)
        self.trials_every_s = trials_every_s
        self._trials_written = 0.0

    def _tables(self) -> dict[str, SegmentTable]:
        return self.append_only

    def has(self, table: str, key: tuple) -> bool:
        return key in self.append_only[table].keys

    def upsert(self, table: str, rows: Iterable[dict]) -> None:
        if table == "trials":
            for r in rows:
                self.rows["trials"][(r["trial_id"],)] = r
            return
        for r in self._tables()[table].insert(rows):
            if table == "evals":
                self.evals_by_trial.setdefault(r["trial_id"], []).append(r)

    def flush(self, tables: Iterable[str] = tuple(TABLES), force: bool = True) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tables = list(tables)
        for t in ("class_iou", "evals"):  # class rows first: an eval row means its classes are on disk
            if t in tables:
                self._tables()[t].flush()
        if "trials" in tables and (force or time.time() - self._trials_written >= self.trials_every_s):
            rows = list(self.rows["trials"].values())
            _atomic_write(rows_to_table(rows, FIXED["trials"]), self.dir / "trials.parquet")
            self._trials_written = time.time()


def read_table(results_dir: Path, table: str) -> list[dict]:
    """The rows of one table; rows of schema version 1 come back with their `val/...` columns named
    `test/...` (see uda_ray.metric_names.upgrade_row)."""
    p = Path(results_dir) / f"{table}.parquet"
    if not p.exists():
        return []
    try:
        rows = _read_parquet(p).to_pylist()
    except (OSError, pa.ArrowException) as e:
        raise UserError(f"{p}: not a readable Parquet table ({str(e).splitlines()[0][:200]})") from None
    return [upgrade_row(r) if (r.get("schema_version") or 1) < 2 else r for r in rows]


def _read_parquet(p: Path) -> pa.Table:
    """A table file, or a folder of segments, read while a writer may replace them (see `_read_file`)."""
    if not p.is_dir():
        return _read_file(p)
    parts = [_read_file(seg) for seg in sorted(p.glob("part-*.parquet"))]
    if not parts:
        return pq.read_table(p)  # no segment: pyarrow's own answer (an empty table)
    return pa.concat_tables(parts, promote_options="default")  # the first segment's columns first


PROC_FD = Path("/proc/self/fd").is_dir()  # Linux: an open file can be read again by a path


def _read_file(p: Path, tries: int = 20) -> pa.Table:
    """One Parquet file that a writer may atomically replace meanwhile. pyarrow reading by path takes the size
    from a stat and reads another open of the file, so a replacement in between reads as corrupt (seen as
    "Couldn't deserialize thrift" while a sweep ran). On Linux the path read goes through /proc/self/fd of one
    open handle, so the stat and the read see the same file (a replaced file's handle keeps the old, whole
    one); elsewhere a failed read is retried (each replacement is atomic, so a later read is whole).
    Not pyarrow reading a Python file object or an in-memory buffer: about 1 process in 5 to 1 in 100 that
    read a table that way aborted at exit ("terminate called without an active exception", pyarrow 26)."""
    if PROC_FD:
        with open(p, "rb") as f:
            return pq.read_table(f"/proc/self/fd/{f.fileno()}")
    for i in range(tries - 1):
        try:
            return pq.read_table(p)
        except (OSError, pa.ArrowException):
            time.sleep(0.005 * (i + 1))
    return pq.read_table(p)  # the last try: its error is the caller's


def versions() -> dict[str, str]:
    import torch

    import uda_ray

    out = {"uda_ray_version": uda_ray.__version__, "torch_version": torch.__version__}
    try:
        import ray

        out["ray_version"] = ray.__version__
    except ImportError:  # pragma: no cover
        out["ray_version"] = None
    return out


def eval_rows(sweep: str, trial_id: str, result: dict) -> tuple[dict, list[dict]]:
    """One `evals` row and the `class_iou` rows of one reported result."""
    step = int(result["step"])
    base = {"schema_version": SCHEMA_VERSION, "sweep": sweep, "trial_id": trial_id, "step": step}
    ev = dict(base)
    ious = []
    for k, v in result.items():
        if k.startswith("test/iou/"):
            ious.append({**base, "class_name": k[len("test/iou/"):], "iou": v})
        elif k.startswith(REPORTED_PREFIXES) or k in RESTART_KEYS or k in NODE_KEYS:
            ev[k] = v
    ev["checkpoint_path"] = result.get("checkpoint_path")
    ev["reported_at"] = time.time()
    return ev, ious


class TrialSummary:
    """Builds a `trials` row from the config and every eval reported so far."""

    def __init__(self, sweep: str, trial_id: str, experiment: dict, params: dict, metric: str, mode: str,
                 search_seed: int | None) -> None:
        self.row: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION, "sweep": sweep, "trial_id": trial_id, "status": "pending",
            "method": experiment["method"], "model": experiment["model"]["name"],
            "source": experiment["data"]["source"], "target": experiment["data"]["target"],
            "seed": experiment["seed"], "max_steps": experiment["train"]["max_steps"],
            "objective": metric, "mode": mode, "search_seed": search_seed,
            "params": json.dumps(params, sort_keys=True), "config_json": json.dumps(experiment),
            # trained on the target's ground truth (an oracle, not a UDA result): uda_ray.target_labels
            "target_ground_truth": trains_on_target_gt(experiment),
            **{f"config.{k}": v for k, v in flatten(experiment).items()},
            **versions(), "started_at": time.time(),
        }

    @staticmethod
    def from_row(row: dict) -> TrialSummary:
        s = TrialSummary.__new__(TrialSummary)
        s.row = dict(row)
        return s

    def update(self, evals: list[dict]) -> dict:
        """Recompute best / final values from all of this trial's eval rows."""
        metric, mode = self.row["objective"], self.row["mode"]
        evals = sorted(evals, key=lambda r: r["step"])
        scored = [r for r in evals if r.get(metric) is not None and r[metric] == r[metric]]
        if scored:
            best = (max if mode == "max" else min)(scored, key=lambda r: r[metric])
            last = evals[-1]
            self.row.update({
                "best_value": best[metric], "best_step": best["step"],
                "best_checkpoint": best.get("checkpoint_path"),
                "final_value": last.get(metric), "final_step": last["step"],
                "last_checkpoint": last.get("checkpoint_path"), "n_evals": len(evals),
                "wall_time_s": last.get("time/elapsed_s"),
            })
            for k in ("test/miou", "test/miou16", "test/miou13", "test/pixel_acc"):
                if k in best:
                    self.row[f"best_{k.replace('/', '_')}"] = best[k]
            for k in ("model/params", "model/gflops", "model/latency_ms", "model/fps"):
                if k in last:
                    self.row[k.replace("/", "_")] = last[k]
        restarted = [r for r in evals if r.get("restarts") is not None]
        self.row["restarts"] = max((int(r["restarts"]) for r in restarted), default=0)
        self.row["resumed_from"] = int(restarted[-1]["resumed_from"]) if restarted else None
        if evals:  # the node of the latest evaluation (each evaluation's is in `evals`)
            self.row.update({k: evals[-1].get(k) for k in NODE_KEYS})
        self.row["updated_at"] = time.time()
        return self.row


class ResultsWriter:
    """Keeps the three tables of one sweep up to date (used by the Tune callback on the driver)."""

    def __init__(self, results_dir: Path, sweep: str, metric: str, mode: str, search_seed: int | None,
                 trials_every_s: float = 0.0) -> None:
        # the trials file is rewritten at most every `trials_every_s` by results (always at a start or an end);
        # its rows are recomputed from the evals, so a crash in between loses nothing
        self.store = TableStore(results_dir, trials_every_s)
        self.sweep, self.metric, self.mode, self.search_seed = sweep, metric, mode, search_seed

    def _summary(self, trial_id: str, experiment: dict | None, params: dict) -> TrialSummary:
        row = self.store.rows["trials"].get((trial_id,))
        if row is not None:
            return TrialSummary.from_row(row)
        return TrialSummary(self.sweep, trial_id, experiment or {}, params, self.metric, self.mode,
                            self.search_seed)

    def _evals_of(self, trial_id: str) -> list[dict]:
        return self.store.evals_by_trial.get(trial_id, [])

    def start(self, trial_id: str, experiment: dict, params: dict) -> None:
        s = self._summary(trial_id, experiment, params)
        s.row["status"] = "running"
        self.store.upsert("trials", [s.update(self._evals_of(trial_id))])
        self.store.flush(["trials"])

    def result(self, trial_id: str, experiment: dict, params: dict, result: dict) -> dict:
        """Record one evaluation. A step already recorded (replayed after a resume) keeps its first row."""
        if self.store.has("evals", (trial_id, int(result["step"]))):
            return self._summary(trial_id, experiment, params).row
        ev, ious = eval_rows(self.sweep, trial_id, result)
        self.store.upsert("evals", [ev])
        self.store.upsert("class_iou", ious)
        s = self._summary(trial_id, experiment, params)
        s.row["status"] = "running"
        row = s.update(self._evals_of(trial_id))
        self.store.upsert("trials", [row])
        self.store.flush(force=False)
        return row

    def end(self, trial_id: str, experiment: dict, params: dict, status: str, error: str | None = None) -> dict:
        s = self._summary(trial_id, experiment, params)
        row = s.update(self._evals_of(trial_id))
        if status == "completed" and (row.get("final_step") or 0) < row["max_steps"]:
            status = "stopped_early"  # ended without reaching max_steps: the scheduler stopped it
        row["status"] = status
        row["error"] = error
        self.store.upsert("trials", [row])
        self.store.flush(["trials"])
        return row


def experiment_of(base_raw: dict, params: dict) -> dict:
    from uda_ray.build import build_experiment  # the registries (torch): not for reading tables
    from uda_ray.config import apply_overrides

    return experiment_dict(build_experiment(apply_overrides(base_raw, params), "trial"))


# ------------------------------------------------------------------------------------------------
# queries


def best_trials(results_dir: Path, metric: str | None = None, mode: str | None = None, top: int = 5,
                method: str | None = None) -> list[dict]:
    """Trials ranked by their best value of `metric` (default: the sweep's objective) over all evals.

    Each row says whether that step's checkpoint is still on disk: Ray Train keeps only the run's
    `train.keep_checkpoints` best by the run's own selection metric (and the latest), so the best step by
    another metric may have lost its weights. `rank_checkpoint` is the checkpoint folder when it was kept,
    else None (`rank_checkpoint_kept` False); `kept_step`, `kept_value`, `kept_checkpoint` and
    `kept_test_miou` name the best step by `metric` among those whose checkpoint still exists (the same step
    when it was kept; all None when the trial has no checkpoint left)."""
    from uda_ray.training.checkpoint import checkpoint_kept

    trials = read_table(results_dir, "trials")
    if method:
        trials = [t for t in trials if t["method"] == method]
    if not trials:
        return []
    if metric:
        metric = check_metric(metric, "metric")
        mode = mode or mode_of(metric)
    else:
        metric, mode = trials[0]["objective"], mode or trials[0]["mode"]
    evals = read_table(results_dir, "evals")
    out = []
    for t in trials:
        vals = [e for e in evals
                if e["trial_id"] == t["trial_id"] and e.get(metric) is not None and e[metric] == e[metric]]
        if not vals:
            continue
        pick = max if mode == "max" else min
        kept = [v for v in vals if checkpoint_kept(v.get("checkpoint_path"))]
        e = pick(kept + [v for v in vals if v not in kept], key=lambda x: x[metric])  # a tie: the kept one
        is_kept = checkpoint_kept(e.get("checkpoint_path"))
        k = e if is_kept else pick(kept, key=lambda x: x[metric]) if kept else {}
        # test/miou at the picked step, None when the target has no test labels (absent, not zero)
        out.append({**t, "rank_metric": metric, "rank_mode": mode, "rank_value": e[metric], "rank_step": e["step"],
                    "rank_checkpoint": e.get("checkpoint_path") if is_kept else None,
                    "rank_checkpoint_kept": is_kept, "rank_test_miou": e.get("test/miou"),
                    "kept_step": k.get("step"), "kept_value": k.get(metric),
                    "kept_checkpoint": k.get("checkpoint_path"), "kept_test_miou": k.get("test/miou")})
    out.sort(key=lambda r: r["rank_value"], reverse=(mode == "max"))
    return out[:top]


def non_dominated(points: list[tuple[Any, list[float]]], modes: list[str]) -> set:
    """Keys of the points no other point dominates (at least as good in every objective, better in one)."""
    signs = [1.0 if m == "max" else -1.0 for m in modes]

    def dominates(a: list[float], b: list[float]) -> bool:
        return all(s * x >= s * y for s, x, y in zip(signs, a, b)) and any(s * x > s * y
                                                                           for s, x, y in zip(signs, a, b))

    return {k for k, v in points if not any(dominates(w, v) for _, w in points)}


def pareto_front(results_dir: Path, objectives: list[dict], constraints: list[dict] = ()) -> list[dict]:
    """Completed trials with their objective values at their last evaluation (the values the searcher was told),
    marked `feasible` (every constraint met there) and `on_front` (non-dominated among the feasible trials).
    Front first, ordered by the first objective (best first), then the rest."""
    from uda_ray.search.space import Constraint

    metrics = [o["metric"] for o in objectives]
    modes = [o["mode"] for o in objectives]
    cons = [c if isinstance(c, Constraint) else Constraint(**c) for c in constraints]
    evals = read_table(results_dir, "evals")
    out = []
    for t in read_table(results_dir, "trials"):
        if t["status"] != "completed":
            continue
        mine = sorted((e for e in evals if e["trial_id"] == t["trial_id"]), key=lambda e: e["step"])
        if not mine:
            continue
        last = mine[-1]
        vals = [last.get(m) for m in metrics]
        if not all(isinstance(v, (int, float)) and v == v for v in vals):
            continue
        violations = [c.violation(last.get(c.metric)) for c in cons]
        out.append({**t, "values": vals, "step": last["step"], "checkpoint": last.get("checkpoint_path"),
                    "feasible": all(v <= 0 for v in violations), "violated": [str(c) for c, v in
                                                                         zip(cons, violations) if v > 0]})
    front = non_dominated([(r["trial_id"], r["values"]) for r in out if r["feasible"]], modes)
    for r in out:
        r["on_front"] = r["trial_id"] in front
    sign = -1.0 if modes[0] == "max" else 1.0
    out.sort(key=lambda r: (not r["on_front"], sign * r["values"][0]))
    return out


def markdown_report(title: str, run_dirs: list[tuple[str, Path]], note: str = "", selection: str | None = None) -> str:
    """A markdown table of runs (label, folder holding results/) built from their Parquet tables: the test
    mIoU (in %) of the checkpoint `selection` picks (default: metric_names.DEFAULT_SELECTION; a label-free
    validator) beside the test-label oracle's (the best test mIoU of the run), the final test mIoU, pixel
    accuracy, model cost, and per-class IoU at the oracle's step. A line under the table names the label protocol
    of the numbers (data.label_set: cityscapes19, or synthia16 where every mIoU is the 16-class model's)."""
    from uda_ray.data.labels import CLASSES
    from uda_ray.metric_names import DEFAULT_SELECTION, mode_of

    selection = selection or DEFAULT_SELECTION
    pick = max if mode_of(selection) == "max" else min
    lines = [f"# {title}", "", note, ""] if note else [f"# {title}", ""]
    lines += [f"| run | method | model | steps | selected by {selection}: test mIoU (step) | "
              "oracle: best test mIoU (step) | final mIoU | pixel acc | GFLOPs |",
              "|---|---|---|---|---|---|---|---|---|"]
    per_class = []
    protocols: dict[str, str] = {}  # run label -> data.label_set
    marked: list[str] = []  # runs trained on target ground truth
    for label, d in run_dirs:
        trials = read_table(d / "results", "trials")
        if not trials:
            continue
        t = trials[0]
        evals = [e for e in read_table(d / "results", "evals") if e.get("test/miou") is not None]
        if not evals:
            continue
        protocols[label] = t.get("config.data.label_set") or "cityscapes19"  # older tables: 19 classes
        best = max(evals, key=lambda e: e["test/miou"])
        last = max(evals, key=lambda e: e["step"])
        scored = [e for e in evals if e.get(selection) is not None and e[selection] == e[selection]]
        chosen = pick(scored, key=lambda e: e[selection]) if scored else None
        sel = f"{100 * chosen['test/miou']:.1f} ({chosen['step']})" if chosen else "-"
        if row_marked(t):
            marked.append(label)
            label = f"{label} ({SHORT_MARK})"
        lines.append(f"| {label} | {t['method']} | {t['model']} | {last['step']} | {sel} | "
                     f"{100 * best['test/miou']:.1f} ({best['step']}) | {100 * last['test/miou']:.1f} | "
                     f"{100 * last['test/pixel_acc']:.1f} | {last.get('model/gflops') or float('nan'):.2f} |")
        ious = {r["class_name"]: r["iou"] for r in read_table(d / "results", "class_iou")
                if r["step"] == best["step"]}
        per_class.append((label, ious))
    if protocols:
        kinds = sorted(set(protocols.values()))
        lines += ["", f"Label protocol (data.label_set): {kinds[0]} for every run." if len(kinds) == 1 else
                  "Label protocol (data.label_set): " + ", ".join(f"{k}: {v}" for k, v in protocols.items()) + "."]
    if marked:
        lines += ["", f"{MARK} ({SHORT_MARK}): {', '.join(marked)}. Oracles or runs started from one, not UDA "
                  "results: they saw the target's labels in training."]
    if per_class:
        lines += ["", "Per-class IoU (%) at each run's best test step (- = class absent from labels and predictions):",
                  "",
                  "| run | " + " | ".join(CLASSES) + " |", "|---|" + "---|" * len(CLASSES)]
        for label, ious in per_class:
            cells = [f"{100 * ious[c]:.0f}" if ious.get(c) is not None and ious[c] == ious[c] else "-"
                     for c in CLASSES]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
