"""Run a stage task and report what it did: built, or reused (and why), to the log and the UI."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import replace
from pathlib import Path

from prefect import get_run_logger
from prefect.artifacts import create_table_artifact

from ptflow import interrupt
from ptflow.stages import STAGES
from ptflow.store.entries import Artifact
from ptflow.store.layout import Layout
from ptflow.store.stage import Planned
from ptflow.store.verdict import evict, predict


def run_stage(stage_task, *args, layout: Layout, redo: Collection[str] = (), **kwargs) -> Artifact:
    """Plan the stage (its key components, computed once) and run its task; see `run_planned`."""
    planned = STAGES[stage_task.name].plan(*args, layout=layout, **kwargs)
    return run_planned(stage_task, planned, layout, redo)


def run_planned(stage_task, planned: Planned, layout: Layout, redo: Collection[str] = ()) -> Artifact:
    """Call the task, named after what it will do (`train [hit]`); redo it from scratch if its stage is in `redo`.

    The store is the only cache: the task gets the key components already computed and finds
    (or builds) its entry by them. A forced stage loses its store entry (and checkpoints) first.
    """
    interrupt.check()
    verdict = predict(layout, planned)
    forced = verdict.stage in redo
    if forced:
        evict(layout, verdict.stage, verdict.key)
    label = "forced" if forced else verdict.label
    stage_task = stage_task.with_options(task_run_name=f"{verdict.stage} [{label}]")
    artifact = stage_task(*planned.args, **planned.kwargs, parts=planned.parts)
    if forced:
        artifact = replace(artifact, reason="forced by orchestration.force/from_stage")
    artifact = note_resume(artifact)
    outcome = "hit" if artifact.hit else "miss"
    get_run_logger().info("%s: %s (%s) -> %s", artifact.stage, outcome, artifact.reason or "built", artifact.path)
    return artifact


def note_resume(artifact: Artifact) -> Artifact:
    """Add "resumed from checkpoint-N" to the reason of a stage that was built from a checkpoint."""
    if artifact.hit or not artifact.stats.get("resumed_from"):
        return artifact
    return replace(artifact, reason=f"{artifact.reason}; resumed from {Path(artifact.stats['resumed_from']).name}")


def report_stages(artifacts: list[Artifact | None]) -> list[dict]:
    rows = [{"stage": a.stage, "cache": "hit" if a.hit else "miss", "reason": a.reason, "key": a.key[:12],
             "digest": a.digest[:12], "path": a.path} for a in artifacts if a is not None]
    create_table_artifact(rows, key="stages", description="Each stage: reused from the store or built, and why")
    return rows


METRICS = ("parameters", "trainable_parameters", "total_steps", "resumed_from", "tokens_per_step", "first_loss",
           "final_loss", "train_loss", "final_eval_loss", "train_runtime", "first_step_s")


def report_metrics(model: Artifact, evaluation: Artifact | None) -> list[dict]:
    """A table of the run's numbers in the UI: training summary and, when evaluated, eval_loss and perplexity."""
    stats = {**{k: model.stats.get(k) for k in METRICS}, **(evaluation.stats if evaluation else {})}
    rows = [{"metric": k, "value": _json_safe(v)} for k, v in stats.items()
            if isinstance(v, (int, float, str)) and v != ""]
    create_table_artifact(rows, key="metrics", description="Training and evaluation metrics of this run")
    return rows


def _json_safe(value):
    """inf/nan as text: the UI cannot parse a table whose JSON holds Infinity (Prefect cleans only NaN)."""
    import math

    return str(value) if isinstance(value, float) and not math.isfinite(value) else value
