"""Packing and document boundaries on hand-made streams."""

from __future__ import annotations

import numpy as np
import pytest

from ptflow.data.packing import (
    BlockFile,
    DocStarts,
    Packer,
    doc_starts,
    pack,
    segments,
    select_rows,
    truncate,
)

EOS = 9
# documents of 3, 5, 1 and 4 tokens (EOS included): ends 3, 8, 9, 13
STREAM = np.array([1, 2, EOS, 3, 4, 5, 6, EOS, EOS, 7, 8, 1, EOS], dtype=np.uint16)
ENDS = np.array([3, 8, 9, 13])


def test_pack_keeps_every_full_block_and_drops_only_the_tail():
    blocks, dropped = pack(STREAM, 4)
    assert blocks.tolist() == [[1, 2, EOS, 3], [4, 5, 6, EOS], [EOS, 7, 8, 1]]
    assert dropped == 1


def test_doc_starts_per_block():
    offsets, starts = doc_starts(ENDS, 3, 4)
    rows = DocStarts(offsets, starts)
    # block 0: doc 0 at 0, doc 1 at 3; block 1: doc 1 continues (0); block 2: doc 2 at 0, doc 3 at 1
    assert [rows[i].tolist() for i in range(len(rows))] == [[0, 3], [0], [0, 1]]


def test_doc_starts_when_a_document_ends_exactly_at_a_block_end():
    offsets, starts = doc_starts(np.array([4, 8, 10]), 2, 4)
    assert [starts[offsets[i]: offsets[i + 1]].tolist() for i in range(2)] == [[0], [0]]


def test_select_rows_follows_the_block_order():
    offsets, starts = doc_starts(ENDS, 3, 4)
    new_offsets, new_starts = select_rows(offsets, starts, np.array([2, 0]))
    assert [new_starts[new_offsets[i]: new_offsets[i + 1]].tolist() for i in range(2)] == [[0, 1], [0, 3]]
    empty_offsets, empty_starts = select_rows(offsets, starts, np.array([], dtype=np.int64))
    assert empty_offsets.tolist() == [0] and len(empty_starts) == 0


def test_segments_restart_positions_at_each_document():
    segment, position = segments(np.array([0, 3]), 6)
    assert segment.tolist() == [0, 0, 0, 1, 1, 1]
    assert position.tolist() == [0, 1, 2, 0, 1, 2]


def test_truncate_pads_and_counts():
    blocks, lengths, dropped, padding = truncate(STREAM, ENDS, 4, pad_id=0)
    assert blocks.tolist() == [[1, 2, EOS, 0], [3, 4, 5, 6], [EOS, 0, 0, 0], [7, 8, 1, EOS]]
    assert lengths.tolist() == [3, 4, 1, 4]
    assert (dropped, padding) == (1, 4)


def test_packer_fed_in_pieces_equals_packing_the_whole_stream():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 12, size=200)
    ends = np.cumsum(lengths)
    stream = rng.integers(3, 500, size=int(ends[-1])).astype(np.uint16)
    whole, dropped = pack(stream, 16)
    offsets, starts = doc_starts(ends, len(whole), 16)
    packer, blocks, rows = Packer(16, np.uint16), [], []
    cuts = np.unique(np.concatenate([[0], rng.choice(ends[:-1], 30, replace=False), [len(stream)]]))
    for a, b in zip(cuts[:-1], cuts[1:]):  # runs of whole documents, as the stored path feeds them
        mine = ends[(ends > a) & (ends <= b)] - a
        got, (o, s), used = packer.feed(stream[a:b], mine)
        assert used == b - a
        blocks.append(got)
        rows += [s[o[i]: o[i + 1]].tolist() for i in range(len(got))]
    assert np.array_equal(np.concatenate(blocks), whole)
    assert rows == [starts[offsets[i]: offsets[i + 1]].tolist() for i in range(len(whole))]
    assert packer.drop() == dropped


def test_packer_limit_stops_at_a_block_boundary_and_resumes_there():
    packer = Packer(4, np.uint16)
    blocks, (offsets, starts), used = packer.feed(STREAM, ENDS, limit=2)
    assert blocks.tolist() == [[1, 2, EOS, 3], [4, 5, 6, EOS]] and used == 8
    assert [starts[offsets[i]: offsets[i + 1]].tolist() for i in range(2)] == [[0, 3], [0]]
    rest, (offsets, starts), used = packer.feed(STREAM[8:], ENDS[2:] - 8, new_doc=False)
    assert rest.tolist() == [[EOS, 7, 8, 1]] and used == 5
    assert starts.tolist() == [0, 1]
    assert packer.drop() == 1


def test_block_file_writes_what_np_save_writes(tmp_path):
    blocks = np.arange(24, dtype=np.uint16).reshape(6, 4)
    out = BlockFile(tmp_path / "rows.npy", 6, 4, np.dtype(np.uint16))
    out.append(blocks[:1])
    out.append(blocks[1:])
    out.close()
    np.save(tmp_path / "whole.npy", blocks)
    assert (tmp_path / "rows.npy").read_bytes() == (tmp_path / "whole.npy").read_bytes()
    short = BlockFile(tmp_path / "short.npy", 6, 4, np.dtype(np.uint16))
    short.append(blocks[:2])
    with pytest.raises(RuntimeError, match="wrote 2 of 6 rows"):
        short.close()
