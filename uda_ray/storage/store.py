"""Cloud storage roots: a storage URI that a pyarrow filesystem serves (`s3://bucket/prefix`, `gs://bucket/prefix`,
with pyarrow's query settings such as `?endpoint_override=http://127.0.0.1:9000&scheme=http`; credentials from the
usual environment variables, e.g. AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_DEFAULT_REGION for S3).

Everything in uda_ray reads and writes local files. A URI root is therefore a local staging folder per node
(`$UDA_RAY_CACHE/<hash of the URI>`, default `~/.cache/uda_ray/<hash>`) mirrored to the store under the same
layout (uda_ray.storage.layout):

    pull(folder)   the store's files under a staging folder brought down (those that differ), at a command's start:
                   `resume`, `best`, `ls`, `report`, ... on a machine that has only the URI
    push(path)     a file or folder written in a staging folder uploaded to the store, right after each write
                   (tables, sweep.json, the Optuna journal after every append, checkpoints, Tune's state)
    remove(path)   its copy in the store deleted (pruned checkpoints)

An object PUT is atomic, so a reader of the store never sees a half-written file, as with the local code's
os.replace. A staging root holds a marker file naming its URI, so any process on that node finds the store of a
path it was given (`located`). The store is the truth: a pull overwrites the staging copy of a file that differs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from uda_ray.errors import UserError

MARKER = ".uda_ray_store.json"  # in a staging root: {"uri": the storage URI}
CACHE_ENV = "UDA_RAY_CACHE"
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_uri(storage: Any) -> bool:
    """A storage string with a scheme (`s3://...`), not a local path; `file://` URIs are local paths."""
    return isinstance(storage, str) and bool(_SCHEME.match(storage)) and not storage.startswith("file://")


def redact(uri: str) -> str:
    """The URI without its query (which may hold keys), for messages."""
    return uri.split("?", 1)[0]


@dataclasses.dataclass(frozen=True)
class Store:
    """A storage URI opened: its pyarrow filesystem, the path of the root in it, and this node's staging folder."""

    uri: str
    fs: Any
    base: str
    staging: Path

    def remote(self, local: Path) -> str:
        """The store's path of a file or folder under the staging root."""
        rel = Path(local).absolute().relative_to(self.staging).as_posix()
        return self.base.rstrip("/") + ("" if rel == "." else "/" + rel)


_stores: dict[str, Store] = {}
_located: dict[Path, Store | None] = {}


def staging_root(uri: str) -> Path:
    """This node's staging folder of a storage URI."""
    cache = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "uda_ray").expanduser().absolute()
    return cache / hashlib.sha1(uri.encode()).hexdigest()[:16]


def open_store(uri: str) -> Store:
    """The Store of a URI, checked (once per process): UserError, one line, for a scheme no pyarrow filesystem
    serves, an unreachable endpoint or a missing bucket. Its staging root and marker are created."""
    if uri in _stores:
        return _stores[uri]
    import pyarrow as pa
    import pyarrow.fs as pafs

    try:
        fs, base = pafs.FileSystem.from_uri(uri)
    except (pa.ArrowInvalid, OSError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"storage {redact(uri)}: no filesystem serves this URI ({first[:200]})") from None
    bucket = base.strip("/").split("/")[0]
    if not bucket:
        raise UserError(f"storage {redact(uri)}: the URI names no bucket")
    try:
        found = fs.get_file_info(bucket).type != pafs.FileType.NotFound
    except OSError as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"storage {redact(uri)}: not reachable ({first[:300]})") from None
    if not found:
        raise UserError(f"storage {redact(uri)}: no bucket '{bucket}' there")
    staging = staging_root(uri)
    staging.mkdir(parents=True, exist_ok=True)
    marker = staging / MARKER
    if not marker.is_file():
        tmp = staging / f".{MARKER}.{os.getpid()}"
        tmp.write_text(json.dumps({"uri": uri}))
        os.chmod(tmp, 0o600)  # the URI's query may hold settings a user keeps private
        os.replace(tmp, marker)
    store = _stores[uri] = Store(uri, fs, base.rstrip("/"), staging)
    _located[staging] = store
    return store


def local_path(uri: str, rel: str) -> Path:
    """This node's staging copy of the store's folder `rel` (a sweep, a run): how a process on another node
    finds the folder that the driver names by its own staging path."""
    return open_store(uri).staging / rel


def located(path: str | os.PathLike) -> Store | None:
    """The Store whose staging root holds `path` (a marker above it), None for a plain local path."""
    p = Path(path).absolute()
    chain = []
    for d in (p, *p.parents):
        if d in _located:
            found = _located[d]
            break
        chain.append(d)
        if (d / MARKER).is_file():
            found = open_store(json.loads((d / MARKER).read_text())["uri"])
            break
    else:
        found = None
    for d in chain:
        if d != p:  # folders only (a file may be written later under a new name)
            _located[d] = found
    return found


def as_staged(folder: str | os.PathLike, result: dict) -> dict:
    """A reported result whose `checkpoint_path` is in the store of `folder`'s staging root (Ray Train wrote it
    there) with that path as its staging path: tables name checkpoints by local paths, whatever the storage."""
    cp = result.get("checkpoint_path")
    if not isinstance(cp, str) or cp.startswith("/"):
        return result
    store = located(folder)
    base = None if store is None else store.remote(store.staging) + "/"
    if base is None or not cp.startswith(base):
        return result
    return {**result, "checkpoint_path": str(store.staging / cp[len(base):])}


def here(path: str | os.PathLike, fetch: bool = True) -> Path:
    """A path recorded under some machine's staging folder of an open store (a checkpoint in a results table)
    as this machine's staging copy, brought down from the store if missing (`fetch`); any other path unchanged."""
    p = Path(path)
    for st in list(_stores.values()):
        if st.staging.name in p.parts:
            local = st.staging.joinpath(*p.parts[p.parts.index(st.staging.name) + 1:])
            if fetch and not local.exists():
                pull(local)
            return local
    return p


def in_store(path: str | os.PathLike) -> bool:
    """Whether a file recorded under a staging folder (see `here`) is in its store (False for a local path)."""
    local = here(path, fetch=False)
    st = located(local)
    if st is None:
        return False
    import pyarrow.fs as pafs

    return st.fs.get_file_info(st.remote(local)).type == pafs.FileType.File


def push(path: str | os.PathLike) -> None:
    """Upload a file, or a folder with everything in it, to the same place in the store (nothing for a local
    path). Each object PUT is atomic. The local copies take the store's times, so a later pull skips them."""
    store = located(path)
    if store is None:
        return
    import pyarrow.fs as pafs

    p = Path(path).absolute()
    if p.is_dir():
        pafs.copy_files(str(p), store.remote(p), source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=store.fs)
        infos = store.fs.get_file_info(pafs.FileSelector(store.remote(p), recursive=True))
    elif p.is_file():
        with open(p, "rb") as src, store.fs.open_output_stream(store.remote(p)) as dst:
            while chunk := src.read(1 << 22):
                dst.write(chunk)
        infos = [store.fs.get_file_info(store.remote(p))]
    else:
        return
    base = store.remote(store.staging)
    for info in infos:
        if info.type == pafs.FileType.File and info.mtime is not None:
            try:
                os.utime(store.staging / info.path[len(base):].lstrip("/"), (info.mtime.timestamp(),) * 2)
            except FileNotFoundError:  # removed locally meanwhile
                pass


def push_changed(folder: str | os.PathLike, seen: dict[str, tuple[int, int]]) -> None:
    """Push the files directly in `folder` whose size or time changed since `seen` (updated) last saw them: a
    folder another library writes (Ray Tune's experiment state), polled."""
    if located(folder) is None:
        return
    try:
        entries = [e for e in os.scandir(folder) if e.is_file() and not e.name.startswith(".")]
    except FileNotFoundError:
        return
    for e in entries:
        st = e.stat()
        if seen.get(e.name) != (st.st_size, st.st_mtime_ns):
            push(e.path)
            st = os.stat(e.path)
            seen[e.name] = (st.st_size, st.st_mtime_ns)


def remove(path: str | os.PathLike) -> None:
    """Delete the store's copy of a file or folder (nothing for a local path, or when the store has none)."""
    store = located(path)
    if store is None:
        return
    import pyarrow.fs as pafs

    target = store.remote(Path(path))
    info = store.fs.get_file_info(target)
    if info.type == pafs.FileType.Directory:
        store.fs.delete_dir(target)
    elif info.type == pafs.FileType.File:
        store.fs.delete_file(target)


def pull(folder: str | os.PathLike, skip: Callable[[str], bool] | None = None) -> int:
    """Bring down the store's files under a staging folder whose size or time differ from the local copy (the
    store is the truth), each written atomically; `skip(relative posix path)` leaves some out. Nothing for a
    local path. Returns how many files were downloaded."""
    store = located(folder)
    if store is None:
        return 0
    import pyarrow.fs as pafs

    root = Path(folder).absolute()
    remote_root = store.remote(root)
    infos = store.fs.get_file_info(pafs.FileSelector(remote_root, recursive=True, allow_not_found=True))
    n = 0
    for info in infos:
        if info.type != pafs.FileType.File:
            continue
        rel = info.path[len(remote_root):].lstrip("/")
        if skip is not None and skip(rel):
            continue
        n += _download(store, info, root / rel)
    return n


def _download(store: Store, info: Any, dest: Path) -> int:
    mtime = info.mtime.timestamp() if info.mtime is not None else None
    try:
        st = dest.stat()
        if st.st_size == info.size and (mtime is None or abs(st.st_mtime - mtime) < 1e-6):
            return 0
    except FileNotFoundError:
        pass
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.pull-{os.getpid()}")
    with store.fs.open_input_stream(info.path) as src, open(tmp, "wb") as dst:
        while chunk := src.read(1 << 22):
            dst.write(chunk)
    if mtime is not None:
        os.utime(tmp, (mtime, mtime))
    os.replace(tmp, dest)
    return 1
