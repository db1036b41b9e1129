"""Children of a run (Prefect's embedded server, torchrun) never outlive it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from ptflow import child

SLEEPER = "import sys, time; open(sys.argv[1], 'w').write('up'); time.sleep(600)"


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.split(") ")[1][0] != "Z"


def wait_gone(pid: int, timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not alive(pid)


def with_path(folder: Path) -> dict:
    """This environment, with `folder` (the test's helper scripts) and this interpreter's path importable."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(folder), *sys.path])}


def wait_file(path: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert path.exists(), f"{path} never appeared"


def test_a_child_runs_in_its_own_session_and_end_group_ends_its_grandchildren(tmp_path):
    script = tmp_path / "spawn.py"
    script.write_text("import subprocess, sys, time\n"
                      f"p = subprocess.Popen([sys.executable, '-c', {SLEEPER!r}, sys.argv[1]])\n"
                      "open(sys.argv[2], 'w').write(str(p.pid)); time.sleep(600)\n")
    ready, pid_file = tmp_path / "ready", tmp_path / "grandchild.pid"
    process = child.start("spawn", str(ready), str(pid_file), env=with_path(tmp_path))
    wait_file(ready)
    wait_file(pid_file)
    grandchild = int(pid_file.read_text())
    try:
        assert os.getsid(process.pid) == process.pid != os.getsid(0)  # a terminal's Ctrl-C does not reach it
        child.end_group(process, grace=5)
        assert process.returncode == -signal.SIGTERM
        assert wait_gone(grandchild)
    finally:
        child.end_group(process, grace=0)


def test_a_child_ends_when_its_parent_is_killed(tmp_path):
    """kill -9 of the parent: the kernel sends the child SIGTERM (Prefect's server no longer outlives ptflow)."""
    ready, pid_file = tmp_path / "ready", tmp_path / "child.pid"
    parent_code = ("import sys, time; from ptflow import child\n"
                   f"p = child.start('tests_sleeper', {str(ready)!r})\n"
                   f"open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(600)\n")
    (tmp_path / "tests_sleeper.py").write_text(SLEEPER)
    parent = subprocess.Popen([sys.executable, "-c", parent_code], env=with_path(tmp_path), start_new_session=True)
    wait_file(ready)
    wait_file(pid_file)
    pid = int(pid_file.read_text())
    try:
        assert alive(pid)
        parent.kill()
        parent.wait()
        assert wait_gone(pid)
    finally:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)
