"""Fault injection for the crash tests: `PTFLOW_KILL_AT=<point>` SIGKILLs this process at that point.

Points: `<stage>:built` (the stage's files are written, its manifest not yet: a crash mid-write),
`train:step-<n>` (right after optimizer step n), `checkpoint:writing-<n>` (checkpoint n's weights
written, the rest not). Unset, a point costs one environment lookup.
"""

from __future__ import annotations

import os
import signal


def point(name: str) -> None:
    if os.environ.get("PTFLOW_KILL_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)
