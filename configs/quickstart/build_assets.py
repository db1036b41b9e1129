"""Build the offline, deterministic assets for the ptflow CPU quickstart.

The quickstart trains a tiny Llama from scratch on a CPU in a few minutes. It
needs a small text corpus, a tokenizer and a model config, none of which may be
downloaded. This script makes all three from text that every Python install
already has: the docstrings of the standard library's modules, classes and
functions.

What it does:

1. Walks the ``.py`` files under ``sysconfig.get_paths()['stdlib']`` in sorted
   order (skipping ``test``/``tests`` directories, ``idlelib``, ``lib2to3``,
   ``site-packages`` and ``__pycache__``), parses each one with ``ast`` (the
   modules are never imported) and collects ``ast.get_docstring(node,
   clean=True)`` for the module and every class and function, in source order.
   Docstrings shorter than 200 characters are dropped, exact duplicates are
   dropped, and collection stops once about 1.5 MB of text has been gathered.
2. Writes ``data/corpus.jsonl`` (one ``{"text": ...}`` per line) and
   ``data/dataset_info.json`` (LLaMA-Factory's dataset registry format).
3. Trains a byte-level BPE tokenizer (vocab 4096; ``<s>`` = 0, ``</s>`` = 1,
   ``<pad>`` = 2) on the corpus with the ``tokenizers`` library and saves it to
   ``model/`` through ``transformers.PreTrainedTokenizerFast``.
4. Writes ``model/config.json`` for a tiny random-init Llama (config only; the
   weights are created by ``AutoModelForCausalLM.from_config`` at train time).

The output depends only on the Python version (its stdlib text) and the
``tokenizers``/``transformers`` versions. With tokenizers 0.23.3 BPE training
gave byte-identical ``tokenizer.json`` files with 1, 2 and 8 threads (the
trainer breaks count ties by pair order); the script still pins it to one thread
(``RAYON_NUM_THREADS=1``, ``TOKENIZERS_PARALLELISM=false``, unless already set)
as a safeguard, which costs a couple of seconds.

Run from the repository root::

    python configs/quickstart/build_assets.py

Options: ``--out DIR`` (default: this file's directory), ``--max-bytes N``
(default 1_500_000), ``--min-chars N`` (default 200).
"""

from __future__ import annotations

import os

# Must be set before `tokenizers` is imported: the Rust thread pool is created
# on first use and reads these once.
os.environ.setdefault("RAYON_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import ast
import hashlib
import json
import sys
import sysconfig
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent

VOCAB_SIZE = 4096
SPECIAL_TOKENS = ["<s>", "</s>", "<pad>"]  # ids 0, 1, 2 (trainer adds them first, in order)
SKIP_DIRS = {"test", "tests", "idle_test", "idlelib", "lib2to3", "site-packages", "dist-packages", "__pycache__"}
DOC_NODES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def stdlib_files(root: Path) -> list[Path]:
    """All stdlib .py files under ``root`` in sorted (relative POSIX path) order."""
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        for name in filenames:
            if name.endswith(".py"):
                files.append(Path(dirpath) / name)
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def iter_docstrings(tree: ast.AST):
    """Docstrings of the module and every class/function, depth-first in source order."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, DOC_NODES):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                yield doc
        # reversed so that popping from the stack visits children in source order
        stack.extend(reversed(list(ast.iter_child_nodes(node))))


def collect_docstrings(root: Path, max_bytes: int, min_chars: int) -> tuple[list[str], dict]:
    docs: list[str] = []
    seen: set[str] = set()
    total = 0
    stats = {"files_seen": 0, "files_failed": 0, "last_file": None}
    for path in stdlib_files(root):
        if total >= max_bytes:
            break
        stats["files_seen"] += 1
        try:
            source = path.read_bytes()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # SyntaxWarning for odd escapes in old modules
                tree = ast.parse(source, filename=str(path))
        except (SyntaxError, ValueError, UnicodeDecodeError):
            stats["files_failed"] += 1
            continue
        for doc in iter_docstrings(tree):
            doc = doc.strip()
            if len(doc) < min_chars or doc in seen:
                continue
            seen.add(doc)
            docs.append(doc)
            total += len(doc.encode("utf-8"))
            stats["last_file"] = path.relative_to(root).as_posix()
            if total >= max_bytes:
                break
    stats["documents"] = len(docs)
    stats["text_bytes"] = total
    return docs, stats


def write_data(docs: list[str], data_dir: Path) -> Path:
    data_dir.mkdir(parents=True, exist_ok=True)
    corpus = data_dir / "corpus.jsonl"
    with corpus.open("w", encoding="utf-8", newline="\n") as f:
        for doc in docs:
            f.write(json.dumps({"text": doc}, ensure_ascii=False) + "\n")
    info = {"stdlib_docs": {"file_name": "corpus.jsonl", "columns": {"prompt": "text"}}}
    (data_dir / "dataset_info.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return corpus


def train_tokenizer(docs: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())  # byte-level: every byte is in the alphabet, so no <unk>
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    # GPT-2 style: no special tokens are added automatically (the pipeline appends
    # eos itself); trim_offsets=False keeps offsets exact.
    tok.post_processor = processors.ByteLevel(trim_offsets=False, add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer=trainer, length=len(docs))
    return tok


def save_model_assets(tok, model_dir: Path) -> None:
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    model_dir.mkdir(parents=True, exist_ok=True)
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(t) == i, (t, tok.token_to_id(t))
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
    )
    hf_tok.save_pretrained(str(model_dir))

    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=128,
        intermediate_size=352,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
        use_cache=False,
    )
    config.save_pretrained(str(model_dir))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=HERE, help="output directory (default: %(default)s)")
    ap.add_argument("--max-bytes", type=int, default=1_500_000, help="corpus text cap in UTF-8 bytes")
    ap.add_argument("--min-chars", type=int, default=200, help="minimum docstring length")
    args = ap.parse_args(argv)

    root = Path(sysconfig.get_paths()["stdlib"])
    docs, stats = collect_docstrings(root, args.max_bytes, args.min_chars)
    if not docs:
        print(f"no docstrings found under {root}", file=sys.stderr)
        return 1
    corpus = write_data(docs, args.out / "data")
    tok = train_tokenizer(docs)
    save_model_assets(tok, args.out / "model")

    print(f"python {sys.version.split()[0]} stdlib: {root}")
    print(
        f"corpus: {stats['documents']} docstrings, {stats['text_bytes']:,} bytes of text "
        f"from {stats['files_seen']} files (last: {stats['last_file']}, {stats['files_failed']} unparsable)"
    )
    print(f"wrote {corpus} sha256={sha256(corpus)}")
    tj = args.out / "model" / "tokenizer.json"
    print(f"wrote {tj} vocab={tok.get_vocab_size()} sha256={sha256(tj)}")
    print(f"wrote {args.out / 'model' / 'config.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
