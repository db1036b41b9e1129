"""Multi-process training under torchrun (gloo DDP and FSDP on CPU): same batches, same losses, rank errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny_assets import ASSETS, Interrupted, stop_at, write_dataset_info

from ptflow.config.schema import DataSection, ModelSection, TrainSection
from ptflow.data.dataset import prepare_dataset
from ptflow.errors import CheckpointError, TrainingError
from ptflow.store.layout import Layout
from ptflow.train import sharding
from ptflow.train.loop import train

pytestmark = pytest.mark.integration  # two extra Python processes: ~20 s on 2 cores


@pytest.fixture(scope="module")
def dataset(repeated_dataset):
    return repeated_dataset  # conftest.py: 30 blocks of 16


def settings(**kw) -> TrainSection:
    base = dict(max_steps=6, learning_rate=3e-3, logging_steps=1, save_steps=3, lr_scheduler_type="constant")
    return TrainSection(**{**base, **kw})


def log_of(artifact) -> list[dict]:
    return [json.loads(line) for line in (artifact.dir / "trainer_log.jsonl").read_text().splitlines()]


def stopped_after(step: int, monkeypatch, *args) -> None:
    """`train(*args)` fails on purpose after `step` (its checkpoints stay for the re-run); later runs do not."""
    monkeypatch.setenv("PTFLOW_TEST_FAIL_AFTER_STEP", str(step))
    with pytest.raises(TrainingError, match=f"injected failure after step {step}"):
        train(*args)
    monkeypatch.delenv("PTFLOW_TEST_FAIL_AFTER_STEP")


def test_two_processes_match_one_with_the_same_global_batch(tiny_model_dir, tokenizer_artifact, dataset, tmp_path,
                                                            caplog):
    import logging

    caplog.set_level(logging.INFO, logger="ptflow")
    model = ModelSection(model_name_or_path=str(tiny_model_dir), train_from_scratch=True)
    relayed = []
    two = train(model, settings(num_processes=2, per_device_train_batch_size=2), tokenizer_artifact, dataset,
                Layout(tmp_path / "a"), on_log=relayed.append)
    one = train(model, settings(num_processes=1, per_device_train_batch_size=4), tokenizer_artifact, dataset,
                Layout(tmp_path / "b"))
    assert [r["current_steps"] for r in relayed] == list(range(1, 7))  # rank 0's records reached the callback
    # rank 0's own progress lines reach the launching process's loggers (the ones Prefect captures), once each
    lines = [r.getMessage() for r in caplog.records if r.name == "ptflow.train" and r.getMessage().endswith("(rank 0)")]
    assert sum("train: model built in" in line for line in lines) == 1
    assert sum("train: checkpoint-3 saved" in line for line in lines) == 1
    ddp, single = [r["loss"] for r in log_of(two)], [r["loss"] for r in log_of(one)]
    assert ddp == pytest.approx(single, abs=2e-4)
    meta = json.loads((two.dir / "checkpoint-3" / "ptflow_checkpoint.json").read_text())
    assert meta["fingerprint"]["world_size"] == 2
    assert not [p.name for p in two.dir.iterdir() if p.name.startswith(".launch")]
    assert two.key != one.key  # the process count is part of the key


def test_rank_error_keeps_its_type_and_message(tiny_model_dir, tokenizer_artifact, dataset, tmp_path):
    model = ModelSection(model_name_or_path=str(tiny_model_dir), train_from_scratch=True)
    with pytest.raises(TrainingError, match=r"not finite at step \d"):
        train(model, settings(num_processes=2, per_device_train_batch_size=2, learning_rate=1e10, max_grad_norm=0),
              tokenizer_artifact, dataset, Layout(tmp_path / "c"))


def test_an_interrupted_launch_ends_torchrun_and_every_rank(tiny_model_dir, tokenizer_artifact, dataset, tmp_path):
    """Ctrl-C or SIGTERM in the parent (raised in its relay loop): the whole torchrun group is ended."""
    model = ModelSection(model_name_or_path=str(tiny_model_dir), train_from_scratch=True)

    layout = Layout(tmp_path / "d")
    with pytest.raises(Interrupted):
        train(model, settings(num_processes=2, per_device_train_batch_size=2, max_steps=200), tokenizer_artifact,
              dataset, layout, on_log=stop_at(2))
    marker = str(layout.root).encode()
    left = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and marker in (entry / "cmdline").read_bytes():
                left.append((entry / "cmdline").read_bytes())
        except OSError:
            continue
    assert left == []


def test_fsdp_matches_ddp_and_saves_full_weights(tiny_model_dir, tokenizer_artifact, dataset, tmp_path, monkeypatch):
    """Sharded training takes the same steps as DDP; checkpoints are sharded (DCP) and re-shard onto any number of
    processes; only the exported model holds full tensors; the stage refuses another process count, naming why."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model = ModelSection(model_name_or_path=str(tiny_model_dir), train_from_scratch=True)
    two = dict(num_processes=2, per_device_train_batch_size=2, gradient_accumulation_steps=2)
    ddp = train(model, settings(**two), tokenizer_artifact, dataset, Layout(tmp_path / "ddp"))
    layout = Layout(tmp_path / "fsdp")
    stopped_after(4, monkeypatch, model, settings(fsdp=True, **two), tokenizer_artifact, dataset, layout)
    fsdp = train(model, settings(fsdp=True, **two), tokenizer_artifact, dataset, layout)
    assert fsdp.stats["resumed_from"].endswith("checkpoint-3")
    assert "FSDP over 2 processes" in fsdp.stats["speedups"]
    assert [r["current_steps"] for r in log_of(fsdp)] == list(range(1, 7))
    assert [r["loss"] for r in log_of(fsdp)] == pytest.approx([r["loss"] for r in log_of(ddp)], abs=1e-5)
    sharded, replicated = load_file(fsdp.dir / "model.safetensors"), load_file(ddp.dir / "model.safetensors")
    assert sharded.keys() == replicated.keys()
    for name in replicated:
        torch.testing.assert_close(sharded[name], replicated[name], atol=1e-5, rtol=0, msg=name)
    loaded = AutoModelForCausalLM.from_pretrained(fsdp.dir, use_safetensors=True)  # the export: full tensors
    assert {n: tuple(p.shape) for n, p in loaded.named_parameters()} == \
        {n: tuple(p.shape) for n, p in AutoModelForCausalLM.from_config(loaded.config).named_parameters()}
    checkpoint = fsdp.dir / "checkpoint-3"
    assert (checkpoint / "sharded" / ".metadata").is_file() and not (checkpoint / "trainable.safetensors").exists()
    files = {f.name for f in (checkpoint / "sharded").glob("*.distcp")}  # each rank wrote its own shards, in parallel
    assert {name.split("_")[2] for name in files} == {"0", "1"} and len(files) == 2 * sharding.WRITE_THREADS
    # the sharded checkpoint re-shards onto one plain process: the same weights and AdamW state as DDP's
    net = AutoModelForCausalLM.from_pretrained(fsdp.dir, use_safetensors=True)
    optimizer = torch.optim.AdamW(net.parameters())
    sharding.load_sharded(net, optimizer, checkpoint / "sharded")
    replicated = load_file(ddp.dir / "checkpoint-3" / "trainable.safetensors")
    for name, param in net.named_parameters():
        torch.testing.assert_close(param.detach(), replicated[name], atol=1e-5, rtol=0, msg=name)
    assert all(state["step"] == 3 for state in optimizer.state.values())
    # one process continues it when a step still holds the same blocks (1 x 4 x 2 = 2 x 2 x 2): DCP re-shards the
    # state onto the plain model, and the last steps match DDP's; another number of blocks per step is refused
    one = train(model, settings(num_processes=1, per_device_train_batch_size=4, gradient_accumulation_steps=2,
                                resume_from_checkpoint=str(checkpoint)), tokenizer_artifact, dataset,
                Layout(tmp_path / "one"))
    assert one.stats["resumed_from"].endswith("checkpoint-3")
    assert [r["current_steps"] for r in log_of(one)] == [4, 5, 6]  # another folder: only the steps it ran
    assert [r["loss"] for r in log_of(one)] == pytest.approx([r["loss"] for r in log_of(ddp)][3:], abs=2e-4)
    with pytest.raises(CheckpointError, match=r"global_batch \(checkpoint 8, now 4\).*other batches"):
        train(model, settings(num_processes=1, per_device_train_batch_size=4, resume_from_checkpoint=str(checkpoint)),
              tokenizer_artifact, dataset, Layout(tmp_path / "four"))


def test_a_run_stopped_on_two_processes_continues_on_one(tiny_model_dir, tokenizer_artifact, dataset, tmp_path,
                                                        monkeypatch):
    """Fewer GPUs on the re-run, the same blocks per step (2 x 2 -> 1 x 4): the new key's stage adopts the stopped
    run's checkpoint by its fingerprint and ends where one process would have."""
    model = ModelSection(model_name_or_path=str(tiny_model_dir), train_from_scratch=True)
    layout = Layout(tmp_path / "store")
    stopped_after(4, monkeypatch, model, settings(num_processes=2, per_device_train_batch_size=2), tokenizer_artifact,
                  dataset, layout)
    continued = train(model, settings(num_processes=1, per_device_train_batch_size=4), tokenizer_artifact, dataset,
                      layout)
    alone = train(model, settings(num_processes=1, per_device_train_batch_size=4), tokenizer_artifact, dataset,
                  Layout(tmp_path / "alone"))
    assert continued.stats["resumed_from"].endswith("checkpoint-3")
    assert [r["current_steps"] for r in log_of(continued)] == list(range(1, 7))
    assert [r["loss"] for r in log_of(continued)] == pytest.approx([r["loss"] for r in log_of(alone)], abs=2e-4)
    with pytest.raises(CheckpointError, match="global_batch"):  # 1 x 2 blocks per step cannot continue 2 x 2
        train(model, settings(num_processes=1, per_device_train_batch_size=2,
                              resume_from_checkpoint=str(continued.dir / "checkpoint-3")),
              tokenizer_artifact, dataset, Layout(tmp_path / "half"))


def test_background_fsdp_checkpoints_resume_like_written_ones(tiny_model_dir, tokenizer_artifact, dataset, tmp_path,
                                                               monkeypatch):
    """async_checkpoint: shards written from a thread over a gloo group while training goes on, sealed (hashed,
    renamed) once every rank is done; a run that fails mid-way resumes from a sealed one to DDP's losses."""
    model = ModelSection(model_name_or_path=str(tiny_model_dir), train_from_scratch=True)
    two = dict(num_processes=2, per_device_train_batch_size=2, save_steps=2)
    ddp = train(model, settings(**two), tokenizer_artifact, dataset, Layout(tmp_path / "ddp"))
    layout = Layout(tmp_path / "async")
    stopped_after(5, monkeypatch, model, settings(fsdp=True, async_checkpoint=True, **two), tokenizer_artifact,
                  dataset, layout)
    done = train(model, settings(fsdp=True, async_checkpoint=True, **two), tokenizer_artifact, dataset, layout)
    # checkpoint-2 was sealed before checkpoint-4 started; checkpoint-4 too if its write ended by step 5's log line
    assert done.stats["resumed_from"].rsplit("/", 1)[-1] in ("checkpoint-2", "checkpoint-4")
    assert [r["current_steps"] for r in log_of(done)] == list(range(1, 7))
    assert [r["loss"] for r in log_of(done)] == pytest.approx([r["loss"] for r in log_of(ddp)], abs=1e-5)
    names = sorted(p.name for p in done.dir.iterdir() if "checkpoint" in p.name)
    assert names[-1] == "checkpoint-6" and not [n for n in names if n.startswith(".tmp")]  # the last one sealed too
    meta = json.loads((done.dir / "checkpoint-6" / "ptflow_checkpoint.json").read_text())
    assert any(name.startswith("sharded/") for name in meta["files"])  # hashed like a written one


def test_async_checkpoint_without_fsdp_is_refused():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="async_checkpoint writes FSDP's sharded checkpoints"):
        settings(async_checkpoint=True, num_processes=2)


def test_fsdp_with_one_process_or_lora_is_refused():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="num_processes is 1"):
        settings(fsdp=True, num_processes=1)
    with pytest.raises(ValidationError, match="LoRA adapter is small enough for DDP"):
        settings(fsdp=True, finetuning_type="lora")


def test_a_stream_trains_the_same_on_two_processes(tiny_model_dir, tokenizer_artifact, tiny_data_dir, session_layout,
                                                   tmp_path, monkeypatch):
    """Every rank reads the whole stream and keeps its rows: 2 x 2 blocks per step = 1 x 4, loss for loss; the two
    ranks of this node tokenize each shard once between them, and resume mid-stream to the same losses."""
    from ptflow.data import sources

    monkeypatch.setattr(sources, "MIN_SHARD_BYTES", 256)  # planned here, in the stream plan the ranks read
    monkeypatch.setattr(sources, "MAX_SHARD_BYTES", 256)
    streamed = prepare_dataset(DataSection(dataset="stdlib_docs", dataset_dir=str(tiny_data_dir), cutoff_len=32,
                                           streaming=True), tokenizer_artifact, Layout(tmp_path / "data"))
    model = ModelSection(model_name_or_path=str(tiny_model_dir), train_from_scratch=True)
    two = train(model, settings(num_processes=2, per_device_train_batch_size=2), tokenizer_artifact, streamed,
                Layout(tmp_path / "a"))
    one = train(model, settings(num_processes=1, per_device_train_batch_size=4), tokenizer_artifact, streamed,
                Layout(tmp_path / "b"))
    assert [r["loss"] for r in log_of(two)] == pytest.approx([r["loss"] for r in log_of(one)], abs=2e-4)
    cursors = [json.loads((run.dir / "checkpoint-3" / "ptflow_checkpoint.json").read_text())["data_cursor"]
               for run in (two, one)]
    assert cursors[0] == cursors[1] and cursors[0]["shard"] > 0  # after three steps of four blocks, several shards in

    (alone,) = one.stats["stream_tokenizing"]
    ranks = two.stats["stream_tokenizing"]
    assert alone["tokenized_shards"] >= 3 and alone["shared_shards"] == 0
    assert [r["tokenized_shards"] + r["shared_shards"] for r in ranks] == [alone["tokenized_shards"]] * 2
    assert sum(r["tokenized_shards"] for r in ranks) == alone["tokenized_shards"]  # once per node, not per rank
    assert not Layout.node_tokens(Layout(tmp_path / "a").work("train", two.key)).exists()  # cleaned up

    layout = Layout(tmp_path / "c")  # killed after step 4: resumes from checkpoint-3's cursor, same losses
    stopped_after(4, monkeypatch, model, settings(num_processes=2, per_device_train_batch_size=2), tokenizer_artifact,
                  streamed, layout)
    resumed = train(model, settings(num_processes=2, per_device_train_batch_size=2), tokenizer_artifact, streamed,
                    layout)
    assert resumed.stats["resumed_from"].endswith("checkpoint-3")
    assert [r["loss"] for r in log_of(resumed)] == pytest.approx([r["loss"] for r in log_of(two)], abs=1e-5)


@pytest.fixture(scope="module")
def padded(tmp_path_factory, tokenizer_artifact, session_layout):
    """Unpacked rows (packing: false): every block padded to 32 with its own token count, and held-out blocks."""
    folder = tmp_path_factory.mktemp("padded-data")
    lines = (ASSETS / "three_docs.jsonl").read_text().splitlines()
    (folder / "rep.jsonl").write_text("".join(json.dumps({"text": json.loads(line)["text"] + f" Copy {i}."}) + "\n"
                                              for i in range(10) for line in lines))  # 30 distinct documents
    write_dataset_info(folder, {"rep": {"file_name": "rep.jsonl"}})
    return prepare_dataset(DataSection(dataset="rep", dataset_dir=str(folder), cutoff_len=32, packing=False,
                                       val_size=5), tokenizer_artifact, session_layout)


def test_two_processes_with_padding_match_one(tiny_model_dir, tokenizer_artifact, padded, tmp_path):
    """The loss is the mean over the step's labelled tokens on every rank, so the split into ranks and micro-batches
    does not matter even when rows hold different numbers of tokens; evaluation is sharded and gives the same loss."""
    model = ModelSection(model_name_or_path=str(tiny_model_dir), train_from_scratch=True)
    common = {"eval_steps": 3, "learning_rate": 1e-2}
    two = train(model, settings(num_processes=2, per_device_train_batch_size=1, gradient_accumulation_steps=2,
                                **common), tokenizer_artifact, padded, Layout(tmp_path / "a"), eval_batch_size=2)
    one = train(model, settings(num_processes=1, per_device_train_batch_size=4, **common), tokenizer_artifact,
                padded, Layout(tmp_path / "b"))
    assert [r["loss"] for r in log_of(two)] == pytest.approx([r["loss"] for r in log_of(one)], abs=1e-5)
    evals = [[r["eval_loss"] for r in log_of(run) if "eval_loss" in r] for run in (two, one)]
    assert len(evals[0]) == 2 and evals[0] == pytest.approx(evals[1], abs=1e-5)
