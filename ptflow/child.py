"""Child processes that never outlive the run: their own process group, ended as a group, gone with their parent.

A child started with `start(...)` runs in a new session, so a Ctrl-C at the terminal reaches only
the `ptflow` process, which then stops its children in order (the Prefect server last, after the
run's final state is reported) instead of every process dying at once mid-request. On Linux the
child also asks the kernel for SIGTERM when its parent dies, so a `kill -9` of `ptflow` does not
leave a server or torchrun behind. That request is made by the child itself, through

    python -m ptflow.child MODULE ARG...      # run MODULE as __main__ once the parent-death signal is set

(no `preexec_fn`, which is unsafe in a threaded parent such as Prefect's).
"""

from __future__ import annotations

import ctypes
import os
import runpy
import signal
import subprocess
import sys
import time

PR_SET_PDEATHSIG = 1


def command(module: str, *args: str) -> list[str]:
    """The argv that runs `python -m module args...` under this guard."""
    return [sys.executable, "-m", "ptflow.child", module, *args]


def start(module: str, *args: str, **popen) -> subprocess.Popen:
    """Run `python -m module args...` in its own session, ended when this process dies."""
    return subprocess.Popen(command(module, *args), start_new_session=True,
                            env={**popen.pop("env", os.environ), "PTFLOW_PARENT_PID": str(os.getpid())}, **popen)


def end_group(process: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM the child's whole process group, SIGKILL whatever is left after `grace` seconds."""
    if process.poll() is None:
        _signal_group(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
    _signal_group(process.pid, signal.SIGKILL)  # the group may outlive its leader (a rank, a worker)
    process.wait()


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def die_with_parent() -> None:
    """Ask for SIGTERM when the parent dies; exit now if it already has (it died before this call)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    expected = os.environ.pop("PTFLOW_PARENT_PID", None)
    if expected and os.getppid() != int(expected):
        sys.exit(143)


if __name__ == "__main__":
    die_with_parent()
    sys.argv = sys.argv[1:]
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
