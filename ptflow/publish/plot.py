"""Stage `plot_loss`: training_loss.png and training_eval_loss.png from trainer_log.jsonl.

File names are LLaMA-Factory's. Each plot shows the raw curve and an exponentially smoothed
one (the smoothing weight grows with the number of points, so short runs stay readable).
Also `training_lr.png` and `training_throughput.png`. A missing metric logs a warning and
skips that plot instead of failing the run.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from ptflow.store.entries import Artifact, build_or_reuse, sha256_file
from ptflow.store.layout import Layout
from ptflow.store.stage import Stage

log = logging.getLogger("ptflow.plot")

PLOTS = {"loss": "training_loss.png", "eval_loss": "training_eval_loss.png",
         "lr": "training_lr.png", "tokens_per_s_per_device": "training_throughput.png"}


def smooth(values: list[float]) -> list[float]:
    """EMA whose weight approaches 0.9 for long curves (1.8 / (1 + e^(-0.05 n)) - 0.9)."""
    if not values:
        return []
    weight = 1.8 * (1 / (1 + math.exp(-0.05 * len(values))) - 0.5)
    out, last = [], values[0]
    for v in values:
        last = last * weight + (1 - weight) * v
        out.append(last)
    return out


def read_log(path: Path) -> list[dict]:
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            log.warning("plot_loss: skipping unreadable line in %s", path)
    return records


def components(model: Artifact, layout: Layout) -> dict:
    return {"config": {},
            "inputs": {"trainer_log": sha256_file(model.dir / "trainer_log.jsonl")}}


def plot_loss(model: Artifact, layout: Layout, parts: dict | None = None) -> Artifact:
    """Plot every logged metric that is present; the artifact lists the files written."""

    def build(folder: Path) -> dict:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        records = read_log(model.dir / "trainer_log.jsonl")
        written = []
        for key, name in PLOTS.items():
            points = [(r["current_steps"], r[key]) for r in records if r.get(key) is not None]
            if not points:
                log.warning("plot_loss: no %s in trainer_log.jsonl; %s not written", key, name)
                continue
            steps, values = zip(*points)
            fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
            ax.plot(steps, values, color="#1f77b4", alpha=0.4, label="original", marker="o" if len(steps) < 20 else None)
            ax.plot(steps, smooth(list(values)), color="#1f77b4", label="smoothed")
            ax.set_title(f"{key} of {model.stats.get('finetuning_type', 'full')} training")
            ax.set_xlabel("step")
            ax.set_ylabel(key)
            ax.legend()
            fig.tight_layout()
            fig.savefig(folder / name, format="png")
            plt.close(fig)
            written.append(name)
        return {"plots": written}

    return build_or_reuse(layout, STAGE.name, parts or STAGE.key_parts(model, layout), build)


STAGE = Stage("plot_loss", version=1, components=components, build=plot_loss)
