"""Retry policy shared by every stage task; caching is the store's alone.

Prefect's result cache is off on stage tasks: the store (content-addressed entries with their
manifests) is the single source of truth, so a copied or moved store keeps working and a
stage's key is computed once per run (docs/caching.md says why). Retries are for transient
errors only.
"""

from __future__ import annotations

from prefect.cache_policies import NO_CACHE

from ptflow.errors import is_transient


def transient_only(task, task_run, state) -> bool:
    """retry_condition_fn: retry network/Hub hiccups, never config, data or divergence errors."""
    try:
        state.result()
    except BaseException as exc:  # the failed task's own exception, re-raised by Prefect
        return is_transient(exc)
    return False


STAGE_OPTIONS = dict(cache_policy=NO_CACHE, persist_result=False, retries=2, retry_delay_seconds=[10, 60],
                     retry_condition_fn=transient_only)
