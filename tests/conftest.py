"""Shared fixtures: a tiny Llama (2 layers, hidden 32) with the quickstart tokenizer, tiny corpora, a store.

Everything is built once per session under pytest's tmp dir from files in the repository
(found from this file's path, never from the current directory), so tests run offline in
seconds. `make_config(**sections)` gives a validated RunConfig pointing at these assets.
"""

from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path

import pytest
from tiny_assets import (
    ASSETS,
    CORPUS_LINES,
    QUICKSTART,
    copy_tokenizer,
    tiny_llama_config,
    write_dataset_info,
    write_repeated_corpus,
)

# No test may reach the network: make the Hub client cache-only before anything imports it.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """config.json (tiny Llama, no weights: for train_from_scratch) + the quickstart tokenizer."""
    folder = copy_tokenizer(tmp_path_factory.mktemp("tiny-model"))
    tiny_llama_config().save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_weights_dir(tmp_path_factory) -> Path:
    """The same tiny Llama with seeded random weights saved as model.safetensors (for freeze/lora/loading)."""
    import torch
    from transformers import AutoModelForCausalLM

    folder = copy_tokenizer(tmp_path_factory.mktemp("tiny-weights"))
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_llama_config()).save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory) -> Path:
    """Datasets: stdlib_docs (first 200 quickstart docs, jsonl), three (3 short docs, jsonl), notes (.txt)."""
    folder = tmp_path_factory.mktemp("tiny-data")
    with open(QUICKSTART / "data" / "corpus.jsonl", encoding="utf-8") as src:
        lines = [next(src) for _ in range(CORPUS_LINES)]
    (folder / "corpus.jsonl").write_text("".join(lines), encoding="utf-8")
    shutil.copy(ASSETS / "three_docs.jsonl", folder / "three_docs.jsonl")
    shutil.copy(ASSETS / "notes.txt", folder / "notes.txt")
    return write_dataset_info(folder, {
        "stdlib_docs": {"file_name": "corpus.jsonl", "columns": {"prompt": "text"}},
        "three": {"file_name": "three_docs.jsonl"},
        "notes": {"file_name": "notes.txt"},
    })


@pytest.fixture
def layout(tmp_path):
    from ptflow.store.layout import Layout

    return Layout(tmp_path / "store")


def merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


@pytest.fixture(scope="session")
def make_config(tiny_model_dir, tiny_data_dir):
    """make_config(data={"cutoff_len": 64}, train={...}) -> RunConfig on the tiny assets (validated)."""
    from ptflow.config.schema import validate_config

    base = {
        "run_name": "test-run",
        "seed": 42,
        "model": {"model_name_or_path": str(tiny_model_dir), "train_from_scratch": True},
        "data": {"dataset": "stdlib_docs", "dataset_dir": str(tiny_data_dir), "cutoff_len": 64},
        "train": {"per_device_train_batch_size": 4, "max_steps": 4, "logging_steps": 1, "learning_rate": 3e-3},
    }

    def build(**sections):
        return validate_config(merge(base, sections), "test")

    return build


@pytest.fixture(scope="session")
def session_layout(tmp_path_factory):
    """A store shared by session-scoped artifacts (tests that count hits use the per-test `layout`)."""
    from ptflow.store.layout import Layout

    return Layout(tmp_path_factory.mktemp("session-store"))


@pytest.fixture(scope="session")
def tokenizer_artifact(tiny_model_dir, session_layout):
    from ptflow.config.schema import ModelSection
    from ptflow.data.tokenizer import load_tokenizer

    return load_tokenizer(ModelSection(model_name_or_path=str(tiny_model_dir)), session_layout)


@pytest.fixture(scope="session")
def repeated_data_dir(tmp_path_factory) -> Path:
    """Dataset `rep`: the three test documents repeated 10 times, 480 tokens."""
    return write_repeated_corpus(tmp_path_factory.mktemp("repeated"))


@pytest.fixture(scope="session")
def repeated_dataset(repeated_data_dir, tokenizer_artifact, session_layout):
    """`rep` packed to cutoff_len 16: 30 blocks, read-only, shared by the training tests (test_train.py,
    test_launch.py)."""
    from ptflow.config.schema import DataSection
    from ptflow.data.dataset import prepare_dataset

    return prepare_dataset(DataSection(dataset="rep", dataset_dir=str(repeated_data_dir), cutoff_len=16),
                           tokenizer_artifact, session_layout)


@pytest.fixture(scope="session")
def prefect_api():
    """One temporary Prefect API for every test that runs a flow (each server start costs seconds here).

    Tests on it pick their own runs (by id or name), never "the newest run", so sharing it is safe.
    """
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield
