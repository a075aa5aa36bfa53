"""Parquet results tables: `trials`, `evals`, `class_iou` — written durably, queried afterwards.

Under <sweep>/results/ (or <run>/results/):

    trials.parquet      one file, one row per trial, rewritten atomically (temporary file, fsync, rename); a
                        sweep's driver rewrites it at most once a second, and before each Tune snapshot
    evals.parquet/      a folder of Parquet segments (Spark-style), one row per (trial, step)
    class_iou.parquet/  the same, one row per (trial, step, class)

At any moment a reader sees whole files only, each key at most once, and every row written before it
looked; plain pyarrow / pandas (`read_parquet(".../evals.parquet")`), polars and DuckDB
(`".../evals.parquet/*.parquet"`) read them without uda_ray. A result rewrites only the last segment of
each table (bounded size), never the whole table, so its cost stays flat as a sweep grows. A step already
recorded (replayed by a resumed trial) keeps its first row: a resume adds no duplicates. The fixed columns
have a declared Arrow type and every reported metric is float64: a value of another type is an error,
never a silent cast to text.

Rows are built in uda_ray.results.rows; the tables are read by uda_ray.results.reading (`read_table`, also
imported from here); the questions asked of them are in uda_ray.results.queries.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from uda_ray.metric_names import REPORTED_PREFIXES, mode_of, upgrade_row
from uda_ray.results.reading import read_table  # re-exported: the tables are read there
from uda_ray.results.rows import TrialSummary, eval_rows
from uda_ray.results.trials_table import TrialsArrow
from uda_ray.storage import store

TABLES = {"trials": ("trial_id",), "evals": ("trial_id", "step"), "class_iou": ("trial_id", "step", "class_name")}
APPEND_ONLY = ("evals", "class_iou")
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
    with contextlib.suppress(OSError):
        os.fsync(fd)
    os.close(fd)


def atomic_write(table: pa.Table, path: Path) -> None:
    """Atomically (re)place one Parquet file; the temporary name is hidden, so readers skip it. Under a storage
    URI's staging folder the file is then uploaded (one atomic PUT: uda_ray.storage.store)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pq.write_table(table, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    store.push(path)


def _cell(v: Any) -> Any:
    """Parquet-friendly scalar: lists/dicts as JSON text, NaN kept as float."""
    if isinstance(v, (list, tuple, dict)):
        return json.dumps(v)
    return v.item() if hasattr(v, "item") and not isinstance(v, (str, bytes)) else v


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
        self.keys: set[tuple] = set()  # the (trial_id, step) recorded (every class_iou key: 8.6 MB / 1,000 trials)
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
        t = pq.read_table(self.path, columns=["trial_id", "step"], schema=self.schema)
        self.keys = set(zip(t.column("trial_id").to_pylist(), t.column("step").to_pylist()))
        self.open_table = pq.read_table(self.path / self.segments[-1], schema=self.schema)

    def _convert_one_file(self) -> None:
        rows = [upgrade_row(r) if (r.get("schema_version") or 1) < 2 else r
                for r in pq.read_table(self.path).to_pylist()]
        staging = self.dir / f".{self.name}.parquet.convert"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        columns = list(dict.fromkeys(c for r in rows for c in r))
        schema = pa.schema([(c, _metric_type(self.name, c)) for c in columns])
        atomic_write(rows_to_table(rows, dict(zip(schema.names, schema.types)), columns), staging / self._seg(0))
        aside = self.dir / f".{self.name}.parquet.one-file"
        os.replace(self.path, aside)
        os.replace(staging, self.path)
        aside.unlink()
        _fsync_dir(self.dir)
        store.remove(self.path)  # the store's one file, replaced by the segments' folder
        store.push(self.path)

    def rows(self) -> list[dict]:
        return pq.read_table(self.path, schema=self.schema).to_pylist() if self.segments else []

    def insert(self, rows: Iterable[dict]) -> list[dict]:
        """Queue the rows of a (trial, step) not recorded before this call; returns them."""
        new, fresh = [], set()
        for r in rows:
            k = (r["trial_id"], r["step"])
            if k in fresh or k not in self.keys:
                fresh.add(k)
                new.append(r)
        self.keys |= fresh
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
        atomic_write(self.open_table, self.path / self.segments[-1])
        if new_column:
            self._widen(schema, self.segments[:-1])

    def _widen(self, schema: pa.Schema, segments: list[str]) -> None:
        """Add the columns of `schema` (null) to `segments`, the first segment last (readers take its schema)."""
        self.schema = schema
        for name in sorted(segments, reverse=True):
            atomic_write(_conform(pq.read_table(self.path / name), schema), self.path / name)


def _conform(t: pa.Table, schema: pa.Schema) -> pa.Table:
    """`t` with the columns of `schema`, in its order (missing ones null)."""
    if t.schema.equals(schema):  # the common case, at every flush: nothing to rebuild (26 ms a call)
        return t
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
        self._trials_written, self._trials_dirty, self._trials_cost = 0.0, True, 0.0
        self._trials_arrow = TrialsArrow(lambda rows: rows_to_table(rows, FIXED["trials"]))

    def has(self, table: str, key: tuple) -> bool:
        return key in self.append_only[table].keys

    def upsert(self, table: str, rows: Iterable[dict]) -> None:
        if table == "trials":
            for r in rows:
                self.rows["trials"][(r["trial_id"],)] = r
                self._trials_dirty = True
            return
        for r in self.append_only[table].insert(rows):
            if table == "evals":
                self.evals_by_trial.setdefault(r["trial_id"], []).append(r)

    def flush(self, tables: Iterable[str] = tuple(TABLES), force: bool = True) -> None:
        """Write what changed; the trials file only when a row changed and (unless `force`) `trials_every_s` and 10x
        its last write's time have passed since it was written (a tenth of the driver's time at most)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        tables = list(tables)
        for t in ("class_iou", "evals"):  # class rows first: an eval row means its classes are on disk
            if t in tables:
                self.append_only[t].flush()
        every = max(self.trials_every_s, 10 * self._trials_cost) if self.trials_every_s else 0.0
        if "trials" in tables and self._trials_dirty and (force or time.time() - self._trials_written >= every):
            t0 = time.time()
            atomic_write(self._trials_arrow.table(self.rows["trials"]), self.dir / "trials.parquet")
            self._trials_written, self._trials_dirty, self._trials_cost = time.time(), False, time.time() - t0


class ResultsWriter:
    """Keeps the three tables of a sweep (the Tune callback on the driver) or of one run (`for_run`) up to date:
    the one recorder of results."""

    def __init__(self, results_dir: Path, sweep: str, metric: str, mode: str, search_seed: int | None,
                 trials_every_s: float = 0.0) -> None:
        # the trials file is rewritten at most every `trials_every_s` by results (always at a start or an end);
        # its rows are recomputed from the evals, so a crash in between loses nothing
        self.store = TableStore(results_dir, trials_every_s)
        self.sweep, self.metric, self.mode, self.search_seed = sweep, metric, mode, search_seed

    @classmethod
    def for_run(cls, results_dir: Path, name: str, select: str) -> ResultsWriter:
        """The recorder of one run (`uda-ray train`, a pipeline stage, a rerun, an ensemble evaluation): its
        tables hold one trial named after the run, ranked by the run's selection metric `select`."""
        return cls(results_dir, name, select, mode_of(select), None)

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
        self.store.flush(["trials"], force=False)

    def result(self, trial_id: str, experiment: dict, params: dict, result: dict) -> dict:
        """Record one evaluation. A step already recorded (replayed after a resume) keeps its first row."""
        if self.store.has("evals", (trial_id, int(result["step"]))):
            return self._summary(trial_id, experiment, params).row
        ev, ious = eval_rows(self.sweep, trial_id, store.as_staged(self.store.dir, result))
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
        self.store.flush(["trials"], force=False)
        return row
