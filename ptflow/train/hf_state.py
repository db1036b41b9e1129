"""HF Trainer's trainer_state.json and total_flos, from ptflow's log records, for scripts that read them.

transformers' `TrainerState.load_from_json` loads what `hf_trainer_state` returns (every one of the
dataclass's fields, nothing else), and its `log_history` has HF's entry shapes: a training entry per
logged step (`loss`, `learning_rate`, `grad_norm`), a separate evaluation entry (`eval_loss`, plus
ptflow's `eval_perplexity`), and after training a summary entry (`train_loss`, `train_runtime`,
`total_flos`, ...). `total_flos` is HF's count: 6 x non-embedding parameters x input tokens
(`Trainer.floating_point_ops`), not the attention-inclusive model FLOPs ptflow's MFU uses.

    state = hf_trainer_state(history, step=done, max_steps=total, train=train, epoch=e, total_flos=f,
                             tokens_seen=done * tokens_per_step, summary=results)
"""

from __future__ import annotations

import math

from ptflow.config.schema import TrainSection
from ptflow.train.eval_loss import perplexity

HF_DEFAULT_EVAL_STEPS = 500  # TrainerState's default, kept when no step-wise evaluation is configured, as HF does
SUMMARY_KEYS = ("train_runtime", "train_samples_per_second", "train_steps_per_second", "total_flos", "train_loss")


def hf_total_flos(model, tokens: int) -> float:
    """HF Trainer's total_flos for `tokens` input tokens (all ranks): 6 x num_parameters(exclude_embeddings=True)
    x tokens. `model` is the unwrapped model (a peft model counts base + adapter, as HF's does)."""
    return float(6 * model.num_parameters(exclude_embeddings=True) * tokens)


def hf_log_history(history: list[dict], summary: dict | None = None, step: int = 0) -> list[dict]:
    """trainer_log.jsonl records -> HF log_history: one entry per training log, one per evaluation, then the
    summary of a run finished at `step` (train_results.json's keys that HF logs)."""
    entries = []
    for record in history:
        step, epoch = record["current_steps"], record.get("epoch")
        if "loss" in record:
            entries.append({"epoch": epoch, "grad_norm": record.get("grad_norm"),
                            "learning_rate": record.get("lr"), "loss": record["loss"], "step": step})
        if "eval_loss" in record:
            entries.append({"epoch": epoch, "eval_loss": record["eval_loss"],
                            "eval_perplexity": perplexity(record["eval_loss"]), "step": step})
    if summary is not None:
        entries.append({"epoch": summary.get("epoch"), "step": step,
                        **{key: summary[key] for key in SUMMARY_KEYS if key in summary}})
    return entries


def hf_trainer_state(history: list[dict], *, step: int, max_steps: int, train: TrainSection, epoch: float,
                     total_flos: float, tokens_seen: int, summary: dict | None = None) -> dict:
    """TrainerState's fields at `step` (a checkpoint), or at the end of training when `summary` is given."""
    return {
        "best_global_step": None, "best_metric": None, "best_model_checkpoint": None,  # no load_best_model_at_end
        "epoch": round(epoch, 4),
        "eval_steps": train.eval_steps or HF_DEFAULT_EVAL_STEPS,
        "global_step": step,
        "is_hyper_param_search": False,
        "is_local_process_zero": True, "is_world_process_zero": True,  # rank 0 writes it
        "log_history": hf_log_history(history, summary, step),
        "logging_steps": train.logging_steps,
        "max_steps": max_steps,
        "num_input_tokens_seen": tokens_seen,
        "num_train_epochs": math.ceil(epoch * max_steps / step) if step else 0,
        "save_steps": train.save_steps,
        "stateful_callbacks": {"TrainerControl": {"args": {
            "should_training_stop": step >= max_steps, "should_epoch_stop": False, "should_save": True,
            "should_evaluate": False, "should_log": False}, "attributes": {}}},
        "total_flos": float(total_flos),
        "train_batch_size": train.per_device_train_batch_size,
        "trial_name": None, "trial_params": None,
    }
