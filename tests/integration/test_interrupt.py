"""Ctrl-C, SIGTERM and kill -9 of `ptflow run` in the default embedded mode, in a terminal, then the same command.

Each test runs the CLI in a pseudo-terminal as a user does (its own session, so a Ctrl-C is a
SIGINT to the foreground process group, as a terminal sends it), stops it mid-training, and
checks what the user sees and what is left: the exit within 15 s with one resume line and no
traceback, no process of the run still alive (Prefect's embedded server included: every child
inherits the test's PTFLOW_HOME, so a scan of /proc/*/environ finds them), the flow and task runs
in final states and the lineage slot free in Prefect's database. The same command then resumes
training from the newest checkpoint at once, with the losses the interrupted run logged (after
Ctrl-C and kill -9; SIGTERM unwinds through the same path as Ctrl-C, so its re-run is not repeated).
"""

from __future__ import annotations

import json
import os
import pty
import re
import select
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, cli_env, run_cli

from ptflow.store.entries import read_manifest

FAST = ["train.max_steps=40", "train.save_steps=4", "train.logging_steps=1", "train.eval_steps=100",
        "train.per_device_train_batch_size=4", "data.cutoff_len=64", "data.val_size=8", "run_name=interrupt"]
STOP_AFTER = "train: step 6/40"  # checkpoint-4 is written; 34 steps remain for the signal to land in
FINAL = {"COMPLETED", "CRASHED", "CANCELLED", "FAILED"}


class TerminalRun:
    """`ptflow run` in a pseudo-terminal; collects everything it prints."""

    def __init__(self, env: dict, *args: str):
        primary, secondary = pty.openpty()
        self.fd, self.output = primary, b""
        self.process = subprocess.Popen([sys.executable, "-m", "flows.cli", "run", *args], cwd=ROOT, env=env,
                                        stdin=secondary, stdout=secondary, stderr=secondary, start_new_session=True)
        os.close(secondary)

    @property
    def text(self) -> str:
        return self.output.decode(errors="replace")

    def _read(self, timeout: float) -> None:
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if ready:
            try:
                self.output += os.read(self.fd, 65536)
            except OSError:  # the terminal closed: every process writing to it is gone
                time.sleep(timeout)

    def wait_for(self, text: str, timeout: float = 400) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.text:
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"never printed {text!r}: {self.text[-3000:]}")
            self._read(0.2)

    def wait_exit(self, timeout: float) -> float:
        """Seconds until the process exited (and the terminal had nothing more to say)."""
        started = time.monotonic()
        while self.process.poll() is None and time.monotonic() - started < timeout:
            self._read(0.1)
        elapsed = time.monotonic() - started
        if self.process.poll() is None:
            self.kill()
        for _ in range(20):
            self._read(0.05)
        os.close(self.fd)
        return elapsed

    def kill(self) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()


def processes_of(store: Path) -> list[str]:
    """Command lines of live processes started for this store (children inherit PTFLOW_HOME)."""
    marker = f"PTFLOW_HOME={store}\0".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if marker in (entry / "environ").read_bytes():
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                if (entry / "stat").read_text().split(") ")[1][0] != "Z":
                    found.append(f"{entry.name}: {cmdline}")
        except OSError:
            continue
    return found


def wait_until_gone(store: Path, timeout: float) -> list[str]:
    deadline = time.monotonic() + timeout
    while (left := processes_of(store)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def prefect_db(tmp_path: Path, sql: str) -> list[tuple]:
    with sqlite3.connect(tmp_path / "prefect" / "prefect.db") as db:
        return db.execute(sql).fetchall()


def logged_losses(folder: Path) -> dict[int, float]:
    lines = (folder / "trainer_log.jsonl").read_text().splitlines() if (folder / "trainer_log.jsonl").exists() else []
    return {r["current_steps"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


def work_folder(store: Path) -> Path:
    (folder,) = (store / "cache" / "train").glob("*.work")
    return folder


def rerun_resumes(env: dict, tmp_path: Path, seen: dict[int, float], newest: str) -> str:
    """Run the same command; it must resume from `newest` and log the same losses for the steps seen before."""
    rerun = run_cli(env, "run", "configs/quickstart.yaml", *FAST, timeout=900)  # loaded machine: 6 min
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    rows = {row["stage"]: row for row in json.loads((tmp_path / "summary.json").read_text())["stages"]}
    assert rows["prepare_dataset"]["cache"] == "hit" and rows["train"]["cache"] == "miss"
    folder = Path(rows["train"]["path"])
    assert read_manifest(folder)["stats"]["resumed_from"].endswith(newest)
    again = logged_losses(folder)
    assert sorted(again) == list(range(1, 41))
    assert {step: again[step] for step in seen} == pytest.approx(seen, rel=1e-6)
    return rerun.stdout + rerun.stderr


@pytest.mark.parametrize("how", ["SIGINT", "SIGTERM"])
def test_signal_stops_the_run_in_seconds_and_the_same_command_resumes(how, tmp_path):
    env = cli_env(tmp_path, PTFLOW_SUMMARY_JSON=str(tmp_path / "summary.json"), TERM="xterm")
    store = tmp_path / "store"
    run = TerminalRun(env, "configs/quickstart.yaml", *FAST)
    run.wait_for(STOP_AFTER)
    if how == "SIGINT":  # Ctrl-C: the terminal signals its foreground process group
        os.killpg(run.process.pid, signal.SIGINT)
    else:  # kill PID, a container stop, a scheduler's preemption
        run.process.send_signal(signal.SIGTERM)
    elapsed = run.wait_exit(timeout=60)
    print(f"{how}: exited {elapsed:.1f} s after the signal")  # shown with -rP
    text = run.text
    assert elapsed < 15, f"took {elapsed:.1f} s to exit: {text[-3000:]}"
    assert run.process.returncode == (130 if how == "SIGINT" else 143), text[-3000:]
    resume = [line for line in text.splitlines() if "resume with: ptflow run configs/quickstart.yaml" in line]
    assert len(resume) == 1 and ("Ctrl-C" if how == "SIGINT" else "SIGTERM") in resume[0], text[-3000:]
    assert "Traceback" not in text and "ConnectError" not in text, text[-5000:]
    assert wait_until_gone(store, 5) == []  # its embedded Prefect server included
    states = prefect_db(tmp_path, "SELECT state_type FROM flow_run UNION ALL SELECT state_type FROM task_run")
    assert states and {state for (state,) in states} <= FINAL, states
    assert prefect_db(tmp_path, "SELECT active_slots FROM concurrency_limit_v2 "
                                "WHERE name = 'ptflow-train-interrupt'") == [(0,)]
    seen = logged_losses(work_folder(store))
    newest = max((p.name for p in work_folder(store).glob("checkpoint-*")), key=lambda n: int(n.split("-")[1]))
    assert int(newest.split("-")[1]) >= 4 and max(seen) >= 6
    if how == "SIGTERM":  # it unwinds as Ctrl-C does (above); the resume after it is SIGINT's to show
        return
    output = rerun_resumes(env, tmp_path, seen, newest)
    assert "released ptflow-train-interrupt" not in output  # the stopped run gave its slot back itself


def test_kill_9_of_the_cli_then_the_same_command_resumes_without_waiting(tmp_path):
    env = cli_env(tmp_path, PTFLOW_SUMMARY_JSON=str(tmp_path / "summary.json"), TERM="xterm")
    store = tmp_path / "store"
    run = TerminalRun(env, "configs/quickstart.yaml", *FAST)
    run.wait_for(STOP_AFTER)
    run.process.send_signal(signal.SIGKILL)  # only the CLI: no chance to clean anything up
    run.wait_exit(timeout=30)
    assert run.process.returncode == -signal.SIGKILL
    started = time.monotonic()
    assert wait_until_gone(store, 15) == []  # the embedded server ends with its parent
    print(f"kill -9: the run's last process was gone {time.monotonic() - started:.1f} s after the CLI")
    assert prefect_db(tmp_path, "SELECT active_slots FROM concurrency_limit_v2 "
                                "WHERE name = 'ptflow-train-interrupt'") == [(1,)]  # what used to block re-runs
    seen = logged_losses(work_folder(store))
    newest = max((p.name for p in work_folder(store).glob("checkpoint-*")), key=lambda n: int(n.split("-")[1]))
    started = time.monotonic()
    output = rerun_resumes(env, tmp_path, seen, newest)
    print(f"kill -9: the re-run took {time.monotonic() - started:.1f} s")
    assert re.search(r"released ptflow-train-interrupt, left taken by flow run \S+ \(.*pid \d+", output), output[-3000:]
    runs = run_cli(env, "runs")
    assert re.search(r"^interrupt\s+completed\s+40\s", runs.stdout, re.MULTILINE), runs.stdout
