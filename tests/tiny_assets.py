"""Tiny test assets shared by the unit tests: a 2-layer Llama config, the quickstart tokenizer, dataset_info.

Paths come from this file's location, never from the current directory. Imported by
conftest.py (fixtures) and by tests that need the helpers directly (`from tiny_assets import ...`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "quickstart"
ASSETS = Path(__file__).resolve().parent / "assets"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
CORPUS_LINES = 200

TINY_LLAMA = dict(vocab_size=4096, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, max_position_embeddings=128, tie_word_embeddings=True, bos_token_id=0,
                  eos_token_id=1, pad_token_id=2, use_cache=False)


def tiny_llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(**TINY_LLAMA)


def copy_tokenizer(dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        shutil.copy(QUICKSTART / "model" / name, dst / name)
    return dst


def copy_capped_tokenizer(dst: Path, max_length: int = 8, pad_to: int = 16) -> Path:
    """The quickstart tokenizer re-saved by the `tokenizers` library with `truncation.max_length` and fixed
    padding in tokenizer.json, as BERT-family and sentence-transformers files ship them."""
    from tokenizers import Tokenizer

    copy_tokenizer(dst)
    rust = Tokenizer.from_file(str(dst / "tokenizer.json"))
    rust.enable_truncation(max_length)
    rust.enable_padding(length=pad_to, pad_id=2, pad_token="<pad>")
    rust.save(str(dst / "tokenizer.json"))
    return dst


def write_dataset_info(data_dir: Path, entries: dict[str, dict]) -> Path:
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "dataset_info.json").write_text(json.dumps(entries, indent=2))
    return data_dir


class Interrupted(KeyboardInterrupt):
    """What `stop_at` raises: a KeyboardInterrupt (as Ctrl-C would be) that no other code raises, so
    `pytest.raises(Interrupted)` proves the run stopped where the test said."""


def stop_at(step: int):
    """An on_log callback for `train` that interrupts training once `step` is logged, as a kill would."""
    def on_log(record: dict) -> None:
        if record.get("current_steps") == step:
            raise Interrupted(f"killed at step {step}")

    return on_log


def write_repeated_corpus(folder: Path) -> Path:
    """The three test documents repeated 10 times as dataset `rep` (480 tokens: 30 blocks of cutoff_len 16)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "rep.jsonl").write_text((ASSETS / "three_docs.jsonl").read_text() * 10)
    return write_dataset_info(folder, {"rep": {"file_name": "rep.jsonl"}})
