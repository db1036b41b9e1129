"""The fault-injection seam: configured once from the environment, a no-op when unset."""

from __future__ import annotations

import os
import subprocess
import sys

PROBE = """
from ptflow import faults
for name in ("prepare_dataset:built", "train:step-3", "train:step-4"):
    try:
        faults.point(name)
        print(name, "passed")
    except faults.InjectedFault as exc:
        print(name, "raised", exc)
"""


def probe(**env: str) -> list[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PTFLOW_")}
    out = subprocess.run([sys.executable, "-c", PROBE], env={**clean, **env}, capture_output=True, text=True,
                         timeout=60)
    return out.stdout.splitlines() if out.returncode == 0 else [f"rc {out.returncode}: {out.stderr[-300:]}"]


def test_unset_points_pass():
    assert probe() == ["prepare_dataset:built passed", "train:step-3 passed", "train:step-4 passed"]


def test_a_failure_point_raises_a_training_error_there_only():
    lines = probe(PTFLOW_TEST_FAIL_AFTER_STEP="3")
    assert lines[0] == "prepare_dataset:built passed" and lines[2] == "train:step-4 passed"
    assert lines[1] == "train:step-3 raised train: injected failure after step 3 (fault point train:step-3)"
    assert probe(PTFLOW_FAIL_AT="prepare_dataset:built")[0].startswith("prepare_dataset:built raised")


def test_a_kill_point_kills_the_process():
    assert probe(PTFLOW_KILL_AT="train:step-3")[0].startswith("rc -9")
