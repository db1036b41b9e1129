"""The lineage slot `ptflow-train-<run_name>`: one run of a lineage trains at a time, and a dead run never blocks.

Against a real server the slot is a global concurrency limit of 1 held with a 60 s lease that
the server's repossessor revokes once a killed holder stops renewing it.

In the embedded mode (no PREFECT_API_URL) each `ptflow` process starts its own temporary server
on the SQLite database in PREFECT_HOME, and that server keeps leases in its memory: a run killed
while holding the slot leaves `active_slots=1` in the database with no lease anywhere, so nothing
ever frees it and the next run waits forever. There, a holder also keeps an exclusive file lock
on `<PREFECT_HOME>/ptflow-slots/<slot>.json` (with its pid, host and flow run) while it holds the
slot. The kernel drops that lock when the holder dies, however it dies, so a run that gets the
file lock while the database says the slot is taken knows the holder is gone: it frees the
slot, logs which run held it, and goes on at once. A live holder keeps the lock, and a second
run waits for it (Ctrl-C still stops the wait).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from prefect import get_client, get_run_logger
from prefect.client.schemas.actions import (
    GlobalConcurrencyLimitCreate,
    GlobalConcurrencyLimitUpdate,
)
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
from prefect.runtime import flow_run
from prefect.settings import (
    PREFECT_API_URL,
    PREFECT_HOME,
    PREFECT_SERVER_ALLOW_EPHEMERAL_MODE,
)

# The shortest lease the server accepts, renewed while training runs: a run killed with -9 frees
# a real server's slot within 60 s instead of blocking its own re-run for the 300 s default.
LEASE_S = 60


def is_embedded() -> bool:
    """True when runs talk to a temporary server of their own (no PREFECT_API_URL)."""
    return not PREFECT_API_URL.value() and bool(PREFECT_SERVER_ALLOW_EPHEMERAL_MODE.value())


def holder_file(slot: str) -> Path:
    return Path(PREFECT_HOME.value()).expanduser() / "ptflow-slots" / f"{slot}.json"


@contextmanager
def lineage_slot(run_name: str) -> Iterator[None]:
    """Hold `ptflow-train-<run_name>` (a global concurrency limit of 1 slot) while training this lineage."""
    name = f"ptflow-train-{run_name}"
    _ensure_limit(name)
    if not is_embedded():
        with concurrency(name, occupy=1, strict=True, lease_duration=LEASE_S):
            yield
        return
    path = holder_file(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+", encoding="utf-8") as handle:
        _lock(handle, name)
        try:
            _free_if_stale(name, handle)
            with concurrency(name, occupy=1, strict=True, lease_duration=LEASE_S):
                _write_holder(handle)
                yield
        finally:
            handle.truncate(0)
            fcntl.flock(handle, fcntl.LOCK_UN)


def _ensure_limit(name: str) -> None:
    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            try:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
            except ObjectAlreadyExists:  # another run created it first
                pass


def _lock(handle: IO[str], name: str) -> None:
    """Take the holder lock, waiting (and saying for whom) while a live run holds it."""
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return
    except BlockingIOError:
        pass
    get_run_logger().info("train: waiting for %s, held by %s", name, _describe(_read_holder(handle)))
    fcntl.flock(handle, fcntl.LOCK_EX)  # a signal (Ctrl-C) interrupts the wait


def _free_if_stale(name: str, handle: IO[str]) -> None:
    """We hold the lock, so no live process holds the slot: a taken slot was left by a dead run."""
    with get_client(sync_client=True) as client:
        limit = client.read_global_concurrency_limit_by_name(name)
        if limit.active_slots == 0:
            return
        client.update_global_concurrency_limit(name, GlobalConcurrencyLimitUpdate(active_slots=0))
    get_run_logger().warning("train: released %s, left taken by %s, which is no longer running", name,
                             _describe(_read_holder(handle)))


def _read_holder(handle: IO[str]) -> dict:
    handle.seek(0)
    try:
        return json.loads(handle.read() or "{}")
    except ValueError:
        return {}


def _write_holder(handle: IO[str]) -> None:
    handle.seek(0)
    handle.truncate(0)
    handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "flow_run": str(flow_run.get_id()),
                             "flow_run_name": flow_run.get_name(), "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}))
    handle.flush()


def _describe(holder: dict) -> str:
    if not holder:
        return "an earlier run (no record of which)"
    return f"flow run {holder.get('flow_run_name')} ({holder.get('flow_run')}, pid {holder.get('pid')} on " \
           f"{holder.get('host')}, since {holder.get('since')})"
