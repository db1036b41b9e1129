"""A Ctrl-C whose KeyboardInterrupt is lost (raised inside a finalizer) still stops the run (ptflow/interrupt.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The signal lands while the main thread runs a finalizer: Python prints "Exception ignored in ..." and
# drops the KeyboardInterrupt there; only the recorded request can stop the loop that follows.
SWALLOWED = """
import os, signal, sys
from ptflow import interrupt
if sys.argv[1] == "install":
    interrupt.install()

class Finalized:
    def __del__(self):
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(1000):  # the handler runs between these bytecodes, inside __del__
            pass

Finalized()
try:
    for step in range(1, 4):
        interrupt.check()
        print("step", step, flush=True)
except KeyboardInterrupt:
    print("stopped", flush=True)
"""


def run(how: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", SWALLOWED, how], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)


def test_python_alone_loses_a_ctrl_c_raised_inside_a_finalizer():
    plain = run("default")
    assert "Exception ignored" in plain.stderr and "KeyboardInterrupt" in plain.stderr, plain.stderr
    assert plain.stdout.split() == ["step", "1", "step", "2", "step", "3"]


def test_the_recorded_request_is_raised_again_at_the_next_check():
    guarded = run("install")
    assert "Exception ignored" in guarded.stderr, guarded.stderr  # the first raise was lost as before
    assert guarded.stdout.split() == ["stopped"]
