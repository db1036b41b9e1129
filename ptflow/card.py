"""Stage `write_model_card`: README.md with Hub metadata and the run's full provenance.

Built with huggingface_hub's `ModelCard`/`ModelCardData`, so the YAML header (license, tags,
datasets, model-index with perplexity) is what the Hub expects. The body names the base
model or "trained from scratch", per-source token counts, hyperparameters, results, the
digests of data, tokenizer and eval set, the code version and framework versions. Keys that
look like secrets are removed from the config before it is written.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import re
import subprocess
from pathlib import Path

from ptflow import __version__
from ptflow.config import RunConfig
from ptflow.layout import Layout
from ptflow.store import Artifact, build_or_reuse, code_version

log = logging.getLogger("ptflow.card")

STAGE = "write_model_card"
SECRET = re.compile(r"token|secret|password|api_key", re.IGNORECASE)
FRAMEWORKS = ("torch", "transformers", "accelerate", "peft", "datasets", "prefect")


def redact(obj):
    if isinstance(obj, dict):
        return {k: ("<redacted>" if SECRET.search(k) and v else redact(v)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact(v) for v in obj]
    return obj


def public_config(config: RunConfig) -> dict:
    data = redact(config.model_dump(mode="json"))
    data.pop("store", None)
    data["output"].pop("output_dir", None)
    return data


def git_sha() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def framework_versions() -> dict[str, str]:
    versions = {"ptflow": __version__}
    for name in FRAMEWORKS:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


def components(config: RunConfig, tokenizer: Artifact, dataset: Artifact, model: Artifact,
               evaluation: Artifact | None, plots: Artifact | None) -> dict:
    inputs = {"tokenizer": tokenizer.digest, "dataset": dataset.digest, "model": model.digest,
              "evaluate": evaluation.digest if evaluation else None, "plots": plots.digest if plots else None}
    return {"stage": STAGE, "code": code_version(__name__), "config": public_config(config), "inputs": inputs}


def write_model_card(config: RunConfig, tokenizer: Artifact, dataset: Artifact, model: Artifact,
                     evaluation: Artifact | None, plots: Artifact | None, layout: Layout,
                     provenance: dict | None = None) -> Artifact:
    """README.md for the trained model. `provenance` (flow run id/url) is recorded but not part of the key."""

    def build(folder: Path) -> dict:
        card = render_card(config, tokenizer, dataset, model, evaluation, plots, provenance or {})
        card.save(folder / "README.md")
        return {"metadata": card.data.to_dict()}

    return build_or_reuse(layout, STAGE, components(config, tokenizer, dataset, model, evaluation, plots), build)


def render_card(config, tokenizer, dataset, model, evaluation, plots, provenance):
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    results = evaluation.stats if evaluation else {}
    base = None if config.model.train_from_scratch else config.model.model_name_or_path
    eval_results = None
    if results.get("perplexity") is not None:
        eval_results = [EvalResult(task_type="text-generation", dataset_type="ptflow-heldout",
                                   dataset_name=f"held-out blocks of {', '.join(config.data.dataset)}",
                                   metric_type="perplexity", metric_value=round(results["perplexity"], 4),
                                   dataset_revision=results.get("eval_set_digest", "")[:16] or None)]
    data = ModelCardData(
        license=config.output.license, library_name="transformers", pipeline_tag="text-generation",
        tags=["ptflow", "pretraining", config.train.finetuning_type, *config.output.tags],
        datasets=list(config.data.dataset), model_name=config.run_name, eval_results=eval_results,
        **({"base_model": base} if base and "/" in base and not Path(base).exists() else {}),
    )
    sources = dataset.stats.get("sources", {})
    train = config.train
    hyper = {k: getattr(train, k) for k in ("finetuning_type", "learning_rate", "lr_scheduler_type", "warmup_ratio",
                                            "weight_decay", "max_grad_norm", "per_device_train_batch_size",
                                            "gradient_accumulation_steps", "max_steps", "num_train_epochs", "bf16")}
    hyper.update(cutoff_len=config.data.cutoff_len, seed=config.seed, total_steps=model.stats.get("total_steps"),
                 tokens_per_step=model.stats.get("tokens_per_step"))
    lines = [f"# {config.run_name}", "",
             f"A causal language model {'trained from scratch' if config.model.train_from_scratch else 'continued from ' + config.model.model_name_or_path} "
             f"with ptflow ({config.train.finetuning_type} training).", "",
             "## Training data", "", "| dataset | documents | tokens | mean tokens/doc |", "|---|---|---|---|"]
    lines += [f"| {name} | {s['documents']:,} | {s['tokens']:,} | {s['mean_doc_tokens']} |" for name, s in sources.items()]
    lines += ["", f"Packed into {dataset.stats.get('train_blocks', 0):,} training and {dataset.stats.get('eval_blocks', 0):,} "
              f"held-out blocks of {config.data.cutoff_len} tokens; {dataset.stats.get('dropped_tokens', 0):,} tokens "
              "dropped (final partial block).", "",
              "## Hyperparameters", "", "| key | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in hyper.items()]
    lines += ["", "## Results", "", "| metric | value |", "|---|---|"]
    for key in ("train_loss", "train_runtime"):
        if model.stats.get(key) is not None:
            lines.append(f"| {key} | {model.stats[key]:.4f} |")
    for key in ("eval_loss", "perplexity", "eval_tokens"):
        if results.get(key) is not None:
            lines.append(f"| {key} | {results[key]:.4f} |" if isinstance(results[key], float) else f"| {key} | {results[key]} |")
    if plots and "training_loss.png" in plots.stats.get("plots", []):
        lines += ["", "![training loss](training_loss.png)"]
    lines += ["", "## Provenance", "", "| item | value |", "|---|---|",
              f"| data manifest digest | `{dataset.digest}` |", f"| tokenizer digest | `{tokenizer.digest}` |",
              f"| model digest | `{model.digest}` |",
              f"| eval set digest | `{results.get('eval_set_digest', 'n/a')}` |",
              f"| code version (git) | `{git_sha() or 'unknown'}` |"]
    for key, value in provenance.items():
        lines.append(f"| {key} | {value} |")
    lines += [f"| {name} | {version} |" for name, version in framework_versions().items()]
    lines += ["", "## Config", "", "```json", json.dumps(public_config(config), indent=2), "```", ""]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))
