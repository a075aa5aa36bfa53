"""The reproduction catalogue (`experiments/reproduce/catalogue.yaml`, `uda-ray reproduce`): every result row of the
tables this project reproduces, mapped to the one command that reproduces it under that paper's protocol (or the
reason it cannot be expressed), the number the paper reports, what still differs, and a time estimate.

Plain YAML and strings: no training here. `uda-ray reproduce ENTRY` turns an entry into the argument list of an
ordinary `uda-ray` command (`entry_argv`) and runs it; `experiments/README.md` holds `markdown_table`'s output."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from uda_ray.errors import UserError

# experiments/reproduce/catalogue.yaml of a source checkout (under the package folder's sibling); its commands name
# the shipped files relative to the checkout's root
REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PATH = REPO_ROOT / "experiments" / "reproduce" / "catalogue.yaml"
_FIELDS = {"id", "paper", "table", "row", "reported", "command", "reason", "differs", "gpu_hours", "needs",
           "inputs", "note"}
_REQUIRED = ("id", "paper", "table", "row", "reported")
_PLACEHOLDER = re.compile(r"\{(\w+)\}")


@dataclass(frozen=True)
class Entry:
    """One result row of one table. `command` is an ordinary `uda-ray ...` line with `{name}` placeholders for
    the `inputs` a user supplies (e.g. a published checkpoint); None when the row cannot be expressed (`reason`).
    `needs` names the configuration keys the command relies on beyond the shipped files' (documentation only)."""

    id: str
    paper: str
    table: str
    row: str
    reported: dict[str, Any]
    command: str | None = None
    reason: str | None = None
    differs: str = ""
    gpu_hours: float | None = None  # an estimate on one GPU (the catalogue says how it was estimated)
    needs: tuple[str, ...] = ()
    inputs: dict[str, str] = field(default_factory=dict)  # placeholder -> what the user gives for it
    note: str = ""

    @property
    def expressible(self) -> bool:
        return self.command is not None


def _entry(raw: Any, where: str) -> Entry:
    if not isinstance(raw, dict):
        raise UserError(f"{where}: an entry must be a mapping, got {type(raw).__name__}")
    unknown = sorted(set(raw) - _FIELDS)
    missing = [k for k in _REQUIRED if k not in raw]
    if unknown or missing:
        raise UserError(f"{where} ({raw.get('id', '?')}): unknown keys {unknown} / missing keys {missing} "
                        f"(valid: {', '.join(sorted(_FIELDS))})")
    e = Entry(**{**raw, "needs": tuple(raw.get("needs") or ()), "inputs": dict(raw.get("inputs") or {}),
                 "reported": dict(raw["reported"] or {})})
    if (e.command is None) == (e.reason is None):
        raise UserError(f"{where} ({e.id}): give exactly one of `command` and `reason`")
    if e.command is not None:
        if not e.command.startswith("uda-ray "):
            raise UserError(f"{where} ({e.id}): a command starts with 'uda-ray ', got {e.command!r}")
        names = set(_PLACEHOLDER.findall(e.command))
        if names != set(e.inputs):
            raise UserError(f"{where} ({e.id}): placeholders {sorted(names)} but inputs {sorted(e.inputs)}")
    return e


def load_catalogue(path: str | Path | None = None) -> list[Entry]:
    """The entries of a catalogue file, checked: known keys only, unique ids, a command or a reason each."""
    p = Path(path) if path is not None else DEFAULT_PATH
    if not p.is_file():
        raise UserError(f"catalogue {p}: no such file (a source checkout has experiments/reproduce/catalogue.yaml)")
    raw = yaml.safe_load(p.read_text())
    if not isinstance(raw, dict) or not isinstance(raw.get("entries"), list):
        raise UserError(f"catalogue {p}: expected a mapping with an `entries:` list")
    entries = [_entry(r, f"catalogue {p}") for r in raw["entries"]]
    seen: set[str] = set()
    for e in entries:
        if e.id in seen:
            raise UserError(f"catalogue {p}: entry id {e.id!r} appears twice")
        seen.add(e.id)
    return entries


def find(entries: list[Entry], entry_id: str) -> Entry:
    for e in entries:
        if e.id == entry_id:
            return e
    close = [e.id for e in entries if entry_id in e.id][:5]
    hint = f" (did you mean: {', '.join(close)}?)" if close else " (`uda-ray reproduce --list` lists them)"
    raise UserError(f"reproduce: no catalogue entry {entry_id!r}{hint}")


def entry_argv(entry: Entry, *, inputs: dict[str, str] | None = None, overrides: list[str] | None = None,
               storage: str | None = None, repo_root: Path | None = None) -> list[str]:
    """The `uda-ray` argument list (without the program name) of an entry: its placeholders filled from `inputs`,
    `--set` overrides appended (they win, as every --set does), shipped `experiments/...` paths made absolute
    against `repo_root` so the command runs from any folder."""
    if entry.command is None:
        raise UserError(f"reproduce {entry.id}: not expressible in uda_ray: {entry.reason}")
    given = dict(inputs or {})
    missing = [k for k in entry.inputs if k not in given]
    if missing:
        raise UserError(f"reproduce {entry.id}: give --with {missing[0]}=... ({entry.inputs[missing[0]]})")
    extra = sorted(set(given) - set(entry.inputs))
    if extra:
        raise UserError(f"reproduce {entry.id}: --with {extra[0]}: this entry takes "
                        f"{', '.join(entry.inputs) or 'no inputs'}")
    argv = [_PLACEHOLDER.sub(lambda m: given[m.group(1)], tok) for tok in shlex.split(entry.command)[1:]]
    if repo_root is not None:
        argv = [str(repo_root / a) if a.startswith("experiments/") else a for a in argv]
    for o in overrides or []:
        argv += ["--set", o]
    if storage:
        argv += ["--storage", storage]
    return argv


def _cell(v: Any) -> str:
    return str(v).replace("|", "\\|").replace("\n", " ")


def _reported(e: Entry) -> str:
    return ", ".join(f"{k} {v}" for k, v in e.reported.items()) or "none published"


def markdown_table(entries: list[Entry]) -> str:
    """The human-readable table of experiments/README.md (the test compares the README with this)."""
    lines = ["| entry | paper; table; row | reported | command (or why not) | what still differs | one GPU, hours "
             "(estimate) |", "|---|---|---|---|---|---|"]
    for e in entries:
        cmd = f"`{e.command}`" if e.command else f"not expressible: {e.reason}"
        hours = "" if e.gpu_hours is None else f"{e.gpu_hours:g}" + (f" ({e.note})" if e.note else "")
        lines.append(f"| `{e.id}` | {_cell(e.paper)}; {_cell(e.table)}; {_cell(e.row)} | {_cell(_reported(e))} "
                     f"| {_cell(cmd)} | {_cell(e.differs)} | {_cell(hours)} |")
    return "\n".join(lines)


def listing(entries: list[Entry]) -> str:
    """What `uda-ray reproduce --list` prints: one block per entry."""
    out = []
    for e in entries:
        out.append(f"{e.id}\n  {e.paper} | {e.table} | {e.row}\n  reported: {_reported(e)}")
        if e.command:
            out.append(f"  command: {e.command}")
            out += [f"    {{{k}}}: {v}" for k, v in e.inputs.items()]
            if e.gpu_hours is not None:
                out.append(f"  one GPU: ~{e.gpu_hours:g} h (estimate)" + (f"; {e.note}" if e.note else ""))
        else:
            out.append(f"  not expressible: {e.reason}")
        if e.differs:
            out.append(f"  differs: {e.differs}")
    n = sum(e.expressible for e in entries)
    out.append(f"{len(entries)} entries, {n} with a command, {len(entries) - n} not expressible")
    return "\n".join(out)
