"""Cache and retry policy shared by every stage task.

The Prefect cache key is ptflow's content key (stage, code, config fields, input digests),
and it is only offered when the store still holds that artifact intact: a Prefect cache
record can never point at deleted or damaged files. Retries are for transient errors only.
"""

from __future__ import annotations

from types import ModuleType

from ptflow.errors import is_transient
from ptflow.store.entries import is_cached, stage_key
from ptflow.store.verdict import stage_components


def content_key(stage_module: ModuleType):
    """A `cache_key_fn` built from the stage module's `components(...)` function."""

    def key_fn(context, parameters: dict) -> str | None:
        parts = stage_components(stage_module, parameters)
        if not is_cached(parameters["layout"], stage_module.STAGE, parts):
            return None
        return f"ptflow-{stage_module.STAGE}-{stage_key(parts)}"

    key_fn.stage_module = stage_module  # lets the flow predict hit/miss and name the task run before it runs
    return key_fn


def transient_only(task, task_run, state) -> bool:
    """retry_condition_fn: retry network/Hub hiccups, never config, data or divergence errors."""
    try:
        state.result()
    except BaseException as exc:  # the failed task's own exception, re-raised by Prefect
        return is_transient(exc)
    return False


STAGE_OPTIONS = dict(persist_result=True, retries=2, retry_delay_seconds=[10, 60], retry_condition_fn=transient_only)
