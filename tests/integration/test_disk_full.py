"""A real full disk: the store on a small tmpfs (mounted in a private mount namespace, no root needed).

`ptflow run` must stop with exit 2 and one readable StoreError (no traceback) naming the store
entry and saying the disk is full; no partial entry may be left, and once the tmpfs is
enlarged (space freed) the same command must finish, reusing what was stored before.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, cli_env

FAST = ["train.max_steps=12", "train.save_steps=5", "train.eval_steps=6", "train.logging_steps=2",
        "data.cutoff_len=128", "data.val_size=8", "run_name=disk-full"]
SMALL = "6m"  # the tokenizer and the packed data fit, training's checkpoints do not

SCRIPT = """
set -u
mount -t tmpfs -o size={small} tmpfs "$STORE"
"$PY" -m flows.cli run configs/quickstart.yaml {args} >"$OUT/first.out" 2>"$OUT/first.err"; echo $? >"$OUT/first.rc"
"$PY" -c "$LIST" "$STORE" >"$OUT/after-first.json"
mount -o remount,size=256m "$STORE"
"$PY" -m flows.cli run configs/quickstart.yaml {args} >"$OUT/second.out" 2>"$OUT/second.err"; echo $? >"$OUT/second.rc"
"$PY" -c "$LIST" "$STORE" >"$OUT/after-second.json"
"""

LIST = """
import json, sys
from pathlib import Path
from ptflow.store.entries import check_files, read_manifest
cache = Path(sys.argv[1]) / "cache"
out = {}
for stage in sorted(p for p in cache.iterdir() if p.is_dir()) if cache.is_dir() else []:
    rows = out[stage.name] = {}
    for entry in sorted(stage.iterdir()):
        if entry.name.endswith(".lock") or entry.name == "index.json" or entry.is_file():
            continue
        manifest = read_manifest(entry)
        rows[entry.name] = "no manifest" if manifest is None else (check_files(entry, manifest) or "intact")
print(json.dumps(out))
"""


def can_mount_tmpfs(tmp_path: Path) -> bool:
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=1m tmpfs {tmp_path}"],
                           capture_output=True)
    return probe.returncode == 0


def test_full_disk_stops_the_run_cleanly_and_a_rerun_after_freeing_space_finishes(prefect_server, tmp_path):
    if not can_mount_tmpfs(tmp_path):
        pytest.skip("cannot mount a size-limited tmpfs here (unshare -rm with mount is not permitted)")
    store, out = tmp_path / "store", tmp_path / "out"
    store.mkdir()
    out.mkdir()
    env = cli_env(tmp_path, PREFECT_API_URL=prefect_server, STORE=str(store), OUT=str(out), PY=sys.executable,
                  LIST=LIST)
    script = SCRIPT.format(small=SMALL, args=" ".join(FAST))
    done = subprocess.run(["unshare", "-rm", "sh", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    read = lambda name: (out / name).read_text()  # noqa: E731

    first_err = read("first.err")
    assert read("first.rc").strip() == "2", first_err[-3000:]
    assert "Traceback" not in first_err + read("first.out"), first_err[-3000:]
    error = first_err[first_err.index("ptflow: error: "):]
    assert "the disk is full: no space left to write the artifact " in error
    assert f"(store {store})" in error and "point `store:` (or PTFLOW_HOME) at a bigger one" in error
    after_first = json.loads(read("after-first.json"))
    for stage, rows in after_first.items():
        assert not [name for name in rows if name.startswith(".tmp-")], (stage, rows)  # no temp folder left
        assert all(state == "intact" for name, state in rows.items() if not name.endswith(".work")), (stage, rows)
    stored_first = {stage for stage, rows in after_first.items() if any(not n.endswith(".work") for n in rows)}
    assert stored_first == {"load_tokenizer", "tokenize", "prepare_dataset"}  # train ran out of space

    assert read("second.rc").strip() == "0", read("second.err")[-3000:]
    summary = read("second.out")
    for stage in ("load_tokenizer", "prepare_dataset"):
        assert f"  {stage:<17} hit " in summary, summary
    assert "  train             miss " in summary
    after_second = json.loads(read("after-second.json"))
    assert all(state == "intact" for rows in after_second.values() for n, state in rows.items()
               if not n.endswith(".work") and not n.startswith(".")), after_second
