"""The lineage slot in the embedded mode: a dead holder's slot is freed at once, a live holder's never."""

from __future__ import annotations

import fcntl
import json
import threading

import pytest
from prefect import flow, get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate

from tasks import slots


@pytest.fixture
def embedded(monkeypatch, tmp_path):
    """The embedded-mode path (the harness itself is a server URL), holder files under tmp_path."""
    monkeypatch.setattr(slots, "is_embedded", lambda: True)
    monkeypatch.setattr(slots, "holder_file", lambda slot: tmp_path / f"{slot}.json")
    return tmp_path


def active_slots(name: str) -> int:
    with get_client(sync_client=True) as client:
        return client.read_global_concurrency_limit_by_name(name).active_slots


def take(name: str) -> None:
    """What a run killed while training leaves in the database: the slot taken, no lease behind it."""
    with get_client(sync_client=True) as client:
        client.update_global_concurrency_limit(name, GlobalConcurrencyLimitUpdate(active_slots=1))


@flow
def hold(run_name: str) -> int:
    """Slots taken while this run holds the lineage slot."""
    with slots.lineage_slot(run_name):
        return active_slots(f"ptflow-train-{run_name}")


@pytest.mark.timeout(600)  # before the fix this waited forever
def test_a_slot_left_by_a_dead_run_is_released_at_once_and_said_so(prefect_api, embedded, caplog):
    hold("dead")  # creates the limit
    take("ptflow-train-dead")
    (embedded / "ptflow-train-dead.json").write_text(json.dumps({"pid": 999999, "host": "h", "flow_run": "f-1",
                                                                 "flow_run_name": "brave-fox", "since": "then"}))
    assert hold("dead") == 1  # this run's own slot, not the dead one's on top of it
    assert active_slots("ptflow-train-dead") == 0
    assert "released ptflow-train-dead, left taken by flow run brave-fox (f-1, pid 999999" in caplog.text
    assert (embedded / "ptflow-train-dead.json").read_text() == ""  # no holder once released


def test_a_live_holder_is_waited_for_and_never_released(prefect_api, embedded):
    hold("live")
    take("ptflow-train-live")  # a live run holds it
    holder = open(embedded / "ptflow-train-live.json", "a+")
    fcntl.flock(holder, fcntl.LOCK_EX)  # its lock, on another open file: this process's second run conflicts
    inside: list = []
    waiter = threading.Thread(target=lambda: inside.append(hold("live")))
    waiter.start()
    waiter.join(timeout=3)
    assert waiter.is_alive() and inside == [] and active_slots("ptflow-train-live") == 1
    with get_client(sync_client=True) as client:  # the live run finishes: gives its slot back, then its lock
        client.update_global_concurrency_limit("ptflow-train-live", GlobalConcurrencyLimitUpdate(active_slots=0))
    fcntl.flock(holder, fcntl.LOCK_UN)
    holder.close()
    waiter.join(timeout=120)
    assert inside == [1] and active_slots("ptflow-train-live") == 0


def test_against_a_server_the_slot_is_a_plain_lease(prefect_api, monkeypatch, tmp_path):
    monkeypatch.setattr(slots, "holder_file", lambda slot: tmp_path / f"{slot}.json")
    assert hold("server") == 1 and active_slots("ptflow-train-server") == 0
    assert not (tmp_path / "ptflow-train-server.json").exists()
