"""Packing and document boundaries on hand-made streams."""

from __future__ import annotations

import numpy as np

from ptflow.data.packing import (
    DocStarts,
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
