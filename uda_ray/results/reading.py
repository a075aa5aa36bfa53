"""Reading the results tables (uda_ray.results.tables writes them): a table as rows, or as Arrow with only the
columns a question needs (`uda-ray best` at 10,000 trials reads five columns of `evals` and the `trials` rows
it prints, not every value of both tables).

Files are read one by one with pyarrow.parquet.ParquetFile, never through pyarrow.dataset (which
`pyarrow.parquet.read_table` uses, and which imports pandas: 0.6 s of a short command's start), each while a
writer may atomically replace it (`_read_file`).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from uda_ray.errors import UserError
from uda_ray.metric_names import canonical, upgrade_row

PROC_FD = Path("/proc/self/fd").is_dir()  # Linux: an open file can be read again by a path


def read_table(results_dir: Path, table: str, columns: Iterable[str] | None = None) -> list[dict]:
    """The rows of one table; rows of schema version 1 come back with their `val/...` columns named
    `test/...` (see uda_ray.metric_names.upgrade_row). `columns`: only these (by their schema-2 names; a row
    has the ones its table has), else every column."""
    return rows_of(read_arrow(results_dir, table, columns))


def read_arrow(results_dir: Path, table: str, columns: Iterable[str] | None = None) -> pa.Table | None:
    """One table as Arrow (None when it does not exist), its columns under their stored names (rows_of
    renames those of schema 1); `columns` as in `read_table` (`schema_version` is always read with them)."""
    p = Path(results_dir) / f"{table}.parquet"
    if not p.exists():
        return None
    wanted = None if columns is None else {"schema_version", *columns}
    try:
        return _read_parquet(p, wanted)
    except (OSError, pa.ArrowException) as e:
        raise UserError(f"{p}: not a readable Parquet table ({str(e).splitlines()[0][:200]})") from None


def rows_of(t: pa.Table | None, positions: Sequence[int] | None = None) -> list[dict]:
    """Rows of an Arrow table read by `read_arrow` (those at `positions`, in that order, when given), with
    schema-1 rows upgraded."""
    if t is None:
        return []
    if positions is None:
        rows = t.to_pylist()
    elif len(positions) * 8 < t.num_rows:  # a few rows: without converting the others
        rows = [t.slice(i, 1).to_pylist()[0] for i in positions]
    else:
        every = t.to_pylist()
        rows = [every[i] for i in positions]
    return [upgrade_row(r) if (r.get("schema_version") or 1) < 2 else r for r in rows]


def _read_parquet(p: Path, wanted: set[str] | None) -> pa.Table:
    """A table file, or a folder of segments, read while a writer may replace them (see `_read_file`)."""
    if not p.is_dir():
        return _read_file(p, wanted)
    parts = [_read_file(seg, wanted) for seg in sorted(p.glob("part-*.parquet"))]
    if not parts:
        return pq.read_table(p)  # no segment: pyarrow's own answer (an empty table)
    return pa.concat_tables(parts, promote_options="default")  # the first segment's columns first


def _read_file(p: Path, wanted: set[str] | None, tries: int = 20) -> pa.Table:
    """One Parquet file that a writer may atomically replace meanwhile. pyarrow reading by path stats and opens
    the file separately, so a replacement in between reads as corrupt ("Couldn't deserialize thrift"). On Linux
    the read goes through /proc/self/fd of one open handle (a replaced file's handle keeps the old, whole one);
    elsewhere a failed read is retried (each replacement is atomic). Not a Python file object or an in-memory
    buffer: 1 process in 5 to 100 reading that way aborted at exit (pyarrow 26, "terminate called without...").
    """
    if PROC_FD:
        with open(p, "rb") as f:
            return _columns(f"/proc/self/fd/{f.fileno()}", wanted)
    for i in range(tries - 1):
        try:
            return _columns(str(p), wanted)
        except (OSError, pa.ArrowException):
            time.sleep(0.005 * (i + 1))
    return _columns(str(p), wanted)  # the last try: its error is the caller's


def _columns(path: str, wanted: set[str] | None) -> pa.Table:
    """The file's columns whose schema-2 name is `wanted` (all when None), in the file's order."""
    with pq.ParquetFile(path) as f:
        names = f.schema_arrow.names
        return f.read(columns=None if wanted is None else [c for c in names if canonical(c) in wanted])
