"""Fault injection for the crash tests: one seam, read from the environment once when ptflow loads.

Production code marks points with `faults.point(name)`; with no fault configured a point is one
comparison of two strings. Points: `<stage>:built` (the stage's files are written, its manifest
not yet: a crash mid-write), `train:step-<n>` (right after optimizer step n), `checkpoint:writing-<n>`
(checkpoint n's weights written, the rest not), `tokenize:stored-<n>` (the preparing process has received
the n-th shard it tokenized in this run, that shard in the store; worker processes may be mid-shard), and
on an object store `<stage>:uploading` (the entry's files uploaded, its manifest not yet) and
`checkpoint:uploading-<n>` (its files uploaded, its ptflow_checkpoint.json not yet).

    PTFLOW_KILL_AT=<point>               SIGKILL this process there (a crash, as kill -9)
    PTFLOW_FAIL_AT=<point>               raise an InjectedFault there (a failing task)
    PTFLOW_TEST_FAIL_AFTER_STEP=<n>      the same as PTFLOW_FAIL_AT=train:step-<n>
"""

from __future__ import annotations

import os
import signal

from ptflow.errors import TrainingError


class InjectedFault(TrainingError):
    """The failure a test asked for; a TrainingError, so it is not retried as a transient error."""


def _configured_failure() -> str | None:
    step = os.environ.get("PTFLOW_TEST_FAIL_AFTER_STEP")
    return os.environ.get("PTFLOW_FAIL_AT") or (f"train:step-{int(step)}" if step else None)


KILL_AT = os.environ.get("PTFLOW_KILL_AT")
FAIL_AT = _configured_failure()


def point(name: str) -> None:
    if name == KILL_AT:
        os.kill(os.getpid(), signal.SIGKILL)
    if name == FAIL_AT:
        stage, _, where = name.partition(":")
        what = f"after step {where.removeprefix('step-')}" if where.startswith("step-") else f"at {where}"
        raise InjectedFault(f"{stage}: injected failure {what} (fault point {name})")
