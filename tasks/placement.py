"""Where the train stage runs (in this flow, or on the gpu work pool) and who may train a lineage now.

`orchestration.placement: gpu-pool` runs the `train-stage` deployment (flows/train_stage.py) with
run_deployment, passing the config path, overrides and the keys of its input artifacts; both
pools share the store, so the child finds its inputs there and the parent finds the model by
the key it computed. A train that is already in the store never books a GPU.

One run per run_name trains at a time: the flow holds the global concurrency limit
`ptflow-train-<run_name>` (limit 1, created on first use) from choosing the start model to
recording it in the lineage, so a second scheduled run waits instead of training on top of
a run still in progress (tasks/slots.py; a dead holder never blocks a re-run).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import replace

from prefect import get_run_logger
from prefect.deployments import run_deployment
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
from tasks.slots import lineage_slot
from tasks.stages import train


def train_model(cfg: RunConfig, config_path: str, overrides: list[str], tokenizer: Artifact, dataset: Artifact,
                layout: Layout, redo: Collection[str] = ()) -> Artifact:
    """Train (or reuse) the model where the config places it, continuing the lineage when asked."""
    with lineage_slot(cfg.run_name):
        start = start_model(cfg, layout, dataset)
        get_run_logger().info("train: %s", start.note)
        planned = STAGES["train"].plan(start.section, cfg.train, tokenizer, dataset, layout=layout, seed=cfg.seed,
                                       eval_batch_size=cfg.eval.per_device_eval_batch_size)
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
