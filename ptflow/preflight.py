"""CPU checks that a valid config fits the model, data and store it names, before any stage runs.

Everything here is cheap (reads config.json, dataset_info.json and each data file's first
record), so a wrong path or column fails in seconds instead of after tokenization or on a
booked GPU. All problems are collected and raised together as one `PreflightError`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ptflow.config import RunConfig
from ptflow.errors import PreflightError, PtflowError
from ptflow.layout import Layout


def preflight(config: RunConfig, source: str = "config") -> None:
    """Raise PreflightError listing every problem found."""
    from ptflow.dataset import check_sources, resolve_sources
    from ptflow.model import model_files
    from ptflow.tokenizer import resolve_model_dir, tokenizer_source_files

    problems = []
    model_dir = None
    try:
        model_dir = resolve_model_dir(config.model, weights=not config.model.train_from_scratch)
        tokenizer_source_files(model_dir)
        model_files(model_dir, config.model.train_from_scratch)
    except PtflowError as exc:
        problems.append(str(exc))
    if model_dir is not None and (model_dir / "config.json").is_file():
        model_config = json.loads((model_dir / "config.json").read_text())
        max_pos = model_config.get("max_position_embeddings")
        if isinstance(max_pos, int) and config.data.cutoff_len > max_pos:
            problems.append(f"data.cutoff_len: {config.data.cutoff_len} is beyond the model's "
                            f"max_position_embeddings {max_pos} ({model_dir / 'config.json'}); lower cutoff_len")
    try:
        check_sources(resolve_sources(config.data))
    except PtflowError as exc:
        problems.append(str(exc))
    layout = Layout.resolve(config.store)
    problems += _writable(layout.root, "store (PTFLOW_HOME or `store:`)")
    out = layout.output_dir(config.output.output_dir, config.run_name)
    if out.exists() and not out.is_dir():
        problems.append(f"output.output_dir: {out} is a file; give a folder path")
    else:
        problems += _writable(out, "output.output_dir")
    if problems:
        raise PreflightError(source, problems)


def _writable(path: Path, what: str) -> list[str]:
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK):
        return [f"{what}: {path} cannot be created or written (checked {probe})"]
    return []
