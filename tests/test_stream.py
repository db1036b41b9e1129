"""Streaming (data.streaming: true): same blocks as packing, O(1) resume from a cursor, passes, training end to end."""

from __future__ import annotations

import json
import os
import signal

import numpy as np
import pytest
from tiny_assets import ASSETS, QUICKSTART, Interrupted, stop_at, write_dataset_info

from ptflow.config.schema import (
    DataSection,
    ModelSection,
    TrainSection,
    validate_config,
)
from ptflow.data import shards as shards_module
from ptflow.data import sources as sources_module
from ptflow.data.dataset import open_blocks, prepare_dataset
from ptflow.data.node_tokens import NodeTokens
from ptflow.data.packing import doc_starts, pack
from ptflow.data.sources import resolve_sources
from ptflow.data.stream import BlockStream, Cursor, StreamPlan, hold_out, is_streamed
from ptflow.data.tokenizer import open_tokenizer
from ptflow.errors import CheckpointError, DataError
from ptflow.train.loop import train

L = 32


@pytest.fixture(scope="module")
def tok():
    return open_tokenizer(QUICKSTART / "model")


@pytest.fixture(scope="module")
def two_corpora(tmp_path_factory):
    """Two jsonl datasets of 120 and 80 quickstart documents, and a .txt one."""
    folder = tmp_path_factory.mktemp("streamed")
    lines = (QUICKSTART / "data" / "corpus.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    (folder / "a.jsonl").write_text("".join(lines[:120]), encoding="utf-8")
    (folder / "b.jsonl").write_text("".join(lines[120:200]), encoding="utf-8")
    (folder / "notes.txt").write_text((ASSETS / "notes.txt").read_text())
    return write_dataset_info(folder, {"a": {"file_name": "a.jsonl"}, "b": {"file_name": "b.jsonl"},
                                       "notes": {"file_name": "notes.txt"}})


@pytest.fixture
def small_shards(monkeypatch):
    """Shards of about 4 KB, so the tiny corpora span many of them."""
    monkeypatch.setattr(sources_module, "MIN_SHARD_BYTES", 4096)
    monkeypatch.setattr(sources_module, "MAX_SHARD_BYTES", 4096)


def section(data_dir, **kw) -> DataSection:
    """In file order unless a test asks for shuffle_shards (so blocks compare with packing)."""
    return DataSection(**{"dataset": "a,b", "dataset_dir": str(data_dir), "cutoff_len": L, "streaming": True,
                          "shuffle_shards": False, **kw})


def documents(data_dir, names, tok, limit=None) -> list[list[int]]:
    docs = []
    for name in names:
        texts = [json.loads(line)["text"] for line in (data_dir / f"{name}.jsonl").read_text().splitlines()]
        docs += [ids + [tok.eos_token_id] for ids in tok(texts[:limit], add_special_tokens=False)["input_ids"]]
    return docs


def reference(docs: list[list[int]]) -> tuple[np.ndarray, list[list[int]]]:
    """What non-streamed packing makes of these documents: blocks and per-block document starts."""
    stream = np.array([t for d in docs for t in d], dtype=np.uint16)
    blocks, _ = pack(stream, L)
    offsets, starts = doc_starts(np.cumsum([len(d) for d in docs]), len(blocks), L)
    return blocks, [starts[offsets[i]: offsets[i + 1]].tolist() for i in range(len(blocks))]


def plan_for(data_dir, **kw) -> StreamPlan:
    s = section(data_dir, **kw)
    return StreamPlan.for_sources(resolve_sources(s), s, seed=7)


def test_streamed_blocks_equal_packed_blocks_across_shards_and_datasets(two_corpora, tok, small_shards):
    plan = plan_for(two_corpora, doc_mask=True)
    assert len(plan.shards) > 10
    want, want_starts = reference(documents(two_corpora, "ab", tok))
    with BlockStream(plan, tok) as stream:
        got, starts, cursor = stream.take(len(want))
    np.testing.assert_array_equal(got, want)
    assert [s.tolist() for s in starts] == want_starts
    assert cursor.epoch == 0 and cursor.shard == len(plan.shards) - 1


def test_worker_processes_give_the_same_blocks(two_corpora, tok, small_shards):
    plan = plan_for(two_corpora)
    with BlockStream(plan, tok) as inline, BlockStream(plan, tok, workers=2) as pooled:
        np.testing.assert_array_equal(inline.take(60)[0], pooled.take(60)[0])


def test_truncation_and_padding_in_tokenizer_json_are_not_applied_to_a_stream(tmp_path, two_corpora, small_shards):
    from tiny_assets import copy_capped_tokenizer

    folder = copy_capped_tokenizer(tmp_path / "capped")
    capped = open_tokenizer(folder)  # untouched: calling it would reset its backend's settings
    assert capped.backend_tokenizer.truncation["max_length"] == 8
    want, _ = reference(documents(two_corpora, "ab", open_tokenizer(folder)))  # tokenizer(texts) applies neither
    plan = plan_for(two_corpora)
    with BlockStream(plan, capped) as inline, BlockStream(plan, capped, workers=2) as pooled:
        np.testing.assert_array_equal(inline.take(len(want))[0], want)
        np.testing.assert_array_equal(pooled.take(len(want))[0], want)


def test_resuming_from_any_cursor_continues_the_same_blocks(two_corpora, tok, small_shards):
    plan = plan_for(two_corpora, doc_mask=True)
    with BlockStream(plan, tok) as stream:
        chunks = [stream.take(n) for n in (1, 7, 13, 5, 40, 9)]
    whole = np.concatenate([c[0] for c in chunks])
    done = 0
    for i, (blocks, _, cursor) in enumerate(chunks[:-1]):
        done += len(blocks)
        with BlockStream(plan, tok, cursor) as resumed:
            rest = resumed.take(len(whole) - done)
        np.testing.assert_array_equal(rest[0], whole[done:], err_msg=f"resumed at {cursor}")
        assert rest[2] == chunks[-1][2]


def test_shuffled_passes_read_every_training_shard_once_in_a_new_order(two_corpora, tok, small_shards):
    plan = plan_for(two_corpora, shuffle_shards=True)
    held, _ = hold_out(plan, tok, 100)  # the first blocks in file order; training starts inside a later shard
    assert plan.start.shard > 0
    first, second = plan.order(0), plan.order(1)
    assert sorted(first) == sorted(second) == list(range(plan.start.shard, len(plan.shards)))
    assert first != second and first != sorted(first)
    docs = documents(two_corpora, "ab", tok)
    want, _ = reference(docs)
    np.testing.assert_array_equal(held, want[:100])
    training_tokens = np.array([t for d in docs for t in d])[100 * L:]  # everything after the held-out blocks
    pass_one = []
    with BlockStream(plan, tok) as stream:
        while True:
            block = stream.take(1)[0]
            if stream.epoch == 1:
                break
            pass_one.append(block)
    assert len(pass_one) == len(training_tokens) // L  # every training token once, only a final partial dropped
    counts = np.bincount(np.concatenate(pass_one).ravel(), minlength=4096)
    missing = np.bincount(training_tokens, minlength=4096) - counts
    assert missing.min() >= 0 and missing.sum() == len(training_tokens) % L
    assert not {bytes(b) for b in pass_one} & {bytes(b) for b in held}  # held-out blocks are never trained on


def test_a_shuffled_stream_resumes_exactly_across_passes(two_corpora, tok, small_shards):
    plan = plan_for(two_corpora, shuffle_shards=True)
    hold_out(plan, tok, 5)
    with BlockStream(plan, tok) as stream:
        chunks = [stream.take(n) for n in (300, 900, 700, 400)]  # crosses into the second pass
    assert chunks[-1][2].epoch >= 1
    whole = np.concatenate([c[0] for c in chunks])
    done = 0
    for blocks, _, cursor in chunks[:-1]:
        done += len(blocks)
        with BlockStream(plan, tok, cursor) as resumed:
            np.testing.assert_array_equal(resumed.take(len(whole) - done)[0], whole[done:], err_msg=str(cursor))


def test_resume_reads_only_the_cursors_shard(two_corpora, tok, small_shards, monkeypatch):
    plan = plan_for(two_corpora)
    with BlockStream(plan, tok) as stream:
        stream.take(300)
        cursor = stream.take(1)[2]
    assert cursor.shard > 3
    read = []
    real = shards_module.read_shard
    monkeypatch.setattr(shards_module, "read_shard", lambda shard: read.append(shard.index) or real(shard))
    with BlockStream(plan, tok, cursor) as resumed:
        resumed.take(1)
    assert read[0] == plan.shards[cursor.shard].index and len(read) <= 2  # no replay of consumed shards


def test_a_pass_drops_only_its_final_partial_block_then_starts_again(two_corpora, tok):
    plan = plan_for(two_corpora, dataset="b")
    want, _ = reference(documents(two_corpora, "b", tok))
    with BlockStream(plan, tok) as stream:
        first = stream.take(len(want))[0]
        again, _, cursor = stream.take(len(want) + 2)
    np.testing.assert_array_equal(first, want)
    np.testing.assert_array_equal(again[: len(want)], want)
    np.testing.assert_array_equal(again[len(want):], want[:2])
    assert cursor.epoch == 2


def test_max_samples_keeps_the_first_documents_of_each_dataset(two_corpora, tok, small_shards):
    plan = plan_for(two_corpora, max_samples=30)
    docs = documents(two_corpora, "a", tok, 30) + documents(two_corpora, "b", tok, 30)
    want, _ = reference(docs)
    with BlockStream(plan, tok) as stream:
        got = stream.take(len(want) + 1)[0]
    np.testing.assert_array_equal(got[: len(want)], want)
    np.testing.assert_array_equal(got[len(want)], want[0])  # then the next pass


def test_val_size_holds_out_the_first_blocks_in_every_pass(two_corpora, tok):
    plan = plan_for(two_corpora, dataset="b", val_size=3)
    want, _ = reference(documents(two_corpora, "b", tok))
    held, _ = hold_out(plan, tok, 3)
    np.testing.assert_array_equal(held, want[:3])
    with BlockStream(plan, tok) as stream:
        got = stream.take(2 * (len(want) - 3))[0]
    np.testing.assert_array_equal(got, np.concatenate([want[3:], want[3:]]))  # eval blocks never trained on


def test_too_little_data_for_one_block_is_a_clear_error(two_corpora, tok):
    plan = plan_for(two_corpora, dataset="notes", cutoff_len=4096)
    with pytest.raises(DataError, match="fewer than cutoff_len=4096"), BlockStream(plan, tok) as stream:
        stream.take(1)


def test_a_file_changed_after_planning_is_refused(tmp_path, two_corpora):
    folder = tmp_path / "data"
    folder.mkdir()
    for name in ("a.jsonl", "b.jsonl", "dataset_info.json"):
        (folder / name).write_bytes((two_corpora / name).read_bytes())
    plan = plan_for(folder)
    plan.check_unchanged()
    with open(folder / "b.jsonl", "a") as f:
        f.write('{"text": "one more"}\n')
    with pytest.raises(DataError, match="b.jsonl: changed since prepare_dataset"):
        plan.check_unchanged()


def test_cursor_round_trips_through_json():
    cursor = Cursor(2, 5, 1234, 77)
    assert Cursor.from_json(json.loads(json.dumps(cursor.to_json()))) == cursor


# --------------------------------------------------------------------------- the stage and the config


def test_prepare_writes_a_plan_and_the_held_out_blocks_but_no_tokens(two_corpora, tokenizer_artifact, layout, tok):
    artifact = prepare_dataset(section(two_corpora, val_size=4), tokenizer_artifact, layout)
    assert is_streamed(artifact.path)
    eval_blocks, _ = open_blocks(artifact, "eval")
    want, _ = reference(documents(two_corpora, "ab", tok))
    np.testing.assert_array_equal(eval_blocks, want[:4])
    assert not (artifact.dir / "train.npy").exists()
    assert not layout.stage_dir("tokenize").exists() or not any(layout.stage_dir("tokenize").iterdir())
    assert artifact.stats["streaming"] and artifact.stats["eval_blocks"] == 4
    assert artifact.stats["sources"]["a"]["cache"] == "streamed"
    assert prepare_dataset(section(two_corpora, val_size=4), tokenizer_artifact, layout).hit


def test_num_samples_cannot_be_streamed(tmp_path, two_corpora, tokenizer_artifact, layout):
    info = json.loads((two_corpora / "dataset_info.json").read_text())
    info["a"]["num_samples"] = 10
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "a.jsonl").write_bytes((two_corpora / "a.jsonl").read_bytes())
    write_dataset_info(folder, {"a": info["a"]})
    with pytest.raises(DataError, match="num_samples"):
        prepare_dataset(section(folder, dataset="a"), tokenizer_artifact, layout)


@pytest.mark.parametrize("data, train, message", [
    ({"val_size": 0.1}, {"max_steps": 4}, "data.val_size: 0.1 is a fraction"),
    ({"mix_strategy": "interleave_under"}, {"max_steps": 4}, "mix_strategy: interleave_under is not available"),
    ({"packing": False}, {"max_steps": 4}, "data.packing: false is not available"),
    ({}, {}, "train.max_steps: a stream's length is unknown"),
])
def test_config_problems_of_streaming(tiny_model_dir, two_corpora, data, train, message):
    from ptflow.errors import ConfigError

    raw = {"run_name": "s", "model": {"model_name_or_path": str(tiny_model_dir), "train_from_scratch": True},
           "data": {"dataset": "a,b", "dataset_dir": str(two_corpora), "streaming": True, **data}, "train": train}
    with pytest.raises(ConfigError, match=message):
        validate_config(raw, "streaming.yaml")


# --------------------------------------------------------------------------- training from a stream

STEPS, SAVE = 8, 3


def stream_train(**kw) -> TrainSection:
    return TrainSection(**{"max_steps": STEPS, "learning_rate": 3e-3, "per_device_train_batch_size": 4,
                           "logging_steps": 1, "save_steps": SAVE, "eval_steps": 4, **kw})


@pytest.fixture(scope="module")
def streamed(two_corpora, tokenizer_artifact, session_layout):
    return prepare_dataset(section(two_corpora, dataset="b", val_size=2, doc_mask=True), tokenizer_artifact,
                           session_layout)


def log_of(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / "trainer_log.jsonl").read_text().splitlines()]


def test_training_from_a_stream_resumes_exactly_after_an_interruption(tiny_model_dir, tokenizer_artifact, streamed,
                                                                     tmp_path):
    from ptflow.store.layout import Layout

    scratch = ModelSection(model_name_or_path=str(tiny_model_dir), train_from_scratch=True)
    reference_run = train(scratch, stream_train(), tokenizer_artifact, streamed, Layout(tmp_path / "a"))
    want = {r["current_steps"]: r["loss"] for r in log_of(reference_run.dir) if "loss" in r}
    assert want[STEPS] < want[1]
    assert reference_run.stats["streamed"] and reference_run.stats["train_tokens"] == STEPS * 4 * L
    assert any("eval_loss" in r for r in log_of(reference_run.dir))

    layout = Layout(tmp_path / "b")
    with pytest.raises(Interrupted):
        train(scratch, stream_train(), tokenizer_artifact, streamed, layout, on_log=stop_at(7))
    work = layout.work("train", reference_run.key)
    meta = json.loads((work / "checkpoint-6" / "ptflow_checkpoint.json").read_text())
    assert Cursor.from_json(meta["data_cursor"]).offset == (2 + 6 * 4) * L  # after the held-out and 6 steps' blocks
    resumed = train(scratch, stream_train(), tokenizer_artifact, streamed, layout)
    assert resumed.stats["resumed_from"].endswith("checkpoint-6")
    records = log_of(resumed.dir)
    assert [r["current_steps"] for r in records if "loss" in r] == list(range(1, STEPS + 1))
    got = {r["current_steps"]: r["loss"] for r in records if "loss" in r}
    for step in want:
        assert got[step] == pytest.approx(want[step], abs=1e-5), step


def test_a_checkpoint_without_a_data_cursor_is_refused_for_a_stream(tiny_model_dir, tokenizer_artifact, streamed,
                                                                   tmp_path):
    from ptflow.store.layout import Layout

    scratch = ModelSection(model_name_or_path=str(tiny_model_dir), train_from_scratch=True)
    layout = Layout(tmp_path / "c")
    with pytest.raises(Interrupted):
        train(scratch, stream_train(), tokenizer_artifact, streamed, layout, on_log=stop_at(4))
    meta_path = next(layout.stage_dir("train").glob("*.work")) / "checkpoint-3" / "ptflow_checkpoint.json"
    meta = json.loads(meta_path.read_text())
    del meta["data_cursor"]
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="has no data cursor"):
        train(scratch, stream_train(), tokenizer_artifact, streamed, layout)


def test_parquet_and_gzip_sources_stream_the_same_blocks(tmp_path, two_corpora, tok):
    """Columnar (row-group shards) and compressed (whole-file shard) files stream like jsonl."""
    import gzip

    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [json.loads(line)["text"] for line in (two_corpora / "b.jsonl").read_text().splitlines()]
    pq.write_table(pa.table({"text": texts}), tmp_path / "b.parquet", row_group_size=7)
    (tmp_path / "b.jsonl.gz").write_bytes(gzip.compress((two_corpora / "b.jsonl").read_bytes()))
    write_dataset_info(tmp_path, {"pq": {"file_name": "b.parquet"}, "gz": {"file_name": "b.jsonl.gz"}})
    want, _ = reference(documents(two_corpora, "b", tok))
    for name in ("pq", "gz"):
        with BlockStream(plan_for(tmp_path, dataset=name), tok) as stream:
            np.testing.assert_array_equal(stream.take(len(want))[0], want, err_msg=name)


def test_shards_shorter_than_a_block_still_give_the_packed_blocks(tmp_path, tok, monkeypatch):
    monkeypatch.setattr(sources_module, "MIN_SHARD_BYTES", 64)  # a few short documents per shard: most blocks span
    monkeypatch.setattr(sources_module, "MAX_SHARD_BYTES", 64)  # several shards, some shards complete no block
    for name, n in (("a", 40), ("b", 25)):
        lines = [json.dumps({"text": f"doc {i} of {name}: " + "word " * (i % 7)}) + "\n" for i in range(n)]
        (tmp_path / f"{name}.jsonl").write_text("".join(lines))
    write_dataset_info(tmp_path, {"a": {"file_name": "a.jsonl"}, "b": {"file_name": "b.jsonl"}})
    plan = plan_for(tmp_path, doc_mask=True)
    want, want_starts = reference(documents(tmp_path, "ab", tok))
    assert len(plan.shards) > len(want) > 11
    with BlockStream(plan, tok) as stream:
        got, starts = [], []
        for n in (1, 7, 3, len(want) - 11):
            blocks, block_starts, _ = stream.take(n)
            assert len(blocks) == len(block_starts) == n
            got.append(blocks)
            starts += block_starts
    np.testing.assert_array_equal(np.concatenate(got), want)
    assert [s.tolist() for s in starts] == want_starts


# --------------------------------------------------------------------------- ranks of a node sharing tokens


def node_ranks(folder, plan, tok, cursor=None, workers=0) -> list[BlockStream]:
    """Two ranks of one node (LOCAL_WORLD_SIZE 2), as torchrun's processes would make them."""
    return [BlockStream(plan, tok, cursor, workers=workers, node=NodeTokens(str(folder), rank, 2, "tok-digest"))
            for rank in (0, 1)]


def shard_folders(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")) \
        if folder.exists() else []


def test_ranks_of_a_node_tokenize_each_shard_once_and_read_the_blocks_of_one_process(two_corpora, tok, small_shards,
                                                                                    tmp_path):
    plan = plan_for(two_corpora, shuffle_shards=True)
    hold_out(plan, tok, 5)
    sizes = [5] * 60 + [1800]  # small steps, then across into the second pass
    with BlockStream(plan, tok) as alone:
        want = [alone.take(n) for n in sizes]
        read = alone.tokenizing["tokenized_shards"]
    assert want[-1][2].epoch == 1 and read > len(plan.shards) - plan.start.shard
    folder = tmp_path / "node"
    ranks = node_ranks(folder, plan, tok)
    for n, (blocks, starts, cursor) in zip(sizes, want):
        for rank in ranks:  # rank 0 is always a step ahead: it tokenizes, rank 1 maps its files
            got, got_starts, got_cursor = rank.take(n)
            np.testing.assert_array_equal(got, blocks)
            assert got_cursor == cursor
        if n == 5:
            assert len(shard_folders(folder)) <= 2  # a shard's files go once both ranks have passed it
    for rank in ranks:
        rank.close()
    counts = [r.tokenizing for r in ranks]
    assert [c["tokenized_shards"] + c["shared_shards"] for c in counts] == [read, read]  # each read every shard
    assert counts[1]["tokenized_shards"] == 0  # the shards rank 0 tokenized, rank 1 only mapped
    # rank 0 reached the second pass a pass ahead of rank 1, so it re-read those shards' files too
    assert len(plan.shards) - plan.start.shard <= counts[0]["tokenized_shards"] < read
    assert ranks[0].tokenizing["tokenize_cpu_s"] > 0 == ranks[1].tokenizing["tokenize_cpu_s"]
    assert not folder.exists()  # every shard released by both ranks: nothing left on disk


def test_node_ranks_with_tokenizer_workers_resume_from_a_cursor(two_corpora, tok, small_shards, tmp_path):
    """Workers fetch shards ahead into the node's files; a resumed pair of ranks reads what one process reads."""
    plan = plan_for(two_corpora, shuffle_shards=True)
    with BlockStream(plan, tok) as alone:
        alone.take(333)
        cursor = alone.cursor()
        want = alone.take(500)[0]
    ranks = node_ranks(tmp_path / "node", plan, tok, cursor, workers=1)
    try:
        got = [[rank.take(n)[0] for n in (100, 400)] for rank in ranks]
    finally:
        for rank in ranks:
            rank.close()
    for blocks in got:
        np.testing.assert_array_equal(np.concatenate(blocks), want)
    counts = [r.tokenizing for r in ranks]
    fetched = counts[0]["tokenized_shards"] + counts[0]["shared_shards"]
    assert counts[1]["tokenized_shards"] + counts[1]["shared_shards"] == fetched
    assert counts[0]["tokenized_shards"] + counts[1]["tokenized_shards"] == fetched  # each once for the node
    assert not (tmp_path / "node").exists()


def test_a_rank_killed_while_writing_a_shards_tokens_leaves_nothing_another_rank_reads(two_corpora, tok, tmp_path):
    import subprocess
    import sys

    plan = plan_for(two_corpora, dataset="b")
    shard = plan.shards[0]
    folder = tmp_path / "node"
    killed = subprocess.run(
        [sys.executable, "-c", "import sys, json, numpy as np\n"
         "from ptflow.data.node_tokens import NodeTokens\nfrom ptflow.data.sources import Shard\n"
         "node = NodeTokens(sys.argv[1], 1, 2, 'tok-digest')\n"
         "node.fetch(Shard(**json.loads(sys.argv[2])), 0, lambda: (np.zeros(7, np.uint16), np.array([3, 7])))",
         str(folder), json.dumps(shard.__dict__)],
        env={**os.environ, "PTFLOW_KILL_AT": "stream:tokens-written"}, capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    node = NodeTokens(str(folder), 0, 2, "tok-digest")
    assert [p.name.split(".tmp-")[0] for p in folder.iterdir() if ".tmp-" in p.name] == [f".{node.name(shard)}"]
    want = BlockStream(plan, tok).encoder  # the real tokens, not the killed writer's zeros
    fetched = node.fetch(shard, 0, lambda: shards_module.encode_shard(shard, want, BlockStream(plan, tok).encoding))
    tokens, ends = node.open(fetched)
    assert fetched.built and len(ends) > 2 and tokens[: int(ends[0])].any()
    assert not [p for p in folder.iterdir() if ".tmp-" in p.name]  # the half-written folder was removed
    node.release(shard, 0)
    assert node.open(fetched) is not None  # rank 1 has not passed it yet
    other = NodeTokens(str(folder), 1, 2, "tok-digest")
    assert not other.fetch(shard, 0, lambda: pytest.fail("rank 0 tokenized it already")).built
    other.release(shard, 0)
    assert node.open(fetched) is None and list(folder.iterdir()) == []  # files and lock file gone
