"""The launching process re-logs rank 0's records, so runs trained under torchrun show their progress in Prefect."""

from __future__ import annotations

import json
import logging

from ptflow.train.launch import _relay


def test_rank_records_are_logged_once_each_by_the_launcher_and_a_torn_line_waits(tmp_path, caplog):
    log = tmp_path / "trainer_log.jsonl"
    records = [{"current_steps": s, "total_steps": 3, "loss": 2.0 / s} for s in (1, 2)]
    log.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"current_steps": 3, "tot')
    seen: list[dict] = []
    with caplog.at_level(logging.INFO, logger="ptflow.train"):
        count = _relay(log, 0, seen.append)
        assert _relay(log, count, seen.append) == 2  # nothing new: nothing logged twice
    assert seen == records
    lines = [r.getMessage() for r in caplog.records if r.name == "ptflow.train"]
    assert lines == ["train: step 1/3, loss 2 (rank 0)", "train: step 2/3, loss 1 (rank 0)"]
