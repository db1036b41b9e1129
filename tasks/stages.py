"""One Prefect task per ptflow stage; each body is a single call into the Prefect-free core."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE

from ptflow.config.schema import (
    DataSection,
    EvalSection,
    ModelSection,
    OutputSection,
    RunConfig,
    TrainSection,
)
from ptflow.data import dataset, tokenizer
from ptflow.publish import card, plot
from ptflow.publish import evaluate as evaluation
from ptflow.publish import hub as publish
from ptflow.store.entries import Artifact, is_cached
from ptflow.store.layout import Layout
from ptflow.train import loop as training
from tasks.policy import STAGE_OPTIONS
from tasks.tokenize import tokenize_on_dask


@task(name="load_tokenizer", **STAGE_OPTIONS)
def load_tokenizer(section: ModelSection, layout: Layout, parts: dict | None = None) -> Artifact:
    return tokenizer.load_tokenizer(section, layout, parts=parts)


@task(name="prepare_dataset", **STAGE_OPTIONS)
def prepare_dataset(section: DataSection, tokenizer: Artifact, layout: Layout, seed: int,
                    parts: dict | None = None) -> Artifact:
    parts = parts or dataset.STAGE.key_parts(section, tokenizer, layout, seed)
    if section.dask_address and not is_cached(layout, dataset.STAGE.name, parts):
        tokenize_on_dask(section.dask_address, section, tokenizer, layout)  # then the stage finds every shard cached
    return dataset.prepare_dataset(section, tokenizer, layout, seed, parts=parts)


@task(name="train", **STAGE_OPTIONS)
def train(model: ModelSection, train: TrainSection, tokenizer: Artifact, dataset: Artifact, layout: Layout,
          seed: int, eval_batch_size: int | None = None, parts: dict | None = None) -> Artifact:
    progress = create_progress_artifact(0.0, key="train-progress", description="training: waiting for step 1")

    def on_log(record: dict) -> None:
        if "percentage" in record:
            update_progress_artifact(progress, record["percentage"], description=progress_line(record))

    return training.train(model, train, tokenizer, dataset, layout, seed, on_log=on_log, parts=parts,
                          eval_batch_size=eval_batch_size)


def progress_line(record: dict) -> str:
    """One line for the UI; evaluation-only records carry eval_loss but no training numbers."""
    parts = [f"step {record['current_steps']}/{record['total_steps']}"]
    for key, form in (("loss", "loss {:.4f}"), ("eval_loss", "eval_loss {:.4f}"),
                      ("tokens_per_s_per_device", "{:,.0f} tok/s/device"), ("remaining_time", "ETA {}")):
        if record.get(key) is not None:
            parts.append(form.format(record[key]))
    return ", ".join(parts)


@task(name="evaluate", **STAGE_OPTIONS)
def evaluate(section: EvalSection, model: Artifact, dataset: Artifact, layout: Layout, use_cpu: bool = False,
             parts: dict | None = None) -> Artifact:
    return evaluation.evaluate(section, model, dataset, layout, use_cpu, parts=parts)


@task(name="plot_loss", **STAGE_OPTIONS)
def plot_loss(model: Artifact, layout: Layout, parts: dict | None = None) -> Artifact:
    return plot.plot_loss(model, layout, parts=parts)


@task(name="write_model_card", **STAGE_OPTIONS)
def write_model_card(config: RunConfig, tokenizer: Artifact, dataset: Artifact, model: Artifact,
                     evaluation: Artifact | None, plots: Artifact | None, layout: Layout, provenance: dict,
                     parts: dict | None = None) -> Artifact:
    return card.write_model_card(config, tokenizer, dataset, model, evaluation, plots, layout, provenance, parts=parts)


@task(name="publish", cache_policy=NO_CACHE, persist_result=False)  # a side effect: never cached; retries inside
def push_to_hub(section: OutputSection, output_dir: Path, artifacts: list[Artifact | None], run_name: str,
                data_digest: str, flow_run: str) -> publish.PublishResult:
    return publish.publish(section, output_dir, artifacts, run_name=run_name, data_digest=data_digest,
                           flow_run=flow_run)
