"""Where the train stage runs (in this flow, or on the gpu work pool) and who may train a lineage now.

`orchestration.placement: gpu-pool` runs the `train-stage` deployment (flows/train_stage.py) with
run_deployment, passing the config path, overrides and the keys of its input artifacts; both
pools share the store, so the child finds its inputs there and the parent finds the model by
the key it computed. A train that is already in the store never books a GPU.

One run per run_name trains at a time: the flow holds the global concurrency limit
`ptflow-train-<run_name>` (limit 1, created on first use) from choosing the start model to
recording it in the lineage, so a second scheduled run waits instead of training on top of
a run still in progress.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import replace

from prefect import get_client, get_run_logger
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.concurrency.sync import concurrency
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
from prefect.runtime import flow_run

from ptflow.config.schema import RunConfig
from ptflow.errors import TrainingError
from ptflow.stages import STAGES
from ptflow.store.entries import Artifact
from ptflow.store.layout import Layout
from ptflow.store.lineage import Start, record, start_model
from ptflow.store.stage import Planned
from ptflow.store.verdict import locate, predict
from tasks.runner import note_resume, run_planned
from tasks.stages import train


def train_model(cfg: RunConfig, config_path: str, overrides: list[str], tokenizer: Artifact, dataset: Artifact,
                layout: Layout, redo: Collection[str] = ()) -> Artifact:
    """Train (or reuse) the model where the config places it, continuing the lineage when asked."""
    with lineage_slot(cfg.run_name):
        start = start_model(cfg, layout, dataset)
        get_run_logger().info("train: %s", start.note)
        planned = STAGES["train"].plan(start.section, cfg.train, tokenizer, dataset, layout=layout, seed=cfg.seed)
        if cfg.orchestration.placement == "gpu-pool":
            model = train_on_pool(cfg, config_path, overrides, planned, start, layout, "train" in redo)
        else:
            model = run_planned(train, planned, layout, redo)
        record(layout, cfg.run_name, model, start, dataset, flow_run=str(flow_run.get_id()))
    return model


def train_on_pool(cfg: RunConfig, config_path: str, overrides: list[str], planned: Planned, start: Start,
                  layout: Layout, force: bool) -> Artifact:
    verdict = predict(layout, planned)
    tokenizer, dataset = planned.args[2], planned.args[3]
    if verdict.cached and not force:
        return locate(layout, "train", verdict.key).as_cached("all key components unchanged (no GPU run needed)")
    name = cfg.orchestration.train_deployment
    get_run_logger().info("train: %s on deployment %s (%s)", verdict.label, name, verdict.reason)
    child = run_deployment(name, parameters={
        "config_path": config_path, "overrides": overrides, "tokenizer_key": tokenizer.key,
        "dataset_key": dataset.key, "parent_key": start.parent, "force": force},
        flow_run_name=f"{flow_run.get_name()}-train", tags=["ptflow"], poll_interval=2)
    if not child.state.is_completed():
        raise TrainingError(f"train: flow run {child.name} of deployment {name} ended {child.state.name}: "
                            f"{child.state.message}. Re-run this flow: finished stages are reused and training "
                            "resumes from its newest checkpoint.")
    reason = "forced by orchestration.force/from_stage" if force else verdict.reason
    model = replace(locate(layout, "train", verdict.key), hit=False, reason=f"{reason}; trained by {child.name}")
    return note_resume(model)


@contextmanager
def lineage_slot(run_name: str) -> Iterator[None]:
    """Hold `ptflow-train-<run_name>` (a global concurrency limit of 1 slot) while training this lineage."""
    name = f"ptflow-train-{run_name}"
    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            try:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
            except ObjectAlreadyExists:  # another run created it first
                pass
    # The shortest lease the server accepts, renewed while training runs: a run killed with -9 frees
    # the slot within 60 s instead of blocking its own re-run for the 300 s default.
    with concurrency(name, occupy=1, strict=True, lease_duration=60):
        yield
