"""The `trials` table of a results folder made cheap to rewrite as a sweep grows (uda_ray.results.tables writes
it): rows are converted to Arrow in chunks of CHUNK trials (in the order the trials came), a chunk again only
when one of its rows changed, and a rewrite joins the chunks. Converting every cell of every trial in Python at
every rewrite made a sweep's per-trial driver cost grow with its number of trials (benchmarks/driver_scale.py:
1.5 s per rewrite at 10,000 trials); trials change near the end of the table (the latest started), so a rewrite
converts one or two chunks of CHUNK trials."""

from __future__ import annotations

from collections.abc import Callable

import pyarrow as pa

CHUNK = 64  # trials per converted chunk


class TrialsArrow:
    """The `trials` rows as Arrow, converted with `convert(rows)` (the tables' own conversion, so the joined
    table is the one `convert(all rows)` gives)."""

    def __init__(self, convert: Callable[[list[dict]], pa.Table]) -> None:
        self.convert = convert
        self.index: dict[tuple, int] = {}  # trial key -> its place (chunk = place // CHUNK)
        # chunk -> (the row dicts converted, their table). The tables' writer replaces a row by a new dict when it
        # changes (never changes a stored row in place), so a chunk whose rows are other objects is converted again
        self.cache: dict[int, tuple[list[dict], pa.Table]] = {}

    def table(self, rows: dict[tuple, dict]) -> pa.Table:
        """All `rows` (key -> row, in order) as one table. When a column's type differs between chunks (a searched
        choice of a number and a word), one conversion of all rows."""
        chunks: dict[int, list[dict]] = {}
        for key, row in rows.items():
            chunks.setdefault(self.index.setdefault(key, len(self.index)) // CHUNK, []).append(row)
        parts = []
        for c, rs in sorted(chunks.items()):
            got = self.cache.get(c)
            if got is None or len(got[0]) != len(rs) or any(a is not b for a, b in zip(got[0], rs)):
                got = self.cache[c] = (rs, self.convert(rs))
            parts.append(got[1])
        if len(parts) < 2:
            return parts[0] if parts else self.convert([])
        try:
            return pa.concat_tables(parts, promote_options="default").combine_chunks()
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            return self.convert(list(rows.values()))
