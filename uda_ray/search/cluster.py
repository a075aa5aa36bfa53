"""The Ray cluster of a sweep: a new local one, or the user's (reachable, token presented, bounded wait), and
whether a trial fits it. Importing this module does not import ray."""

from __future__ import annotations

import logging
import os
import socket
import tempfile
from pathlib import Path
from typing import Any

from uda_ray.errors import UserError
from uda_ray.search.private import LOCAL_TRAIN_ENV, refresh_token_auth_mode

log = logging.getLogger(__name__)

AUTH_HINT = ("if the cluster uses token authentication, put its token in ~/.ray/auth_token (or RAY_AUTH_TOKEN) "
             "and set RAY_AUTH_MODE=token")


class ClusterUnreachable(UserError):
    """ray.init is still retrying in a thread: the process must end without waiting for it."""


def check_address(address: str | None, timeout_s: float = 5.0) -> None:
    """Fail fast with one line when a cluster address cannot be reached (ray.init would retry long)."""
    if not address or address in ("auto", "local"):
        return
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"--address {address}: expected HOST:PORT (or ray://HOST:PORT)")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            pass
    except OSError as e:
        raise UserError(f"cannot reach the Ray cluster at {address}: {e.strerror or e}") from None


def init_ray(address: str | None, num_cpus: int | None = None, timeout_s: float | None = None) -> None:
    """A new local cluster when no address is given (the embedded default), else the user's cluster.

    Connecting to a cluster is bounded: ray.init retries forever on a cluster that rejects our token."""
    import ray  # noqa: F401 - imported before its logger's level is set below (importing ray configures it)

    address = address or os.environ.get("RAY_ADDRESS")
    check_address(address)
    logging.getLogger("ray").setLevel(logging.ERROR)  # full logs stay in Ray's session folder
    kwargs: dict[str, Any] = dict(log_to_driver=False, logging_level=logging.ERROR)
    if not address:
        _start_local(num_cpus, kwargs)
        return
    if "RAY_AUTH_MODE" not in os.environ and _token_available():
        _enable_token_auth()  # a token is at hand: present it
    _connect(address, kwargs, timeout_s or float(os.environ.get("UDA_RAY_CONNECT_TIMEOUT_S", "60")))


def _start_local(num_cpus: int | None, kwargs: dict[str, Any]) -> None:
    import ray

    for k, v in LOCAL_TRAIN_ENV.items():  # inherited by the local cluster's processes; the user's values win
        os.environ.setdefault(k, v)
    # The Train cleaner asks the State API of "the" cluster; with several Ray instances on one host it
    # must be pointed at ours, so pick the dashboard port first and export it before the start.
    port = _free_port()
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1",
             dashboard_port=port, **kwargs)


def _connect(address: str, kwargs: dict[str, Any], timeout_s: float) -> None:
    """ray.init(address) in a thread, waiting at most `timeout_s` for it."""
    import threading

    import ray

    outcome: list = []

    def connect() -> None:
        try:
            ray.init(address=address, **kwargs)
            outcome.append(None)
        except Exception as e:  # noqa: BLE001 - reported below as one line
            outcome.append(e)

    # Ray's C++ client logs every failed retry to fd 2: keep those in a file while we wait
    log_path = Path(tempfile.gettempdir()) / f"uda_ray_connect_{os.getpid()}.log"
    saved = os.dup(2)
    with open(log_path, "w") as f:
        os.dup2(f.fileno(), 2)
        try:
            t = threading.Thread(target=connect, daemon=True)
            t.start()
            t.join(timeout_s)
        finally:
            os.dup2(saved, 2)
            os.close(saved)
    if not outcome:
        raise ClusterUnreachable(f"no answer from the Ray cluster at {address} within {timeout_s:.0f}s: {AUTH_HINT} "
                                 f"(client log: {log_path})")
    if outcome[0] is not None:
        raise UserError(f"cannot connect to the Ray cluster at {address}: "
                        f"{str(outcome[0]).splitlines()[0]} ({AUTH_HINT})")


def _token_available() -> bool:
    return bool(os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")
                or (Path.home() / ".ray" / "auth_token").is_file())


def _enable_token_auth() -> None:
    """RAY_AUTH_MODE=token for this process and its children; Ray caches its config, so use its own setter."""
    os.environ["RAY_AUTH_MODE"] = "token"
    refresh_token_auth_mode()


def check_resources(train: Any, driver_cpus: float, concurrent: int, local: bool) -> None:
    """A trial that can never fit the cluster would wait for workers forever: say so up front (an error
    on the local cluster; a warning on a remote one, which may autoscale)."""
    import ray

    have = ray.cluster_resources()
    driver_cpus = 0.0 if train.inline else driver_cpus  # an inline trial's process is its one worker
    need_cpu = driver_cpus + train.num_workers * train.cpus_per_worker
    need_gpu = train.num_workers if train.use_gpu and train.launcher != "replay" else 0
    problems = []
    if need_cpu > have.get("CPU", 0) + 1e-9:
        driver = f" + {driver_cpus:g} for the trial driver" if driver_cpus else ""
        problems.append(f"{need_cpu:g} CPUs ({train.num_workers} worker(s) x {train.cpus_per_worker:g}{driver})"
                        f" but the cluster has {have.get('CPU', 0):g}")
    if need_gpu > have.get("GPU", 0):
        problems.append(f"{need_gpu} GPU(s) but the cluster has {have.get('GPU', 0):g}")
    if problems:
        msg = "a trial needs " + " and ".join(problems) + " (lower train.num_workers / train.cpus_per_worker)"
        if local:
            raise UserError(msg)
        log.warning("%s; waiting for the cluster to grow", msg)
    if concurrent * need_cpu > have.get("CPU", 0) + 1e-9 and not problems:
        log.info("only %d trial(s) fit side by side", int(have.get("CPU", 0) // need_cpu))


def _free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
