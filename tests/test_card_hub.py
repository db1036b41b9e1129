"""The model card's metadata, checked offline the way the Hub reads it, for full, LoRA and diverged runs.

`ModelCard.validate` posts to the Hub's /api/validate-yaml (network). Offline, the same checks
huggingface_hub itself applies are: the YAML header parses into `ModelCardData`, the
model-index parses with `model_index_to_eval_results` and round-trips through
`eval_results_to_model_index`, and each result equals what `metadata_eval_result` (the helper
the Hub docs use to build model-index) produces for the same numbers.
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import yaml

from ptflow.publish.card import write_model_card
from ptflow.store.entries import Artifact

SOURCES = {"web": {"documents": 30, "tokens": 750, "mean_doc_tokens": 25.0},
           "code": {"documents": 10, "tokens": 250, "mean_doc_tokens": 25.0}}


def fake(stage: str, stats: dict, digest: str) -> Artifact:
    return Artifact(stage=stage, key=digest[:32], path="/nonexistent", digest=digest, stats=stats)


def card_for(make_config, layout, perplexity: float, url: str | None = "http://ui/runs/flow-run/1234", **sections):
    config = make_config(run_name="tiny-lm", **sections)
    tokenizer = fake("load_tokenizer", {}, "1" * 64)
    dataset = fake("prepare_dataset", {"sources": SOURCES, "train_blocks": 30, "eval_blocks": 2,
                                       "dropped_tokens": 7}, "2" * 64)
    model = fake("train", {"total_steps": 4, "tokens_per_step": 256, "train_loss": 6.5, "train_runtime": 3.0},
                 "3" * 64)
    evaluation = fake("evaluate", {"eval_loss": math.log(perplexity) if math.isfinite(perplexity) else 1e4,
                                   "perplexity": perplexity, "eval_tokens": 126, "eval_set_digest": "4" * 64}, "5" * 64)
    plots = fake("plot_loss", {"plots": ["training_loss.png", "training_eval_loss.png"]}, "6" * 64)
    provenance = {"prefect flow run": "pretrain/brave-fox (1234)", "prefect flow run url": url}
    artifact = write_model_card(config, tokenizer, dataset, model, evaluation, plots, layout, provenance)
    return artifact.dir / "README.md"


def hub_checks(path) -> dict:
    """Parse the card as huggingface_hub does and return its metadata; raises on anything the Hub would reject."""
    from huggingface_hub import ModelCard, ModelCardData
    from huggingface_hub.repocard import metadata_eval_result, metadata_load
    from huggingface_hub.repocard_data import (
        eval_results_to_model_index,
        model_index_to_eval_results,
    )

    card = ModelCard.load(path)
    metadata = metadata_load(path)
    assert ModelCardData(**metadata).to_dict() == card.data.to_dict()
    assert yaml.safe_load(yaml.safe_dump(metadata)) == metadata  # plain YAML types only
    if "model-index" in metadata:
        name, results = model_index_to_eval_results(metadata["model-index"])
        assert eval_results_to_model_index(name, results) == metadata["model-index"]
        for result in results:
            assert isinstance(result.metric_value, (int, float)) and math.isfinite(result.metric_value)
            rebuilt = metadata_eval_result(
                model_pretty_name=name, task_pretty_name=result.task_name, task_id=result.task_type,
                metrics_pretty_name=result.metric_name, metrics_id=result.metric_type,
                metrics_value=result.metric_value, dataset_pretty_name=result.dataset_name,
                dataset_id=result.dataset_type, dataset_revision=result.dataset_revision)
            unverified = dataclasses.replace(result, verified=False)  # absent in the card means not verified
            assert model_index_to_eval_results(rebuilt["model-index"]) == (name, [unverified])
    return metadata


def test_full_run_card_metadata_passes_the_hub_checks(make_config, layout):
    path = card_for(make_config, layout, 42.0, output={"license": "apache-2.0", "tags": ["tiny"]})
    metadata = hub_checks(path)
    assert metadata["license"] == "apache-2.0" and metadata["library_name"] == "transformers"
    assert metadata["tags"] == ["ptflow", "pretraining", "full", "tiny"]
    assert metadata["datasets"] == ["stdlib_docs"] and "base_model" not in metadata  # trained from scratch
    [entry] = metadata["model-index"]
    assert entry["name"] == "tiny-lm"
    assert entry["results"][0]["metrics"] == [{"type": "perplexity", "value": 42.0}]
    assert entry["results"][0]["dataset"]["revision"] == "4" * 16


def test_lora_card_names_peft_and_the_hub_base_model(make_config, layout):
    path = card_for(make_config, layout, 9.0, model={"model_name_or_path": "org/base-1b", "train_from_scratch": False},
                    train={"finetuning_type": "lora", "lora_rank": 4})
    metadata = hub_checks(path)
    assert (metadata["library_name"], metadata["base_model"]) == ("peft", "org/base-1b")
    assert "lora" in metadata["tags"]
    text = path.read_text()
    assert "continued from org/base-1b" in text and "| lora_rank | 4 |" in text and "| lora_alpha | 8 |" in text
    assert "from peft import AutoPeftModelForCausalLM" in text


def test_an_overflowed_perplexity_stays_out_of_the_model_index(make_config, layout):
    path = card_for(make_config, layout, math.inf)
    metadata = hub_checks(path)
    assert "model-index" not in metadata
    assert "| perplexity | inf |" in path.read_text()


def test_card_has_no_flow_run_url_row_without_a_ui(make_config, layout):
    """The embedded Prefect server has no UI: the card leaves the URL row out instead of writing a placeholder."""
    text = card_for(make_config, layout, 42.0, url=None).read_text()
    assert "| prefect flow run | pretrain/brave-fox (1234) |" in text
    assert "prefect flow run url" not in text


def test_card_body_has_mixture_provenance_and_no_token(make_config, layout):
    secret = "hf_cardSecret0123456789abcdef"
    path = card_for(make_config, layout, 42.0, output={"hub_token": secret, "push_to_hub": True,
                                                       "hub_model_id": "lab/tiny-lm"})
    text = path.read_text()
    assert "| web | 30 | 750 | 25.0 | 75.0% |" in text and "| code | 10 | 250 | 25.0 | 25.0% |" in text
    assert "Mixture: sources concatenated in the order listed." in text
    for digest in ("1" * 64, "2" * 64, "3" * 64, "4" * 64):  # tokenizer, data manifest, model, eval set
        assert f"`{digest}`" in text
    assert "| prefect flow run | pretrain/brave-fox (1234) |" in text
    assert "| prefect flow run url | http://ui/runs/flow-run/1234 |" in text
    assert "![training loss](training_loss.png)" in text and "![eval loss](training_eval_loss.png)" in text
    assert 'AutoModelForCausalLM.from_pretrained("lab/tiny-lm")' in text
    assert "| code version (git) | `" in text and "| transformers |" in text
    public = json.loads(text.split("```json\n", 1)[1].split("\n```", 1)[0])
    assert "hub_token" not in public["output"] and public["output"]["hub_model_id"] == "lab/tiny-lm"
    assert secret not in text and "hub_token" not in text


@pytest.mark.parametrize("token", [None, "hf_oneToken0123456789", "hf_otherToken0123456789"])
def test_the_token_does_not_change_the_card_key(make_config, layout, token):
    from ptflow.publish.card import STAGE

    inputs = [fake(s, {}, d * 64) for s, d in (("t", "1"), ("d", "2"), ("m", "3"))]
    config = make_config(output={"hub_token": token} if token else {})
    assert STAGE.key_parts(config, *inputs, None, None, layout) == STAGE.key_parts(make_config(), *inputs, None, None,
                                                                                  layout)


def test_interleaved_mixture_and_a_held_out_eval_dataset(make_config, layout):
    config = make_config(run_name="mix", data={"dataset": "web,code", "mix_strategy": "interleave_under",
                                               "interleave_probs": [0.75, 0.25], "eval_dataset": "notes"})
    sources = {**SOURCES, "notes (eval)": {"documents": 5, "tokens": 100, "mean_doc_tokens": 20.0}}
    artifact = write_model_card(
        config, fake("load_tokenizer", {}, "1" * 64), fake("prepare_dataset", {"sources": sources}, "2" * 64),
        fake("train", {}, "3" * 64), fake("evaluate", {"perplexity": 7.0, "eval_set_digest": "4" * 64}, "5" * 64),
        None, layout)
    text = (artifact.dir / "README.md").read_text()
    assert "| web | 30 | 750 | 25.0 | 75.0% |" in text and "| notes (eval) | 5 | 100 | 20.0 | held out |" in text
    assert "Mixture: interleave_under, probabilities [0.75, 0.25]." in text
    metadata = hub_checks(artifact.dir / "README.md")
    assert metadata["model-index"][0]["results"][0]["dataset"]["name"] == "held-out blocks of notes"
