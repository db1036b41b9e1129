"""A store on object storage, seen from two machines' cache directories (fsspec's in-memory filesystem here;
tests/integration/test_object_store.py runs the same paths against a real S3 API server).

Entries are fetched by key and checked against their manifest, uploaded with the manifest last,
absent while unfinished; checkpoints, lineage and the token index travel too; credentials never
enter the URL.
"""

from __future__ import annotations

import json
import pickle
import uuid
from pathlib import Path

import fsspec
import pytest

from ptflow import faults
from ptflow.errors import StoreError
from ptflow.store.entries import build_or_reuse, lookup, read_manifest
from ptflow.store.layout import MANIFEST, Layout
from ptflow.store.lineage import read_lineage, record
from ptflow.store.remote import MARKER, cache_dir
from ptflow.store.verdict import evict
from ptflow.train import checkpoint as ckpt
from ptflow.train.checkpoint_sync import publish_checkpoints, pull_checkpoints

STAGE = "demo"
COMPONENTS = {"stage": STAGE, "config": {"n": 1}}


@pytest.fixture
def url():
    """A fresh bucket prefix on fsspec's process-wide in-memory filesystem, removed afterwards."""
    url = f"memory://bucket/{uuid.uuid4().hex[:8]}"
    yield url
    fs, path = fsspec.core.url_to_fs(url)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def machine(url: str, cache: Path, monkeypatch) -> Layout:
    """The layout one machine gets for the store `url`, with its own cache directory."""
    monkeypatch.setenv("PTFLOW_CACHE_DIR", str(cache))
    return Layout.resolve(url)


def remote_files(url: str) -> set[str]:
    fs, path = fsspec.core.url_to_fs(url)
    return {name[len(path) + 1:] for name in fs.find(path)}


def write_blocks(folder: Path) -> dict:
    (folder / "blocks.bin").write_bytes(b"\x01" * 1000)
    (folder / "sub").mkdir()
    (folder / "sub" / "stats.json").write_text('{"n": 3}')
    return {"blocks": 3}


def test_urls_with_credentials_are_refused_without_echoing_them(monkeypatch, tmp_path):
    monkeypatch.setenv("PTFLOW_CACHE_DIR", str(tmp_path / "cache"))
    for url in ("s3://AKIAXXXX:s3cr3t@bucket/ptflow", "s3://bucket/ptflow?secret_access_key=s3cr3t"):
        with pytest.raises(StoreError, match="the URL holds credentials") as error:
            Layout.resolve(url)
        assert "s3cr3t" not in str(error.value) and "AKIAXXXX" not in str(error.value)
    with pytest.raises(StoreError, match="no filesystem for nosuchproto:// is installed"):
        Layout.resolve("nosuchproto://bucket/ptflow")
    assert not (tmp_path / "cache").exists()


def test_cache_directory_is_per_store_and_tied_to_its_url(monkeypatch, tmp_path, url):
    monkeypatch.delenv("PTFLOW_CACHE_DIR", raising=False)
    monkeypatch.setenv("PTFLOW_HOME", str(tmp_path / "home"))
    default = cache_dir(url)
    assert default.parent == tmp_path / "home" / "remote" and default != cache_dir(url + "-other")
    layout = machine(url, tmp_path / "a", monkeypatch)
    assert layout.root == tmp_path / "a" and layout.remote.url == url
    assert json.loads((tmp_path / "a" / MARKER).read_text()) == {"url": url}
    assert pickle.loads(pickle.dumps(layout)).remote.url == url  # tokenizer workers and ranks find the bucket
    assert Layout(tmp_path / "a").remote.url == url and Layout(tmp_path / "elsewhere").remote is None
    with pytest.raises(StoreError, match=f"caches the store {url}, not memory://bucket/other"):
        machine("memory://bucket/other", tmp_path / "a", monkeypatch)


def test_entry_built_on_one_machine_is_fetched_verified_and_reused_on_another(monkeypatch, tmp_path, url):
    a = machine(url, tmp_path / "a", monkeypatch)
    built = build_or_reuse(a, STAGE, COMPONENTS, write_blocks)
    assert not built.hit
    rel = f"cache/{STAGE}/{built.key}"
    assert remote_files(url) >= {f"{rel}/blocks.bin", f"{rel}/sub/stats.json", f"{rel}/{MANIFEST}"}

    b = machine(url, tmp_path / "b", monkeypatch)
    calls = []
    again = build_or_reuse(b, STAGE, COMPONENTS, lambda folder: calls.append(folder) or {})
    assert again.hit and calls == [] and again.digest == built.digest
    assert again.dir == tmp_path / "b" / "cache" / STAGE / built.key
    assert (again.dir / "blocks.bin").read_bytes() == b"\x01" * 1000
    manifest = read_manifest(again.dir)
    assert (again.dir / "blocks.bin").stat().st_mtime_ns == manifest["files"]["blocks.bin"]["mtime_ns"]
    for fetched in (again.dir / "blocks.bin", again.dir / "sub" / "stats.json", again.dir / MANIFEST):
        assert not fetched.stat().st_mode & 0o222, fetched  # read-only, as an entry built on this machine


def test_a_remote_entry_without_its_manifest_is_absent_and_rebuilt(monkeypatch, tmp_path, url):
    a = machine(url, tmp_path / "a", monkeypatch)

    def die(name):
        if name == f"{STAGE}:uploading":
            raise KeyboardInterrupt  # stands in for kill -9 between the files and the manifest

    monkeypatch.setattr(faults, "point", die)
    with pytest.raises(KeyboardInterrupt):
        build_or_reuse(a, STAGE, COMPONENTS, write_blocks)
    key = read_manifest(a.artifact(STAGE, next(p.name for p in a.stage_dir(STAGE).iterdir()
                                               if not p.name.startswith("."))))["key"]
    rel = f"cache/{STAGE}/{key}"
    assert f"{rel}/blocks.bin" in remote_files(url) and f"{rel}/{MANIFEST}" not in remote_files(url)

    monkeypatch.undo()
    b = machine(url, tmp_path / "b", monkeypatch)
    assert lookup(b, STAGE, key) == (None, "")
    rebuilt = build_or_reuse(b, STAGE, COMPONENTS, write_blocks)
    assert not rebuilt.hit and f"{rel}/{MANIFEST}" in remote_files(url)
    # the first machine's local entry is a hit there, and its late upload finds the store complete
    assert build_or_reuse(machine(url, tmp_path / "a", monkeypatch), STAGE, COMPONENTS, write_blocks).hit


def test_a_damaged_remote_copy_is_a_miss_and_is_replaced(monkeypatch, tmp_path, url):
    a = machine(url, tmp_path / "a", monkeypatch)
    built = build_or_reuse(a, STAGE, COMPONENTS, write_blocks)
    fs, path = fsspec.core.url_to_fs(url)
    fs.pipe_file(f"{path}/cache/{STAGE}/{built.key}/blocks.bin", b"\x02" * 1000)  # same size, other bytes

    b = machine(url, tmp_path / "b", monkeypatch)
    found, damage = lookup(b, STAGE, built.key)
    assert found is None and "damaged" in damage and "sha256 mismatch" in damage
    assert not (tmp_path / "b" / "cache" / STAGE / built.key).exists()
    rebuilt = build_or_reuse(b, STAGE, COMPONENTS, write_blocks)
    assert not rebuilt.hit and rebuilt.reason.startswith("cached entry is damaged")
    assert fs.cat_file(f"{path}/cache/{STAGE}/{built.key}/blocks.bin") == b"\x01" * 1000
    assert lookup(machine(url, tmp_path / "c", monkeypatch), STAGE, built.key)[0] is not None


def test_forcing_a_stage_removes_the_remote_copy_too(monkeypatch, tmp_path, url):
    a = machine(url, tmp_path / "a", monkeypatch)
    built = build_or_reuse(a, STAGE, COMPONENTS, write_blocks)
    assert evict(a, STAGE, built.key)
    assert not any(name.startswith(f"cache/{STAGE}/{built.key}") for name in remote_files(url))
    assert lookup(machine(url, tmp_path / "b", monkeypatch), STAGE, built.key) == (None, "")


def test_lineage_recorded_on_one_machine_is_read_on_another(monkeypatch, tmp_path, url, make_config):
    from ptflow.store.entries import Artifact
    from ptflow.store.lineage import Start

    a = machine(url, tmp_path / "a", monkeypatch)
    model = build_or_reuse(a, "train", {"stage": "train"}, write_blocks)
    dataset = Artifact("prepare_dataset", "d" * 32, str(tmp_path), "dd")
    cfg = make_config()
    assert record(a, "nightly", model, Start(cfg.model, None, "first"), dataset)
    b = machine(url, tmp_path / "b", monkeypatch)
    entries = read_lineage(b, "nightly")
    assert [e["key"] for e in entries] == [model.key] and entries[0]["path"] == f"cache/train/{model.key}"


def fake_checkpoint(work: Path, step: int) -> Path:
    folder = work / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    for name in (ckpt.WEIGHTS, "optimizer.pt", "scheduler.pt", "rng_state.pth"):
        (folder / name).write_bytes(bytes([step]) * 64)
    (folder / ckpt.META).write_text(json.dumps({"step": step, "fingerprint": {}}))
    return folder


def test_checkpoints_are_uploaded_as_written_and_resumed_from_on_another_machine(monkeypatch, tmp_path, url):
    a = machine(url, tmp_path / "a", monkeypatch)
    work = a.work("train", "k" * 32)
    (work / "trainer_log.jsonl").parent.mkdir(parents=True)
    for step in (2, 4, 6):
        fake_checkpoint(work, step)
        (work / "trainer_log.jsonl").write_text("".join(f'{{"current_steps": {s}}}\n' for s in range(1, step + 1)))
        publish_checkpoints(work, keep=2)
    rel = f"cache/train/{'k' * 32}.work"
    assert {n.split("/")[3] for n in remote_files(url) if n.count("/") > 3} == {"checkpoint-4", "checkpoint-6"}

    fs, path = fsspec.core.url_to_fs(url)  # a torn upload of a newer checkpoint: files without metadata
    fs.pipe_file(f"{path}/{rel}/checkpoint-8/{ckpt.WEIGHTS}", b"x")

    b = machine(url, tmp_path / "b", monkeypatch)
    fresh = b.work("train", "k" * 32)
    fetched = pull_checkpoints(fresh)
    assert fetched == fresh / "checkpoint-6" and ckpt.newest_valid(fresh) == fetched
    assert (fetched / ckpt.WEIGHTS).read_bytes() == bytes([6]) * 64
    assert (fresh / "trainer_log.jsonl").read_text().count("\n") == 6
    assert pull_checkpoints(fresh) is None  # nothing newer than what this machine has


def test_local_stores_do_not_touch_any_object_store(tmp_path):
    layout = Layout(tmp_path)
    assert layout.remote is None
    built = build_or_reuse(layout, STAGE, COMPONENTS, write_blocks)
    assert lookup(layout, STAGE, built.key)[0] is not None
    work = layout.work("train", "k")
    fake_checkpoint(work, 2)
    publish_checkpoints(work, keep=1)
    assert pull_checkpoints(work) is None and not (tmp_path / MARKER).exists()
