"""Multi-process training: the train stage re-runs itself under torchrun (DDP or FSDP), one process per device.

The parent (the Prefect task, or a plain call) writes a JSON spec, starts
`torchrun --standalone --nproc_per_node N -m ptflow.train.rank SPEC` (`distributed.Ranks` picks
the ranks up from torchrun's environment, with NCCL on GPUs and gloo on CPUs), relays rank 0's new
trainer_log.jsonl records to its `on_log` callback while the ranks train, and re-raises a
rank's ptflow error with its own type and message. Every rank runs `run_training` on the
same work folder; only rank 0 writes logs, checkpoints and the final model.

    python -m ptflow.train.rank SPEC.json     # what each rank runs (not meant to be called by hand)
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from ptflow import child, errors
from ptflow.errors import PtflowError, TrainingError
from ptflow.train.metrics import fmt

log = logging.getLogger("ptflow.train")

SPEC, STATS, ERROR = ".launch-spec.json", ".launch-stats.json", ".launch-error.json"
RANK_LOG = ".launch-rank0-log.jsonl"  # rank 0's progress lines (model built, resumed, checkpoint saved), relayed


def device_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 1


def resolve_num_processes(requested: int | None, use_cpu: bool = False) -> int:
    """train.num_processes, or one per visible GPU; one process when train.use_cpu trains on the CPU."""
    return requested if requested else 1 if use_cpu else device_count()


def launch_training(folder: Path, spec: dict, num_processes: int, on_log: Callable[[dict], None] | None) -> dict:
    """Run `run_training` on `num_processes` ranks and return rank 0's stats."""
    spec_path = folder / SPEC
    spec_path.write_text(json.dumps(spec))
    log_path, relayed, lines = folder / "trainer_log.jsonl", 0, 0
    (folder / RANK_LOG).unlink(missing_ok=True)
    # Its own process group, ended as a whole (ranks included) when this stops or dies: see ptflow/child.py.
    process = child.start("torch.distributed.run", "--standalone", "--nproc_per_node", str(num_processes),
                          "-m", "ptflow.train.rank", str(spec_path), env={**os.environ, "PTFLOW_LAUNCHED": "1"})
    try:
        while process.poll() is None:
            time.sleep(1.0)
            lines = _relay_lines(folder / RANK_LOG, lines)
            relayed = _relay(log_path, relayed, on_log)
    finally:
        child.end_group(process)
    _relay_lines(folder / RANK_LOG, lines)
    _relay(log_path, relayed, on_log)
    try:
        if process.returncode != 0:
            raise _rank_error(folder, process.returncode)
        return json.loads((folder / STATS).read_text())
    finally:
        for name in (SPEC, STATS, ERROR, RANK_LOG):
            (folder / name).unlink(missing_ok=True)


def _new_json_lines(path: Path, already: int) -> tuple[list[dict], int]:
    """The JSON lines rank 0 has completed in `path` after the first `already`, and the new count (a line still
    being written waits for the next call)."""
    if not path.exists():
        return [], already
    text = path.read_text()
    lines = text.splitlines()
    complete = lines if text.endswith("\n") else lines[:-1]
    return [json.loads(line) for line in complete[already:]], max(already, len(complete))


def _relay(log_path: Path, already: int, on_log: Callable[[dict], None] | None) -> int:
    """Log rank 0's trainer_log.jsonl records written since the last call, here in the launching process (the one
    Prefect watches, so the lines reach the run's logs and the UI), and pass them to `on_log`; returns the count."""
    records, count = _new_json_lines(log_path, already)
    for record in records:
        log.info("train: %s (rank 0)", fmt(record))
        if on_log is not None:
            on_log(record)
    return count


def _relay_lines(path: Path, already: int) -> int:
    """Re-log rank 0's log lines written since the last call under their own logger names, here in the process
    Prefect watches (a rank's own logging reaches only torchrun's stderr); returns the count."""
    entries, count = _new_json_lines(path, already)
    for entry in entries:
        logging.getLogger(entry["name"]).log(entry["level"], "%s (rank 0)", entry["message"])
    return count


class RankLogFormatter(logging.Formatter):
    """One JSON line per record: what `_relay_lines` reads back in the launching process."""

    def format(self, record: logging.LogRecord) -> str:
        return json.dumps({"name": record.name, "level": record.levelno, "message": record.getMessage()})


def _rank_error(folder: Path, returncode: int) -> PtflowError:
    try:
        info = json.loads((folder / ERROR).read_text())
    except (OSError, ValueError):
        return TrainingError(f"train: torchrun exited with code {returncode}; the ranks' output above "
                             "says why")
    cls = getattr(errors, info["type"], TrainingError)
    return cls(info["message"]) if issubclass(cls, PtflowError) and cls is not errors.ConfigError else \
        TrainingError(info["message"])


def spec_for(folder: Path, model, train, tokenizer, dataset, seed: int, fingerprint: dict) -> dict:
    return {"folder": str(folder), "model": model.model_dump(mode="json"), "train": train.model_dump(mode="json"),
            "tokenizer": asdict(tokenizer), "dataset": asdict(dataset), "seed": seed, "fingerprint": fingerprint}
