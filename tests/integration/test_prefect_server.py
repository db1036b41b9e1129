"""The flow against a real `prefect server` on PostgreSQL: states, task runs and UI artifacts recorded."""

from __future__ import annotations

import asyncio
import urllib.request

from conftest import cli_env, run_cli

STAGES = {"load_tokenizer", "prepare_dataset", "train", "evaluate", "plot_loss", "write_model_card"}


async def read_run(api_url: str):
    from prefect.client.orchestration import PrefectClient
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowRunFilter,
        FlowRunFilterId,
    )

    async with PrefectClient(api_url) as client:
        # The server is shared by the session's integration tests: take the runs of this test's run_name.
        runs = [r for r in await client.read_flow_runs() if "run_name=server-it" in (r.parameters.get("overrides") or [])]
        assert len(runs) == 1
        run = runs[0]
        tasks = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])))
        artifacts = await client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[run.id])))
        return run, tasks, artifacts


def test_flow_run_is_recorded_on_the_server(prefect_server, tmp_path):
    env = cli_env(tmp_path, PREFECT_API_URL=prefect_server)
    result = run_cli(env, "run", "configs/quickstart.yaml", "train.max_steps=10", "train.save_steps=5",
                     "train.eval_steps=5", "data.cutoff_len=128", "data.val_size=8", "run_name=server-it")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Starting temporary server" not in result.stdout + result.stderr

    run, tasks, artifacts = asyncio.run(read_run(prefect_server))
    assert run.state.type.value == "COMPLETED"
    assert run.parameters["config_path"] == "configs/quickstart.yaml"
    assert {t.name for t in tasks} == {f"{stage} [miss]" for stage in STAGES}  # named by what they did
    assert all(t.state.type.value == "COMPLETED" for t in tasks)
    by_key = {a.key: a for a in artifacts if a.key}
    assert by_key["train-progress"].type == "progress" and by_key["train-progress"].data == 100.0
    assert {row["stage"] for row in _table(by_key["stages"].data)} == STAGES
    assert "# server-it" in by_key["model-card"].data

    with urllib.request.urlopen(prefect_server.removesuffix("/api") + "/", timeout=10) as page:
        assert b"<html" in page.read(2000).lower()  # the UI is served by the same server


def _table(data):
    import json

    return json.loads(data) if isinstance(data, str) else data
