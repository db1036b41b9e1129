"""Evaluate-only use (train.do_train: false): an existing model folder, keyed by its files' content."""

from __future__ import annotations

import math
import shutil

import pytest

from ptflow.config.schema import DataSection, EvalSection, ModelSection, TrainSection
from ptflow.data.dataset import prepare_dataset
from ptflow.errors import ModelError, PreflightError
from ptflow.publish.evaluate import evaluate, existing_model


@pytest.fixture(scope="module")
def held_out(tiny_data_dir, tokenizer_artifact, session_layout):
    return prepare_dataset(DataSection(dataset="stdlib_docs", dataset_dir=str(tiny_data_dir), cutoff_len=32,
                                       val_size=6), tokenizer_artifact, session_layout)


def test_do_train_does_not_change_the_train_key():
    assert "do_train" not in TrainSection(do_train=False).digest_fields()
    assert TrainSection(do_train=False).digest_fields() == TrainSection().digest_fields()


def test_existing_model_is_keyed_by_content_not_location(tiny_weights_dir, tmp_path, layout):
    a = existing_model(ModelSection(model_name_or_path=str(tiny_weights_dir)), layout)
    moved = shutil.copytree(tiny_weights_dir, tmp_path / "elsewhere")
    (moved / "eval_results.json").write_text("{}")  # result files are not part of the model
    b = existing_model(ModelSection(model_name_or_path=str(moved)), layout)
    assert (a.key, a.digest) == (b.key, b.digest) and a.path != b.path
    assert set(a.stats["files"]) == {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                                     "tokenizer_config.json"}
    assert a.stats["finetuning_type"] == "full" and a.hit and "do_train: false" in a.reason
    data = bytearray((moved / "model.safetensors").read_bytes())
    data[-1] ^= 1
    (moved / "model.safetensors").write_bytes(bytes(data))
    assert existing_model(ModelSection(model_name_or_path=str(moved)), layout).digest != a.digest


def test_existing_model_needs_weights(tiny_model_dir, layout):
    with pytest.raises(ModelError, match=r"has no \*\.safetensors weights.*earlier run's output_dir"):
        existing_model(ModelSection(model_name_or_path=str(tiny_model_dir)), layout)


def test_evaluate_an_existing_model_then_hit_from_a_moved_copy(tiny_weights_dir, held_out, layout, tmp_path):
    model = existing_model(ModelSection(model_name_or_path=str(tiny_weights_dir)), layout)
    first = evaluate(EvalSection(per_device_eval_batch_size=4), model, held_out, layout)
    assert not first.hit and first.stats["model_digest"] == model.digest
    assert math.isfinite(first.stats["eval_loss"]) and first.stats["eval_blocks"] == held_out.stats["eval_blocks"] > 6
    assert first.stats["epoch"] is None  # no train_results.json beside this model
    assert first.stats["device"] in ("cpu", "cuda")
    moved = existing_model(ModelSection(model_name_or_path=str(shutil.copytree(tiny_weights_dir, tmp_path / "m"))),
                           layout)
    again = evaluate(EvalSection(per_device_eval_batch_size=4), moved, held_out, layout)
    assert again.hit and again.stats["eval_loss"] == first.stats["eval_loss"]


def test_evaluate_an_existing_lora_adapter(tiny_weights_dir, tokenizer_artifact, held_out, layout):
    from ptflow.train.loop import train

    lora = train(ModelSection(model_name_or_path=str(tiny_weights_dir)),
                 TrainSection(finetuning_type="lora", max_steps=2, per_device_train_batch_size=2),
                 tokenizer_artifact, held_out, layout)
    model = existing_model(ModelSection(model_name_or_path=str(lora.dir)), layout)
    assert model.stats["finetuning_type"] == "lora" and "adapter_config.json" in model.stats["files"]
    assert "train_loss" in model.stats  # read from the folder's train_results.json
    result = evaluate(EvalSection(), model, held_out, layout)
    assert math.isfinite(result.stats["perplexity"])


def test_preflight_lists_what_an_evaluate_only_run_lacks(make_config, tiny_model_dir, tmp_path):
    from ptflow.preflight import preflight

    config = make_config(store=str(tmp_path / "store"), train={"do_train": False},
                         output={"push_to_hub": True, "output_dir": str(tiny_model_dir)})
    with pytest.raises(PreflightError) as info:
        preflight(config)
    problems = "\n".join(info.value.problems)
    for expected in ("would evaluate random weights", "set data.val_size", "has no saved model",
                     "no model of its own to publish", "is inside model.model_name_or_path"):
        assert expected in problems
    assert "HF_HUB_OFFLINE" not in problems  # no Hub check while other problems remain


def test_preflight_accepts_an_evaluate_only_run(make_config, tiny_weights_dir, tmp_path):
    from ptflow.preflight import preflight

    preflight(make_config(store=str(tmp_path / "store"), train={"do_train": False}, data={"val_size": 4},
                          model={"model_name_or_path": str(tiny_weights_dir), "train_from_scratch": False}))


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU")
def test_evaluate_runs_on_the_gpu_when_there_is_one(tiny_weights_dir, held_out, layout):
    """On a GPU worker the model is evaluated there (bf16 autocast) and agrees with the fp32 CPU loss."""
    import torch
    from transformers import AutoModelForCausalLM

    from ptflow.data.dataset import open_blocks
    from ptflow.train.eval_loss import eval_loss

    model = existing_model(ModelSection(model_name_or_path=str(tiny_weights_dir)), layout)
    result = evaluate(EvalSection(per_device_eval_batch_size=2), model, held_out, layout)
    assert result.stats["device"] == "cuda"
    blocks, lengths = open_blocks(held_out, "eval")
    cpu_loss, count = eval_loss(AutoModelForCausalLM.from_pretrained(tiny_weights_dir, dtype=torch.float32), blocks,
                                lengths, 2, "cpu")
    assert count == result.stats["eval_tokens"]
    assert result.stats["eval_loss"] == pytest.approx(cpu_loss, rel=2e-2)  # bf16 autocast vs fp32
