"""trainer_state.json as HF Trainer writes it, and total_flos as HF counts it (ptflow/train/hf_state.py)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from tiny_assets import TINY_LLAMA

from ptflow.config.schema import TrainSection
from ptflow.train.eval_loss import perplexity
from ptflow.train.hf_state import hf_log_history, hf_total_flos, hf_trainer_state

TRAIN = TrainSection(max_steps=5, logging_steps=2, save_steps=4, eval_steps=4, per_device_train_batch_size=3)
HISTORY = [  # trainer_log.jsonl records: a log, a log with an evaluation, the last step (log + evaluation)
    {"current_steps": 2, "epoch": 0.4, "loss": 3.5, "lr": 1e-3, "grad_norm": 1.5, "total_tokens": 96},
    {"current_steps": 4, "epoch": 0.8, "loss": 3.0, "lr": 5e-4, "grad_norm": 1.2, "eval_loss": 3.1},
    {"current_steps": 5, "epoch": 1.0, "loss": 2.9, "lr": 0.0, "grad_norm": 1.1, "eval_loss": 2.95},
]
SUMMARY = {"epoch": 1.0, "total_flos": 1234.0, "train_loss": 3.1, "train_runtime": 2.5,
           "train_samples_per_second": 6.0, "train_steps_per_second": 2.0, "train_tokens": 240}


def final_state() -> dict:
    return hf_trainer_state(HISTORY, step=5, max_steps=5, train=TRAIN, epoch=1.0, total_flos=1234.0, tokens_seen=240,
                            summary=SUMMARY)


def test_trainer_state_has_exactly_trainer_states_fields_and_loads_with_transformers(tmp_path):
    from transformers.trainer_callback import TrainerState

    state = final_state()
    assert set(state) == {f.name for f in dataclasses.fields(TrainerState)}
    (tmp_path / "trainer_state.json").write_text(json.dumps(state, indent=2))
    loaded = TrainerState.load_from_json(str(tmp_path / "trainer_state.json"))
    assert (loaded.global_step, loaded.max_steps, loaded.num_train_epochs) == (5, 5, 1)
    assert (loaded.logging_steps, loaded.eval_steps, loaded.save_steps, loaded.train_batch_size) == (2, 4, 4, 3)
    assert (loaded.total_flos, loaded.num_input_tokens_seen) == (1234.0, 240)
    assert loaded.stateful_callbacks["TrainerControl"]["args"]["should_training_stop"] is True


def test_log_history_has_separate_eval_entries_and_a_final_summary():
    history = final_state()["log_history"]
    assert [(e["step"], sorted(e)) for e in history] == [
        (2, ["epoch", "grad_norm", "learning_rate", "loss", "step"]),
        (4, ["epoch", "grad_norm", "learning_rate", "loss", "step"]),
        (4, ["epoch", "eval_loss", "eval_perplexity", "step"]),
        (5, ["epoch", "grad_norm", "learning_rate", "loss", "step"]),
        (5, ["epoch", "eval_loss", "eval_perplexity", "step"]),
        (5, ["epoch", "step", "total_flos", "train_loss", "train_runtime", "train_samples_per_second",
             "train_steps_per_second"]),
    ]
    assert history[1]["learning_rate"] == 5e-4 and history[2]["eval_loss"] == 3.1
    assert history[2]["eval_perplexity"] == pytest.approx(perplexity(3.1))
    assert history[-1]["train_loss"] == 3.1 and "train_tokens" not in history[-1]


def test_a_checkpoints_state_has_no_summary_and_training_goes_on():
    state = hf_trainer_state(HISTORY[:2], step=4, max_steps=5, train=TRAIN, epoch=0.8, total_flos=987.0,
                             tokens_seen=192)
    assert [e["step"] for e in state["log_history"]] == [2, 4, 4]
    assert state["stateful_callbacks"]["TrainerControl"]["args"]["should_training_stop"] is False
    assert hf_log_history([]) == []
    assert TrainSection().eval_steps is None
    assert hf_trainer_state([], step=1, max_steps=1, train=TrainSection(), epoch=1.0, total_flos=0.0,
                            tokens_seen=0)["eval_steps"] == 500  # TrainerState's default without step-wise eval


@pytest.mark.parametrize("tied", [True, False])
def test_total_flos_is_six_times_non_embedding_parameters_times_tokens(tied):
    from transformers import AutoModelForCausalLM, LlamaConfig

    model = AutoModelForCausalLM.from_config(LlamaConfig(**{**TINY_LLAMA, "tie_word_embeddings": tied}))
    embedding = TINY_LLAMA["vocab_size"] * TINY_LLAMA["hidden_size"]
    # an untied output head is counted (it is a Linear), the input embedding never is
    non_embedding = sum(p.numel() for p in model.parameters()) - embedding
    assert hf_total_flos(model, 1000) == 6 * non_embedding * 1000
    assert isinstance(hf_total_flos(model, 1), float)
    assert torch.is_tensor(model.lm_head.weight) and (model.lm_head.weight is model.model.embed_tokens.weight) == tied
