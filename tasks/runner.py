"""Run a stage task and report what it did: built, or reused (and why), to the log and the UI."""

from __future__ import annotations

import inspect
from collections.abc import Collection
from dataclasses import replace
from pathlib import Path

from prefect import get_run_logger
from prefect.artifacts import create_table_artifact

from ptflow.store.entries import Artifact
from ptflow.store.layout import Layout
from ptflow.store.verdict import evict, predict


def run_stage(stage_task, *args, layout: Layout, redo: Collection[str] = (), **kwargs) -> Artifact:
    """Call the task, named after what it will do (`train [hit]`); redo it from scratch if its stage is in `redo`.

    Prefect's cache records are kept in the store (a Path, which Prefect wraps in an unsaved
    LocalFileSystem), so they travel and vanish together with the artifacts they point to.
    A forced stage loses its store entry (and checkpoints) and skips Prefect's cache.
    """
    parameters = inspect.signature(stage_task.fn).bind(*args, layout=layout, **kwargs).arguments
    verdict = predict(layout, stage_task.cache_key_fn.stage_module, parameters)
    forced = verdict.stage in redo
    if forced:
        evict(layout, verdict.stage, verdict.key)
    stage_task = stage_task.with_options(result_storage=layout.prefect_results(), refresh_cache=forced,
                                         task_run_name=f"{verdict.stage} [{'forced' if forced else verdict.label}]")
    state = stage_task(*args, layout=layout, return_state=True, **kwargs)
    artifact = state.result()
    if state.name == "Cached":
        artifact = artifact.as_cached("Prefect cache: content key unchanged and the store entry intact")
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
