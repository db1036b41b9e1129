"""CPU checks that a valid config fits the model, data and store it names, before any stage runs.

Everything here is cheap (reads config.json, dataset_info.json and each data file's first
record), so a wrong path or column fails in seconds instead of after tokenization or on a
booked GPU. With `output.push_to_hub` it also asks the Hub who the token belongs to and
whether it may write to the target repo (one whoami call), so a bad token fails before
training rather than after it. All problems are collected and raised together as one
`PreflightError`.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from ptflow.config.schema import RunConfig
from ptflow.data.dataset import check_sources, resolve_all
from ptflow.data.tokenizer import (
    fix_special_tokens,
    open_tokenizer,
    resolve_model_dir,
    tokenizer_source_files,
)
from ptflow.errors import PreflightError, PtflowError
from ptflow.publish.hub import check_access
from ptflow.store.layout import Layout
from ptflow.train.model import model_files

_PASSED: set[str] = set()  # configs this process already checked: the CLI checks before Prefect starts, the flow again


def preflight(config: RunConfig, source: str = "config") -> None:
    """Raise PreflightError listing every problem found; a config that passed in this process is not re-checked."""
    token = config.output.hub_token.get_secret_value() if config.output.hub_token else ""
    digest = hashlib.sha256(f"{config.model_dump_json()}\0{token}".encode()).hexdigest()
    if digest in _PASSED:
        return
    _check(config, source)
    _PASSED.add(digest)


def _check(config: RunConfig, source: str) -> None:
    problems = []
    model_dir = None
    try:
        model_dir = resolve_model_dir(config.model, weights=not config.model.train_from_scratch)
        tokenizer_source_files(model_dir)
        if config.train.do_train:
            model_files(model_dir, config.model.train_from_scratch)
    except PtflowError as exc:
        problems.append(str(exc))
    if not config.train.do_train:
        problems += _evaluate_only(config, model_dir)
    model_config = _model_config(model_dir, problems)
    if model_config is not None:
        max_pos = model_config.get("max_position_embeddings")
        if isinstance(max_pos, int) and config.data.cutoff_len > max_pos:
            problems.append(f"data.cutoff_len: {config.data.cutoff_len} is beyond the model's "
                            f"max_position_embeddings {max_pos} ({model_dir / 'config.json'}); lower cutoff_len")
        problems += _vocab_fits(config, model_dir, model_config)
    try:
        check_sources([source for sources in resolve_all(config.data) for source in sources])
    except PtflowError as exc:
        problems.append(str(exc))
    resume = config.train.resume_from_checkpoint
    if isinstance(resume, str) and resume.lower() not in ("auto", "true", "false") and not Path(resume).is_dir():
        problems.append(f"train.resume_from_checkpoint: {resume} is not a directory; give a checkpoint-<step> "
                        "folder, auto, or false")
    layout = Layout.resolve(config.store)
    problems += _writable(layout.root, "store (PTFLOW_HOME or `store:`)")
    out = layout.output_dir(config.output.output_dir, config.run_name)
    if out.exists() and not out.is_dir():
        problems.append(f"output.output_dir: {out} is a file; give a folder path")
    else:
        problems += _writable(out, "output.output_dir")
    problems += _outside_inputs(config, model_dir, layout, out)
    if config.output.push_to_hub and not problems:  # only worth a network call once everything else is right

        problems += check_access(config.output, config.run_name)
    if problems:
        raise PreflightError(source, problems)


def _model_config(model_dir: Path | None, problems: list[str]) -> dict | None:
    """The model's config.json as a dict; a file that is not a JSON object is a problem naming the file."""
    path = model_dir / "config.json" if model_dir is not None else None
    if path is None or not path.is_file():
        return None
    try:
        found = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        problems.append(f"model.model_name_or_path: {path} is not UTF-8 text ({exc.reason}); it must be the "
                        "model's JSON config as transformers saves it")
        return None
    except ValueError as exc:
        problems.append(f"model.model_name_or_path: {path} is not valid JSON ({exc}); restore the model's "
                        "config.json (save_pretrained writes one)")
        return None
    if not isinstance(found, dict):
        problems.append(f"model.model_name_or_path: {path} holds a JSON {type(found).__name__}, not an object of "
                        "model settings; restore the model's config.json")
        return None
    return found


def _evaluate_only(config: RunConfig, model_dir: Path | None) -> list[str]:
    """train.do_train: false evaluates an existing model: it needs weights, held-out data and somewhere to write."""
    problems = []
    if config.model.train_from_scratch:
        problems.append("train.do_train: false with model.train_from_scratch: true would evaluate random weights; "
                        "set train_from_scratch: false and point model.model_name_or_path at a trained model")
    if not config.eval.do_eval:
        problems.append("train.do_train: false with eval.do_eval: false leaves nothing to do; set eval.do_eval: true")
    if not config.data.val_size and not getattr(config.data, "eval_dataset", None):
        problems.append("train.do_train: false evaluates on held-out blocks: set data.val_size (e.g. 0.05)"
                        + (" or data.eval_dataset" if "eval_dataset" in type(config.data).model_fields else ""))
    if config.output.push_to_hub:
        problems.append("output.push_to_hub: an evaluate-only run (train.do_train: false) has no model of its own "
                        "to publish; set push_to_hub: false")
    if model_dir is not None:
        weights = list(model_dir.glob("*.safetensors"))
        if not weights or not ((model_dir / "config.json").is_file() or (model_dir / "adapter_config.json").is_file()):
            problems.append(f"model.model_name_or_path: {model_dir} has no saved model (config.json or "
                            "adapter_config.json, and *.safetensors) to evaluate with train.do_train: false")
    return problems


def _outside_inputs(config: RunConfig, model_dir: Path | None, layout: Layout, out: Path) -> list[str]:
    """ptflow never writes into its inputs: the output folder and the store may not lie inside the model or data
    folder (exporting would replace the model's own files), nor the output folder inside the store's cache."""
    inputs = [("model.model_name_or_path", model_dir), ("data.dataset_dir", Path(config.data.dataset_dir))]
    problems = []
    for key, target in (("output.output_dir", out), ("store", layout.root)):
        target = target.expanduser().resolve()
        for what, folder in inputs:
            folder = folder.expanduser().resolve() if folder is not None else None
            if folder is not None and (target == folder or folder in target.parents):
                problems.append(f"{key}: {target} is inside {what} ({folder}); ptflow never writes into its inputs: "
                                f"choose a {key.split('.')[-1]} outside it")
    cache = layout.root / "cache"
    if out.resolve() == cache or cache in out.resolve().parents:
        problems.append(f"output.output_dir: {out} is inside the store's cache ({cache}), whose entries ptflow "
                        "manages; choose an output_dir outside it")
    return problems


def _vocab_fits(config: RunConfig, model_dir: Path, model_config: dict) -> list[str]:
    """Every token id the tokenizer can emit must have an embedding row (or resize_vocab must be on).

    Counted after the EOS/pad fix `load_tokenizer` applies: a tokenizer without an EOS gets one more token there,
    which the model must also fit (training would otherwise stop at model load, after tokenization)."""
    vocab = model_config.get("vocab_size") or (model_config.get("text_config") or {}).get("vocab_size")
    try:
        tokenizer = open_tokenizer(model_dir, config.model.use_fast_tokenizer, config.model.trust_remote_code)
    except PtflowError as exc:
        return [str(exc)]
    fixes = fix_special_tokens(tokenizer)
    tokens = len(tokenizer)
    if isinstance(vocab, int) and tokens > vocab and not config.model.resize_vocab:
        after = f" after load_tokenizer {' and '.join(fixes)}" if fixes else ""
        return [f"model.model_name_or_path: the tokenizer in {model_dir} has {tokens} tokens{after} but config.json's "
                f"vocab_size is {vocab}; set model.resize_vocab: true or use the model's own tokenizer"]
    return []


def _writable(path: Path, what: str) -> list[str]:
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK):
        return [f"{what}: {path} cannot be created or written (checked {probe})"]
    return []
