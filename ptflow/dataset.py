"""Stage `prepare_dataset`: read registered corpora, tokenize, pack into blocks, split, store memory-mapped.

Datasets are registered in `<dataset_dir>/dataset_info.json` as in LLaMA-Factory
(`{"name": {"file_name": "corpus.jsonl", "columns": {"prompt": "text"}}}`). Each document
becomes its tokens followed by EOS; documents are concatenated across the whole corpus and
cut into `cutoff_len` blocks. Unlike LLaMA-Factory, nothing but the final partial block is
dropped (it cuts per 1000-document batch), EOS is a trained token (it masks EOS because
pad == EOS), and no BOS is written over a block's first token. The blocks are `train.npy`
and `eval.npy` (shape blocks x cutoff_len), opened with `np.load(mmap_mode="r")`.

Everything that can be checked before tokenization (names, files, columns, JSON syntax) is
checked first, so a typo costs seconds.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ptflow.config import DataSection
from ptflow.errors import DataError
from ptflow.layout import Layout
from ptflow.store import Artifact, DigestMemo, build_or_reuse, code_version

log = logging.getLogger("ptflow.dataset")

STAGE = "prepare_dataset"
FORMATS = {".jsonl": "jsonl", ".json": "json", ".txt": "txt"}


@dataclass(frozen=True)
class Source:
    """One registered dataset resolved to files on disk."""

    name: str
    files: tuple[Path, ...]
    column: str
    format: str


def read_dataset_info(dataset_dir: Path) -> dict:
    info_path = dataset_dir / "dataset_info.json"
    if not info_path.is_file():
        raise DataError(f"data.dataset_dir: {dataset_dir} has no dataset_info.json "
                        f"(relative paths are resolved from {Path.cwd()}). Register each dataset there, e.g. "
                        '{"my_corpus": {"file_name": "corpus.jsonl", "columns": {"prompt": "text"}}}')
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{info_path}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    if not isinstance(info, dict):
        raise DataError(f"{info_path}: expected an object mapping dataset names to entries")
    return info


def resolve_sources(section: DataSection) -> list[Source]:
    """Map dataset names to files, checking every name, file and format; report all problems at once."""
    dataset_dir = Path(section.dataset_dir).expanduser()
    info = read_dataset_info(dataset_dir)
    sources, problems = [], []
    for name in section.dataset:
        entry = info.get(name)
        if entry is None:
            problems.append(f"data.dataset: {name!r} is not in {dataset_dir / 'dataset_info.json'} "
                            f"(it has: {', '.join(sorted(info)) or 'nothing'})")
            continue
        if "file_name" not in entry:
            problems.append(f"{dataset_dir / 'dataset_info.json'}: entry {name!r} needs file_name "
                            "(hub datasets are not supported yet)")
            continue
        path = dataset_dir / entry["file_name"]
        files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
        missing = [f for f in files if not f.is_file()]
        if missing or not files:
            problems.append(f"data.dataset {name!r}: file {path} does not exist")
            continue
        formats = {FORMATS.get(f.suffix.lower()) for f in files}
        if None in formats or len(formats) != 1:
            problems.append(f"data.dataset {name!r}: {path} must be .jsonl, .json or .txt files of one type")
            continue
        columns = entry.get("columns") or {}
        column = columns.get("prompt", "text")
        sources.append(Source(name, tuple(files), column, formats.pop()))
    if problems:
        raise DataError("\n  - ".join(problems))
    return sources


def iter_documents(source: Source) -> Iterator[str]:
    """Texts of one source; malformed lines and missing columns are named by file and line."""
    for file in source.files:
        if source.format == "txt":
            with open(file, "rb") as f:
                for lineno, raw in enumerate(f, 1):
                    text = _decode(raw, file, lineno).rstrip("\n")
                    if text.strip():
                        yield text
        elif source.format == "jsonl":
            with open(file, "rb") as f:
                for lineno, raw in enumerate(f, 1):
                    line = _decode(raw, file, lineno)
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise DataError(f"{file}:{lineno}: malformed JSON ({exc.msg.removesuffix(' at')} at column {exc.colno})") from None
                    yield _column(record, source, file, lineno)
        else:
            try:
                records = json.loads(_decode(file.read_bytes(), file, None))
            except json.JSONDecodeError as exc:
                raise DataError(f"{file}:{exc.lineno}: malformed JSON ({exc.msg.removesuffix(' at')} at column {exc.colno})") from None
            if not isinstance(records, list):
                raise DataError(f"{file}: expected a JSON list of records")
            for i, record in enumerate(records):
                yield _column(record, source, file, f"record {i}")


def _decode(raw: bytes, file: Path, lineno: int | None) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        where = f"{file}:{lineno}" if lineno else f"{file} (byte {exc.start})"
        raise DataError(f"{where}: not valid UTF-8 (byte 0x{raw[exc.start]:02x}); re-encode the file as UTF-8") from None


def _column(record: object, source: Source, file: Path, where: object) -> str:
    if not isinstance(record, dict) or source.column not in record:
        found = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise DataError(f"{file}:{where}: dataset {source.name!r} has no column {source.column!r} (found: {found}); "
                        f"set columns.prompt in dataset_info.json")
    value = record[source.column]
    if not isinstance(value, str):
        raise DataError(f"{file}:{where}: column {source.column!r} must be a string, got {type(value).__name__}")
    return value


def check_sources(sources: list[Source]) -> None:
    """Read the first record of every file so column and syntax errors surface before tokenizing."""
    for source in sources:
        for file in source.files:
            single = Source(source.name, (file,), source.column, source.format)
            if next(iter_documents(single), None) is None:
                raise DataError(f"{file}: dataset {source.name!r} has no documents (empty file)")


def components(section: DataSection, tokenizer: Artifact, layout: Layout, seed: int) -> dict:
    sources = resolve_sources(section)
    memo = DigestMemo(layout)
    files = {f"{s.name}/{f.name}": memo.digest(f) for s in sources for f in s.files}
    memo.save()
    config = section.digest_fields()
    config.pop("dataset_dir")  # content, not location
    if section.val_size:
        config["seed"] = seed
    columns = {s.name: s.column for s in sources}
    return {"stage": STAGE, "code": code_version(__name__), "config": {**config, "columns": columns},
            "inputs": {"tokenizer": tokenizer.digest, "files": files}}


def prepare_dataset(section: DataSection, tokenizer: Artifact, layout: Layout, seed: int = 42) -> Artifact:
    """Tokenize and pack the configured datasets into the store (or reuse an identical earlier result)."""
    sources = resolve_sources(section)
    check_sources(sources)

    def build(folder: Path) -> dict:
        from ptflow.tokenizer import open_tokenizer

        tok = open_tokenizer(tokenizer.path)
        dtype = np.uint16 if len(tok) <= np.iinfo(np.uint16).max + 1 else np.uint32
        per_source, docs = {}, []
        for source in sources:
            streams, n_docs = [], 0
            for ids in _tokenize(source, tok, section.preprocessing_batch_size, section.max_samples):
                streams.append(ids.astype(dtype, copy=False))
                n_docs += 1
            tokens = int(sum(len(s) for s in streams))
            per_source[source.name] = {"documents": n_docs, "tokens": tokens,
                                       "mean_doc_tokens": round(tokens / max(n_docs, 1), 1)}
            log.info("prepare_dataset: %s: %d documents, %d tokens", source.name, n_docs, tokens)
            docs.extend(streams)
        blocks, lengths, dropped = (_pack(docs, section.cutoff_len, dtype) if section.packing
                                    else _truncate(docs, section.cutoff_len, dtype, tok.pad_token_id))
        if len(blocks) == 0:
            total = sum(len(d) for d in docs)
            raise DataError(f"data.dataset: {total} tokens make no block of cutoff_len={section.cutoff_len}; "
                            "add data or lower data.cutoff_len")
        train_idx, eval_idx = split_indices(len(blocks), section.val_size, seed)
        _save(folder, "train", blocks[train_idx], None if lengths is None else lengths[train_idx])
        _save(folder, "eval", blocks[eval_idx], None if lengths is None else lengths[eval_idx])
        stats = {"sources": per_source, "cutoff_len": section.cutoff_len, "packing": section.packing,
                 "train_blocks": int(len(train_idx)), "eval_blocks": int(len(eval_idx)),
                 "train_tokens": int(len(train_idx) * section.cutoff_len),
                 "eval_tokens": int(len(eval_idx) * section.cutoff_len),
                 "dropped_tokens": int(dropped), "dtype": np.dtype(dtype).name,
                 "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
        log.info("prepare_dataset: %d train blocks, %d eval blocks of %d tokens; %d tokens dropped",
                 stats["train_blocks"], stats["eval_blocks"], section.cutoff_len, dropped)
        return stats

    return build_or_reuse(layout, STAGE, components(section, tokenizer, layout, seed), build)


def _tokenize(source: Source, tok, batch_size: int, max_samples: int | None) -> Iterator[np.ndarray]:
    from tqdm.auto import tqdm

    eos = tok.eos_token_id
    batch, seen = [], 0
    progress = tqdm(desc=f"tokenize {source.name}", unit="doc", disable=None, leave=False)
    for text in iter_documents(source):
        if max_samples is not None and seen >= max_samples:
            break
        batch.append(text)
        seen += 1
        if len(batch) == batch_size:
            yield from _encode(tok, batch, eos)
            progress.update(len(batch))
            batch = []
    if batch:
        yield from _encode(tok, batch, eos)
        progress.update(len(batch))
    progress.close()


def _encode(tok, texts: list[str], eos: int) -> Iterator[np.ndarray]:
    for ids in tok(texts, add_special_tokens=False, verbose=False)["input_ids"]:
        yield np.fromiter((*ids, eos), dtype=np.int64, count=len(ids) + 1)


def _pack(docs: list[np.ndarray], cutoff_len: int, dtype) -> tuple[np.ndarray, None, int]:
    stream = np.concatenate(docs) if docs else np.zeros(0, dtype=dtype)
    n_blocks = len(stream) // cutoff_len
    return stream[: n_blocks * cutoff_len].reshape(n_blocks, cutoff_len), None, len(stream) - n_blocks * cutoff_len


def _truncate(docs: list[np.ndarray], cutoff_len: int, dtype, pad_id: int) -> tuple[np.ndarray, np.ndarray, int]:
    blocks = np.full((len(docs), cutoff_len), pad_id, dtype=dtype)
    lengths = np.zeros(len(docs), dtype=np.int32)
    dropped = 0
    for i, doc in enumerate(docs):
        n = min(len(doc), cutoff_len)
        blocks[i, :n] = doc[:n]
        lengths[i] = n
        dropped += len(doc) - n
    return blocks, lengths, dropped


def split_indices(n_blocks: int, val_size: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded random hold-out of `val_size` blocks (a fraction below 1, or a count)."""
    if not val_size:
        return np.arange(n_blocks), np.arange(0)
    n_eval = math.ceil(val_size * n_blocks) if val_size < 1 else int(val_size)
    if n_eval >= n_blocks:
        raise DataError(f"data.val_size: {val_size} asks for {n_eval} of {n_blocks} blocks, leaving none to train on; "
                        "lower val_size or add data")
    order = np.random.default_rng(seed).permutation(n_blocks)
    return np.sort(order[n_eval:]), np.sort(order[:n_eval])


def _save(folder: Path, split: str, blocks: np.ndarray, lengths: np.ndarray | None) -> None:
    np.save(folder / f"{split}.npy", np.ascontiguousarray(blocks))
    if lengths is not None:
        np.save(folder / f"{split}_lengths.npy", lengths)


def open_blocks(artifact: Artifact | str | Path, split: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Memory-mapped blocks of one split (and per-block lengths when packing was off)."""
    folder = Path(artifact.path if isinstance(artifact, Artifact) else artifact)
    blocks = np.load(folder / f"{split}.npy", mmap_mode="r")
    lengths_path = folder / f"{split}_lengths.npy"
    return blocks, (np.load(lengths_path) if lengths_path.exists() else None)
