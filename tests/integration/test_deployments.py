"""Production orchestration against a real server: prefect.yaml deployments, cpu and gpu process workers.

`ptflow deploy` creates the pools and deployments on a `prefect server` on PostgreSQL; a cpu
and a gpu `prefect worker` (the gpu pool runs on the CPU here) share one store. The nightly
deployment (configs/continual.yaml, training placed on the gpu pool) is run through the API
with a fault injected into the gpu worker's training after the step-10 checkpoint; the re-run
must reuse the tokenizer and dataset and resume training at step 10. A new shard then makes
the next run continue from the lineage's model. Chromium looks at the UI when it is installed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import ROOT, free_port, prefect_server_on_postgres

QUICKSTART_CORPUS = ROOT / "configs" / "quickstart" / "data" / "corpus.jsonl"
SMALL = ["train.max_steps=20", "train.save_steps=10", "train.eval_steps=10", "train.logging_steps=5",
         "data.cutoff_len=128", "data.val_size=8"]
SCREENSHOTS = Path(os.environ.get("PTFLOW_UI_SCREENSHOTS", ROOT / "build" / "ui"))


class Stack:
    """Workers for the cpu and gpu pools, started as users start them; logs kept for failure reports."""

    def __init__(self, api_url: str, root: Path):
        self.api_url, self.root = api_url, root
        self.store, self.data = root / "store", root / "corpus"
        self.workers: dict[str, subprocess.Popen] = {}

    def env(self, name: str, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "PTFLOW_"))}
        env.update(PREFECT_API_URL=self.api_url, PREFECT_HOME=str(self.root / f"home-{name}"), HF_HUB_OFFLINE="1",
                   PTFLOW_HOME=str(self.store), PREFECT_SERVER_ANALYTICS_ENABLED="false", PYTHONUNBUFFERED="1",
                   PREFECT_WORKER_QUERY_SECONDS="1", TOKENIZERS_PARALLELISM="false", **extra)
        (self.root / f"home-{name}").mkdir(exist_ok=True)
        return env

    def start_worker(self, pool: str, **extra: str) -> None:
        log = open(self.root / f"worker-{pool}.log", "a")
        self.workers[pool] = subprocess.Popen(
            [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, "--name", f"it-{pool}"],
            cwd=ROOT, env=self.env(pool, **extra), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            # A worker started from a non-interactive shell inherits SIGINT ignored and then needs two signals.
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        log.close()

    def stop_worker(self, pool: str) -> None:
        process = self.workers.pop(pool)
        for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 10)):
            try:
                os.killpg(process.pid, sig)
                process.wait(timeout=wait)
                return
            except ProcessLookupError:
                return
            except subprocess.TimeoutExpired:
                continue

    def logs(self) -> str:
        parts = []
        for path in sorted(self.root.glob("*.log")):
            parts.append(f"===== {path.name} (last 4000 characters)\n{path.read_text(errors='replace')[-4000:]}")
        return "\n".join(parts)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with prefect_server_on_postgres(tmp_path_factory.mktemp("server")) as api_url:  # runs of its own
        yield from start_stack(api_url, tmp_path_factory.mktemp("stack"))


def start_stack(api_url: str, root: Path):
    stack = Stack(api_url, root)
    deploy = subprocess.run([sys.executable, "-m", "flows.cli", "deploy"], cwd=ROOT, env=stack.env("deploy"),
                            capture_output=True, text=True, timeout=300)
    assert deploy.returncode == 0, deploy.stdout[-3000:] + deploy.stderr[-3000:]
    lines = QUICKSTART_CORPUS.read_text(encoding="utf-8").splitlines(keepends=True)
    (stack.data / "shards").mkdir(parents=True)
    (stack.data / "shards" / "000.jsonl").write_text("".join(lines[:1000]), encoding="utf-8")
    (stack.data / "shards" / "001.jsonl").write_text("".join(lines[1000:1800]), encoding="utf-8")
    (stack.data / "dataset_info.json").write_text(json.dumps({"corpus": {"file_name": "shards"}}))
    stack.start_worker("cpu")
    stack.start_worker("gpu", PTFLOW_TEST_FAIL_AFTER_STEP="10")  # training fails once, after checkpoint-10
    try:
        yield stack
    finally:
        for pool in list(stack.workers):
            stack.stop_worker(pool)
        print(stack.logs())  # shown by pytest when a test of this module failed


def client(stack: Stack):
    from prefect.client.orchestration import SyncPrefectClient

    return SyncPrefectClient(stack.api_url)


def run_nightly(stack: Stack, overrides: list[str] = (), job_variables: dict | None = None, timeout: float = 300):
    """Trigger pretrain/nightly through the API with its own parameters plus test overrides; wait for the end."""
    with client(stack) as api:
        deployment = api.read_deployment_by_name("pretrain/nightly")
        params = {**deployment.parameters, "overrides": [*deployment.parameters["overrides"],
                                                         f"data.dataset_dir={stack.data}", *SMALL, *overrides]}
        run = api.create_flow_run_from_deployment(deployment.id, parameters=params, job_variables=job_variables)
        deadline = time.monotonic() + timeout
        while not (run := api.read_flow_run(run.id)).state.is_final():
            assert time.monotonic() < deadline, f"flow run {run.name} stuck in {run.state.name}\n{stack.logs()}"
            time.sleep(1)
        return run


def task_runs(stack: Stack, flow_run) -> dict[str, object]:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with client(stack) as api:
        runs = api.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id])))
    return {t.name: t for t in runs}


def train_child(stack: Stack, parent):
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterParentFlowRunId,
    )

    with client(stack) as api:
        children = api.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent.id])))
    assert len(children) == 1, [c.name for c in children]
    return children[0]


def log_lines(stack: Stack, flow_run) -> list[object]:
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    with client(stack) as api:
        return api.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run.id])))


def artifacts(stack: Stack, flow_run) -> dict[str, object]:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with client(stack) as api:
        found = api.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run.id])))
    return {a.key: a for a in found if a.key}


def table(artifact) -> list[dict]:
    return json.loads(artifact.data) if isinstance(artifact.data, str) else artifact.data


def test_prefect_yaml_deployments_pools_and_schedule(stack):
    with client(stack) as api:
        nightly = api.read_deployment_by_name("pretrain/nightly")
        train = api.read_deployment_by_name("train-stage/gpu")
        pools = {p.name: p.type for p in api.read_work_pools()}
    assert pools["cpu"] == "process" and pools["gpu"] == "process"
    assert (nightly.work_pool_name, train.work_pool_name) == ("cpu", "gpu")
    assert nightly.entrypoint == "flows/pretrain.py:pretrain" and train.entrypoint == "flows/train_stage.py:train_stage"
    assert nightly.parameters == {"config_path": "configs/continual.yaml",
                                  "overrides": ["orchestration.placement=gpu-pool"]}
    [schedule] = nightly.schedules
    assert (schedule.schedule.cron, schedule.schedule.timezone, schedule.active) == ("0 2 * * *", "UTC", True)
    assert nightly.global_concurrency_limit.limit == 1
    assert nightly.concurrency_options.collision_strategy.value == "ENQUEUE"
    assert nightly.job_variables["env"]["PREFECT_FLOW_DEFAULT_RETRIES"] == "1"
    assert nightly.pull_steps == [{"prefect.deployments.steps.set_working_directory": {"directory": str(ROOT)}}]


@pytest.fixture(scope="module")
def failed_then_rerun(stack):
    """Run A fails in training after checkpoint-10 (flow retries off); run B is a plain re-run of the deployment."""
    failed = run_nightly(stack, job_variables={"env": {"PREFECT_FLOW_DEFAULT_RETRIES": "0"}})
    rerun = run_nightly(stack)
    return failed, rerun


def test_failed_training_then_rerun_reuses_stages_and_resumes_from_checkpoint(stack, failed_then_rerun):
    failed, rerun = failed_then_rerun
    assert failed.state.type.value == "FAILED", stack.logs()
    assert "injected failure after step 10" in failed.state.message
    failed_child = train_child(stack, failed)
    assert failed_child.work_pool_name == "gpu" and failed_child.state.type.value == "FAILED"
    assert set(task_runs(stack, failed)) >= {"load_tokenizer [miss]", "prepare_dataset [miss]"}
    assert task_runs(stack, failed_child)["train [miss]"].state.type.value == "FAILED"

    assert rerun.state.type.value == "COMPLETED", f"{rerun.state.message}\n{stack.logs()}"
    assert rerun.parameters == failed.parameters
    assert rerun.empirical_policy.retries == 1  # flow-level retries from prefect.yaml reached the run
    tasks = task_runs(stack, rerun)
    assert {"load_tokenizer [hit]", "prepare_dataset [hit]"} <= set(tasks)
    assert all(t.state.type.value == "COMPLETED" for t in tasks.values())
    child = train_child(stack, rerun)
    assert (child.work_pool_name, child.deployment_id is not None, child.state.type.value) == ("gpu", True, "COMPLETED")
    assert child.parameters["tokenizer_key"] and child.parameters["dataset_key"]
    assert task_runs(stack, child)["train [resume from step 10]"].state.type.value == "COMPLETED"
    # ptflow's own log lines reach the API from runs a worker launched (the job variables of prefect.yaml
    # configure Prefect's logging; the workers' own environment has no PREFECT_* setting).
    child_logs = log_lines(stack, child)
    assert any(r.name == "ptflow.train" and "step 20/20" in r.message for r in child_logs), \
        sorted({r.name for r in child_logs})
    assert any(r.name.startswith("ptflow.") for r in log_lines(stack, rerun))
    assert "evaluate [miss]" in task_runs(stack, child)  # evaluation ran where the model is (the gpu pool)
    assert "evaluate [hit]" in task_runs(stack, rerun)
    assert artifacts(stack, child)["train-progress"].data == 100.0

    found = artifacts(stack, rerun)
    stages = {row["stage"]: row for row in table(found["stages"])}
    assert {s: stages[s]["cache"] for s in ("load_tokenizer", "prepare_dataset", "train")} == {
        "load_tokenizer": "hit", "prepare_dataset": "hit", "train": "miss"}
    assert "resumed from checkpoint-10" in stages["train"]["reason"] and child.name in stages["train"]["reason"]
    metrics = {row["metric"]: row["value"] for row in table(found["metrics"])}
    assert metrics["total_steps"] == 20 and metrics["resumed_from"].endswith("checkpoint-10")
    assert "# continual" in found["model-card"].data

    # The store agrees: the model came from the checkpoint, and its log has steps 5..20 without a restart.
    model = Path(stages["train"]["path"])
    manifest = json.loads((model / "manifest.json").read_text())
    assert manifest["stats"]["resumed_from"] == str(model.with_name(model.name + ".work") / "checkpoint-10")
    log = [json.loads(line) for line in (model / "trainer_log.jsonl").read_text().splitlines()]
    assert [r["current_steps"] for r in log if "loss" in r] == [5, 10, 15, 20]
    lineage = [json.loads(line) for line in (stack.store / "lineage" / "continual.jsonl").read_text().splitlines()]
    assert [(e["key"], e["parent"], e["flow_run"]) for e in lineage] == [(model.name, None, str(rerun.id))]


def test_new_shard_continues_from_the_lineage_model(stack, failed_then_rerun):
    _, rerun = failed_then_rerun
    stack.stop_worker("gpu")
    stack.start_worker("gpu")  # the fault was transient: a fresh gpu worker
    lines = QUICKSTART_CORPUS.read_text(encoding="utf-8").splitlines(keepends=True)
    (stack.data / "shards" / "002.jsonl").write_text("".join(lines[1800:]), encoding="utf-8")
    nightly = run_nightly(stack, ["train.max_steps=10"])
    assert nightly.state.type.value == "COMPLETED", f"{nightly.state.message}\n{stack.logs()}"
    tasks = task_runs(stack, nightly)
    assert {"load_tokenizer [hit]", "prepare_dataset [miss]"} <= set(tasks)
    lineage = [json.loads(line) for line in (stack.store / "lineage" / "continual.jsonl").read_text().splitlines()]
    assert len(lineage) == 2 and lineage[1]["parent"] == lineage[0]["key"]
    assert lineage[1]["flow_run"] == str(nightly.id) and lineage[1]["dataset"] != lineage[0]["dataset"]
    child = train_child(stack, nightly)
    assert set(task_runs(stack, child)) == {"train [miss]", "evaluate [miss]"}  # evaluated where it trained
    assert child.parameters["parent_key"] == lineage[0]["key"]


def test_one_training_per_lineage_at_a_time(stack, failed_then_rerun):
    from prefect.concurrency.sync import concurrency
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from tasks.placement import lineage_slot

    with client(stack) as api:  # the flows created their lineage's limit on the server
        assert api.read_global_concurrency_limit_by_name("ptflow-train-continual").limit == 1
    outcome = {}

    def second_run():
        try:
            with concurrency("ptflow-train-it-lock", occupy=1, timeout_seconds=3, strict=True):
                outcome["second"] = "acquired"
        except TimeoutError:
            outcome["second"] = "waited"

    with temporary_settings({PREFECT_API_URL: stack.api_url}):
        with lineage_slot("it-lock"):
            waiter = threading.Thread(target=second_run)
            waiter.start()
            waiter.join(30)
        assert outcome == {"second": "waited"}
        second_run()
    assert outcome == {"second": "acquired"}


def test_kubernetes_work_pool_template_is_accepted_by_the_server(stack):
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import PrefectHTTPStatusError

    template = json.loads((ROOT / "infra" / "k8s" / "gpu-work-pool.json").read_text())
    with client(stack) as api:
        pool = api.create_work_pool(WorkPoolCreate(name="gpu-k8s", type="kubernetes", base_job_template=template))
        assert pool.base_job_template["variables"]["properties"]["gpu_count"]["default"] == 1
        broken = json.loads(json.dumps(template))
        broken["job_configuration"]["job_manifest"]["spec"]["parallelism"] = "{{ workers }}"
        with pytest.raises(PrefectHTTPStatusError, match="undeclared"):
            api.create_work_pool(WorkPoolCreate(name="gpu-k8s-broken", type="kubernetes", base_job_template=broken))


@pytest.mark.skipif(not shutil.which("chromium"), reason="needs Debian's chromium (apt-get install chromium) "
                    "for the UI screenshot")
def test_ui_shows_the_run_with_named_task_runs_and_artifacts(stack, failed_then_rerun):
    from browser import Browser

    _, rerun = failed_then_rerun
    child = train_child(stack, rerun)
    ui = stack.api_url.removesuffix("/api")
    with Browser(free_port(), height=1100) as browser:
        browser.open(f"{ui}/runs/flow-run/{rerun.id}")
        browser.wait_for(rerun.name, "Completed", "load_tokenizer [hit]", "prepare_dataset [hit]", "Artifacts")
        browser.click_text("Artifacts")
        browser.wait_for("stages", "metrics", "model-card")
        page = browser.screenshot(SCREENSHOTS / "flow-run.png")
        browser.open(f"{ui}/runs/flow-run/{child.id}")
        browser.wait_for(child.name, "train [resume from step 10]", "Artifacts")
        browser.click_text("Artifacts")
        browser.wait_for("train-progress")
        train_page = browser.screenshot(SCREENSHOTS / "train-stage-run.png")
    for path in (page, train_page):
        assert path.stat().st_size > 20_000  # a rendered page, not a blank one
    print(f"UI screenshots: {page} {train_page}")
