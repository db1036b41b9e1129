"""The content-addressed store: hits, misses with reasons, atomic writes, damage detection, content digests."""

from __future__ import annotations

import json
import os
import sys
import textwrap

import pytest

from ptflow import store
from ptflow.layout import MANIFEST
from ptflow.store import DigestMemo, build_or_reuse, code_version, files_digest, stage_key

STAGE = "demo"


def components(cutoff_len: int = 64, data: str = "a" * 64) -> dict:
    return {"stage": STAGE, "code": "c0de", "config": {"cutoff_len": cutoff_len, "packing": True},
            "inputs": {"files": {"corpus.jsonl": data}}}


class Builder:
    """A build function that records its calls and writes two small files."""

    def __init__(self, payload: str = "hello"):
        self.calls, self.payload = 0, payload

    def __call__(self, folder):
        self.calls += 1
        (folder / "blocks.txt").write_text(self.payload * 10)
        (folder / "sub").mkdir()
        (folder / "sub" / "stats.json").write_text(json.dumps({"n": 3}))
        return {"blocks": 3}


def entries(layout) -> list[str]:
    """What the stage folder holds, lock files aside."""
    return sorted(p.name for p in layout.stage_dir(STAGE).iterdir() if not p.name.endswith(".lock"))


def test_first_build_is_a_miss_then_identical_components_hit(layout):
    build = Builder()
    first = build_or_reuse(layout, STAGE, components(), build)
    assert (first.hit, first.reason) == (False, "no earlier artifact of this stage in the store")
    assert first.key == stage_key(components())
    assert first.dir == layout.artifact(STAGE, first.key)
    assert first.stats["blocks"] == 3 and first.stats["build_s"] >= 0
    manifest = json.loads((first.dir / MANIFEST).read_text())
    assert manifest["components"] == components()
    assert sorted(manifest["files"]) == ["blocks.txt", "sub/stats.json"]

    again = build_or_reuse(layout, STAGE, components(), build)
    assert (again.hit, again.reason) == (True, "all key components unchanged")
    assert (again.key, again.path, again.digest, again.stats) == (first.key, first.path, first.digest, first.stats)
    assert build.calls == 1
    assert entries(layout) == [first.key]


def test_miss_names_the_changed_component(layout):
    build = Builder()
    first = build_or_reuse(layout, STAGE, components(cutoff_len=64), build)
    second = build_or_reuse(layout, STAGE, components(cutoff_len=128), build)
    assert not second.hit and second.key != first.key
    assert second.reason == "changed config.cutoff_len: 64 -> 128"
    # The reason compares with the newest artifact; make "newest" unambiguous on coarse-mtime filesystems.
    os.utime(first.dir / MANIFEST, (1_000_000, 1_000_000))
    third = build_or_reuse(layout, STAGE, components(cutoff_len=128, data="b" * 64), build)
    assert third.reason.startswith("changed inputs.files.corpus.jsonl: ")
    assert "config.cutoff_len" not in third.reason
    assert build.calls == 3
    assert entries(layout) == sorted([first.key, second.key, third.key])


def test_same_content_different_build_gives_same_digest(layout, tmp_path):
    a = build_or_reuse(layout, STAGE, components(cutoff_len=1), Builder("x"))
    b = build_or_reuse(layout, STAGE, components(cutoff_len=2), Builder("x"))
    c = build_or_reuse(layout, STAGE, components(cutoff_len=3), Builder("y"))
    assert a.key != b.key and a.digest == b.digest
    assert c.digest != a.digest


def test_crashed_build_leaves_no_artifact_and_no_temp_dir(layout):
    def crash(folder):
        (folder / "half.npy").write_bytes(b"\0" * 100)
        raise RuntimeError("tokenizer exploded")

    with pytest.raises(RuntimeError, match="tokenizer exploded"):
        build_or_reuse(layout, STAGE, components(), crash)
    assert entries(layout) == []
    assert not store.is_cached(layout, STAGE, components())

    build = Builder()
    artifact = build_or_reuse(layout, STAGE, components(), build)
    assert not artifact.hit and build.calls == 1
    assert artifact.reason == "no earlier artifact of this stage in the store"  # the crash left nothing behind


def test_interrupted_build_is_cleaned_up_too(layout):
    def interrupted(folder):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_or_reuse(layout, STAGE, components(), interrupted)
    assert entries(layout) == []


def test_resumable_build_keeps_its_work_folder_after_a_crash(layout):
    def crash(folder):
        (folder / "checkpoint-2").mkdir()
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        build_or_reuse(layout, STAGE, components(), crash, resumable=True)
    key = stage_key(components())
    assert entries(layout) == [f"{key}.work"]
    assert (layout.work(STAGE, key) / "checkpoint-2").is_dir()

    seen = []

    def resume(folder):
        seen.extend(p.name for p in folder.iterdir())
        return {}

    artifact = build_or_reuse(layout, STAGE, components(), resume, resumable=True)
    assert seen == ["checkpoint-2"]
    assert entries(layout) == [key] and artifact.dir == layout.artifact(STAGE, key)


def damage_truncate(folder):
    path = folder / "blocks.txt"
    path.write_text(path.read_text()[:-3])


def damage_same_size_edit(folder):
    path = folder / "blocks.txt"
    st = path.stat()
    path.write_text(path.read_text().upper())
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


def damage_delete_file(folder):
    (folder / "sub" / "stats.json").unlink()


def damage_delete_manifest(folder):
    (folder / MANIFEST).unlink()


def damage_corrupt_manifest(folder):
    (folder / MANIFEST).write_text("{not json")


@pytest.mark.parametrize("damage, problem", [
    (damage_truncate, "blocks.txt has 47 bytes, expected 50"),
    (damage_same_size_edit, "blocks.txt content changed (sha256 mismatch)"),
    (damage_delete_file, "sub/stats.json is missing"),
    (damage_delete_manifest, "manifest.json is missing or unreadable"),
    (damage_corrupt_manifest, "manifest.json is missing or unreadable"),
])
def test_damaged_artifact_is_detected_and_rebuilt(layout, damage, problem):
    build = Builder()
    first = build_or_reuse(layout, STAGE, components(), build)
    damage(first.dir)
    rebuilt = build_or_reuse(layout, STAGE, components(), build)
    assert not rebuilt.hit
    assert rebuilt.reason == f"cached entry is damaged ({problem}); rebuilding it"
    assert build.calls == 2
    assert (rebuilt.dir / "blocks.txt").read_text() == "hello" * 10
    assert rebuilt.digest == first.digest
    assert build_or_reuse(layout, STAGE, components(), build).hit


def test_touched_but_unchanged_file_is_still_a_hit(layout):
    build = Builder()
    first = build_or_reuse(layout, STAGE, components(), build)
    path = first.dir / "blocks.txt"
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    assert build_or_reuse(layout, STAGE, components(), build).hit
    assert build.calls == 1


def make_tree(root, files: dict[str, bytes]):
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


FILES = {"tokenizer.json": b'{"v": 1}', "sub/merges.txt": b"a b\n", "vocab.txt": b"x\ny\n"}


def test_files_digest_depends_on_content_not_location(tmp_path):
    one = make_tree(tmp_path / "one", FILES)
    two = make_tree(tmp_path / "elsewhere" / "two", FILES)
    digest_one, files_one = files_digest(one)
    digest_two, _ = files_digest(two)
    assert digest_one == digest_two
    assert sorted(files_one) == ["sub/merges.txt", "tokenizer.json", "vocab.txt"]
    assert files_one["vocab.txt"]["size"] == 4

    (two / "vocab.txt").write_bytes(b"x\nz\n")
    assert files_digest(two)[0] != digest_one
    renamed = make_tree(tmp_path / "renamed", {**{k: v for k, v in FILES.items() if k != "vocab.txt"},
                                                "vocab2.txt": FILES["vocab.txt"]})
    assert files_digest(renamed)[0] != digest_one  # file names are part of the content


def test_files_digest_ignores_the_manifest_and_skipped_files(tmp_path):
    root = make_tree(tmp_path / "t", FILES)
    digest, _ = files_digest(root)
    (root / MANIFEST).write_text("{}")
    assert files_digest(root)[0] == digest
    make_tree(root, {"checkpoint-5/optimizer.pt": b"big"})
    assert files_digest(root)[0] != digest
    skipped, files = files_digest(root, skip=lambda rel: rel.startswith("checkpoint-"))
    assert skipped == digest
    assert files["checkpoint-5/optimizer.pt"]["sha256"] is None


def test_digest_memo_rehashes_only_when_size_or_mtime_changes(layout, tmp_path, monkeypatch):
    path = tmp_path / "corpus.jsonl"
    path.write_text('{"text": "aaaa"}\n')
    reads = []
    real = store.sha256_file
    monkeypatch.setattr(store, "sha256_file", lambda p: reads.append(p) or real(p))

    memo = DigestMemo(layout)
    first = memo.digest(path)
    assert first == real(path) and len(reads) == 1
    assert memo.digest(path) == first and len(reads) == 1  # same size and mtime: not re-read
    memo.save()
    assert DigestMemo(layout).digest(path) == first and len(reads) == 1  # persisted in the store

    st = path.stat()
    path.write_text('{"text": "bbbb"}\n')  # same size, new content
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    second = memo.digest(path)
    assert len(reads) == 2
    assert second == real(path) != first


def test_digest_memo_survives_an_unreadable_memo_file(layout, tmp_path):
    memo_path = layout.root / "cache" / "input-digests.json"
    memo_path.parent.mkdir(parents=True)
    memo_path.write_text("{torn")
    path = tmp_path / "f.txt"
    path.write_text("x")
    assert DigestMemo(layout).digest(path) == store.sha256_file(path)


def test_code_version_changes_with_source(tmp_path, monkeypatch):
    name = "ptflow_test_stage_module"
    module = tmp_path / f"{name}.py"
    module.write_text(textwrap.dedent('''\
        def build():
            return 1
        '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        before = code_version(name)
        assert code_version(name) == before and len(before) == 16
        module.write_text(textwrap.dedent('''\
            def build():
                return 2  # changed
            '''))
        after = code_version(name)
        assert after != before
        assert code_version(name, "ptflow.layout") != after
    finally:
        sys.modules.pop(name, None)


def test_code_version_of_real_stages_is_stable_and_distinct():
    assert code_version("ptflow.dataset") == code_version("ptflow.dataset")
    assert code_version("ptflow.dataset") != code_version("ptflow.tokenizer")
    assert code_version("ptflow.train", "ptflow.model") == code_version("ptflow.model", "ptflow.train")


def test_unwritable_store_raises_store_error(tmp_path):
    from ptflow.errors import StoreError
    from ptflow.layout import Layout

    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(StoreError, match=r"cannot write to the store at .*file.*PTFLOW_HOME"):
        build_or_reuse(Layout(blocker), STAGE, components(), Builder())


def test_layout_paths_and_remote_roots(tmp_path, monkeypatch):
    from ptflow.errors import StoreError
    from ptflow.layout import Layout

    layout = Layout(tmp_path)
    assert layout.artifact("train", "k") == tmp_path / "cache" / "train" / "k"
    assert layout.work("train", "k") == tmp_path / "cache" / "train" / "k.work"
    assert layout.tmp("train", "k").name.startswith(".tmp-k-")
    assert layout.output_dir(None, "run") == tmp_path / "runs" / "run"
    monkeypatch.setenv("PTFLOW_HOME", str(tmp_path / "home"))
    assert Layout.resolve().root == tmp_path / "home"
    assert Layout.resolve(str(tmp_path / "cfg")).root == tmp_path / "cfg"
    with pytest.raises(StoreError, match="remote stores are not supported yet"):
        Layout.resolve("s3://bucket/ptflow")
    assert not (tmp_path / "home").exists()  # nothing is created until a stage writes
