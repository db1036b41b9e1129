"""What a stage will do in this run, read from the store before it runs: hit, miss, resume, or forced.

The flow names each task run after this (`prepare_dataset [hit]`, `train [resume from step 10]`),
removes the store entries of stages the config forces (`orchestration.force` / `from_stage`) so
they are rebuilt, and finds artifacts that another worker built by their key.

    verdict = predict(layout, dataset.STAGE.plan(cfg.data, tok, layout, 42))
    verdict.label   # "hit", "miss" or "resume from step 10"
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from ptflow.errors import StoreError
from ptflow.store import sync
from ptflow.store.entries import Artifact, explain_miss, key_lock, lookup
from ptflow.store.layout import Layout
from ptflow.store.stage import Planned
from ptflow.train.checkpoint import is_complete, list_checkpoints

log = logging.getLogger("ptflow.plan")


@dataclass(frozen=True)
class Verdict:
    """A stage's key in this run and whether the store already holds its artifact."""

    stage: str
    key: str
    cached: bool
    reason: str = ""  # why it misses: the key component that changed, or the damage found
    resume_step: int | None = None  # newest complete checkpoint of a resumable stage's unfinished build

    @property
    def label(self) -> str:
        if self.cached:
            return "hit"
        return f"resume from step {self.resume_step}" if self.resume_step else "miss"


def predict(layout: Layout, planned: Planned) -> Verdict:
    """What the store holds for a planned stage: its entry (a hit), a resumable build, or a miss and why."""
    stage, key = planned.stage.name, planned.key
    found, damage = lookup(layout, stage, key)
    if found:
        return Verdict(stage, key, True)
    reason = damage or explain_miss(layout, stage, planned.parts)
    return Verdict(stage, key, False, reason, _resume_step(layout.work(stage, key)))


def _resume_step(work: Path) -> int | None:
    if not work.is_dir():
        return None

    steps = [step for step, path in list_checkpoints(work) if is_complete(path)]
    return steps[-1] if steps else None


def evict(layout: Layout, stage: str, key: str) -> bool:
    """Remove a stage's artifact and its unfinished build (checkpoints), so the next call rebuilds from scratch.

    The folder is renamed away before it is deleted, so a reader never sees half of it; files
    hard-linked into an output_dir stay valid there.
    """
    removed = False
    with key_lock(layout, stage, key):
        for folder in (layout.artifact(stage, key), layout.work(stage, key)):
            if folder.exists():
                doomed = layout.tmp(stage, key)
                folder.rename(doomed)
                shutil.rmtree(doomed, ignore_errors=True)
                removed = True
        if layout.remote is not None:
            sync.drop(layout, stage, key)  # an object store's copy too, else the next lookup fetches it back
            removed = True
    if removed:
        log.info("%s: removed %s from the store (forced)", stage, key[:12])
    return removed


def locate(layout: Layout, stage: str, key: str) -> Artifact:
    """The intact artifact `stage/key` (as a hit), or StoreError saying how the workers must share the store."""
    found, damage = lookup(layout, stage, key)
    if found is None:
        state = f"unusable ({damage})" if damage else "missing"
        raise StoreError(f"{stage}: artifact {key[:12]} is {state} in the store at {layout.root}. "
                         "Workers of every pool must share one store: mount it at the same path on each and "
                         "point `store:` (or PTFLOW_HOME) at it, and deploy the same ptflow version to every "
                         "pool (see docs/deploy.md).")
    return found
