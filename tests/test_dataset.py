"""Stage prepare_dataset: exact packing (text + EOS, one final partial block dropped), splits, errors, cache."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from tiny_assets import ASSETS, QUICKSTART, write_dataset_info

from ptflow.config.schema import DataSection
from ptflow.data.dataset import held_out, open_blocks, prepare_dataset
from ptflow.data.shards import content_hashes
from ptflow.data.tokenizer import open_tokenizer
from ptflow.errors import DataError
from ptflow.store.layout import Layout

THREE = [json.loads(line)["text"] for line in (ASSETS / "three_docs.jsonl").read_text().splitlines()]
EOS, BOS, PAD = 1, 0, 2


@pytest.fixture(scope="module")
def tok(tokenizer_artifact):
    return open_tokenizer(tokenizer_artifact.path)


def stream_of(tok, texts) -> list[int]:
    out = []
    for text in texts:
        out += tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return out


def counts(stats: dict, name: str) -> dict:
    return {k: stats["sources"][name][k] for k in ("documents", "tokens", "mean_doc_tokens")}


def data(tiny_data_dir, dataset="three", **kw) -> DataSection:
    return DataSection(dataset=dataset, dataset_dir=str(tiny_data_dir), **kw)


def make_data_dir(root, files: dict[str, bytes | str], entries: dict | None = None):
    """A dataset_dir with the given files; each file is registered under its stem unless `entries` is given."""
    root.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        (root / name).write_bytes(content.encode() if isinstance(content, str) else content)
    return write_dataset_info(root, entries or {name.split(".")[0]: {"file_name": name} for name in files})


def test_packing_is_text_plus_eos_concatenated_and_cut(tiny_data_dir, tokenizer_artifact, tok, layout):
    expected = stream_of(tok, THREE)
    assert len(expected) == 48  # 19 + 12 + 14 tokens, each document followed by EOS
    artifact = prepare_dataset(data(tiny_data_dir, cutoff_len=10), tokenizer_artifact, layout)
    blocks, lengths = open_blocks(artifact, "train")
    assert lengths is None
    assert blocks.shape == (4, 10) and blocks.dtype == np.uint16
    assert blocks.ravel().tolist() == expected[:40]
    stats = artifact.stats
    assert stats["dropped_tokens"] == 8 == len(expected) - 40  # only the final partial block
    assert list(stats["sources"]) == ["three"]
    assert counts(stats, "three") == {"documents": 3, "tokens": 48, "mean_doc_tokens": 16.0}
    assert (stats["train_blocks"], stats["eval_blocks"], stats["train_tokens"]) == (4, 0, 40)
    assert (stats["eos_token_id"], stats["pad_token_id"], stats["dtype"]) == (EOS, PAD, "uint16")
    # EOS ends each document inside the blocks (it is trained on); no BOS is inserted anywhere.
    assert np.flatnonzero(blocks.ravel() == EOS).tolist() == [19, 32]
    assert BOS not in blocks
    eval_blocks, _ = open_blocks(artifact, "eval")
    assert eval_blocks.shape == (0, 10)


def test_blocks_are_memory_mapped(tiny_data_dir, tokenizer_artifact, layout):
    artifact = prepare_dataset(data(tiny_data_dir, cutoff_len=10), tokenizer_artifact, layout)
    blocks, _ = open_blocks(artifact.path, "train")
    assert isinstance(blocks, np.memmap)


def test_exact_fit_drops_nothing(tiny_data_dir, tokenizer_artifact, layout):
    artifact = prepare_dataset(data(tiny_data_dir, cutoff_len=8), tokenizer_artifact, layout)
    assert (artifact.stats["train_blocks"], artifact.stats["dropped_tokens"]) == (6, 0)


def test_several_datasets_are_concatenated_in_order(tiny_data_dir, tokenizer_artifact, tok, layout):
    notes = [line for line in (ASSETS / "notes.txt").read_text().splitlines() if line.strip()]
    expected = stream_of(tok, THREE) + stream_of(tok, notes)
    artifact = prepare_dataset(data(tiny_data_dir, dataset="three, notes", cutoff_len=16), tokenizer_artifact, layout)
    blocks, _ = open_blocks(artifact, "train")
    assert len(expected) == 76
    assert blocks.ravel().tolist() == expected[:64]
    assert counts(artifact.stats, "notes") == {"documents": 3, "tokens": 28, "mean_doc_tokens": 9.3}
    assert artifact.stats["dropped_tokens"] == 12


def test_max_samples_keeps_the_first_documents(tiny_data_dir, tokenizer_artifact, tok, layout):
    artifact = prepare_dataset(data(tiny_data_dir, cutoff_len=11, max_samples=2), tokenizer_artifact, layout)
    assert counts(artifact.stats, "three") == {"documents": 2, "tokens": 33, "mean_doc_tokens": 16.5}
    blocks, _ = open_blocks(artifact, "train")
    assert blocks.ravel().tolist() == stream_of(tok, THREE[:2])


def test_small_batches_pack_the_same_as_one_batch(tiny_data_dir, tokenizer_artifact, layout):
    one = prepare_dataset(data(tiny_data_dir, cutoff_len=10), tokenizer_artifact, layout)
    per_doc = prepare_dataset(data(tiny_data_dir, cutoff_len=10, preprocessing_batch_size=1), tokenizer_artifact,
                              layout)
    # No remainder is dropped per batch, so the blocks cannot depend on the batch size: it is not in the key.
    assert per_doc.hit and per_doc.digest == one.digest


def test_no_packing_truncates_each_document_and_writes_lengths(tiny_data_dir, tokenizer_artifact, tok, layout):
    artifact = prepare_dataset(data(tiny_data_dir, cutoff_len=16, packing=False), tokenizer_artifact, layout)
    assert {"train.npy", "train_lengths.npy", "eval.npy", "eval_lengths.npy"} <= {p.name for p in artifact.dir.iterdir()}
    blocks, lengths = open_blocks(artifact, "train")
    assert lengths.tolist() == [16, 13, 15]
    docs = [tok(t, add_special_tokens=False)["input_ids"] + [EOS] for t in THREE]
    for row, doc, n in zip(blocks.tolist(), docs, lengths):
        assert row[:n] == doc[:n]
        assert row[n:] == [PAD] * (16 - n)
    assert artifact.stats["dropped_tokens"] == 20 - 16
    assert artifact.stats["packing"] is False


def corpus_texts(data_dir) -> list[str]:
    return [json.loads(line)["text"] for line in (data_dir / "corpus.jsonl").read_text().splitlines()]


def split_reference(tok, texts, val_size, cutoff_len=64):
    """(train blocks, eval blocks, held mask) as val_size defines them: documents held out by content hash, each
    split packed on its own."""
    held = held_out(content_hashes(texts), val_size)

    def packed(docs):
        stream = stream_of(tok, docs)
        return np.array(stream[: len(stream) // cutoff_len * cutoff_len]).reshape(-1, cutoff_len)

    return packed([t for t, h in zip(texts, held) if not h]), packed([t for t, h in zip(texts, held) if h]), held


def test_val_size_fraction_holds_out_documents_before_packing(tiny_data_dir, tokenizer_artifact, tok, layout):
    artifact = prepare_dataset(data(tiny_data_dir, "stdlib_docs", cutoff_len=64, val_size=0.1),
                               tokenizer_artifact, layout)
    want_train, want_eval, held = split_reference(tok, corpus_texts(tiny_data_dir), 0.1)
    assert 10 <= held.sum() <= 30  # about a tenth of the 200 documents
    np.testing.assert_array_equal(open_blocks(artifact, "train")[0], want_train)
    np.testing.assert_array_equal(open_blocks(artifact, "eval")[0], want_eval)
    assert artifact.stats["sources"]["stdlib_docs (eval)"]["documents"] == held.sum()
    assert artifact.stats["sources"]["stdlib_docs"]["documents"] == 200 - held.sum()


def test_val_size_count_holds_out_that_many_documents(tiny_data_dir, tokenizer_artifact, tok, layout):
    artifact = prepare_dataset(data(tiny_data_dir, "stdlib_docs", cutoff_len=64, val_size=12),
                               tokenizer_artifact, layout)
    want_train, want_eval, held = split_reference(tok, corpus_texts(tiny_data_dir), 12)
    assert held.sum() == 12 == artifact.stats["sources"]["stdlib_docs (eval)"]["documents"]
    np.testing.assert_array_equal(open_blocks(artifact, "eval")[0], want_eval)
    np.testing.assert_array_equal(open_blocks(artifact, "train")[0], want_train)


@pytest.mark.parametrize("val_size, cutoff_len, message", [
    (3, 10, r"data\.val_size: 3 asks for 3 of 3 distinct documents, leaving none to train on"),
    (0.9999999, 10, r"data\.val_size: 0\.9999999 holds out all 3 documents, leaving none to train on"),
    (1, 1024, r"data\.val_size: 1: \d+ tokens make no block of cutoff_len=1024; 1 documents are held out; raise "
            r"data\.val_size"),
])
def test_val_size_too_large_or_too_small(tiny_data_dir, tokenizer_artifact, layout, val_size, cutoff_len, message):
    with pytest.raises(DataError, match=message):
        prepare_dataset(data(tiny_data_dir, "three" if cutoff_len == 10 else "stdlib_docs", cutoff_len=cutoff_len,
                             val_size=val_size), tokenizer_artifact, layout)
    assert [p.name for p in layout.stage_dir("prepare_dataset").iterdir() if not p.name.endswith(".lock")] == []


def test_held_out_documents_depend_on_their_content_alone():
    texts = [f"document number {i}" for i in range(2000)]
    hashes = content_hashes(texts)
    assert 150 <= held_out(hashes, 0.1).sum() <= 250
    grown = content_hashes(texts + [f"new document {i}" for i in range(40)])
    assert held_out(grown, 0.1)[:2000].tolist() == held_out(hashes, 0.1).tolist()
    # A count: the grown corpus's held-out documents that existed before were held out before.
    before, after = held_out(hashes, 100), held_out(grown, 100)[:2000]
    assert before.sum() == 100 and not (after & ~before).any()
    dup = content_hashes(texts[:50] + texts[:50])
    assert held_out(dup, 10)[:50].tolist() == held_out(dup, 10)[50:].tolist()  # copies stay together


@pytest.mark.parametrize("val_size", [0.1, 20])
def test_a_grown_corpus_never_evaluates_on_earlier_training_documents(tmp_path, tokenizer_artifact, val_size):
    """Night 1 trains on 200 documents; night 2's corpus has 2% more (4 documents, inserted at the front, which
    shifts every block): no night-2 eval document or block was trained on by night 1."""
    lines = (QUICKSTART / "data" / "corpus.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)[:200]
    new = [json.dumps({"text": f"A new document {i} about nothing in particular."}) + "\n" for i in range(4)]
    nights = []
    for n, content in enumerate(["".join(lines), "".join(new + lines)]):
        folder = make_data_dir(tmp_path / f"night{n}", {"corpus.jsonl": content})
        nights.append(prepare_dataset(data(folder, "corpus", cutoff_len=64, val_size=val_size), tokenizer_artifact,
                                      Layout(tmp_path / "store")))

    def documents(artifact, split):
        blocks = np.asarray(open_blocks(artifact, split)[0])
        docs, current = set(), []
        for t in blocks.ravel().tolist():
            current.append(t)
            if t == EOS:
                docs.add(tuple(current))
                current = []
        return docs, {row.tobytes() for row in blocks}

    trained_docs, trained_blocks = documents(nights[0], "train")
    eval_docs, eval_blocks = documents(nights[1], "eval")
    assert len(eval_docs) >= 5
    assert not eval_docs & trained_docs
    assert not eval_blocks & trained_blocks


def test_missing_dataset_name_lists_available_ones(tiny_data_dir, tokenizer_artifact, layout):
    with pytest.raises(DataError, match=r"data\.dataset: 'nope' is not in .*dataset_info\.json "
                                        r"\(it has: notes, stdlib_docs, three\)"):
        prepare_dataset(data(tiny_data_dir, "three,nope"), tokenizer_artifact, layout)


def test_every_resolution_problem_is_reported_at_once(tmp_path, tokenizer_artifact, layout):
    root = make_data_dir(tmp_path / "d", {"a.docx": "x"},
                         {"ghost": {"file_name": "ghost.jsonl"}, "docx": {"file_name": "a.docx"}, "bare": {"columns": {}}})
    with pytest.raises(DataError) as info:
        prepare_dataset(data(root, "ghost,docx,bare,nope"), tokenizer_artifact, layout)
    message = str(info.value)
    assert f"data.dataset 'ghost': file {root / 'ghost.jsonl'} does not exist" in message
    assert f"data.dataset 'docx': {root / 'a.docx'} is not a readable type; use .json, .jsonl, .csv, .parquet, " \
           ".txt or .arrow" in message
    assert "entry 'bare' needs file_name" in message
    assert "'nope' is not in" in message


def test_missing_dataset_info(tmp_path, tokenizer_artifact, layout):
    with pytest.raises(DataError, match=r"data\.dataset_dir: .*/nodata has no dataset_info\.json"):
        prepare_dataset(data(tmp_path / "nodata"), tokenizer_artifact, layout)


def test_invalid_dataset_info_json(tmp_path, tokenizer_artifact, layout):
    (tmp_path / "dataset_info.json").write_text('{"a": {"file_name": "a.jsonl"},\n}')
    with pytest.raises(DataError, match=r"dataset_info\.json: invalid JSON at line 2, column 1"):
        prepare_dataset(data(tmp_path, "a"), tokenizer_artifact, layout)


def test_wrong_column_lists_the_columns_found(tmp_path, tokenizer_artifact, layout):
    root = make_data_dir(tmp_path / "d", {"c.jsonl": '{"content": "x", "id": 1}\n'},
                         {"c": {"file_name": "c.jsonl", "columns": {"prompt": "text"}}})
    with pytest.raises(DataError, match=r"c\.jsonl:1: dataset 'c' has no column 'text' \(found: \['content', 'id'\]\); "
                                        r"set columns\.prompt"):
        prepare_dataset(data(root, "c"), tokenizer_artifact, layout)


def test_custom_column_is_read(tmp_path, tokenizer_artifact, tok, layout):
    root = make_data_dir(tmp_path / "d", {"c.jsonl": '{"content": "hello world"}\n' * 4},
                         {"c": {"file_name": "c.jsonl", "columns": {"prompt": "content"}}})
    artifact = prepare_dataset(data(root, "c", cutoff_len=5), tokenizer_artifact, layout)
    assert artifact.stats["sources"]["c"]["documents"] == 4
    assert open_blocks(artifact, "train")[0].ravel().tolist() == stream_of(tok, ["hello world"] * 4)  # 4 x (4 + EOS)


def test_non_string_column(tmp_path, tokenizer_artifact, layout):
    root = make_data_dir(tmp_path / "d", {"c.jsonl": '{"text": 42}\n'})
    with pytest.raises(DataError, match=r"c\.jsonl:1: column 'text' must be a string, got int"):
        prepare_dataset(data(root, "c"), tokenizer_artifact, layout)


def test_a_damaged_token_shard_is_reported_as_damaged_not_resumed(tiny_data_dir, tokenizer_artifact, layout,
                                                                   small_shards):
    first = prepare_dataset(data(tiny_data_dir, "stdlib_docs", cutoff_len=64), tokenizer_artifact, layout)
    total = first.stats["shards_built"]
    shard = sorted(p for p in layout.stage_dir("tokenize").iterdir() if (p / "tokens.npy").is_file())[0]
    (shard / "tokens.npy").write_bytes((shard / "tokens.npy").read_bytes()[:-8])
    shutil.rmtree(first.dir)  # the packed dataset goes too, so its shards are read again
    again = prepare_dataset(data(tiny_data_dir, "stdlib_docs", cutoff_len=64), tokenizer_artifact, layout)
    assert sources_of(again, "stdlib_docs")["cache"] == \
        f"1 damaged shard(s) in the store re-tokenized ({total - 1} of {total} reused): corpus.jsonl"
    assert again.digest == first.digest


def test_malformed_json_line_names_file_and_line(tmp_path, tokenizer_artifact, layout):
    root = make_data_dir(tmp_path / "d", {"bad.jsonl": '{"text": "ok"}\n\n{"text": "broken\n{"text": "ok"}\n'})
    with pytest.raises(DataError, match=r"bad\.jsonl:3: malformed JSON \(Unterminated string starting at column 10\)"):
        prepare_dataset(data(root, "bad", cutoff_len=2), tokenizer_artifact, layout)
    assert [p.name for p in layout.stage_dir("prepare_dataset").iterdir() if not p.name.endswith(".lock")] == []


def test_non_utf8_names_file_and_line(tmp_path, tokenizer_artifact, layout):
    root = make_data_dir(tmp_path / "d", {"latin.txt": "caf\u00e9\n".encode() + "na\u00efve\n".encode("latin-1")})
    with pytest.raises(DataError, match=r"latin\.txt:2: not valid UTF-8 \(byte 0xef\); re-encode the file as UTF-8"):
        prepare_dataset(data(root, "latin", cutoff_len=2), tokenizer_artifact, layout)


def test_utf16_file_is_named_as_utf16(tmp_path, tokenizer_artifact, layout):
    root = make_data_dir(tmp_path / "d", {"wide.txt": "caf\u00e9\nna\u00efve\n".encode("utf-16")})
    with pytest.raises(DataError, match=r"wide\.txt: is UTF-16 text \(byte-order mark 0xfffe\); re-encode it as UTF-8"):
        prepare_dataset(data(root, "wide", cutoff_len=2), tokenizer_artifact, layout)


@pytest.mark.parametrize("make", [os.mkfifo, lambda path: os.symlink("/dev/zero", path)], ids=["fifo", "dev-zero"])
def test_a_fifo_or_device_is_not_a_regular_file(tmp_path, tokenizer_artifact, layout, make):
    root = make_data_dir(tmp_path / "d", {"ok.jsonl": '{"text": "x"}\n'})
    make(root / "odd.jsonl")
    write_dataset_info(root, {"odd": {"file_name": "odd.jsonl"}})
    with pytest.raises(DataError, match=r"data\.dataset 'odd': .*odd\.jsonl is not a regular file \(nor a folder\)"):
        prepare_dataset(data(root, "odd", cutoff_len=2), tokenizer_artifact, layout)


def test_empty_file(tmp_path, tokenizer_artifact, layout):
    root = make_data_dir(tmp_path / "d", {"empty.jsonl": "\n\n"})
    with pytest.raises(DataError, match=r"empty\.jsonl: dataset 'empty' has no documents \(empty file\)"):
        prepare_dataset(data(root, "empty"), tokenizer_artifact, layout)


def test_too_small_for_one_block(tiny_data_dir, tokenizer_artifact, layout):
    with pytest.raises(DataError, match=r"data\.dataset: 48 tokens make no block of cutoff_len=4096; add data or "
                                        r"lower data\.cutoff_len"):
        prepare_dataset(data(tiny_data_dir, cutoff_len=4096), tokenizer_artifact, layout)


def test_json_list_and_folder_of_files(tmp_path, tokenizer_artifact, tok, layout):
    root = tmp_path / "d"
    (root / "shards").mkdir(parents=True)
    (root / "shards" / "b.json").write_text(json.dumps([{"text": THREE[1]}, {"text": THREE[2]}]))
    (root / "shards" / "a.json").write_text(json.dumps([{"text": THREE[0]}]))
    write_dataset_info(root, {"shards": {"file_name": "shards"}})
    artifact = prepare_dataset(data(root, "shards", cutoff_len=8), tokenizer_artifact, layout)
    assert open_blocks(artifact, "train")[0].ravel().tolist() == stream_of(tok, THREE)  # a.json before b.json


def test_second_call_hits(tiny_data_dir, tokenizer_artifact, layout):
    first = prepare_dataset(data(tiny_data_dir, cutoff_len=10), tokenizer_artifact, layout)
    second = prepare_dataset(data(tiny_data_dir, cutoff_len=10), tokenizer_artifact, layout)
    assert (second.hit, second.key, second.digest) == (True, first.key, first.digest)


def test_changing_cutoff_len_misses(tiny_data_dir, tokenizer_artifact, layout):
    prepare_dataset(data(tiny_data_dir, cutoff_len=10), tokenizer_artifact, layout)
    other = prepare_dataset(data(tiny_data_dir, cutoff_len=12), tokenizer_artifact, layout)
    assert not other.hit
    assert other.reason == "changed config.cutoff_len: 10 -> 12"


def test_changing_the_tokenizer_digest_misses(tiny_data_dir, tokenizer_artifact, layout):
    first = prepare_dataset(data(tiny_data_dir, cutoff_len=10), tokenizer_artifact, layout)
    retokenized = dataclasses.replace(tokenizer_artifact, digest="f" * 64)
    other = prepare_dataset(data(tiny_data_dir, cutoff_len=10), retokenized, layout)
    assert not other.hit and other.key != first.key
    assert other.reason.startswith("changed inputs.tokenizer: ")


def test_moved_data_hits_and_edited_data_misses(tiny_data_dir, tokenizer_artifact, layout, tmp_path):
    first = prepare_dataset(data(tiny_data_dir, cutoff_len=10), tokenizer_artifact, layout)
    moved = shutil.copytree(tiny_data_dir, tmp_path / "moved")
    assert prepare_dataset(data(moved, cutoff_len=10), tokenizer_artifact, layout).hit
    with open(moved / "three_docs.jsonl", "a") as f:
        f.write('{"text": "one more document"}\n')
    edited = prepare_dataset(data(moved, cutoff_len=10), tokenizer_artifact, layout)
    assert not edited.hit and edited.key != first.key
    assert edited.reason.startswith("changed inputs.files.three/three_docs.jsonl: ")


def test_seed_is_not_part_of_the_key_of_a_content_split(tiny_data_dir, tokenizer_artifact, layout):
    no_split = prepare_dataset(data(tiny_data_dir, cutoff_len=10), tokenizer_artifact, layout, seed=1)
    assert prepare_dataset(data(tiny_data_dir, cutoff_len=10), tokenizer_artifact, layout, seed=2).key == no_split.key
    split = prepare_dataset(data(tiny_data_dir, "stdlib_docs", cutoff_len=10, val_size=5), tokenizer_artifact,
                            layout, seed=1)
    assert prepare_dataset(data(tiny_data_dir, "stdlib_docs", cutoff_len=10, val_size=5), tokenizer_artifact,
                           layout, seed=2).key == split.key
    mixed = dict(dataset="stdlib_docs,three", cutoff_len=10, mix_strategy="interleave_over",
                 interleave_probs=[0.5, 0.5])
    one = prepare_dataset(data(tiny_data_dir, **mixed), tokenizer_artifact, layout, seed=1)
    other = prepare_dataset(data(tiny_data_dir, **mixed), tokenizer_artifact, layout, seed=2)
    assert other.key != one.key and other.reason == "changed config.seed: 1 -> 2"


# --------------------------------------------------------------------------- LLaMA-Factory's flaws, fixed


def test_eos_is_a_trained_label_and_no_bos_is_written(tiny_data_dir, tokenizer_artifact, layout):
    from ptflow.train.eval_loss import batch_tensors

    artifact = prepare_dataset(data(tiny_data_dir, cutoff_len=10), tokenizer_artifact, layout)
    blocks, lengths = open_blocks(artifact, "train")
    ids, labels, mask = batch_tensors(blocks, lengths, np.arange(len(blocks)))
    eos_positions = (ids == EOS).nonzero().tolist()
    assert eos_positions == [[1, 9], [3, 2]]  # the ends of documents 1 and 2 (19 = block 1, 32 = block 3)
    assert all(labels[b, p] == EOS for b, p in eos_positions)  # not -100: the model learns to end documents
    assert mask is None and (ids[:, 0] != BOS).all()


def test_no_remainder_is_dropped_per_batch(tmp_path, tokenizer_artifact, tok, layout):
    texts = [f"document {i} has some words" for i in range(25)]
    root = make_data_dir(tmp_path / "d", {"many.jsonl": "".join(json.dumps({"text": t}) + "\n" for t in texts)})
    artifact = prepare_dataset(data(root, "many", cutoff_len=16, preprocessing_batch_size=4), tokenizer_artifact,
                               layout)
    expected = stream_of(tok, texts)
    blocks, _ = open_blocks(artifact, "train")
    assert blocks.ravel().tolist() == expected[: len(expected) // 16 * 16]
    assert artifact.stats["dropped_tokens"] == len(expected) % 16 < 16  # LF would drop up to 15 per batch of 4


# --------------------------------------------------------------------------- doc_mask, eval_dataset, mixing


def test_doc_mask_records_document_starts(tiny_data_dir, tokenizer_artifact, layout):
    from ptflow.data.dataset import open_doc_starts

    artifact = prepare_dataset(data(tiny_data_dir, cutoff_len=10, doc_mask=True), tokenizer_artifact, layout)
    starts = open_doc_starts(artifact, "train")
    # documents end at 19, 32 (then 47): they start at 0, 20 (block 2, offset 0) and 33 (block 3, offset 3)
    assert [starts[i].tolist() for i in range(len(starts))] == [[0], [0], [0], [0, 3]]
    assert open_doc_starts(prepare_dataset(data(tiny_data_dir, cutoff_len=10), tokenizer_artifact, layout),
                           "train") is None


def test_doc_mask_follows_the_val_split(tiny_data_dir, tokenizer_artifact, tok, layout):
    from ptflow.data.dataset import open_doc_starts
    from ptflow.data.packing import doc_starts

    split = prepare_dataset(data(tiny_data_dir, "stdlib_docs", cutoff_len=64, doc_mask=True, val_size=0.1),
                            tokenizer_artifact, layout)
    texts = corpus_texts(tiny_data_dir)
    held = held_out(content_hashes(texts), 0.1)
    for name, want in (("train", False), ("eval", True)):
        ends = np.cumsum([len(stream_of(tok, [t])) for t, h in zip(texts, held) if h == want])
        offsets, starts = doc_starts(ends, int(ends[-1]) // 64, 64)
        mine = open_doc_starts(split, name)
        assert len(mine) == len(offsets) - 1 == split.stats[f"{name}_blocks"]
        assert all(mine[k].tolist() == starts[offsets[k]: offsets[k + 1]].tolist() for k in range(len(mine)))


def test_eval_dataset_packs_its_own_blocks(tiny_data_dir, tokenizer_artifact, tok, layout):
    notes = [line for line in (ASSETS / "notes.txt").read_text().splitlines() if line.strip()]
    artifact = prepare_dataset(data(tiny_data_dir, cutoff_len=8, eval_dataset="notes"), tokenizer_artifact, layout)
    train, _ = open_blocks(artifact, "train")
    held, _ = open_blocks(artifact, "eval")
    assert train.ravel().tolist() == stream_of(tok, THREE)[:48]
    assert held.ravel().tolist() == stream_of(tok, notes)[:24]
    assert (artifact.stats["train_blocks"], artifact.stats["eval_blocks"]) == (6, 3)
    assert artifact.stats["dropped_tokens"] == 0 + 28 - 24
    assert counts(artifact.stats, "notes (eval)")["documents"] == 3


def test_several_eval_datasets_are_concatenated_whatever_the_training_mix(tiny_data_dir, tokenizer_artifact, tok,
                                                                         layout):
    notes = [line for line in (ASSETS / "notes.txt").read_text().splitlines() if line.strip()]
    artifact = prepare_dataset(data(tiny_data_dir, "three,stdlib_docs", cutoff_len=4, eval_dataset="notes,three",
                                    mix_strategy="interleave_under", interleave_probs="0.3,0.7"),
                               tokenizer_artifact, layout)
    expected = stream_of(tok, notes + THREE)
    assert open_blocks(artifact, "eval")[0].ravel().tolist() == expected[: len(expected) // 4 * 4]


def test_interleave_mixes_documents_in_datasets_order(tiny_data_dir, tokenizer_artifact, tok, layout):
    notes = [line for line in (ASSETS / "notes.txt").read_text().splitlines() if line.strip()]
    under = prepare_dataset(data(tiny_data_dir, "three,notes", cutoff_len=2, mix_strategy="interleave_under"),
                            tokenizer_artifact, layout)
    expected = stream_of(tok, [THREE[0], notes[0], THREE[1], notes[1], THREE[2], notes[2]])
    assert open_blocks(under, "train")[0].ravel().tolist() == expected[: len(expected) // 2 * 2]
    probs = prepare_dataset(data(tiny_data_dir, "three,notes", cutoff_len=2, mix_strategy="interleave_over",
                                 interleave_probs="0.5,0.5"), tokenizer_artifact, layout, seed=5)
    assert probs.stats["sources"]["three"]["documents"] >= 3 and probs.stats["sources"]["notes"]["documents"] >= 3
    again = prepare_dataset(data(tiny_data_dir, "three,notes", cutoff_len=2, mix_strategy="interleave_over",
                                 interleave_probs="0.5,0.5"), tokenizer_artifact, layout, seed=6)
    assert again.key != probs.key  # the draw is seeded: the seed is in the key


def test_num_samples_resamples_an_entry(tmp_path, tokenizer_artifact, tok, layout):
    root = make_data_dir(tmp_path / "d", {"three.jsonl": (ASSETS / "three_docs.jsonl").read_text()},
                         {"up": {"file_name": "three.jsonl", "num_samples": 7}})
    artifact = prepare_dataset(data(root, "up", cutoff_len=4), tokenizer_artifact, layout)
    assert counts(artifact.stats, "up")["documents"] == 7
    blocks, _ = open_blocks(artifact, "train")
    assert artifact.stats["train_blocks"] * 4 + artifact.stats["dropped_tokens"] == artifact.stats["sources"]["up"]["tokens"]
    assert blocks.ravel().tolist().count(EOS) >= 6


@pytest.mark.parametrize("kw, message", [
    ({"dataset": "a,b", "interleave_probs": [0.5, 0.3, 0.2], "mix_strategy": "interleave_under"},
     r"data\.interleave_probs has 3 values for 2 datasets \(a, b\); give one probability per dataset"),
    ({"dataset": "a,b", "interleave_probs": "0.5,0.4", "mix_strategy": "interleave_under"},
     r"must be non-negative and sum to 1 \(they sum to 0\.9\)"),
    ({"dataset": "a,b", "interleave_probs": "0.5,0.5"}, r"only used with mix_strategy interleave_under"),
    ({"dataset": "a,b", "interleave_probs": "1,0", "mix_strategy": "interleave_over"}, r"a probability of 0"),
    ({"dataset": "a", "val_size": 0.1, "eval_dataset": "b"}, r"val_size and data\.eval_dataset both"),
    ({"dataset": "a,a"}, r"data\.dataset lists a more than once"),
    ({"dataset": "a", "doc_mask": True, "packing": False}, r"with packing: false every block is one document"),
])
def test_data_section_checks(kw, message):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=message):
        DataSection(dataset_dir="d", **kw)


def test_eval_dataset_must_be_registered(tiny_data_dir, tokenizer_artifact, layout):
    with pytest.raises(DataError, match=r"data\.eval_dataset: 'held' is not in .*\(it has: notes, stdlib_docs, three\)"):
        prepare_dataset(data(tiny_data_dir, eval_dataset="held"), tokenizer_artifact, layout)


# --------------------------------------------------------------------------- the shard cache


@pytest.fixture
def small_shards(monkeypatch):
    from ptflow.data import sources

    monkeypatch.setattr(sources, "MIN_SHARD_BYTES", 8192)  # the 200-document corpus becomes ~16 shards


def sources_of(artifact, name):
    return artifact.stats["sources"][name]


def test_configs_sharing_a_source_share_its_shards(tiny_data_dir, tokenizer_artifact, layout):
    first = prepare_dataset(data(tiny_data_dir, "three", cutoff_len=8), tokenizer_artifact, layout)
    assert (first.stats["shards_built"], first.stats["shards_reused"]) == (1, 0)
    both = prepare_dataset(data(tiny_data_dir, "three,notes", cutoff_len=8), tokenizer_artifact, layout)
    assert not both.hit
    assert sources_of(both, "three")["shards_reused"] == 1
    assert sources_of(both, "three")["cache"] == "reused all 1 shards (same file bytes and tokenizer)"
    assert sources_of(both, "notes")["cache"] == "new file: notes.txt"
    assert (both.stats["shards_built"], both.stats["shards_reused"]) == (1, 1)


def test_a_new_tokenizer_retokenizes_everything(tiny_data_dir, tokenizer_artifact, layout):
    prepare_dataset(data(tiny_data_dir, "three,notes", cutoff_len=8), tokenizer_artifact, layout)
    other = dataclasses.replace(tokenizer_artifact, digest="e" * 64)
    again = prepare_dataset(data(tiny_data_dir, "three,notes", cutoff_len=8), other, layout)
    assert (again.stats["shards_built"], again.stats["shards_reused"]) == (2, 0)
    assert sources_of(again, "three")["cache"] == "tokenizer changed: three_docs.jsonl"


def test_changing_cutoff_len_repacks_without_retokenizing(tiny_data_dir, tokenizer_artifact, layout, small_shards):
    first = prepare_dataset(data(tiny_data_dir, "stdlib_docs", cutoff_len=64), tokenizer_artifact, layout)
    n = first.stats["shards_built"]
    assert n > 3 and first.stats["shards_reused"] == 0
    second = prepare_dataset(data(tiny_data_dir, "stdlib_docs", cutoff_len=32, packing=True, doc_mask=True),
                             tokenizer_artifact, layout)
    assert (second.stats["shards_built"], second.stats["shards_reused"]) == (0, n)
    a, _ = open_blocks(first, "train")
    b, _ = open_blocks(second, "train")
    assert np.array_equal(np.asarray(a).ravel(), np.asarray(b).ravel()[: a.size])


def test_adding_a_file_to_a_folder_tokenizes_only_that_file(tmp_path, tokenizer_artifact, tok, layout):
    root = tmp_path / "d"
    (root / "daily").mkdir(parents=True)
    for day, text in enumerate(THREE):
        (root / "daily" / f"day{day}.jsonl").write_text(json.dumps({"text": text}) + "\n")
    write_dataset_info(root, {"daily": {"file_name": "daily"}})
    first = prepare_dataset(data(root, "daily", cutoff_len=4), tokenizer_artifact, layout)
    assert first.stats["shards_built"] == 3
    (root / "daily" / "day3.jsonl").write_text(json.dumps({"text": "a new day"}) + "\n")
    second = prepare_dataset(data(root, "daily", cutoff_len=4), tokenizer_artifact, layout)
    assert (second.stats["shards_built"], second.stats["shards_reused"]) == (1, 3)
    assert sources_of(second, "daily")["cache"] == "reused: day0.jsonl, day1.jsonl, day2.jsonl; new file: day3.jsonl"
    assert second.reason.startswith("changed inputs.files.daily/day3.jsonl: absent -> ")
    expected = stream_of(tok, [*THREE, "a new day"])
    assert open_blocks(second, "train")[0].ravel().tolist() == expected[: len(expected) // 4 * 4]


def test_an_edited_file_says_so(tmp_path, tokenizer_artifact, layout):
    root = make_data_dir(tmp_path / "d", {"c.jsonl": '{"text": "first version of the text"}\n'})
    prepare_dataset(data(root, "c", cutoff_len=2), tokenizer_artifact, layout)
    (root / "c.jsonl").write_text('{"text": "second version of the text"}\n')
    edited = prepare_dataset(data(root, "c", cutoff_len=2), tokenizer_artifact, layout)
    assert sources_of(edited, "c")["cache"] == "file changed: c.jsonl"


def test_interrupted_preparation_resumes_with_the_unfinished_shards(tiny_data_dir, tokenizer_artifact, layout,
                                                                    small_shards, monkeypatch):
    from ptflow.data import shards

    real, calls = shards.tokenize_shard, []

    def dies_after_three(*args, **kwargs):
        if len(calls) == 3:
            raise KeyboardInterrupt  # the process is killed mid-way
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(shards, "tokenize_shard", dies_after_three)
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset(data(tiny_data_dir, "stdlib_docs", cutoff_len=64), tokenizer_artifact, layout)
    monkeypatch.setattr(shards, "tokenize_shard", real)
    resumed = prepare_dataset(data(tiny_data_dir, "stdlib_docs", cutoff_len=64), tokenizer_artifact, layout)
    total = resumed.stats["shards_built"] + resumed.stats["shards_reused"]
    assert resumed.stats["shards_reused"] == 3 and total > 3
    assert sources_of(resumed, "stdlib_docs")["cache"] == f"resumed (3 of {total} shards were already tokenized): " \
                                                          "corpus.jsonl"
    fresh = prepare_dataset(data(tiny_data_dir, "stdlib_docs", cutoff_len=64), tokenizer_artifact,
                            type(layout)(layout.root.parent / "fresh-store"))
    assert fresh.digest == resumed.digest


def test_a_bad_line_keeps_the_finished_shards(tmp_path, tokenizer_artifact, layout, small_shards):
    lines = [json.dumps({"text": f"line number {i} of the corpus"}) for i in range(60)]
    lines[50] = '{"text": oops}'
    root = make_data_dir(tmp_path / "d", {"c.jsonl": "\n".join(lines) + "\n"})
    with pytest.raises(DataError, match=r"c\.jsonl:51: malformed JSON"):
        prepare_dataset(data(root, "c", cutoff_len=8), tokenizer_artifact, layout)
    lines[50] = json.dumps({"text": "fixed"})
    (root / "c.jsonl").write_text("\n".join(lines) + "\n")
    fixed = prepare_dataset(data(root, "c", cutoff_len=8), tokenizer_artifact, layout)
    assert fixed.stats["shards_built"] >= 1  # the edited file has new bytes: its shards are new keys
    assert [p.name for p in layout.stage_dir("prepare_dataset").iterdir() if not p.name.startswith(".")] == [fixed.key]


def test_max_samples_tokenizes_only_the_shards_it_needs(tiny_data_dir, tokenizer_artifact, layout, small_shards):
    artifact = prepare_dataset(data(tiny_data_dir, "stdlib_docs", cutoff_len=16, max_samples=2), tokenizer_artifact,
                               layout)
    assert counts(artifact.stats, "stdlib_docs")["documents"] == 2
    assert sources_of(artifact, "stdlib_docs")["shards"] == artifact.stats["shards_built"] == 1


def test_worker_processes_give_the_same_blocks(tiny_data_dir, tokenizer_artifact, layout, small_shards, monkeypatch):
    from ptflow.data import shards

    inline = prepare_dataset(data(tiny_data_dir, "stdlib_docs,three", cutoff_len=32), tokenizer_artifact, layout)
    monkeypatch.setattr(shards, "INLINE_BYTES", 0)
    pooled = prepare_dataset(data(tiny_data_dir, "stdlib_docs,three", cutoff_len=32, preprocessing_num_workers=2),
                             tokenizer_artifact, type(layout)(layout.root.parent / "pool-store"))
    assert pooled.stats["shards_built"] == inline.stats["shards_built"] > 2
    assert pooled.digest == inline.digest


def test_truncation_and_padding_in_tokenizer_json_are_not_applied(tmp_path, tiny_data_dir, monkeypatch):
    """A tokenizer.json with truncation.max_length 8 and fixed padding to 16: every path encodes as
    `tokenizer(texts, add_special_tokens=False)` does -- whole documents, no [PAD] -- inline and in workers."""
    from tiny_assets import copy_capped_tokenizer

    from ptflow.config.schema import ModelSection
    from ptflow.data import shards
    from ptflow.data.tokenizer import load_tokenizer

    layout = Layout(tmp_path / "store")
    capped = load_tokenizer(ModelSection(model_name_or_path=str(copy_capped_tokenizer(tmp_path / "capped"))), layout)
    rust = json.loads((Path(capped.path) / "tokenizer.json").read_text())
    assert rust["truncation"]["max_length"] == 8 and rust["padding"]["strategy"] == {"Fixed": 16}
    tok = open_tokenizer(capped.path)
    texts = [json.loads(line)["text"] for line in (tiny_data_dir / "corpus.jsonl").read_text().splitlines()]
    expected = stream_of(tok, texts)
    assert max(map(len, tok(texts, add_special_tokens=False)["input_ids"])) > 100  # the reference is not capped
    section = data(tiny_data_dir, "stdlib_docs", cutoff_len=16, eval_dataset="three")
    inline = prepare_dataset(section, capped, layout)
    blocks, _ = open_blocks(inline, "train")
    assert blocks.ravel().tolist() == expected[: blocks.size] and blocks.size == len(expected) // 16 * 16
    eval_blocks, _ = open_blocks(inline, "eval")
    assert eval_blocks.ravel().tolist() == stream_of(tok, THREE)[: eval_blocks.size]
    monkeypatch.setattr(shards, "INLINE_BYTES", 0)
    pooled = prepare_dataset(section.model_copy(update={"preprocessing_num_workers": 2}), capped,
                             Layout(tmp_path / "pool-store"))
    assert pooled.digest == inline.digest


@pytest.mark.parametrize("extra", [{"mix_strategy": "interleave_under", "interleave_probs": [0.5, 0.5]},
                                   {"doc_mask": True, "val_size": 0.2}, {"packing": False, "val_size": 3}])
def test_blocks_do_not_depend_on_how_many_tokens_are_gathered_at_a_time(tiny_data_dir, tokenizer_artifact, layout,
                                                                        small_shards, monkeypatch, extra):
    from ptflow.data import assembly

    config = data(tiny_data_dir, "stdlib_docs,three", cutoff_len=24, **extra)
    whole = prepare_dataset(config, tokenizer_artifact, layout)
    monkeypatch.setattr(assembly, "CHUNK_TOKENS", 7)  # a few documents per gather, blocks spanning many gathers
    chunked = prepare_dataset(config, tokenizer_artifact, type(layout)(layout.root.parent / "chunked-store"))
    assert chunked.stats["shards_built"] > 2
    assert chunked.digest == whole.digest  # every file byte-identical: blocks, lengths, document starts


@pytest.mark.parametrize("extra", [{}, {"mix_strategy": "interleave_under", "interleave_probs": [0.5, 0.5]}])
def test_blocks_do_not_depend_on_how_runs_of_documents_are_copied(tiny_data_dir, tokenizer_artifact, layout,
                                                                  small_shards, monkeypatch, extra):
    from ptflow.data import assembly

    config = data(tiny_data_dir, "stdlib_docs,three", cutoff_len=24, **extra)
    monkeypatch.setattr(assembly, "LONG_RUN", float("inf"))  # every gather: one fancy index over its runs
    indexed = prepare_dataset(config, tokenizer_artifact, layout)
    monkeypatch.setattr(assembly, "LONG_RUN", 0)  # every gather: a slice copy per run
    sliced = prepare_dataset(config, tokenizer_artifact, type(layout)(layout.root.parent / "sliced-store"))
    assert sliced.stats["shards_built"] > 2  # gathers span several shards
    assert sliced.digest == indexed.digest
