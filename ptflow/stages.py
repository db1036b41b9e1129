"""The registry of pipeline stages, by name: what the Prefect tasks and the flow look stages up in.

Each stage module declares its own `STAGE` (ptflow/store/stage.py); this is the one place that
lists them, in the order run_pt runs them.
"""

from __future__ import annotations

from ptflow.data import dataset, tokenizer
from ptflow.publish import card, evaluate, plot
from ptflow.store.stage import Stage
from ptflow.train import loop

STAGES: dict[str, Stage] = {stage.name: stage for stage in (
    tokenizer.STAGE, dataset.STAGE, loop.STAGE, evaluate.STAGE, plot.STAGE, card.STAGE)}
