"""`ptflow cache list | gc | verify` on a fabricated store: what crashes leave is swept, what runs use is kept."""

from __future__ import annotations

import json
import os
import time

from flows.cli import main
from ptflow.store import gc
from ptflow.store.entries import DigestMemo, build_or_reuse, key_lock
from ptflow.store.layout import Layout
from ptflow.store.outputs import export

STAGE = "demo"
HOUR = 3600


def components(n: int) -> dict:
    return {"stage": STAGE, "code": "c0de", "config": {"n": n}, "inputs": {}}


def build(text: str):
    def write(folder):
        (folder / "data.txt").write_text(text)
        return {}
    return write


def age(path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


def stale_tmp(layout: Layout, key: str = "deadbeef" * 4, hours: float = 2):
    """What a kill -9 mid-write leaves: a temp folder with part of a file."""
    tmp = layout.tmp(STAGE, key)
    tmp.mkdir(parents=True)
    (tmp / "blocks.npy").write_bytes(b"\0" * 100)
    age(tmp, hours * HOUR)
    return tmp


def test_gc_dry_run_lists_a_stale_temp_folder_and_gc_removes_it(tmp_path, capsys):
    layout = Layout(tmp_path / "store")
    kept = build_or_reuse(layout, STAGE, components(1), build("kept"))
    tmp = stale_tmp(layout)
    fresh = stale_tmp(layout, key="cafe" * 8, hours=0)  # a write that may still be running
    assert main(["cache", "gc", "--dry-run", "--store", str(layout.root)]) == 0
    out = capsys.readouterr().out
    assert f"would remove {tmp}  (temp folder left by an interrupted write (120 min old))" in out
    assert str(fresh) not in out and tmp.is_dir()
    assert main(["cache", "gc", "--store", str(layout.root)]) == 0
    assert f"removed {tmp}" in capsys.readouterr().out
    assert not tmp.exists() and fresh.is_dir()
    assert (kept.dir / "data.txt").read_text() == "kept"
    assert build_or_reuse(layout, STAGE, components(1), build("kept")).hit


def test_gc_sweeps_the_json_temp_files_a_kill_left_once_they_are_stale(tmp_path):
    """kill -9 inside write_json_atomic (between the write and the rename) leaves `.<name>.<pid>.tmp`."""
    layout = Layout(tmp_path / "store")
    build_or_reuse(layout, STAGE, components(1), build("kept"))
    memo = DigestMemo(layout).path
    memo.parent.mkdir(parents=True, exist_ok=True)
    left = [memo.with_name(f".{memo.name}.4242.tmp"), layout.stage_index(STAGE).with_name(".index.json.4242.tmp")]
    fresh = layout.stage_dir(STAGE) / ".index.json.4343.tmp"  # a write that may be happening now
    for path in (*left, fresh):
        path.write_text("{")
    for path in left:
        age(path, 2 * HOUR)
    swept = {p: why for p, why in gc.collect(layout, dry_run=True) if not p.name.endswith(".lock")}
    assert swept == {p: "temp file left by an interrupted write (120 min old)" for p in left}
    assert all(p.exists() for p in left)
    assert sorted(p for p, _ in gc.collect(layout) if not p.name.endswith(".lock")) == sorted(left)
    assert not any(p.exists() for p in left) and fresh.exists()
    assert build_or_reuse(layout, STAGE, components(1), build("kept")).hit


def test_gc_keeps_a_temp_folder_whose_key_is_locked(tmp_path):
    layout = Layout(tmp_path / "store")
    key = "ab" * 16
    tmp = stale_tmp(layout, key)
    with key_lock(layout, STAGE, key):  # a long build of that key is still running
        assert gc.collect(layout) == []
    assert tmp.is_dir()
    assert tmp in [p for p, _ in gc.collect(layout)]
    assert not tmp.exists() and list(layout.stage_dir(STAGE).iterdir()) == []  # no lock file left behind either


def test_gc_sweeps_the_token_files_a_killed_streamed_run_left_unless_it_runs_again(tmp_path):
    layout = Layout(tmp_path / "store")
    key = "ab" * 16
    tokens = Layout.node_tokens(layout.work("train", key))
    (tokens / ("f" * 32)).mkdir(parents=True)
    fresh = Layout.node_tokens(layout.work("train", "cd" * 16))
    fresh.mkdir()
    age(tokens, 2 * HOUR)
    with key_lock(layout, "train", key):  # resumed: its ranks may read these files again
        assert gc.collect(layout) == []
    assert dict(gc.collect(layout))[tokens] == "token files of a stopped streamed training run (120 min untouched)"
    assert not tokens.exists() and fresh.is_dir()


def test_gc_removes_finished_keys_work_folders_and_idle_lock_files(tmp_path):
    layout = Layout(tmp_path / "store")
    done = build_or_reuse(layout, STAGE, components(1), build("x"))
    orphan = layout.work(STAGE, done.key)
    (orphan / "checkpoint-4").mkdir(parents=True)
    unfinished = layout.work(STAGE, "f" * 32)  # a crashed build's checkpoints: the next run resumes from them
    unfinished.mkdir()
    removed = dict(gc.collect(layout))
    assert removed == {orphan: "work folder (checkpoints) of a key that has since finished",
                       layout.lock(STAGE, done.key): "lock file"}
    assert unfinished.is_dir() and done.dir.is_dir()


def test_gc_older_than_removes_only_unreferenced_old_entries(tmp_path, capsys):
    layout = Layout(tmp_path / "store")
    used = build_or_reuse(layout, STAGE, components(1), build("used"))
    unused = build_or_reuse(layout, STAGE, components(2), build("unused"))
    recent = build_or_reuse(layout, STAGE, components(3), build("recent"))
    export(used, layout.run_dir("nightly"))  # runs/nightly links used's files
    for entry in (used, unused):
        age(entry.dir, 40 * 24 * HOUR)
    assert main(["cache", "list", "--store", str(layout.root)]) == 0
    listing = capsys.readouterr().out
    assert f"{STAGE:<16} {used.key[:12]}" in listing and "nightly" in listing
    assert "3 entries" in listing
    removed = [p for p, _ in gc.collect(layout, older_than_days=30)]
    assert unused.dir in removed and used.dir not in removed and recent.dir not in removed
    assert not unused.dir.exists() and used.dir.is_dir() and recent.dir.is_dir()


def test_list_names_the_runs_whose_lineage_records_a_train_entry(tmp_path):
    layout = Layout(tmp_path / "store")
    model = build_or_reuse(layout, "train", {"n": 1}, build("weights"))
    layout.lineage_file("weekly").parent.mkdir(parents=True)
    layout.lineage_file("weekly").write_text(json.dumps({"key": model.key, "parent": None, "dataset": "d"}) + "\n")
    [entry] = gc.list_entries(layout)
    assert (entry.stage, entry.key, entry.runs) == ("train", model.key, ["weekly"])
    assert entry.size_bytes == 7 + (model.dir / "manifest.json").stat().st_size  # data.txt ("weights") and the manifest


def restore_mtime_edit(path, data: bytes) -> None:
    st = path.stat()
    path.chmod(0o644)
    path.write_bytes(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_verify_finds_edits_that_keep_size_and_mtime(tmp_path, capsys):
    layout = Layout(tmp_path / "store")
    entry = build_or_reuse(layout, STAGE, components(1), build("abcd"))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("secret")
    memo = DigestMemo(layout)
    before = memo.digest(corpus)
    memo.save()
    restore_mtime_edit(entry.dir / "data.txt", b"abcX")  # a bit flip in a cached file
    restore_mtime_edit(corpus, b"XXXXXX")  # a same-length redaction with the mtime restored
    assert build_or_reuse(layout, STAGE, components(1), build("abcd")).hit  # the fast check trusts both
    assert DigestMemo(layout).digest(corpus) == before

    assert main(["cache", "verify", "--store", str(layout.root)]) == 1
    out = capsys.readouterr().out
    assert f"{STAGE}/{entry.key}: data.txt content changed (sha256 mismatch)" in out
    assert f"input {corpus}: content changed although its size and mtime did not" in out
    assert not entry.dir.exists()  # removed, so the next run rebuilds it
    assert DigestMemo(layout).digest(corpus) != before  # the next run's keys see the new content
    rebuilt = build_or_reuse(layout, STAGE, components(1), build("abcd"))
    assert not rebuilt.hit and (rebuilt.dir / "data.txt").read_text() == "abcd"
    assert main(["cache", "verify", "--store", str(layout.root)]) == 0
