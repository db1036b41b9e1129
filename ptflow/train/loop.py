"""Stage `train`: a compact plain-PyTorch loop over the packed blocks, resumable and observable.

Read top to bottom, `run_training` opens the data, builds the model, optimizer and schedule
(`build`), restores the newest checkpoint (`checkpointer`), then `Training.run` repeats: take the
step's batch (`batches`: stored or streamed, prefetched), one token-weighted optimizer step
(`step`), log (`metrics`), evaluate, checkpoint; `Training.export` writes the final model.

The batch for optimizer step `s` is a pure function of (seed, s): each epoch is one seeded
permutation of the blocks, so resuming at step s seeks straight to its batch (no replay of
consumed batches) and a resumed run sees exactly the batches of an uninterrupted one.
Checkpoints go to `checkpoint-<step>/` inside the stage's work folder; a re-run of the same
key resumes from the newest complete one. Runs on its own, or one process per rank under torchrun
(ptflow/train/launch.py), DDP or FSDP2 through one stack (ptflow/train/distributed.py).

Writes LLaMA-Factory/HF Trainer files: model.safetensors + config.json (or the LoRA
adapter), tokenizer files, trainer_log.jsonl, trainer_state.json, train_results.json.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ptflow import faults, interrupt
from ptflow.config.schema import ModelSection, TrainSection
from ptflow.data.dataset import open_blocks, open_doc_starts
from ptflow.data.node_tokens import NodeTokens
from ptflow.data.stream import StreamPlan, is_streamed
from ptflow.data.tokenizer import open_tokenizer, resolve_model_dir
from ptflow.errors import DataError
from ptflow.store.entries import (
    Artifact,
    DigestMemo,
    build_or_reuse,
)
from ptflow.store.layout import Layout
from ptflow.store.stage import Stage
from ptflow.train import sharding
from ptflow.train.batches import (
    BatchSource,
    DataOrder,
    Prefetch,
    Slicing,
    StoredBatches,
    StreamedBatches,
)
from ptflow.train.build import (
    Built,
    build_net,
    build_optimizer,
    build_scheduler,
)
from ptflow.train.checkpoint import adopt_checkpoints
from ptflow.train.checkpoint import fingerprint as run_fingerprint
from ptflow.train.checkpoint_sync import pull_checkpoints
from ptflow.train.checkpointer import Checkpointer
from ptflow.train.compile_cache import compile_caches_in
from ptflow.train.distributed import Ranks
from ptflow.train.device import check_device, eval_device, train_on_cpu
from ptflow.train.eval_loss import document_positions, eval_loss
from ptflow.train.hf_state import hf_total_flos, hf_trainer_state
from ptflow.train.kernels import base_causal_lm
from ptflow.train.launch import launch_training, resolve_num_processes, spec_for
from ptflow.train.metrics import (
    LogCallback,
    TrainLog,
    Window,
    log_record,
)
from ptflow.train.model import load_saved_model, model_files
from ptflow.train.step import StepRunner
from ptflow.train.telemetry import flops_per_token, format_seconds, peak_flops

log = logging.getLogger("ptflow.train")

__all__ = ["DataOrder", "components", "document_positions", "plan_steps", "run_training", "train"]


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
               layout: Layout, seed: int = 42, eval_batch_size: int | None = None) -> dict:
    """The train key; `eval_batch_size` changes how fast evaluation runs, not what it computes: not keyed."""
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
          seed: int = 42, on_log: LogCallback | None = None, parts: dict | None = None,
          eval_batch_size: int | None = None) -> Artifact:
    """Train (or resume) and store the final model; reuse it when nothing it depends on changed.

    `eval_batch_size`: blocks per evaluation batch on each rank (eval.per_device_eval_batch_size; default the
    training micro-batch); it does not change the weights, so it is not part of the key.
    """
    parts = parts or STAGE.key_parts(model, train, tokenizer, dataset, layout, seed)

    def build(folder: Path) -> dict:
        world = resolve_num_processes(train.num_processes, train.use_cpu)
        fingerprint = run_fingerprint(parts["config"], dataset.digest, tokenizer.digest, world)
        pull_checkpoints(folder)  # an object store: its newest checkpoint, when another machine got further
        # this key's work folder has no checkpoint: one of the same run under another key (a version bump, or
        # another split of the same steps over processes) continues here
        adopt_checkpoints(folder, fingerprint)
        with compile_caches_in(layout.compile_cache()):
            if world > 1 and not os.environ.get("PTFLOW_LAUNCHED"):
                spec = {**spec_for(folder, model, train, tokenizer, dataset, seed, fingerprint),
                        "eval_batch_size": eval_batch_size}
                return launch_training(folder, spec, world, on_log)
            return run_training(folder, model, train, tokenizer, dataset, seed, fingerprint, on_log, eval_batch_size)

    return build_or_reuse(layout, STAGE.name, parts, build, resumable=True,
                          skip_digest=lambda rel: rel.startswith("checkpoint-"))


# Bump `version` when a code change must retrain stored models; editing code does not (see store/stage.py),
# and an in-flight run whose key changed (a version bump, a library upgrade) resumes by its fingerprint.
STAGE = Stage("train", version=1, components=components, build=train, libraries=("torch", "transformers", "peft"))


@dataclass
class TrainData:
    """The training data as the loop sees it: stored blocks or a stream plan, and the step plan."""

    plan: StreamPlan | None
    blocks: object
    lengths: object
    seq_len: int
    per_step: int
    steps_per_epoch: int | None
    total_steps: int

    @classmethod
    def open(cls, dataset: Artifact, train: TrainSection, world: int) -> TrainData:
        if is_streamed(dataset.path):
            plan = StreamPlan.load(dataset.path)
            plan.check_unchanged()
            return cls(plan, None, None, plan.cutoff_len, *plan_steps(train, None, world))
        blocks, lengths = open_blocks(dataset, "train")
        return cls(None, blocks, lengths, blocks.shape[1], *plan_steps(train, len(blocks), world))

    def source(self, dataset: Artifact, tok, cursor, start_step: int, seed: int, cut: Slicing,
               node: NodeTokens | None = None) -> BatchSource:
        if self.plan is not None:  # every rank reads the whole stream and keeps its rows (packing is global)
            return StreamedBatches(self.plan, tok, cursor, start_step, self.per_step, cut, node)
        return StoredBatches(self.blocks, self.lengths, open_doc_starts(dataset, "train"), self.per_step, seed, cut)


def run_training(folder: Path, model_section: ModelSection, train: TrainSection, tokenizer: Artifact,
                 dataset: Artifact, seed: int, fingerprint: dict, on_log: LogCallback | None = None,
                 eval_batch_size: int | None = None) -> dict:
    """Train on this process (one rank under torchrun); rank 0 returns the run's summary, other ranks {}."""
    from transformers import set_seed

    launched = time.perf_counter()
    ranks = Ranks.open(cpu=train_on_cpu(train))  # torchrun's ranks (NCCL on GPUs, gloo on CPUs), or one process
    check_device(model_section, train, ranks.device)
    set_seed(seed)
    data = TrainData.open(dataset, train, ranks.world)
    tok = open_tokenizer(tokenizer.path)
    model_dir = resolve_model_dir(model_section, weights=not model_section.train_from_scratch)
    built_at = time.perf_counter()
    built = build_net(model_section, model_dir, train, len(tok), seed, ranks)  # on the device, wrapped
    log.info("train: model built in %.1f s", time.perf_counter() - built_at)
    optimizer = build_optimizer(ranks.unwrap(built.net), train, ranks.device, seed)
    scheduler = build_scheduler(optimizer, train, data.total_steps)
    checkpointer = Checkpointer(folder, train, ranks, fingerprint)
    restore_at = time.perf_counter()
    start_step, resumed_from, cursor = checkpointer.restore(built.net, optimizer, scheduler, data.plan is not None)
    if resumed_from is not None:
        log.info("train: resuming from %s (step %d of %d%s), verified and loaded in %.1f s", resumed_from.name,
                 start_step, data.total_steps,
                 f", stream at pass {cursor.epoch + 1} shard {cursor.shard} token {cursor.offset}" if cursor else "",
                 time.perf_counter() - restore_at)
    cut = Slicing(train.per_device_train_batch_size, train.gradient_accumulation_steps, ranks.rank, ranks.world,
                  data.seq_len, ranks.device)
    node = NodeTokens.from_env(Layout.node_tokens(folder), tokenizer.digest)  # torchrun: shard tokens shared
    source = data.source(dataset, tok, cursor, start_step, seed, cut, node)
    step = StepRunner(built.net, optimizer, scheduler, ranks, train, source.padded)
    run = Training(folder, train, ranks, data, built, step, source, checkpointer,
                   TrainLog(folder, start_step, ranks.is_main, on_log), start_step, launched)
    run.eval_set(dataset, eval_batch_size or train.per_device_train_batch_size)
    run.announce()
    runtime = run.run()
    summary = run.export(tok, runtime, resumed_from)
    ranks.close()  # only after a finished run: every rank is past its last collective
    return summary


class Training:
    """The loop over optimizer steps and what happens around each: logging, evaluation, checkpoints, export."""

    def __init__(self, folder: Path, train: TrainSection, ranks: Ranks, data: TrainData, built: Built,
                 step: StepRunner, source: BatchSource, checkpointer: Checkpointer, train_log: TrainLog,
                 start_step: int, launched: float):
        self.folder, self.train, self.ranks, self.data, self.built = folder, train, ranks, data, built
        self.step, self.source, self.checkpointer, self.log = step, source, checkpointer, train_log
        self.start_step, self.launched, self.first_step_s = start_step, launched, None
        self.device, self.world = ranks.device, ranks.world
        self.tokens_per_step = data.per_step * data.seq_len
        cfg = base_causal_lm(ranks.unwrap(step.net)).config
        self.token_flops = flops_per_token(built.n_matmul, cfg.num_hidden_layers, cfg.hidden_size, data.seq_len)
        self.peak = peak_flops(self.device)
        self.hf_flos_per_token = hf_total_flos(ranks.unwrap(step.net), 1)  # HF Trainer's total_flos
        self.losses_sum, self.losses_n = 0.0, 0

    def eval_set(self, dataset: Artifact, batch_size: int) -> None:
        self.eval_blocks, self.eval_lengths = open_blocks(dataset, "eval")
        self.eval_starts, self.eval_batch_size = open_doc_starts(dataset, "eval"), batch_size

    @property
    def precision(self) -> str:
        return "pure bf16" if self.train.pure_bf16 else "bf16 autocast, fp32 master" if self.train.bf16 else "fp32"

    def announce(self) -> None:
        """The scale of the run up front: parameters, tokens per step, steps, precision and kernels."""
        t, b = self.train, self.built
        log.info("train: %s parameters (%s trainable, %s), %s x %d tokens, %s tokens/step "
                 "(%d x %d accumulation x %d devices), %d steps (%s), %s on %s%s",
                 f"{b.n_total:,}", f"{b.n_trainable:,}", t.finetuning_type, self.source.describe(),
                 self.data.seq_len, f"{self.tokens_per_step:,}", t.per_device_train_batch_size,
                 t.gradient_accumulation_steps, self.world, self.data.total_steps,
                 f"{self.data.steps_per_epoch} per epoch" if self.data.plan is None else "max_steps",
                 self.precision, self.device, f", {', '.join(b.speedups)}" if b.speedups else "")

    def run(self) -> float:
        """Every optimizer step from the resumed one to the last; returns the training time in seconds."""
        from tqdm.auto import tqdm

        total = self.data.total_steps
        main = self.ranks.is_main
        progress = tqdm(total=total, initial=self.start_step, desc="train", unit="step", disable=not main or None)
        prefetch = Prefetch(self.source, self.start_step, total)
        running = self.checkpointer.running
        self.window = Window(time.perf_counter(), self.start_step - len(running.get("window", [])))
        self.window.restore(running.get("window", []), running.get("norms", []), self.device)
        self.losses_sum, self.losses_n = running.get("sum", 0.0), running.get("n", 0)
        self.step.net.train()
        try:
            for step in range(self.start_step, total):
                wait_start = time.perf_counter()
                batch = prefetch.next(step)
                self.window.wait_s += time.perf_counter() - wait_start
                loss, grad_norm = self.step(batch)
                done = step + 1
                self.window.add(loss, grad_norm)
                progress.update(1)
                if self.first_step_s is None:
                    float(loss)  # wait for the device once, so the number is real
                    self.first_step_s = time.perf_counter() - self.launched
                    log.info("train: first step done %.1f s after the stage started", self.first_step_s)
                record = self.log_line(done, progress)
                if record is not None:  # a log step (the same on every rank): seal a background checkpoint if done
                    self.checkpointer.finish(wait=False)
                record = self.evaluate(done, record)
                if record:
                    self.log.add(record)
                if self.train.save_strategy == "steps" and (done % self.train.save_steps == 0 or done == total):
                    # the last step's too, as HF Trainer
                    self.save(done)
                faults.point(f"train:step-{done}")
                interrupt.check()  # a Ctrl-C that a finalizer swallowed stops the run here
            self.checkpointer.finish(wait=True)  # the last checkpoint, if still being written, before the export
        finally:
            prefetch.close()
            progress.close()
        return time.perf_counter() - self.window.started

    def log_line(self, done: int, progress) -> dict | None:
        """The training record of a log step (None between log steps); opens the next log window."""
        total = self.data.total_steps
        if done % self.train.logging_steps and done != total:
            return None
        stats = self.window.close(done, self.folder)  # raises on a non-finite loss, naming the step
        self.losses_sum, self.losses_n = self.losses_sum + stats["loss_sum"], self.losses_n + stats["steps"]
        tps = stats["timed_steps"] * self.tokens_per_step / stats["elapsed_s"] / self.world
        record = log_record(done, total, stats["loss_sum"] / stats["steps"], self.step.last_lr,
                            stats["grad_norm"], self.source.epoch_at(done), time.perf_counter() - self.window.started,
                            (total - done) * stats["elapsed_s"] / stats["timed_steps"], tps, done * self.tokens_per_step,
                            self.token_flops, self.peak, self.device, stats["wait_s"] / stats["elapsed_s"])
        progress.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{tps:,.0f}")
        self.window = Window(time.perf_counter(), done, started=self.window.started)
        return record

    def evaluate(self, done: int, record: dict | None) -> dict | None:
        """Adds eval_loss to the step's record at evaluation steps (each rank evaluates its slice)."""
        total = self.data.total_steps
        if not (self.train.eval_steps and len(self.eval_blocks)
                and (done % self.train.eval_steps == 0 or done == total)):
            return record
        eval_start = time.perf_counter()
        loss, _ = eval_loss(self.ranks.unwrap(self.step.net), self.eval_blocks, self.eval_lengths,
                            self.eval_batch_size, self.device, torch.bfloat16 if self.step.autocast_on else None,
                            doc_starts=self.eval_starts, rank=self.ranks.rank, world=self.world)
        if record is None:  # LLaMA-Factory's LogCallback fields for an evaluation-only log line
            elapsed = time.perf_counter() - self.window.started
            record = {"current_steps": done, "total_steps": total, "epoch": round(self.source.epoch_at(done), 4),
                      "percentage": round(100 * done / total, 2), "elapsed_time": format_seconds(elapsed),
                      "remaining_time": format_seconds(elapsed / (done - self.start_step) * (total - done))}
        record["eval_loss"] = loss
        self.window.opened += time.perf_counter() - eval_start  # evaluation is not training throughput
        return record

    def save(self, done: int) -> None:
        pending_losses, pending_norms = self.window.check_finite(self.folder)  # never checkpoint diverged weights
        extra = {"trainer_state": self.hf_state(done),
                 "tokens_seen": done * self.tokens_per_step,
                 "running_loss": {"sum": self.losses_sum, "n": self.losses_n, "window": pending_losses,
                                  "norms": pending_norms}}
        cursor = self.source.cursor_at(done)
        if cursor is not None:
            extra["data_cursor"] = cursor
        started = time.perf_counter()
        path = self.checkpointer.save(done, self.step.net, self.step.optimizer, self.step.scheduler, extra)
        took = time.perf_counter() - started
        self.window.opened += took  # as evaluation: writing a checkpoint is not training throughput
        if path is not None:  # None on other ranks, and for a checkpoint written in the background
            size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
            log.info("train: %s saved, %.1f GB in %.1f s", path.name, size / 1e9, took)

    def export(self, tok, runtime: float, resumed_from: Path | None) -> dict:
        """The final model, tokenizer and results files (rank 0); the run's summary."""
        self.ranks.barrier()
        net = self.step.net
        full_weights = self.ranks.full_weights(net)  # FSDP: gathered on rank 0 (a collective: every rank); else None
        report = self.source.report()  # a stream's tokenizing on this rank (None for stored blocks, on every rank)
        reports = None if report is None else self.ranks.gather(report)  # a collective too: every rank calls it
        if not self.ranks.is_main:
            return {}
        final = self.ranks.unwrap(net)
        final.save_pretrained(self.folder, safe_serialization=True,
                              state_dict=None if full_weights is None else sharding.without_tied(final, full_weights))
        tok.save_pretrained(self.folder)
        if self.train.finetuning_type == "lora" and self.train.save_merged_model:
            final.merge_and_unload().save_pretrained(self.folder / "merged", safe_serialization=True)
            tok.save_pretrained(self.folder / "merged")
        results = self.write_results(runtime)
        return {"total_steps": self.data.total_steps, "resumed_from": None if resumed_from is None else str(resumed_from),
                "parameters": self.built.n_total, "trainable_parameters": self.built.n_trainable,
                "tokens_per_step": self.tokens_per_step, "first_step_s": self.first_step_s,
                "first_loss": self.log.value("loss", last=False), "final_loss": self.log.value("loss"),
                "final_eval_loss": self.log.value("eval_loss"), "finetuning_type": self.train.finetuning_type,
                "speedups": self.built.speedups, "precision": self.precision, "train_tokens": results["train_tokens"],
                "streamed": self.data.plan is not None,
                **({"stream_tokenizing": reports} if reports is not None else {}),
                **{k: results[k] for k in ("train_loss", "train_runtime")}}

    def hf_state(self, done: int, summary: dict | None = None) -> dict:
        """trainer_state.json at step `done` (a checkpoint) or, with the run's `summary`, at the end."""
        tokens = done * self.tokens_per_step
        return hf_trainer_state(self.log.history, step=done, max_steps=self.data.total_steps, train=self.train,
                                epoch=self.source.epoch_at(done), total_flos=self.hf_flos_per_token * tokens,
                                tokens_seen=tokens, summary=summary)

    def write_results(self, runtime: float) -> dict:
        """train_results.json, all_results.json and trainer_state.json, as transformers' Trainer names them."""
        total, per_step = self.data.total_steps, self.data.per_step
        steps_run = total - self.start_step
        epoch = self.source.epoch_at(total)
        results = {"epoch": round(epoch, 4), "total_flos": self.hf_flos_per_token * total * self.tokens_per_step,
                   "train_loss": self.losses_sum / max(self.losses_n, 1), "train_runtime": round(runtime, 4),
                   "train_samples_per_second": round(steps_run * per_step / runtime, 3) if runtime else None,
                   "train_steps_per_second": round(steps_run / runtime, 3) if runtime else None,
                   "train_tokens": total * self.tokens_per_step}
        (self.folder / "train_results.json").write_text(json.dumps(results, indent=2))
        # transformers' save_metrics("train") writes all_results.json too; evaluate merges eval_results into it
        (self.folder / "all_results.json").write_text(json.dumps(results, indent=2))
        (self.folder / "trainer_state.json").write_text(json.dumps(self.hf_state(total, results), indent=2))
        return results


def load_trained_model(folder: Path):
    """The stored model (merging nothing: a LoRA folder loads base + adapter) on the best device, and that device."""
    device = eval_device(False)
    return load_saved_model(folder, device), device
