"""A sweep's Optuna journal under a storage URI's staging folder (uda_ray.storage.store): Optuna's
JournalFileBackend whose file is uploaded to the store after every append, so the study in the store is as
complete as the local file whenever the driver is SIGKILLed (what the exact resume of
uda_ray.search.searcher reads). Imports Optuna: import it where it is needed."""

from __future__ import annotations

from typing import Any

from optuna.storages.journal import JournalFileBackend, JournalFileSymlinkLock

from uda_ray.storage import store


class MirroredJournalFileBackend(JournalFileBackend):
    """The journal file at `file_path`, `rel` under the staging folder of `uri`; uploaded whole after each
    append (a PUT replaces the object atomically). Pickled with the searcher in Tune's state: unpickled on
    another machine (a sweep resumed there), it points at that machine's staging copy."""

    def __init__(self, file_path: str, uri: str, rel: str) -> None:
        super().__init__(file_path)
        self._uri, self._rel = uri, rel

    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        super().append_logs(logs)
        store.push(self._file_path)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        here = store.local_path(self._uri, self._rel)
        if str(here) != self._file_path:
            self._file_path = str(here)
            self._lock = JournalFileSymlinkLock(self._file_path)
            self._log_number_offset = {0: 0}
        if not here.exists():
            here.parent.mkdir(parents=True, exist_ok=True)
            here.touch()
