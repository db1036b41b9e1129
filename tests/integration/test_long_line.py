"""A 1 GiB line in a data file (.jsonl and .txt): refused with file:line and the limit, in bounded memory.

Each check runs in a fresh process that first validates a normal config (so imports and the
tokenizer are loaded), then `ptflow validate`s the config naming the big file, then prepares
it directly (the tokenize path). Peak RSS (ru_maxrss) may grow by far less than the line.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from tiny_assets import write_dataset_info

ROOT = Path(__file__).resolve().parents[2]
LINE_BYTES = 1 << 30
MAX_GROWTH = 200 << 20  # the default 64 MiB limit, decoding, and slack; the line is 1024 MiB

PROBE = r"""
import contextlib, io, json, resource, sys
from flows.cli import main
from ptflow.config.loading import load_config
from ptflow.data.dataset import prepare_dataset
from ptflow.errors import DataError
from ptflow.store.layout import Layout
from ptflow.data.tokenizer import load_tokenizer

def peak():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

ok, big = sys.argv[1], sys.argv[2]
assert main(["validate", ok]) == 0
cfg = load_config(ok)
tokenizer = load_tokenizer(cfg.model, Layout(cfg.store))
prepare_dataset(cfg.data, tokenizer, Layout(cfg.store), cfg.seed)  # warm: the whole normal path once
before = peak()
err = io.StringIO()
with contextlib.redirect_stderr(err):
    code = main(["validate", big])
after_validate = peak()
cfg = load_config(big)
try:
    prepare_dataset(cfg.data, tokenizer, Layout(cfg.store), cfg.seed)
    prepare_error = None
except DataError as exc:
    prepare_error = str(exc)
print(json.dumps({"code": code, "stderr": err.getvalue(), "prepare_error": prepare_error, "before": before,
                  "after_validate": after_validate, "after_prepare": peak()}))
"""


def write_long_line(path: Path, suffix: str) -> None:
    head, tail = (b'{"text": "', b'"}\n') if suffix == "jsonl" else (b"", b"\n")
    block = b"x" * (1 << 20)
    with open(path, "wb") as f:
        f.write(b'{"text": "a short first document"}\n' if suffix == "jsonl" else b"a short first document\n")
        f.write(head)
        for _ in range(LINE_BYTES // len(block)):
            f.write(block)
        f.write(tail)


@pytest.mark.parametrize("suffix", ["jsonl", "txt"])
def test_one_gigabyte_line_fails_clearly_in_bounded_memory(suffix, tmp_path, tiny_model_dir, tiny_data_dir):
    data = tmp_path / "data"
    data.mkdir()
    write_long_line(data / f"huge.{suffix}", suffix)
    (data / "corpus.jsonl").write_text((tiny_data_dir / "corpus.jsonl").read_text())
    write_dataset_info(data, {"huge": {"file_name": f"huge.{suffix}"}, "corpus": {"file_name": "corpus.jsonl"}})
    configs = {}
    for name, dataset in (("ok", "corpus"), ("big", "huge")):
        configs[name] = tmp_path / f"{name}.yaml"
        configs[name].write_text(yaml.safe_dump({
            "run_name": "long-line", "store": str(tmp_path / "store"),
            "model": {"model_name_or_path": str(tiny_model_dir), "train_from_scratch": True},
            "data": {"dataset": dataset, "dataset_dir": str(data), "cutoff_len": 64}}))
    probe = subprocess.run([sys.executable, "-c", PROBE, str(configs["ok"]), str(configs["big"])], cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
    assert probe.returncode == 0, probe.stderr[-3000:]
    result = json.loads(probe.stdout.strip().splitlines()[-1])
    message = rf"huge\.{suffix}:2: line is longer than 67,108,864 bytes \(64 MiB\)"
    assert result["code"] == 2 and "Traceback" not in result["stderr"]
    assert result["stderr"].startswith("ptflow: error: ")
    assert re.search(message, result["stderr"]), result["stderr"]
    assert re.search(message, result["prepare_error"] or ""), result["prepare_error"]
    growth = result["after_prepare"] - result["before"]
    print(f"{suffix}: peak RSS before {result['before'] >> 20} MiB, after validate {result['after_validate'] >> 20} "
          f"MiB, after prepare {result['after_prepare'] >> 20} MiB (growth {growth >> 20} MiB for a "
          f"{LINE_BYTES >> 20} MiB line)")
    assert growth < MAX_GROWTH
