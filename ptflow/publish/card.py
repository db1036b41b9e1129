"""Stage `write_model_card`: README.md with Hub metadata and the run's full provenance.

Built with huggingface_hub's `ModelCard`/`ModelCardData`, so the YAML header (license, tags,
datasets, model-index with perplexity) is what the Hub expects. The body names the base
model or "trained from scratch", per-source token counts and their share of the mixture,
hyperparameters (LoRA/freeze settings included), results and the loss plots, the digests of
data, tokenizer, model and eval set, the code version (git SHA, `-dirty` when modified), the
Prefect flow run (id and UI URL) and framework versions. A LoRA card says `library_name: peft`.
Keys that look like secrets are removed from the config before it is written (hub_token is
dropped entirely).
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import math
import re
import subprocess
from pathlib import Path

from ptflow import __version__
from ptflow.config.schema import RunConfig
from ptflow.store.entries import Artifact, build_or_reuse
from ptflow.store.layout import Layout
from ptflow.store.stage import Stage

log = logging.getLogger("ptflow.card")

SECRET = re.compile(r"token|secret|password|api_key", re.IGNORECASE)
FRAMEWORKS = ("torch", "transformers", "peft", "datasets", "prefect")  # what a run uses (DDP and FSDP are plain torch)


def redact(obj):
    if isinstance(obj, dict):
        # Flags and numbers hold no secret: `use_fast_tokenizer: true` stays readable.
        return {k: ("<redacted>" if SECRET.search(k) and v and not isinstance(v, (bool, int, float)) else redact(v))
                for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact(v) for v in obj]
    return obj


def public_config(config: RunConfig) -> dict:
    data = redact(config.model_dump(mode="json"))
    data.pop("store", None)
    data["output"].pop("output_dir", None)
    data["output"].pop("hub_token", None)  # not even "<redacted>": whether and where a token was set is nobody's business
    data.pop("orchestration", None)  # where and how a run was scheduled does not change the model
    return data


def git_sha() -> str | None:
    """HEAD of the ptflow checkout, with `-dirty` when tracked files differ from it; None outside git."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=here)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=5, cwd=here)
    except (OSError, subprocess.TimeoutExpired):
        return None
    sha = out.stdout.strip() if out.returncode == 0 else ""
    return (sha + ("-dirty" if dirty.stdout.strip() else "")) if sha else None


def framework_versions() -> dict[str, str]:
    versions = {"ptflow": __version__}
    for name in FRAMEWORKS:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


def components(config: RunConfig, tokenizer: Artifact, dataset: Artifact, model: Artifact,
               evaluation: Artifact | None, plots: Artifact | None, layout: Layout,
               provenance: dict | None = None) -> dict:
    """The card's key: provenance (the flow run that wrote it) is recorded in the card but not keyed."""
    inputs = {"tokenizer": tokenizer.digest, "dataset": dataset.digest, "model": model.digest,
              "evaluate": evaluation.digest if evaluation else None, "plots": plots.digest if plots else None}
    return {"config": public_config(config), "inputs": inputs}


def write_model_card(config: RunConfig, tokenizer: Artifact, dataset: Artifact, model: Artifact,
                     evaluation: Artifact | None, plots: Artifact | None, layout: Layout,
                     provenance: dict | None = None, parts: dict | None = None) -> Artifact:
    """README.md for the trained model. `provenance` (flow run id/url) is recorded but not part of the key."""

    def build(folder: Path) -> dict:
        card = render_card(config, tokenizer, dataset, model, evaluation, plots, provenance or {})
        card.save(folder / "README.md")
        return {"metadata": card.data.to_dict()}

    parts = parts or STAGE.key_parts(config, tokenizer, dataset, model, evaluation, plots, layout)
    return build_or_reuse(layout, STAGE.name, parts, build)


STAGE = Stage("write_model_card", version=1, components=components, build=write_model_card)


def render_card(config, tokenizer, dataset, model, evaluation, plots, provenance):
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    results = evaluation.stats if evaluation else {}
    base = None if config.model.train_from_scratch else config.model.model_name_or_path
    eval_results = None
    eval_names = getattr(config.data, "eval_dataset", None) or config.data.dataset
    # The Hub's model-index wants a finite number; an overflowed (inf) perplexity stays in the body only.
    if results.get("perplexity") is not None and math.isfinite(results["perplexity"]):
        eval_results = [EvalResult(task_type="text-generation", dataset_type="ptflow-heldout",
                                   dataset_name=f"held-out blocks of {', '.join(eval_names)}",
                                   metric_type="perplexity", metric_value=round(results["perplexity"], 4),
                                   dataset_revision=results.get("eval_set_digest", "")[:16] or None)]
    lora = config.train.finetuning_type == "lora"
    data = ModelCardData(
        license=config.output.license, library_name="peft" if lora else "transformers", pipeline_tag="text-generation",
        tags=["ptflow", "pretraining", config.train.finetuning_type, *config.output.tags],
        datasets=list(config.data.dataset), model_name=config.run_name, eval_results=eval_results,
        **({"base_model": base} if base and "/" in base and not Path(base).exists() else {}),
    )
    sources = dataset.stats.get("sources", {})
    train = config.train
    hyper = {k: getattr(train, k) for k in ("finetuning_type", "learning_rate", "lr_scheduler_type", "warmup_ratio",
                                            "weight_decay", "max_grad_norm", "per_device_train_batch_size",
                                            "gradient_accumulation_steps", "max_steps", "num_train_epochs", "bf16")}
    if lora:
        hyper.update(lora_rank=train.lora_rank, lora_alpha=train.lora_alpha or 2 * train.lora_rank,
                     lora_dropout=train.lora_dropout, lora_target=",".join(train.lora_target))
    elif train.finetuning_type == "freeze":
        hyper.update(freeze_trainable_layers=train.freeze_trainable_layers,
                     freeze_trainable_modules=",".join(train.freeze_trainable_modules))
    hyper.update(cutoff_len=config.data.cutoff_len, seed=config.seed, total_steps=model.stats.get("total_steps"),
                 tokens_per_step=model.stats.get("tokens_per_step"))
    lines = [f"# {config.run_name}", "",
             f"A causal language model {'trained from scratch' if config.model.train_from_scratch else 'continued from ' + config.model.model_name_or_path} "
             f"with ptflow ({config.train.finetuning_type} training).", "",
             "## Training data", "", "| dataset | documents | tokens | mean tokens/doc | share of tokens |",
             "|---|---|---|---|---|"]
    held_out = {name for name in sources if name.endswith(" (eval)")}  # eval_dataset sources: not in the mix
    streamed = {name for name, s in sources.items() if s.get("cache") == "streamed"}  # counts unknown up front
    total_tokens = sum(s["tokens"] for name, s in sources.items() if name not in held_out | streamed) or 1
    lines += [f"| {name} | streamed | {s['bytes'] / 2**20:,.1f} MiB of files | | read in order |" if name in streamed
              else f"| {name} | {s['documents']:,} | {s['tokens']:,} | {s['mean_doc_tokens']} | "
              + ("held out |" if name in held_out else f"{100 * s['tokens'] / total_tokens:.1f}% |")
              for name, s in sources.items()]
    strategy = getattr(config.data, "mix_strategy", "concat")
    probs = getattr(config.data, "interleave_probs", None)
    lines += ["", "Mixture: " + ("sources concatenated in the order listed" if strategy == "concat" else
                                 f"{strategy}, " + (f"probabilities {probs}" if probs else "round-robin")) + "."]
    if dataset.stats.get("streaming"):
        packed = (f"Streamed and packed while training into blocks of {config.data.cutoff_len} tokens "
                  f"({model.stats.get('train_tokens') or 0:,} training tokens read); "
                  f"{dataset.stats.get('eval_blocks', 0):,} held-out blocks.")
    else:
        packed = (f"Packed into {dataset.stats.get('train_blocks', 0):,} training and "
                  f"{dataset.stats.get('eval_blocks', 0):,} held-out blocks of {config.data.cutoff_len} tokens; "
                  f"{dataset.stats.get('dropped_tokens', 0):,} tokens dropped (final partial block).")
    lines += ["", packed, "",
              "## Hyperparameters", "", "| key | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in hyper.items()]
    lines += ["", "## Results", "", "| metric | value |", "|---|---|"]
    for key in ("train_loss", "train_runtime"):
        if model.stats.get(key) is not None:
            lines.append(f"| {key} | {model.stats[key]:.4f} |")
    for key in ("eval_loss", "perplexity", "eval_tokens"):
        if results.get(key) is not None:
            lines.append(f"| {key} | {results[key]:.4f} |" if isinstance(results[key], float) else f"| {key} | {results[key]} |")
    for name, alt in (("training_loss.png", "training loss"), ("training_eval_loss.png", "eval loss")):
        if plots and name in plots.stats.get("plots", []):
            lines += ["", f"![{alt}]({name})"]
    repo = config.output.hub_model_id or config.run_name
    load = (f'model = AutoPeftModelForCausalLM.from_pretrained("{repo}")  # base model + this adapter' if lora
            else f'model = AutoModelForCausalLM.from_pretrained("{repo}")')
    lines += ["", "## Usage", "", "```python",
              f"from {'peft import AutoPeftModelForCausalLM' if lora else 'transformers import AutoModelForCausalLM'}",
              "from transformers import AutoTokenizer", "", load, f'tokenizer = AutoTokenizer.from_pretrained("{repo}")',
              "```"]
    lines += ["", "## Provenance", "", "| item | value |", "|---|---|",
              f"| data manifest digest | `{dataset.digest}` |", f"| tokenizer digest | `{tokenizer.digest}` |",
              f"| model digest | `{model.digest}` |",
              f"| eval set digest | `{results.get('eval_set_digest', 'n/a')}` |",
              f"| code version (git) | `{git_sha() or 'unknown'}` |"]
    for key, value in provenance.items():
        if value:  # no UI URL in the embedded mode: no row, rather than a placeholder
            lines.append(f"| {key} | {value} |")
    lines += [f"| {name} | {version} |" for name, version in framework_versions().items()]
    lines += ["", "## Config", "", "```json", json.dumps(public_config(config), indent=2), "```", ""]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))
