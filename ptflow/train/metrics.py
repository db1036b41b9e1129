"""What the loop reports: the log window kept on the device, log records, trainer_log.jsonl and trainer_state.json.

Losses and grad norms stay on the device between log lines (no host sync per step); a log step
reads them once, stops the run on a non-finite value (naming the step) and writes one record
with LLaMA-Factory's LogCallback field names. `TrainLog` owns trainer_log.jsonl: on resume it
keeps the records up to the resumed step, so every step is logged once.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ptflow.errors import TrainingError
from ptflow.train.telemetry import format_seconds, peak_memory_gib

log = logging.getLogger("ptflow.train")

LogCallback = Callable[[dict], None]


class Window:
    """Losses and grad norms of the steps since the last log line, kept on the device (no per-step sync)."""

    def __init__(self, opened: float, first_step: int, started: float | None = None):
        self.opened, self.first_step = opened, first_step
        self.started = started if started is not None else opened
        self.losses: list[torch.Tensor] = []
        self.norms: list[torch.Tensor] = []
        self.wait_s = 0.0
        self.restored = 0  # steps run before a resume: in the loss average, not in this process's timing

    def add(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        self.losses.append(loss)
        self.norms.append(torch.as_tensor(grad_norm, device=loss.device).float())

    def restore(self, losses: list[float], norms: list[float], device: torch.device) -> None:
        """Put back the steps a checkpoint saved before they were logged (save_steps not a multiple of logging_steps)."""
        for loss, norm in zip(losses, norms):
            self.add(torch.tensor(loss, device=device), torch.tensor(norm, device=device))
        self.restored = len(losses)

    def check_finite(self, folder: Path) -> tuple[list[float], list[float]]:
        losses = torch.stack(self.losses).tolist() if self.losses else []
        norms = torch.stack(self.norms).tolist() if self.norms else []
        for i, (loss, norm) in enumerate(zip(losses, norms)):
            if not (math.isfinite(loss) and math.isfinite(norm)):
                raise TrainingError(f"train: loss {loss} / grad norm {norm} is not finite at step {self.first_step + i + 1}; "
                                    "stopped without saving. Lower train.learning_rate or set train.max_grad_norm; "
                                    f"the last good checkpoint is kept in {folder}")
        return losses, norms

    def close(self, done: int, folder: Path) -> dict:
        losses, norms = self.check_finite(folder)
        return {"loss_sum": sum(losses), "steps": len(losses), "grad_norm": norms[-1],
                "elapsed_s": time.perf_counter() - self.opened, "wait_s": self.wait_s,
                "timed_steps": max(len(losses) - self.restored, 1)}


def log_record(step, total, loss, lr, grad_norm, epoch, elapsed, remaining, tps, tokens, token_flops, peak,
                device, wait_share) -> dict:
    return {"current_steps": step, "total_steps": total, "loss": round(loss, 6), "lr": lr,
            "grad_norm": round(grad_norm, 6), "epoch": round(epoch, 4), "percentage": round(100 * step / total, 2),
            "elapsed_time": format_seconds(elapsed), "remaining_time": format_seconds(remaining),
            "throughput": round(tps, 2), "total_tokens": tokens, "tokens_per_s_per_device": round(tps, 1),
            "mfu": round(tps * token_flops / peak, 4) if peak else None,
            "peak_mem_gib": round(peak_memory_gib(device), 3), "data_wait_pct": round(100 * wait_share, 2)}


def fmt(record: dict) -> str:
    keys = ("loss", "eval_loss", "lr", "grad_norm", "tokens_per_s_per_device", "mfu", "peak_mem_gib", "data_wait_pct",
            "remaining_time")
    parts = [f"step {record['current_steps']}/{record['total_steps']}"]
    for key in keys:
        if record.get(key) is not None:
            value = record[key]
            parts.append(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}")
    return ", ".join(parts)


def read_log(path: Path, upto: int) -> list[dict]:
    """Earlier log records up to the resumed step (later ones belong to the lost tail and are dropped)."""
    if not path.exists() or upto == 0:
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a torn last line from a killed run
        if record.get("current_steps", 0) <= upto:
            records.append(record)
    return records


class TrainLog:
    """trainer_log.jsonl and the records behind trainer_state.json; only the main process writes."""

    def __init__(self, folder: Path, start_step: int, main: bool, on_log: LogCallback | None):
        self.path, self.main, self.on_log = folder / "trainer_log.jsonl", main, on_log
        self.history = read_log(self.path, upto=start_step) if main else []
        if main:
            self.path.write_text("".join(json.dumps(r) + "\n" for r in self.history))

    def add(self, record: dict) -> None:
        if not self.main:
            return
        self.history.append(record)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if os.environ.get("PTFLOW_LAUNCHED") != "1":  # under torchrun the launching process relays each record
            log.info("train: %s", fmt(record))
        if self.on_log:
            self.on_log(record)

    def value(self, key: str, last: bool = True):
        """The last (or first) logged value of `key`, or None."""
        records = reversed(self.history) if last else iter(self.history)
        return next((r[key] for r in records if key in r), None)
