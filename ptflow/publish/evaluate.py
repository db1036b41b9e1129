"""Stage `evaluate`: token-weighted loss and perplexity of the trained model on the held-out blocks.

The loss is the sum of per-token losses over all predicted tokens divided by their count
(not a mean of batch means), so it does not depend on the batch size. Perplexity is
exp(eval_loss), `inf` on overflow, as LLaMA-Factory reports it. The result records the eval
set's digest and token count: two perplexities compare only when those match. The model runs
on the GPU when there is one (bf16 autocast where supported) unless `train.use_cpu` asks for the
CPU (fp32 there), `per_device_eval_batch_size` blocks at a time. Writes LLaMA-Factory's eval_results.json and all_results.json.

Evaluate-only (`train.do_train: false`): `existing_model` turns the folder at
model_name_or_path into an artifact keyed by its files' content (weights, config, tokenizer),
so re-evaluating an unchanged model is a cache hit wherever the folder lives.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import torch

from ptflow.config.schema import EvalSection, ModelSection
from ptflow.data.dataset import open_blocks, open_doc_starts
from ptflow.data.tokenizer import TOKENIZER_FILES, resolve_model_dir
from ptflow.errors import DataError, ModelError
from ptflow.store.entries import (
    Artifact,
    DigestMemo,
    build_or_reuse,
    sha256_file,
    sha256_json,
)
from ptflow.store.layout import Layout
from ptflow.store.stage import Stage
from ptflow.train.device import eval_autocast, eval_device
from ptflow.train.eval_loss import eval_loss, perplexity
from ptflow.train.model import load_saved_model

log = logging.getLogger("ptflow.evaluate")

MODEL_CONFIG_FILES = ("config.json", "generation_config.json", "adapter_config.json")


def eval_set_digest(dataset: Artifact) -> str:
    return sha256_file(Path(dataset.path) / "eval.npy")


def components(section: EvalSection, model: Artifact, dataset: Artifact, layout: Layout, use_cpu: bool = False) -> dict:
    # where it runs is not part of the key (keys never depend on the machine), so use_cpu is not either
    return {"config": section.digest_fields(), "inputs": {"model": model.digest, "dataset": dataset.digest}}


def evaluate(section: EvalSection, model: Artifact, dataset: Artifact, layout: Layout, use_cpu: bool = False,
             parts: dict | None = None) -> Artifact:
    """eval_results.json (eval_loss, perplexity, runtime, eval set digest) for the trained model; `use_cpu` is
    train.use_cpu (one key for both stages, as transformers' use_cpu)."""

    def build(folder: Path) -> dict:
        blocks, lengths = open_blocks(dataset, "eval")
        device = eval_device(use_cpu)
        net, autocast = load_saved_model(model.dir, device), eval_autocast(device)
        started = time.perf_counter()
        loss, n_tokens = eval_loss(net, blocks, lengths, section.per_device_eval_batch_size, device, autocast,
                                   doc_starts=open_doc_starts(dataset, "eval"))  # as trained: no cross-document attention
        runtime = time.perf_counter() - started
        del net
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if n_tokens == 0:
            raise DataError("evaluate: the held-out blocks hold no predicted tokens (blocks of one token?); "
                            "raise data.cutoff_len or data.val_size")
        train_results = model.dir / "train_results.json"
        epoch = json.loads(train_results.read_text()).get("epoch") if train_results.exists() else None
        # eval_perplexity is LLaMA-Factory's key (the "eval_" prefix HF Trainer puts on every eval metric);
        # perplexity stays as ptflow's earlier name for scripts that read it.
        results = {"epoch": epoch, "eval_loss": loss, "eval_perplexity": perplexity(loss),
                   "perplexity": perplexity(loss),
                   "eval_runtime": round(runtime, 4),
                   "eval_samples_per_second": round(len(blocks) / runtime, 3) if runtime else None,
                   "eval_steps_per_second": round(math.ceil(len(blocks) / section.per_device_eval_batch_size) / runtime, 3)
                   if runtime else None,
                   "eval_tokens": n_tokens, "eval_blocks": int(len(blocks)), "eval_set_digest": eval_set_digest(dataset),
                   "model_digest": model.digest, "device": device.type}
        (folder / "eval_results.json").write_text(json.dumps(results, indent=2))
        merged = {**(json.loads(train_results.read_text()) if train_results.exists() else {}), **results}
        (folder / "all_results.json").write_text(json.dumps(merged, indent=2))
        log.info("evaluate: eval_loss %.4f, perplexity %.2f on %d tokens (%s)", loss, results["perplexity"], n_tokens,
                 device)
        return results

    blocks, _ = open_blocks(dataset, "eval")
    if len(blocks) == 0:
        raise DataError("eval.do_eval needs held-out blocks: set data.val_size (e.g. 0.05) or eval.do_eval: false")
    return build_or_reuse(layout, STAGE.name, parts or STAGE.key_parts(section, model, dataset, layout, use_cpu), build)


STAGE = Stage("evaluate", version=1, components=components, build=evaluate, libraries=("torch", "transformers"))


def existing_model(section: ModelSection, layout: Layout) -> Artifact:
    """The saved model (or LoRA adapter) at model_name_or_path, keyed by its files' content (do_train: false).

    Not copied into the store: the artifact points at the folder (or its Hugging Face cache
    snapshot) and its digest covers the weights, model config and tokenizer files, so any change
    to them misses while a moved or renamed folder still hits. Result files in the folder
    (eval_results.json, ...) are not part of the key.
    """

    model_dir = resolve_model_dir(section, weights=True)
    weights = sorted(model_dir.glob("*.safetensors"))
    adapter = (model_dir / "adapter_config.json").is_file()
    missing = [what for what, present in (("config.json (or adapter_config.json)", adapter or
                                            (model_dir / "config.json").is_file()),
                                           ("*.safetensors weights", bool(weights))) if not present]
    if missing:
        raise ModelError(f"train.do_train: false evaluates the model in {model_dir}, but it has no "
                         f"{' and no '.join(missing)}. Point model.model_name_or_path at a trained model (e.g. an "
                         "earlier run's output_dir) or set train.do_train: true")
    names = [*MODEL_CONFIG_FILES, *TOKENIZER_FILES, *(p.name for p in weights), "model.safetensors.index.json"]
    memo = DigestMemo(layout)
    files = {name: memo.digest(model_dir / name) for name in sorted(set(names)) if (model_dir / name).is_file()}
    memo.save()
    digest = sha256_json(files)
    stats = {"source": section.model_name_or_path, "finetuning_type": "lora" if adapter else "full", "files": files}
    train_results = model_dir / "train_results.json"
    if train_results.is_file():
        stats.update({k: v for k, v in json.loads(train_results.read_text()).items() if k in ("train_loss", "epoch")})
    log.info("evaluate: evaluating the existing model %s (digest %s)", model_dir, digest[:12])
    return Artifact(stage="model", key=digest[:32], path=str(model_dir), digest=digest, stats=stats, hit=True,
                    reason="existing model (train.do_train: false), keyed by its files' content")
