"""Faults under a real (temporary) Prefect API: transient errors are retried, user errors are not; inputs stay untouched.

The stage tasks are the real ones from tasks/stages.py with STAGE_OPTIONS (retries=2,
retry_condition_fn=transient_only), only their retry delay set to 0; the fault is injected
into the core function the task calls.
"""

from __future__ import annotations

import logging
import stat
from pathlib import Path

import pytest
import yaml

from ptflow.config.schema import ModelSection
from ptflow.data import tokenizer as tokenizer_stage
from ptflow.errors import ConfigError, DataError, HubError, PtflowError
from ptflow.store.entries import Artifact
from ptflow.store.layout import Layout
from tasks.policy import STAGE_OPTIONS


def flaky(failures: list[BaseException], calls: list[int]):
    """The real load_tokenizer, raising the given errors on its first calls."""
    real = tokenizer_stage.load_tokenizer

    def load_tokenizer(section, layout, parts=None):
        calls.append(1)
        if len(calls) <= len(failures):
            raise failures[len(calls) - 1]
        return real(section, layout, parts=parts)

    return load_tokenizer


def run_stage_in_a_flow(section: ModelSection, layout: Layout):
    from prefect import flow

    from tasks.stages import load_tokenizer

    task = load_tokenizer.with_options(retry_delay_seconds=0)

    @flow(name="retry-probe")
    def probe():
        return task(section, layout=layout)

    return probe(return_state=True)  # the flow's state: its result is the task's, or raises the task's error


TRANSIENT = {
    "network down once": [ConnectionError("connection reset by peer")],
    "hub 503 once": [HubError("Hub answered 503", transient=True)],
    "timeout twice": [TimeoutError("read timed out"), TimeoutError("read timed out")],
}


@pytest.mark.parametrize("case", sorted(TRANSIENT))
def test_transient_fault_is_retried_and_the_stage_succeeds(prefect_api, tiny_model_dir, tmp_path, monkeypatch, case):
    assert STAGE_OPTIONS["retries"] == 2
    calls: list[int] = []
    monkeypatch.setattr(tokenizer_stage, "load_tokenizer", flaky(TRANSIENT[case], calls))
    state = run_stage_in_a_flow(ModelSection(model_name_or_path=str(tiny_model_dir)), Layout(tmp_path / "store"))
    assert state.is_completed(), state
    artifact = state.result()
    assert isinstance(artifact, Artifact) and (artifact.dir / "tokenizer.json").is_file()
    assert len(calls) == len(TRANSIENT[case]) + 1


USER_ERRORS = {
    "config error": ConfigError("config.yaml", ["model.model_name_or_path: nope"]),
    "data error": DataError("corpus.jsonl:3: malformed JSON"),
    "hub 401": HubError("Hub refused the token (401)", transient=False),
    "out of memory": RuntimeError("CUDA out of memory"),
}


@pytest.mark.parametrize("case", sorted(USER_ERRORS))
def test_config_data_and_other_errors_fail_at_the_first_attempt(prefect_api, tiny_model_dir, tmp_path, monkeypatch,
                                                                 caplog, case):
    calls: list[int] = []
    error = USER_ERRORS[case]
    monkeypatch.setattr(tokenizer_stage, "load_tokenizer", flaky([error] * 3, calls))
    state = run_stage_in_a_flow(ModelSection(model_name_or_path=str(tiny_model_dir)), Layout(tmp_path / "store"))
    assert state.is_failed()
    with pytest.raises(type(error), match=str(error).splitlines()[0][:20]):
        state.result()
    assert len(calls) == 1
    # Prefect logs the failure; a ptflow error's message is the whole story, so no traceback (tasks/__init__.py)
    failures = [r for r in caplog.records if r.name.startswith("prefect.") and r.levelno >= logging.ERROR]
    assert failures and any(type(error).__name__ in r.getMessage() for r in failures)
    assert any(r.exc_info for r in failures) == (not isinstance(error, PtflowError))


def test_persistent_transient_fault_gives_up_after_the_retries(prefect_api, tiny_model_dir, tmp_path, monkeypatch):
    calls: list[int] = []
    monkeypatch.setattr(tokenizer_stage, "load_tokenizer", flaky([ConnectionError("down")] * 5, calls))
    state = run_stage_in_a_flow(ModelSection(model_name_or_path=str(tiny_model_dir)), Layout(tmp_path / "store"))
    assert state.is_failed()
    assert len(calls) == 1 + STAGE_OPTIONS["retries"]


# --------------------------------------------------------------------------- read-only inputs


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.relative_to(folder).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def set_writable(folder: Path, writable: bool) -> None:
    for path in [*folder.rglob("*"), folder]:
        mode = path.stat().st_mode
        bits = stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH
        path.chmod(mode | stat.S_IWUSR if writable else mode & ~bits)


def test_the_flow_never_writes_into_read_only_model_and_data_folders(prefect_api, tiny_model_dir, tiny_data_dir,
                                                                     tmp_path):
    """chmod a-w stops other users; the snapshot (sizes, mtimes, names) also catches root, who ignores modes."""
    import shutil

    from flows.pretrain import pretrain

    model = shutil.copytree(tiny_model_dir, tmp_path / "model")
    data = shutil.copytree(tiny_data_dir, tmp_path / "data")
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "run_name": "read-only", "store": str(tmp_path / "store"),
        "model": {"model_name_or_path": str(model), "train_from_scratch": True},
        "data": {"dataset": "stdlib_docs", "dataset_dir": str(data), "cutoff_len": 64, "val_size": 4},
        "train": {"max_steps": 3, "per_device_train_batch_size": 4, "save_steps": 2, "logging_steps": 1}}))
    for folder in (model, data):
        set_writable(folder, False)
    before = {"model": snapshot(model), "data": snapshot(data)}
    try:
        summary = pretrain(config_path=str(config))
        again = pretrain(config_path=str(config))
    finally:
        for folder in (model, data):
            set_writable(folder, True)
    assert {"model": snapshot(model), "data": snapshot(data)} == before
    assert {row["stage"]: row["cache"] for row in summary["stages"]}["train"] == "miss"
    assert {row["cache"] for row in again["stages"]} == {"hit"}
    out = Path(summary["output_dir"])
    assert out == tmp_path / "store" / "runs" / "read-only" and (out / "model.safetensors").is_file()
