"""Run a stage task and report what it did: built, or reused (and why), to the log and the UI."""

from __future__ import annotations

from prefect import get_run_logger
from prefect.artifacts import create_table_artifact

from ptflow.layout import Layout
from ptflow.store import Artifact


def run_stage(stage_task, *args, layout: Layout, **kwargs) -> Artifact:
    """Call the task; a Prefect cache hit is marked as such on the returned artifact.

    Prefect's cache records are kept in the store (a Path, which Prefect wraps in an unsaved
    LocalFileSystem), so they travel and vanish together with the artifacts they point to.
    """
    stage_task = stage_task.with_options(result_storage=layout.prefect_results())
    state = stage_task(*args, layout=layout, return_state=True, **kwargs)
    artifact = state.result()
    if state.name == "Cached":
        artifact = artifact.as_cached("Prefect cache: content key unchanged and the store entry intact")
    verdict = "hit" if artifact.hit else "miss"
    get_run_logger().info("%s: %s (%s) -> %s", artifact.stage, verdict, artifact.reason or "built", artifact.path)
    return artifact


def report_stages(artifacts: list[Artifact | None]) -> list[dict]:
    rows = [{"stage": a.stage, "cache": "hit" if a.hit else "miss", "reason": a.reason, "key": a.key[:12],
             "digest": a.digest[:12], "path": a.path} for a in artifacts if a is not None]
    create_table_artifact(rows, key="stages", description="Each stage: reused from the store or built, and why")
    return rows
