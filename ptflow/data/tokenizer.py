"""Stage `load_tokenizer`: resolve the model's tokenizer, fix missing EOS/pad, save it as an artifact.

The key is the content of the tokenizer files (not where they live), so moving a model
folder keeps the cache, and editing its tokenizer.json invalidates everything downstream.

    from ptflow.data.tokenizer import load_tokenizer
    artifact = load_tokenizer(cfg.model, Layout.resolve())
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from ptflow.errors import ModelError
from ptflow.store.entries import Artifact, build_or_reuse, sha256_file
from ptflow.store.layout import Layout
from ptflow.store.stage import Stage

if TYPE_CHECKING:  # only annotations: open_tokenizer works without pydantic (bench/prepare_bench.py)
    from ptflow.config.schema import ModelSection

log = logging.getLogger("ptflow.tokenizer")

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model", "chat_template.jinja",
)
HUB_PATTERNS = ["*.json", "*.txt", "*.model", "*.jinja", "*.safetensors"]


def resolve_model_dir(section: ModelSection, *, weights: bool = False) -> Path:
    """A local folder for `model_name_or_path`: the folder itself, or its snapshot in the HF cache.

    Hub ids go through `huggingface_hub.snapshot_download`, which honours HF_HUB_OFFLINE=1
    and then only reads the local cache.
    """
    name = section.model_name_or_path
    local = Path(name).expanduser()
    if local.is_dir():
        return local.resolve()
    if local.is_absolute() or name.startswith((".", "~")) or name.count("/") > 1:
        raise ModelError(f"model.model_name_or_path: {name!r} is not a directory "
                         f"(relative paths are resolved from {Path.cwd()}). Give a folder with config.json "
                         "and tokenizer files, or a Hub repo id like org/name.")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    patterns = HUB_PATTERNS if weights else [p for p in HUB_PATTERNS if p != "*.safetensors"]
    try:
        path = snapshot_download(name, revision=section.model_revision, allow_patterns=patterns,
                                 token=os.environ.get("HF_TOKEN"))
    except LocalEntryNotFoundError:
        raise ModelError(f"model.model_name_or_path: {name!r} (revision {section.model_revision!r}) is not a local "
                         "directory and is not in the Hugging Face cache while offline. Download it first "
                         "(huggingface-cli download) or point to a local folder.") from None
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise ModelError(f"model.model_name_or_path: cannot fetch {name!r} from the Hub: {type(exc).__name__}") from None
    return Path(path)


def tokenizer_source_files(model_dir: Path) -> list[Path]:
    files = [model_dir / f for f in TOKENIZER_FILES if (model_dir / f).is_file()]
    if not files:
        raise ModelError(f"model.model_name_or_path: {model_dir} has no tokenizer files "
                         f"(looked for {', '.join(TOKENIZER_FILES[:3])}, ...). Save the tokenizer there with "
                         "tokenizer.save_pretrained(dir).")
    return files


def components(section: ModelSection, layout: Layout) -> dict:
    model_dir = resolve_model_dir(section)
    inputs = {f.name: sha256_file(f) for f in tokenizer_source_files(model_dir)}
    return {"config": section.tokenizer_fields(), "inputs": inputs}


def load_tokenizer(section: ModelSection, layout: Layout, parts: dict | None = None) -> Artifact:
    """Save the (fixed) tokenizer into the store and return its artifact."""
    model_dir = resolve_model_dir(section)

    def build(folder: Path) -> dict:
        tokenizer = open_tokenizer(model_dir, section.use_fast_tokenizer, section.trust_remote_code)
        fixes = fix_special_tokens(tokenizer)
        tokenizer.save_pretrained(folder)
        return {"vocab_size": len(tokenizer), "eos_token": tokenizer.eos_token, "eos_token_id": tokenizer.eos_token_id,
                "pad_token": tokenizer.pad_token, "bos_token": tokenizer.bos_token, "fixes": fixes,
                "source": section.model_name_or_path}

    return build_or_reuse(layout, STAGE.name, parts or STAGE.key_parts(section, layout), build)


STAGE = Stage("load_tokenizer", version=1, components=components, build=load_tokenizer,
              libraries=("transformers", "tokenizers"))


def open_tokenizer(path: str | Path, use_fast: bool = True, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), use_fast=use_fast, trust_remote_code=trust_remote_code)
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise ModelError(f"{path}: the tokenizer needs custom code; set model.trust_remote_code: true "
                             "only if you trust this repository") from None
        raise ModelError(f"{path}: cannot load the tokenizer: {exc}") from None
    except OSError as exc:
        raise ModelError(f"{path}: cannot load the tokenizer: {exc}") from None


def fix_special_tokens(tokenizer) -> list[str]:
    """Give the tokenizer an EOS and a pad token when it lacks them, as LLaMA-Factory does."""
    fixes = []
    if tokenizer.eos_token_id is None:
        tokenizer.add_special_tokens({"eos_token": "<|endoftext|>"})
        fixes.append("added eos_token <|endoftext|>")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
        fixes.append(f"pad_token set to eos_token {tokenizer.eos_token}")
    for fix in fixes:
        log.info("tokenizer: %s", fix)
    return fixes
