"""Stage `train`: a compact accelerate loop over the packed blocks, resumable and observable.

The batch for optimizer step `s` is a pure function of (seed, s): each epoch is one seeded
permutation of the blocks, so resuming at step s seeks straight to its batch (no replay of
consumed batches) and a resumed run sees exactly the batches of an uninterrupted one.
Checkpoints go to `checkpoint-<step>/` inside the stage's work folder; a re-run of the same
key resumes from the newest complete one. Runs on its own, or one process per rank under torchrun (ptflow/train/launch.py).

Writes LLaMA-Factory/HF Trainer files: model.safetensors + config.json (or the LoRA
adapter), tokenizer files, trainer_log.jsonl, trainer_state.json, train_results.json.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import numpy as np
import torch

from ptflow import faults
from ptflow.config.schema import ModelSection, TrainSection
from ptflow.data.dataset import open_blocks, open_doc_starts
from ptflow.data.packing import segments
from ptflow.data.stream import BlockStream, Cursor, StreamPlan, is_streamed
from ptflow.data.tokenizer import open_tokenizer, resolve_model_dir
from ptflow.data.workers import default_workers
from ptflow.errors import CheckpointError, DataError, TrainingError
from ptflow.store.entries import (
    Artifact,
    DigestMemo,
    build_or_reuse,
    sha256_json,
)
from ptflow.store.layout import Layout
from ptflow.store.stage import Stage
from ptflow.train import checkpoint as ckpt
from ptflow.train import sharding
from ptflow.train.checkpoint import adopt_checkpoints
from ptflow.train.eval_loss import batch_tensors, eval_loss, perplexity
from ptflow.train.kernels import apply_speedups, attention_backend, base_causal_lm
from ptflow.train.launch import launch_training, resolve_num_processes, spec_for
from ptflow.train.model import (
    build_model,
    count_parameters,
    model_files,
    setup_finetuning,
)
from ptflow.train.telemetry import (
    flops_per_token,
    format_seconds,
    peak_flops,
    peak_memory_gib,
)

log = logging.getLogger("ptflow.train")

LogCallback = Callable[[dict], None]


class DataOrder:
    """Which blocks make up optimizer step `step`, computed directly (O(1) seek)."""

    def __init__(self, n_blocks: int, per_step: int, seed: int):
        self.n_blocks, self.per_step, self.seed = n_blocks, per_step, seed
        self.steps_per_epoch = n_blocks // per_step
        self._epoch, self._perm = -1, None

    def step_indices(self, step: int) -> np.ndarray:
        epoch, offset = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            self._epoch, self._perm = epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n_blocks)
        start = offset * self.per_step
        return np.sort(self._perm[start: start + self.per_step])  # sorted: sequential reads from the memmap


def plan_steps(train: TrainSection, n_blocks: int | None, world_size: int) -> tuple[int, int | None, int]:
    """(blocks per optimizer step, steps per epoch, total steps); a stream (n_blocks None) runs max_steps."""
    per_step = train.per_device_train_batch_size * train.gradient_accumulation_steps * world_size
    if n_blocks is None:
        return per_step, None, train.max_steps
    steps_per_epoch = n_blocks // per_step
    if steps_per_epoch == 0:
        raise DataError(f"train: one optimizer step needs {per_step} blocks (per_device_train_batch_size "
                        f"{train.per_device_train_batch_size} x gradient_accumulation_steps "
                        f"{train.gradient_accumulation_steps} x {world_size} devices) but the dataset has {n_blocks}; "
                        "lower the batch size or add data")
    total = train.max_steps if train.max_steps > 0 else math.ceil(train.num_train_epochs * steps_per_epoch)
    return per_step, steps_per_epoch, total


def components(model: ModelSection, train: TrainSection, tokenizer: Artifact, dataset: Artifact,
               layout: Layout, seed: int = 42) -> dict:
    model_dir = resolve_model_dir(model, weights=not model.train_from_scratch)
    memo = DigestMemo(layout)
    model_inputs = {f.name: memo.digest(f) for f in model_files(model_dir, model.train_from_scratch)}
    memo.save()
    model_fields = model.model_dump(mode="json")
    model_fields.pop("model_name_or_path")  # content, not location
    # The key holds train.num_processes as configured (unset: every device of the worker that trains), never
    # the device count of the machine computing the key: a CPU worker and an 8-GPU worker must agree. The
    # world size a run trains with is recorded in its checkpoints' fingerprint and the entry's stats.
    return {"config": {"model": model_fields, "train": train.digest_fields(), "seed": seed},
            "inputs": {"tokenizer": tokenizer.digest, "dataset": dataset.digest, "model": model_inputs}}


def train(model: ModelSection, train: TrainSection, tokenizer: Artifact, dataset: Artifact, layout: Layout,
          seed: int = 42, on_log: LogCallback | None = None, parts: dict | None = None) -> Artifact:
    """Train (or resume) and store the final model; reuse it when nothing it depends on changed."""
    parts = parts or STAGE.key_parts(model, train, tokenizer, dataset, layout, seed)

    def build(folder: Path) -> dict:
        fingerprint = {"dataset": dataset.digest, "tokenizer": tokenizer.digest,
                       "train_config": sha256_json(parts["config"])[:16]}
        adopt_checkpoints(folder, fingerprint)
        world = resolve_num_processes(train.num_processes)
        if world > 1 and not os.environ.get("PTFLOW_LAUNCHED"):
            spec = spec_for(folder, model, train, tokenizer, dataset, seed, fingerprint)
            return launch_training(folder, spec, world, on_log)
        return run_training(folder, model, train, tokenizer, dataset, seed, fingerprint, on_log)

    return build_or_reuse(layout, STAGE.name, parts, build, resumable=True,
                          skip_digest=lambda rel: rel.startswith("checkpoint-"))


# Bump `version` when a code change must retrain stored models; editing code does not (see store/stage.py),
# and an in-flight run whose key changed (a version bump, a library upgrade) resumes by its fingerprint.
STAGE = Stage("train", version=1, components=components, build=train, libraries=("torch", "transformers", "peft"))


def run_training(folder: Path, model_section: ModelSection, train: TrainSection, tokenizer: Artifact,
                 dataset: Artifact, seed: int, fingerprint: dict, on_log: LogCallback | None = None) -> dict:
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers import get_scheduler


    launched = time.perf_counter()
    if model_section.attn_implementation == "flex_attention" and not torch.cuda.is_available():
        raise TrainingError("model.attn_implementation: flex_attention trains only on a CUDA GPU (PyTorch has no "
                            "CPU backward for it); use sdpa here or run the train stage on a GPU worker")
    # Precision is ours (autocast or pure bf16), not accelerate's wrapper; cpu=True lets torchrun ranks use gloo.
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    device, world, main = accelerator.device, accelerator.num_processes, accelerator.is_main_process
    fingerprint = {**fingerprint, "world_size": world}
    set_seed(seed)
    plan = StreamPlan.load(dataset.path) if is_streamed(dataset.path) else None
    if plan is not None:
        plan.check_unchanged()
        blocks, lengths, seq_len = None, None, plan.cutoff_len
    else:
        blocks, lengths = open_blocks(dataset, "train")
        seq_len = blocks.shape[1]
    eval_blocks, eval_lengths = open_blocks(dataset, "eval")
    per_step, steps_per_epoch, total_steps = plan_steps(train, None if plan else len(blocks), world)

    tok = open_tokenizer(tokenizer.path)
    model_dir = resolve_model_dir(model_section, weights=not model_section.train_from_scratch)
    net = setup_finetuning(build_model(model_section, model_dir, len(tok), seed), train)
    if train.pure_bf16:
        net.to(torch.bfloat16)
    if train.gradient_checkpointing:
        if hasattr(net, "activation_checkpointing_enable"):  # transformers >= 5.2x name
            net.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            net.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    n_total, n_trainable = count_parameters(net)
    sharded = train.fsdp and world > 1
    speedups = apply_speedups(net, train.model_copy(update={"torch_compile": False}) if sharded else train)
    if sharded:
        if train.torch_compile:
            speedups.append(sharding.compile_layers(net))
        sharding.shard(net, device, world, train.bf16 and not train.pure_bf16)
        speedups.append(f"FSDP over {world} processes")
    optimizer = torch.optim.AdamW(_param_groups(net, train.weight_decay), lr=train.learning_rate,
                                  betas=(train.adam_beta1, train.adam_beta2), eps=train.adam_epsilon,
                                  fused=device.type == "cuda")
    warmup = train.warmup_steps or math.ceil(train.warmup_ratio * total_steps)
    scheduler = get_scheduler(train.lr_scheduler_type, optimizer, num_warmup_steps=warmup,
                              num_training_steps=total_steps, scheduler_specific_kwargs=_scheduler_kwargs(train, total_steps))
    start_step, resumed_from, cursor = 0, None, None
    resume = _resume_path(folder, train.resume_from_checkpoint)
    if resume is not None:
        meta = ckpt.check_fingerprint(resume, fingerprint)
        if plan is not None and "data_cursor" not in meta:
            raise CheckpointError(f"train.resume_from_checkpoint: {resume} has no data cursor, so the stream cannot "
                                  "resume where it stopped; set train.resume_from_checkpoint: false to start over")
        ckpt.load_checkpoint(resume, net, optimizer, scheduler,
                             load_states=partial(sharding.load_full_states, net, optimizer) if sharded else None)
        start_step, resumed_from = meta["step"], str(resume)
        cursor = Cursor.from_json(meta["data_cursor"]) if plan is not None else None
        log.info("train: resuming from %s (step %d of %d%s)", resume.name, start_step, total_steps,
                 f", stream at pass {cursor.epoch + 1} shard {cursor.shard} token {cursor.offset}" if cursor else "")
    if not sharded:  # DDP through accelerate; FSDP units do their own gradient reduction
        net, optimizer = accelerator.prepare(net, optimizer)

    cfg = base_causal_lm(accelerator.unwrap_model(net)).config
    token_flops = flops_per_token(n_trainable if train.finetuning_type == "full" else n_total,
                                  cfg.num_hidden_layers, cfg.hidden_size, seq_len)
    peak = peak_flops(device)
    tokens_per_step = per_step * seq_len
    precision = "pure bf16" if train.pure_bf16 else "bf16 autocast, fp32 master" if train.bf16 else "fp32"
    log.info("train: %s parameters (%s trainable, %s), %s x %d tokens, %s tokens/step "
             "(%d x %d accumulation x %d devices), %d steps (%s), %s on %s%s",
             f"{n_total:,}", f"{n_trainable:,}", train.finetuning_type,
             f"{len(blocks)} train blocks" if plan is None else f"blocks streamed from {len(plan.shards)} shards",
             seq_len, f"{tokens_per_step:,}", train.per_device_train_batch_size, train.gradient_accumulation_steps,
             world, total_steps, f"{steps_per_epoch} per epoch" if plan is None else "max_steps",
             precision, device, f", {', '.join(speedups)}" if speedups else "")

    log_path = folder / "trainer_log.jsonl"
    history = _read_log(log_path, upto=start_step) if main else []
    if main:
        log_path.write_text("".join(json.dumps(r) + "\n" for r in history))
    rank, mb, accum = accelerator.process_index, train.per_device_train_batch_size, train.gradient_accumulation_steps
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=train.bf16 and not train.pure_bf16)
    params = [p for p in net.parameters() if p.requires_grad]

    if plan is not None:  # every rank reads the whole stream and keeps its rows (packing is global)
        stream = BlockStream(plan, tok, cursor, workers=default_workers(beside_training=True))
        cursors = {start_step: stream.cursor() if cursor is None else cursor}  # data cursor after each step
    else:
        order, doc_starts = DataOrder(len(blocks), per_step, seed), open_doc_starts(dataset, "train")
        stream = None

    def epoch_at(step: int) -> float:
        if stream is None:
            return step / steps_per_epoch
        at = cursors.get(step) or Cursor()
        return at.epoch + at.shard / len(plan.shards)

    def fetch(step: int) -> list[tuple]:
        if stream is not None:
            step_blocks, step_starts, cursors[step + 1] = stream.take(per_step)
            indices, step_lengths = np.arange(per_step), None
        else:
            step_blocks, step_starts, step_lengths, indices = blocks, doc_starts, lengths, order.step_indices(step)
        batches = []
        for i in range(accum):
            rows = indices[(i * world + rank) * mb: (i * world + rank + 1) * mb]
            ids, labels, mask = batch_tensors(step_blocks, step_lengths, rows)
            positions = None if step_starts is None else document_positions(step_starts, rows, seq_len)
            batches.append(tuple(None if t is None else _to_device(t, device) for t in (ids, labels, mask, positions)))
        return batches

    from concurrent.futures import ThreadPoolExecutor

    from tqdm.auto import tqdm

    progress = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", disable=not main or None)
    prefetch = ThreadPoolExecutor(max_workers=1)
    pending = prefetch.submit(fetch, start_step) if start_step < total_steps else None
    window = _Window(time.perf_counter(), start_step)
    first_step_s, losses_sum, losses_n = None, 0.0, 0
    net.train()
    try:
        for step in range(start_step, total_steps):
            wait_start = time.perf_counter()
            batches = pending.result()
            pending = prefetch.submit(fetch, step + 1) if step + 1 < total_steps else None
            window.wait_s += time.perf_counter() - wait_start
            step_loss = torch.zeros((), device=device)
            for i, (ids, labels, mask, positions) in enumerate(batches):
                if sharded:
                    net.set_requires_gradient_sync(i == accum - 1)
                with accelerator.no_sync(net) if i < accum - 1 and world > 1 and not sharded else nullcontext(), \
                        autocast, attention_backend(train):
                    loss = net(input_ids=ids, labels=labels, attention_mask=mask, position_ids=positions).loss / accum
                accelerator.backward(loss)
                step_loss += loss.detach().float()
            if sharded:
                grad_norm = sharding.clip_grad_norm(params, train.max_grad_norm)
            elif train.max_grad_norm > 0:
                grad_norm = accelerator.clip_grad_norm_(params, train.max_grad_norm)
            else:
                grad_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            done = step + 1
            window.add(accelerator.reduce(step_loss, reduction="mean") if world > 1 else step_loss, grad_norm)
            progress.update(1)
            if first_step_s is None:
                float(step_loss)  # wait for the device once, so the number is real
                first_step_s = time.perf_counter() - launched
                log.info("train: first step done %.1f s after the stage started", first_step_s)

            record = None
            if done % train.logging_steps == 0 or done == total_steps:
                stats = window.close(done, folder)  # raises on a non-finite loss, naming the step
                losses_sum, losses_n = losses_sum + stats["loss_sum"], losses_n + stats["steps"]
                tps = stats["steps"] * tokens_per_step / stats["elapsed_s"] / world
                record = _log_record(done, total_steps, stats["loss_sum"] / stats["steps"], scheduler.get_last_lr()[0],
                                     stats["grad_norm"], epoch_at(done), time.perf_counter() - window.started,
                                     (total_steps - done) * stats["elapsed_s"] / stats["steps"], tps,
                                     done * tokens_per_step, token_flops, peak, device,
                                     stats["wait_s"] / stats["elapsed_s"])
                progress.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{tps:,.0f}")
                window = _Window(time.perf_counter(), done, started=window.started)
            if train.eval_steps and len(eval_blocks) and (done % train.eval_steps == 0 or done == total_steps):
                eval_start = time.perf_counter()
                loss_value, _ = eval_loss(accelerator.unwrap_model(net), eval_blocks, eval_lengths,
                                          train.per_device_train_batch_size, device,
                                          torch.bfloat16 if train.bf16 and not train.pure_bf16 else None)
                if record is None:  # LLaMA-Factory's LogCallback fields for an evaluation-only log line
                    elapsed = time.perf_counter() - window.started
                    record = {"current_steps": done, "total_steps": total_steps,
                              "epoch": round(epoch_at(done), 4),
                              "percentage": round(100 * done / total_steps, 2),
                              "elapsed_time": format_seconds(elapsed),
                              "remaining_time": format_seconds(elapsed / (done - start_step) * (total_steps - done))}
                record["eval_loss"] = loss_value
                window.opened += time.perf_counter() - eval_start  # evaluation is not training throughput
            if record and main:
                history.append(record)
                with open(log_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
                log.info("train: %s", _fmt(record))
                if on_log:
                    on_log(record)
            if done % train.save_steps == 0 and done < total_steps:
                window.check_finite(folder)  # never checkpoint diverged weights
                accelerator.wait_for_everyone()
                states = sharding.full_states(net, optimizer) if sharded else None  # every rank takes part
                if main:
                    state = trainer_state(history, done, total_steps, train, epoch_at(done))
                    extra = {"trainer_state": state, "tokens_seen": done * tokens_per_step}
                    if stream is not None:
                        extra["data_cursor"] = cursors[done].to_json()
                    ckpt.save_checkpoint(folder, done, accelerator.unwrap_model(net), optimizer, scheduler, fingerprint,
                                         extra, None if states is None else
                                         (sharding.trainable_only(net, states[0]), states[1]))
                    ckpt.rotate(folder, train.save_total_limit)
            if stream is not None:
                cursors.pop(done - 1, None)
            faults.point(f"train:step-{done}")
    finally:
        prefetch.shutdown(wait=True, cancel_futures=True)
        progress.close()
        if stream is not None:
            stream.close()
    runtime = time.perf_counter() - window.started
    accelerator.wait_for_everyone()
    full_weights = sharding.full_states(net, optimizer)[0] if sharded else None  # every rank takes part
    if not main:
        return {}
    final = accelerator.unwrap_model(net)
    final.save_pretrained(folder, safe_serialization=True,
                          state_dict=None if full_weights is None else sharding.without_tied(final, full_weights))
    tok.save_pretrained(folder)
    if train.finetuning_type == "lora" and train.save_merged_model:
        final.merge_and_unload().save_pretrained(folder / "merged", safe_serialization=True)
        tok.save_pretrained(folder / "merged")
    steps_run = total_steps - start_step
    results = {"epoch": round(epoch_at(total_steps), 4), "total_flos": float(token_flops * total_steps * tokens_per_step),
               "train_loss": losses_sum / max(losses_n, 1), "train_runtime": round(runtime, 4),
               "train_samples_per_second": round(steps_run * per_step / runtime, 3) if runtime else None,
               "train_steps_per_second": round(steps_run / runtime, 3) if runtime else None,
               "train_tokens": total_steps * tokens_per_step}
    (folder / "train_results.json").write_text(json.dumps(results, indent=2))
    # transformers' save_metrics("train") writes all_results.json too; evaluate merges eval_results into it
    (folder / "all_results.json").write_text(json.dumps(results, indent=2))
    (folder / "trainer_state.json").write_text(json.dumps(trainer_state(history, total_steps, total_steps, train,
                                                                        epoch_at(total_steps)), indent=2))
    return {"total_steps": total_steps, "resumed_from": resumed_from, "parameters": n_total,
            "trainable_parameters": n_trainable, "tokens_per_step": tokens_per_step, "first_step_s": first_step_s,
            "first_loss": next((r["loss"] for r in history if "loss" in r), None),
            "final_loss": next((r["loss"] for r in reversed(history) if "loss" in r), None),
            "final_eval_loss": next((r["eval_loss"] for r in reversed(history) if "eval_loss" in r), None),
            "finetuning_type": train.finetuning_type, "speedups": speedups, "precision": precision,
            "train_tokens": results["train_tokens"], "streamed": plan is not None,
            **{k: results[k] for k in ("train_loss", "train_runtime")}}


class _Window:
    """Losses and grad norms of the steps since the last log line, kept on the device (no per-step sync)."""

    def __init__(self, opened: float, first_step: int, started: float | None = None):
        self.opened, self.first_step = opened, first_step
        self.started = started if started is not None else opened
        self.losses: list[torch.Tensor] = []
        self.norms: list[torch.Tensor] = []
        self.wait_s = 0.0

    def add(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        self.losses.append(loss)
        self.norms.append(torch.as_tensor(grad_norm, device=loss.device).float())

    def check_finite(self, folder: Path) -> tuple[list[float], list[float]]:
        losses = torch.stack(self.losses).tolist() if self.losses else []
        norms = torch.stack(self.norms).tolist() if self.norms else []
        for i, (loss, norm) in enumerate(zip(losses, norms)):
            if not (math.isfinite(loss) and math.isfinite(norm)):
                raise TrainingError(f"train: loss {loss} / grad norm {norm} is not finite at step {self.first_step + i + 1}; "
                                    "stopped without saving. Lower train.learning_rate or set train.max_grad_norm; "
                                    f"the last good checkpoint is kept in {folder}")
        return losses, norms

    def close(self, done: int, folder: Path) -> dict:
        losses, norms = self.check_finite(folder)
        return {"loss_sum": sum(losses), "steps": len(losses), "grad_norm": norms[-1],
                "elapsed_s": time.perf_counter() - self.opened, "wait_s": self.wait_s}


def document_positions(doc_starts, rows, seq_len: int) -> torch.Tensor:
    """Position ids restarting at every document start (data.doc_mask).

    transformers reads restarting position ids as packed sequences and masks attention across
    them (block-diagonal causal mask), so no token attends to another document.
    """

    return torch.from_numpy(np.stack([segments(doc_starts[int(r)], seq_len)[1] for r in rows]).astype(np.int64))


def _to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def _param_groups(model, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 or "norm" in name.lower() else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _scheduler_kwargs(train: TrainSection, total_steps: int) -> dict | None:
    if train.lr_scheduler_type == "warmup_stable_decay":
        return {"num_decay_steps": max(1, total_steps // 10)}
    if train.lr_scheduler_type == "cosine_with_min_lr":
        return {"min_lr_rate": 0.1}
    return None


def _resume_path(folder: Path, setting: str | bool) -> Path | None:
    if setting is False or setting in ("false", "False"):
        for _, path in ckpt.list_checkpoints(folder):
            shutil.rmtree(path)
        return None
    if setting in (True, "auto", "true", "True"):
        return ckpt.newest_valid(folder)
    path = Path(str(setting)).expanduser()
    if not path.is_dir():
        raise CheckpointError(f"train.resume_from_checkpoint: {path} is not a directory; give a checkpoint-<step> "
                              "folder, auto, or false")
    return path


def _log_record(step, total, loss, lr, grad_norm, epoch, elapsed, remaining, tps, tokens, token_flops, peak,
                device, wait_share) -> dict:
    return {"current_steps": step, "total_steps": total, "loss": round(loss, 6), "lr": lr,
            "grad_norm": round(grad_norm, 6), "epoch": round(epoch, 4), "percentage": round(100 * step / total, 2),
            "elapsed_time": format_seconds(elapsed), "remaining_time": format_seconds(remaining),
            "throughput": round(tps, 2), "total_tokens": tokens, "tokens_per_s_per_device": round(tps, 1),
            "mfu": round(tps * token_flops / peak, 4) if peak else None,
            "peak_mem_gib": round(peak_memory_gib(device), 3), "data_wait_pct": round(100 * wait_share, 2)}


def _fmt(record: dict) -> str:
    keys = ("loss", "eval_loss", "lr", "grad_norm", "tokens_per_s_per_device", "mfu", "peak_mem_gib", "data_wait_pct",
            "remaining_time")
    parts = [f"step {record['current_steps']}/{record['total_steps']}"]
    for key in keys:
        if record.get(key) is not None:
            value = record[key]
            parts.append(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}")
    return ", ".join(parts)


def _read_log(path: Path, upto: int) -> list[dict]:
    """Earlier log records up to the resumed step (later ones belong to the lost tail and are dropped)."""
    if not path.exists() or upto == 0:
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a torn last line from a killed run
        if record.get("current_steps", 0) <= upto:
            records.append(record)
    return records


def trainer_state(history: list[dict], step: int, total: int, train: TrainSection, epoch: float) -> dict:
    """HF Trainer's trainer_state.json shape (log_history with loss/eval_loss per step)."""
    log_history = []
    for r in history:
        entry = {"step": r["current_steps"], "epoch": r.get("epoch")}
        if "loss" in r:
            entry.update(loss=r["loss"], learning_rate=r.get("lr"), grad_norm=r.get("grad_norm"))
        if "eval_loss" in r:
            entry.update(eval_loss=r["eval_loss"], eval_perplexity=perplexity(r["eval_loss"]))
        log_history.append(entry)
    return {"global_step": step, "max_steps": total, "epoch": round(epoch, 4),
            "num_train_epochs": math.ceil(epoch * total / step) if step else 0, "logging_steps": train.logging_steps,
            "save_steps": train.save_steps, "train_batch_size": train.per_device_train_batch_size,
            "log_history": log_history}


def load_trained_model(folder: Path):
    """The stored model (merging nothing: a LoRA folder loads base + adapter) on the best device."""
    from transformers import AutoModelForCausalLM

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if (folder / "adapter_config.json").exists():
        from peft import AutoPeftModelForCausalLM

        model = AutoPeftModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, use_safetensors=True)
    return model.to(device), device
