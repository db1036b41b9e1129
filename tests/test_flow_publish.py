"""The flow under a real (temporary) Prefect API: UI artifacts, publishing, evaluate-only, and no token anywhere.

The publishing run reads its Hub token from the config file; the test then looks for that
sentinel in every file the run leaves (store, output folder, Prefect's database and local
storage), in what the Prefect API returns (flow run parameters, task runs, logs, artifacts),
in every log line of any logger at DEBUG level (what the console would show), in every
uploaded file and in every request URL and body sent to the Hub (it may only travel in the
Authorization header).
"""

from __future__ import annotations

import base64
import json
import logging
import re
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import yaml
from hub_standin import serve_hub

SENTINEL = "hf_SENTINEL" + uuid.uuid4().hex
DATA_URI = re.compile(r"data:image/png;base64,([A-Za-z0-9+/=]+)")


def write_config(path: Path, store: Path, model_dir: Path, data_dir: Path, **sections) -> Path:
    config = {"run_name": "tiny-flow", "store": str(store),
              "model": {"model_name_or_path": str(model_dir), "train_from_scratch": True},
              "data": {"dataset": "stdlib_docs", "dataset_dir": str(data_dir), "cutoff_len": 64, "val_size": 4},
              "train": {"max_steps": 6, "per_device_train_batch_size": 4, "learning_rate": 3e-3, "logging_steps": 2,
                        "save_steps": 3, "eval_steps": 3},
              "eval": {"per_device_eval_batch_size": 4}}
    for name, values in sections.items():
        config.setdefault(name, {}).update(values)
    path.write_text(yaml.safe_dump(config))
    return path


def run_flow(config: Path):
    from flows.pretrain import pretrain

    state = pretrain(config_path=str(config), overrides=[], return_state=True)
    return state.result(), state.state_details.flow_run_id


def read_api(flow_run_id) -> dict:
    from prefect import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowRunFilter,
        FlowRunFilterId,
        LogFilter,
        LogFilterFlowRunId,
    )
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()
    EventsWorker.drain_all()
    with get_client(sync_client=True) as client:
        return {"flow_run": client.read_flow_run(flow_run_id),
                "task_runs": client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))),
                "logs": client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]))),
                "artifacts": client.read_artifacts(artifact_filter=ArtifactFilter(
                    flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))}


def files_under(*roots: Path, since: float = 0.0) -> list[Path]:
    return [p for root in roots if root.exists() for p in root.rglob("*") if p.is_file() and p.stat().st_mtime >= since]


class Recorder(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@contextmanager
def record_logs(*names: str):
    """Every log line of these loggers (at any level), as it would be printed."""
    recorder = Recorder()
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(recorder)
        logger.setLevel(logging.DEBUG)
    try:
        yield recorder.lines
    finally:
        for logger, level in zip(loggers, levels):
            logger.removeHandler(recorder)
            logger.setLevel(level)


def test_flow_publishes_shows_its_results_and_never_leaks_the_token(prefect_api, tiny_model_dir, tiny_data_dir,
                                                                     tmp_path, monkeypatch):
    import prefect.settings

    import flows.pretrain  # noqa: F401  (importing tasks sets ptflow's level: do it before recording at DEBUG)

    started = time.time() - 1
    with serve_hub(monkeypatch, tmp_path) as hub, record_logs("", "prefect", "ptflow", "huggingface_hub",
                                                              "httpx2") as log_lines:
        hub.add_user(SENTINEL, "alice")
        hub.watch.append(SENTINEL)
        config = write_config(tmp_path / "run.yaml", tmp_path / "store", tiny_model_dir, tiny_data_dir,
                              output={"push_to_hub": True, "hub_model_id": "alice/tiny-flow", "hub_token": SENTINEL,
                                      "license": "apache-2.0"})
        summary, flow_run_id = run_flow(config)

    # Published: one commit named after the run and its data, with the run's files and no checkpoint.
    repo = hub.repos["alice/tiny-flow"]
    [commit] = repo.commits
    data_digest = next(row["digest"] for row in summary["stages"] if row["stage"] == "prepare_dataset")  # 12 chars
    assert re.fullmatch(rf"ptflow run tiny-flow, flow run pretrain/[\w-]+ \({flow_run_id}\): "
                        rf"data manifest {data_digest}[0-9a-f]{{4}}", commit["summary"])
    out = Path(summary["output_dir"])
    assert (out / "checkpoint-3").is_dir() and not any(name.startswith("checkpoint-") for name in repo.files)
    for name in ("model.safetensors", "config.json", "tokenizer.json", "README.md", "eval_results.json",
                 "all_results.json", "training_loss.png", "training_eval_loss.png", "trainer_log.jsonl"):
        assert repo.files[name] == (out / name).read_bytes(), name
    assert summary["hub_commit_url"] == f"{hub.url}/alice/tiny-flow/commit/{commit['oid']}"

    # The UI: loss plots embedded as PNG data URIs, the card with its plot, the commit link, the metrics table.
    api = read_api(flow_run_id)
    artifacts = {a.key: a for a in api["artifacts"] if a.key}
    assert {"loss-plots", "model-card", "hub-commit", "metrics", "stages"} <= set(artifacts)
    plots = artifacts["loss-plots"]
    assert plots.type == "markdown"
    pngs = [base64.b64decode(d) for d in DATA_URI.findall(plots.data)]
    assert (out / "training_loss.png").read_bytes() in pngs and (out / "training_eval_loss.png").read_bytes() in pngs
    card = artifacts["model-card"].data
    assert card.startswith("```yaml\n") and "# tiny-flow" in card and DATA_URI.search(card)
    assert f"({flow_run_id})" in card
    assert summary["hub_commit_url"] in artifacts["hub-commit"].data

    # The token: nowhere but in the config file the user wrote.
    settings = prefect.settings.get_current_settings()
    database = Path(settings.server.database.connection_url.get_secret_value().split(":///", 1)[1]).parent
    storage = Path(prefect.settings.PREFECT_LOCAL_STORAGE_PATH.value())
    scanned = [p for p in files_under(tmp_path / "store", database, storage, since=started)]
    assert any(p.name == "prefect-test.db" for p in scanned) and any(p.name == "README.md" for p in scanned)
    assert [str(p) for p in scanned if SENTINEL.encode() in p.read_bytes()] == []
    api_text = json.dumps({k: [o.model_dump(mode="json") for o in v] if isinstance(v, list) else v.model_dump(mode="json")
                           for k, v in api.items()})
    assert len(api["logs"]) > 10 and SENTINEL not in api_text
    assert api["flow_run"].parameters == {"config_path": str(config), "overrides": []}
    printed = "\n".join(log_lines)
    assert "publish: uploading" in printed and "HTTP Request: POST" in printed and SENTINEL not in printed
    assert not any(SENTINEL.encode() in data for data in repo.files.values())
    assert [r.route for r in hub.api_requests() if r.carries_watched] == []
    assert SENTINEL in config.read_text()  # the scan would have found it


def test_evaluate_only_flow_scores_an_existing_model(prefect_api, tiny_weights_dir, tiny_data_dir, tmp_path):
    config = write_config(tmp_path / "eval.yaml", tmp_path / "store", tiny_weights_dir, tiny_data_dir,
                          model={"train_from_scratch": False}, train={"do_train": False})
    summary, flow_run_id = run_flow(config)
    rows = {row["stage"]: row for row in summary["stages"]}
    assert list(rows) == ["load_tokenizer", "prepare_dataset", "model", "evaluate"]
    assert rows["model"]["path"] == str(tiny_weights_dir) and "do_train: false" in rows["model"]["reason"]
    out = Path(summary["output_dir"])
    results = json.loads((out / "eval_results.json").read_text())
    assert results["eval_loss"] == summary["eval_loss"] and results["eval_blocks"] > 4
    assert results["model_digest"] == rows["model"]["digest"] or results["model_digest"].startswith(rows["model"]["digest"])
    assert not (out / "model.safetensors").exists() and not (out / "README.md").exists()
    artifacts = {a.key for a in read_api(flow_run_id)["artifacts"] if a.key}
    assert "metrics" in artifacts and "loss-plots" not in artifacts
    again, _ = run_flow(config)
    assert {row["stage"]: row["cache"] for row in again["stages"]}["evaluate"] == "hit"
