"""A preparation killed mid-way (worker processes and all) resumes with only the unfinished shards."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

from tiny_assets import write_dataset_info

ROOT = Path(__file__).resolve().parents[2]
KILLED_AFTER = 3  # shards

SCRIPT = """
import sys
from ptflow.config.schema import DataSection
from ptflow.data.dataset import prepare_dataset
from ptflow.store.layout import Layout
from ptflow.store.entries import Artifact, files_digest
from pathlib import Path
tok = Path(sys.argv[1])
art = Artifact("load_tokenizer", "t", str(tok), files_digest(tok)[0])
section = DataSection(dataset="big", dataset_dir=sys.argv[2], cutoff_len=64, preprocessing_num_workers=2)
prepare_dataset(section, art, Layout(sys.argv[3]))
"""


def test_killed_preparation_resumes(tmp_path, tiny_model_dir):
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "return", "value", "(x)", "\n", "  ", "def", "class", "42"]
    data = tmp_path / "data"
    data.mkdir()
    with open(data / "big.jsonl", "w") as f:
        for _ in range(12_000):
            f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(rng.randint(50, 400)))}) + "\n")
    write_dataset_info(data, {"big": {"file_name": "big.jsonl"}})
    store = tmp_path / "store"
    shards = store / "cache" / "tokenize"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PTFLOW_KILL_AT": f"tokenize:stored-{KILLED_AFTER}"}
    # The preparing process SIGKILLs itself once it has received its KILLED_AFTER-th shard, however fast the
    # machine; then the rest of its process group (the worker processes, possibly mid-shard) goes the same way.
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, str(tiny_model_dir), str(data), str(store)], env=env,
                            start_new_session=True)
    assert proc.wait(timeout=300) == -signal.SIGKILL, "preparation was not killed at its fault point"
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:  # the workers had already gone with their parent
        pass
    finished = len([p for p in shards.glob("*") if p.is_dir() and not p.name.startswith(".")])

    from ptflow.config.schema import DataSection
    from ptflow.data.dataset import prepare_dataset
    from ptflow.store.entries import Artifact, files_digest
    from ptflow.store.layout import Layout

    tok = Artifact("load_tokenizer", "t", str(tiny_model_dir), files_digest(tiny_model_dir)[0])
    resumed = prepare_dataset(DataSection(dataset="big", dataset_dir=str(data), cutoff_len=64,
                                          preprocessing_num_workers=2), tok, Layout(store))
    total = resumed.stats["shards_reused"] + resumed.stats["shards_built"]
    # at most workers + their queue (2 + 3) shards past the KILLED_AFTER-th can have been handed out
    assert total > KILLED_AFTER + 5
    assert resumed.stats["shards_reused"] == finished >= KILLED_AFTER
    assert resumed.stats["shards_built"] == total - finished >= 1
    assert "resumed" in resumed.stats["sources"]["big"]["cache"]
