"""Continual pretraining: which model a run trains from, and the record of what each run trained.

`<store>/lineage/<run_name>.jsonl` has one line per train artifact a run of that run_name
finished, oldest first: its key and digest, the digest of the dataset it was trained on, and
the lineage model it started from (`parent`, null for the configured `model`).

With `orchestration.continue_from: latest` a run starts from the newest model of the lineage,
unless that model was trained on exactly this run's dataset: then this run is a re-run of that
step and starts from the same parent, so its train key is the same and it is a cache hit (or
resumes the step's checkpoints) instead of training twice on the same data. A new shard in
the corpus changes the dataset digest, so the next scheduled run continues from the newest model.

    start = start_model(cfg, layout, dataset)     # Start(section=ModelSection for train, parent=key or None)
    record(layout, cfg.run_name, model, start, dataset)
"""

from __future__ import annotations

import fcntl
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from ptflow.config.schema import ModelSection, RunConfig
from ptflow.errors import StoreError
from ptflow.store import sync
from ptflow.store.entries import Artifact
from ptflow.store.layout import Layout
from ptflow.store.verdict import locate

log = logging.getLogger("ptflow.lineage")


@dataclass(frozen=True)
class Start:
    """The model section the train stage uses, and the lineage model it continues (None: none)."""

    section: ModelSection
    parent: str | None
    note: str


def read_lineage(layout: Layout, run_name: str) -> list[dict]:
    path = layout.lineage_file(run_name)
    sync.pull_file(layout, path)  # an object store's lineage is the one every machine shares
    return _parse(path)


def _parse(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    entries = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            entries.append(json.loads(line))
        except ValueError:
            raise StoreError(f"{path}:{n}: not a JSON line; fix or delete that line "
                             "(each line records one trained model)") from None
    return entries


def start_model(config: RunConfig, layout: Layout, dataset: Artifact) -> Start:
    """Where this run's training starts, from `orchestration.continue_from` and the lineage."""
    if config.orchestration.continue_from != "latest":
        return start_from_key(config, layout, None)
    entries = read_lineage(layout, config.run_name)
    if not entries:
        return Start(config.model, None, f"first run of lineage {config.run_name!r}: trains from model")
    newest = entries[-1]
    parent = newest["parent"] if newest["dataset"] == dataset.digest else newest["key"]
    return start_from_key(config, layout, parent)


def start_from_key(config: RunConfig, layout: Layout, parent: str | None) -> Start:
    """The same start on any worker: the lineage model `parent` (found in the store by key), else the config's."""
    setting = config.orchestration.continue_from
    if parent is not None:
        model = locate(layout, "train", parent)
        return Start(_from_folder(config.model, model.dir), parent, f"continues from lineage model {parent[:12]}")
    if setting and setting != "latest":
        folder = Path(setting).expanduser()
        if not folder.is_dir():
            raise StoreError(f"orchestration.continue_from: {setting!r} is not a folder; give a saved model folder "
                             "(e.g. a run's output_dir), or latest")
        return Start(_from_folder(config.model, folder.resolve()), None, f"continues from {folder}")
    return Start(config.model, None, "trains from model")


def _from_folder(section: ModelSection, folder: Path) -> ModelSection:
    return section.model_copy(update={"model_name_or_path": str(folder), "train_from_scratch": False})


def record(layout: Layout, run_name: str, model: Artifact, start: Start, dataset: Artifact,
           flow_run: str | None = None) -> bool:
    """Append the trained model to the lineage (not again when the newest entry is this very model)."""
    path = layout.lineage_file(run_name)
    path.parent.mkdir(parents=True, exist_ok=True)
    sync.pull_file(layout, path)
    with open(path, "a+", encoding="utf-8") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        entries = _parse(path)
        if entries and entries[-1]["key"] == model.key:
            return False
        entry = {"key": model.key, "digest": model.digest, "parent": start.parent, "dataset": dataset.digest,
                 "path": Path(model.path).relative_to(layout.root).as_posix(), "flow_run": flow_run,
                 "total_steps": model.stats.get("total_steps"), "final_loss": model.stats.get("final_loss"),
                 "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        handle.write(json.dumps(entry) + "\n")
        handle.flush()
        sync.push_file(layout, path)
    log.info("lineage %s: recorded model %s (%s)", run_name, model.key[:12], start.note)
    return True
