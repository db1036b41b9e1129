"""Stages evaluate, plot_loss and write_model_card on a tiny trained model (plain calls, CPU)."""

from __future__ import annotations

import json
import logging
import math
import struct

import numpy as np
import pytest
import torch
from tiny_assets import ASSETS, write_dataset_info

from ptflow.config.schema import DataSection, EvalSection, ModelSection, TrainSection
from ptflow.data.dataset import open_blocks, prepare_dataset
from ptflow.errors import DataError
from ptflow.publish.card import redact, write_model_card
from ptflow.publish.evaluate import evaluate
from ptflow.publish.plot import PLOTS, plot_loss, smooth
from ptflow.store.entries import Artifact
from ptflow.train.eval_loss import eval_loss, perplexity
from ptflow.train.loop import train

PNG = b"\x89PNG\r\n\x1a\n"
EVAL_DOCS, CUTOFF = 8, 16  # documents held out: more blocks than one batch of 7


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("eval-data")
    texts = [json.loads(line)["text"] for line in (ASSETS / "three_docs.jsonl").read_text().splitlines()]
    (folder / "rep.jsonl").write_text("".join(json.dumps({"text": f"{t} ({i})"}) + "\n" for i in range(10)
                                              for t in texts))  # 30 distinct documents, 3 texts varied
    return write_dataset_info(folder, {"rep": {"file_name": "rep.jsonl"}})


@pytest.fixture(scope="module")
def dataset(data_dir, tokenizer_artifact, session_layout):
    return prepare_dataset(DataSection(dataset="rep", dataset_dir=str(data_dir), cutoff_len=CUTOFF,
                                       val_size=EVAL_DOCS), tokenizer_artifact, session_layout)


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tokenizer_artifact, dataset, session_layout):
    section = ModelSection(model_name_or_path=str(tiny_model_dir), train_from_scratch=True)
    return train(section, TrainSection(max_steps=10, learning_rate=3e-3, per_device_train_batch_size=4,
                                       logging_steps=2, save_steps=100, eval_steps=5), tokenizer_artifact, dataset,
                 session_layout)


@pytest.fixture(scope="module")
def evaluation(trained, dataset, session_layout):
    return evaluate(EvalSection(per_device_eval_batch_size=4), trained, dataset, session_layout)


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


# evaluate


def test_evaluate_with_use_cpu_runs_on_the_cpu_of_a_gpu_host(trained, dataset, evaluation, layout, monkeypatch):
    """train.use_cpu reaches the evaluate stage: on a (simulated) GPU host it evaluates on the CPU, same numbers."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a model moved to "cuda" here would fail
    result = evaluate(EvalSection(per_device_eval_batch_size=4), trained, dataset, layout, use_cpu=True)
    assert result.stats["device"] == "cpu"
    assert result.stats["eval_loss"] == pytest.approx(evaluation.stats["eval_loss"], rel=1e-5)
    assert result.key == evaluation.key  # where it runs is not part of the key


def test_evaluate_reports_finite_token_weighted_loss(trained, dataset, layout):
    one = evaluate(EvalSection(per_device_eval_batch_size=1), trained, dataset, layout)
    seven = evaluate(EvalSection(per_device_eval_batch_size=7), trained, dataset, layout)
    assert not one.hit and not seven.hit
    a, b = one.stats, seven.stats
    assert a["eval_loss"] == pytest.approx(b["eval_loss"], rel=1e-6)  # batches of 7 + the rest
    assert math.isfinite(a["eval_loss"]) and a["eval_loss"] < math.log(4096)
    assert a["perplexity"] == a["eval_perplexity"] == pytest.approx(math.exp(a["eval_loss"]))
    assert a["eval_blocks"] == dataset.stats["eval_blocks"] > 7
    assert a["eval_tokens"] == a["eval_blocks"] * (CUTOFF - 1)
    assert a["eval_set_digest"] == b["eval_set_digest"] and len(a["eval_set_digest"]) == 64
    written = json.loads((one.dir / "eval_results.json").read_text())
    assert written["eval_loss"] == a["eval_loss"]
    assert written["perplexity"] == written["eval_perplexity"] == a["perplexity"]
    merged = json.loads((one.dir / "all_results.json").read_text())
    assert {"train_loss", "train_runtime", "eval_loss", "perplexity", "epoch"} <= set(merged)


def test_evaluate_matches_the_loss_logged_during_training(trained, evaluation):
    # The last eval_loss in trainer_log.jsonl was computed on the same blocks by the same weights.
    assert evaluation.stats["eval_loss"] == pytest.approx(trained.stats["final_eval_loss"], rel=1e-5)


def test_evaluate_second_call_hits(trained, dataset, evaluation, layout):
    first = evaluate(EvalSection(per_device_eval_batch_size=4), trained, dataset, layout)
    again = evaluate(EvalSection(per_device_eval_batch_size=4), trained, dataset, layout)
    assert not first.hit and (first.key, first.stats["eval_loss"]) == (evaluation.key, evaluation.stats["eval_loss"])
    assert (again.hit, again.key, again.stats["eval_loss"]) == (True, first.key, first.stats["eval_loss"])


def test_evaluate_needs_held_out_blocks(trained, tokenizer_artifact, data_dir, layout):
    no_split = prepare_dataset(DataSection(dataset="rep", dataset_dir=str(data_dir), cutoff_len=CUTOFF),
                               tokenizer_artifact, layout)
    with pytest.raises(DataError, match=r"eval\.do_eval needs held-out blocks: set data\.val_size"):
        evaluate(EvalSection(), trained, no_split, layout)


class PositionLM(torch.nn.Module):
    """Puts logit t on the true next token at position t: its loss there is log(e^t + V - 1) - t, known exactly."""

    vocab = 4096

    def forward(self, input_ids, attention_mask=None):
        batch, seq = input_ids.shape
        logits = torch.zeros(batch, seq, self.vocab)
        positions = torch.arange(seq - 1, dtype=torch.float32).expand(batch, -1)
        logits[:, :-1].scatter_(2, input_ids[:, 1:, None], positions[..., None])
        return type("Output", (), {"logits": logits})()


def position_loss(t: int, vocab: int = 4096) -> float:
    return math.log(math.exp(t) + vocab - 1) - t


def test_eval_loss_weights_every_token_equally(tiny_data_dir, tokenizer_artifact, layout):
    """Documents cut to 16, 3 and 9 tokens: the loss is the mean over all 25 predicted tokens."""
    unpacked = prepare_dataset(DataSection(dataset="three", dataset_dir=str(tiny_data_dir), cutoff_len=16,
                                           packing=False), tokenizer_artifact, layout)
    blocks, lengths = open_blocks(unpacked, "train")
    assert lengths.tolist() == [16, 13, 15]
    lengths = np.array([16, 3, 9], dtype=np.int32)  # very unequal lengths make the weighting visible
    per_doc = [[position_loss(t) for t in range(n - 1)] for n in lengths]
    expected = sum(map(sum, per_doc)) / 25
    mean_of_means = sum(sum(d) / len(d) for d in per_doc) / 3
    assert abs(expected - mean_of_means) > 0.5  # a mean of per-document means would be far off
    for batch_size in (1, 2, 3):
        loss, count = eval_loss(PositionLM(), blocks, lengths, batch_size, "cpu")
        assert count == 15 + 2 + 8
        assert loss == pytest.approx(expected, rel=1e-5)


def test_perplexity():
    assert perplexity(0.0) == 1.0
    assert perplexity(math.log(10.0)) == pytest.approx(10.0)
    assert perplexity(1e4) == math.inf


# plot_loss


def fake_model(tmp_path, records: list[dict | str]) -> Artifact:
    folder = tmp_path / "model"
    folder.mkdir()
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    (folder / "trainer_log.jsonl").write_text("\n".join(lines) + "\n")
    return Artifact(stage="train", key="k" * 32, path=str(folder), digest="d" * 64, stats={"finetuning_type": "full"})


TRAIN_RECORDS = [{"current_steps": s, "loss": 8.0 - 0.1 * s, "lr": 1e-3, "tokens_per_s_per_device": 1000.0 + s}
                 for s in range(1, 11)]


def test_plot_loss_writes_pngs_and_warns_without_eval_loss(tmp_path, layout, caplog):
    with caplog.at_level(logging.WARNING, logger="ptflow.plot"):
        artifact = plot_loss(fake_model(tmp_path, TRAIN_RECORDS), layout)
    assert artifact.stats["plots"] == ["training_loss.png", "training_lr.png", "training_throughput.png"]
    assert png_size(artifact.dir / "training_loss.png") == (700, 400)
    assert not (artifact.dir / "training_eval_loss.png").exists()
    assert "no eval_loss in trainer_log.jsonl; training_eval_loss.png not written" in caplog.text


def test_plot_loss_with_eval_loss_and_a_torn_line(tmp_path, layout, caplog):
    records = [*TRAIN_RECORDS, {"current_steps": 5, "eval_loss": 7.0}, {"current_steps": 10, "eval_loss": 6.5},
               '{"current_steps": 11, "lo']
    with caplog.at_level(logging.WARNING, logger="ptflow.plot"):
        artifact = plot_loss(fake_model(tmp_path, records), layout)
    assert artifact.stats["plots"] == list(PLOTS.values())
    assert png_size(artifact.dir / "training_eval_loss.png") == (700, 400)
    assert "skipping unreadable line" in caplog.text


def test_plot_loss_of_a_real_run_hits_on_rerun(trained, layout):
    first = plot_loss(trained, layout)
    assert {"training_loss.png", "training_eval_loss.png"} <= set(first.stats["plots"])
    assert plot_loss(trained, layout).hit


def test_smooth():
    assert smooth([]) == []
    assert smooth([2.0] * 5) == [2.0] * 5
    values = [10.0, 0.0, 10.0, 0.0]
    out = smooth(values)
    assert out[0] == 10.0 and all(0.0 < v < 10.0 for v in out[1:])


# write_model_card


@pytest.fixture(scope="module")
def card(make_config, data_dir, tokenizer_artifact, dataset, trained, evaluation, session_layout):
    plots = plot_loss(trained, session_layout)
    config = make_config(data={"dataset": "rep", "dataset_dir": str(data_dir), "cutoff_len": CUTOFF,
                               "val_size": EVAL_DOCS},
                         output={"license": "apache-2.0", "tags": ["tiny"]})
    artifact = write_model_card(config, tokenizer_artifact, dataset, trained, evaluation, plots, session_layout,
                                provenance={"prefect flow run": "pretrain/brave-fox (1234)"})
    return artifact, config


def test_model_card_metadata_parses_with_huggingface_hub(card, evaluation):
    from huggingface_hub import ModelCard, ModelCardData
    from huggingface_hub.repocard import metadata_load, model_index_to_eval_results

    artifact, _ = card
    path = artifact.dir / "README.md"
    loaded = ModelCard.load(path)  # raises on malformed metadata (model-index included)
    data = loaded.data
    assert data.license == "apache-2.0" and data.library_name == "transformers"
    assert data.pipeline_tag == "text-generation"
    assert data.tags == ["ptflow", "pretraining", "full", "tiny"]
    assert data.datasets == ["rep"]
    assert getattr(data, "base_model", None) is None  # trained from scratch
    metadata = metadata_load(path)
    name, results = model_index_to_eval_results(metadata["model-index"])
    assert name == "test-run" and len(results) == 1
    assert (results[0].metric_type, results[0].task_type) == ("perplexity", "text-generation")
    assert results[0].metric_value == round(evaluation.stats["perplexity"], 4)
    assert results[0].dataset_revision == evaluation.stats["eval_set_digest"][:16]
    assert ModelCardData(**metadata).to_dict() == data.to_dict()  # round-trips
    assert artifact.stats["metadata"]["tags"] == data.tags


def test_model_card_body_has_provenance_and_no_secrets(card, dataset, tokenizer_artifact, trained):
    artifact, config = card
    text = (artifact.dir / "README.md").read_text()
    assert text.startswith("---\n")
    assert "# test-run" in text and "trained from scratch" in text
    rep, held = dataset.stats["sources"]["rep"], dataset.stats["sources"]["rep (eval)"]
    assert rep["documents"] + held["documents"] == 30 and held["documents"] == EVAL_DOCS
    assert f"| rep | {rep['documents']} | {rep['tokens']} | {rep['mean_doc_tokens']} |" in text
    for digest in (dataset.digest, tokenizer_artifact.digest, trained.digest):
        assert f"`{digest}`" in text
    assert "| prefect flow run | pretrain/brave-fox (1234) |" in text
    assert f"| torch | {torch.__version__.split('+')[0]}" in text and "| accelerate |" not in text  # what ran
    assert "![training loss](training_loss.png)" in text
    public = json.loads(text.split("```json\n", 1)[1].split("\n```", 1)[0])
    assert "store" not in public and "output_dir" not in public["output"]
    assert public["train"]["learning_rate"] == config.train.learning_rate
    assert public["model"]["use_fast_tokenizer"] is True  # a flag is not a secret

    def secret_values(obj, path=""):
        if isinstance(obj, dict):
            for k, v in obj.items():
                if "token" in k.lower() and isinstance(v, str) and v not in ("", "<redacted>"):
                    yield f"{path}{k}"
                yield from secret_values(v, f"{path}{k}.")
        elif isinstance(obj, list):
            for v in obj:
                yield from secret_values(v, path)

    assert list(secret_values(public)) == []


def test_redact_hides_string_secrets_only():
    raw = {"hub_token": "hf_abc", "HF_TOKEN": "", "use_fast_tokenizer": True, "max_tokens": 512,
           "nested": [{"api_key": "k1", "password": ["p"], "name": "x"}], "tokens_per_step": 64}
    assert redact(raw) == {"hub_token": "<redacted>", "HF_TOKEN": "", "use_fast_tokenizer": True, "max_tokens": 512,
                           "nested": [{"api_key": "<redacted>", "password": "<redacted>", "name": "x"}],
                           "tokens_per_step": 64}
