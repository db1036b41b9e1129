"""The content-addressed store: hits, misses with reasons, atomic writes, damage detection, content digests."""

from __future__ import annotations

import errno
import json
import os
import re

import pytest

from ptflow.errors import StoreError
from ptflow.store import entries as store
from ptflow.store.entries import (
    DigestMemo,
    build_or_reuse,
    files_digest,
    stage_key,
)
from ptflow.store.layout import MANIFEST

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


def rewrite(path, edit, later: bool = False):
    """Replace a file's bytes with edit(bytes); `later` also moves its mtime on, as a real edit would."""
    st = path.stat()
    path.chmod(0o644)  # store files are read-only (root writes anyway)
    path.write_bytes(edit(path.read_bytes()))
    if later:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


def damage_truncate(folder):
    rewrite(folder / "blocks.txt", lambda data: data[:-3])


def damage_same_size_edit(folder):
    rewrite(folder / "blocks.txt", bytes.upper, later=True)


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


def test_unwritable_store_raises_store_error(tmp_path):
    from ptflow.errors import StoreError
    from ptflow.store.layout import Layout

    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(StoreError, match=r"cannot write to the store folder .*file/cache/demo: .*PTFLOW_HOME"):
        build_or_reuse(Layout(blocker), STAGE, components(), Builder())


def test_an_unusable_stage_folder_is_named_not_the_store_root(layout):
    layout.stage_dir(STAGE).parent.mkdir(parents=True)
    layout.stage_dir(STAGE).write_text("in the way")
    with pytest.raises(StoreError, match=rf"cannot write to the store folder {re.escape(str(layout.stage_dir(STAGE)))}: "
                                         r"File exists\. Fix its permissions"):
        build_or_reuse(layout, STAGE, components(), Builder())


def test_an_input_that_cannot_be_read_is_named_as_an_input_not_as_the_artifact_write(layout, tmp_path):
    from ptflow.errors import DataError

    def reads_a_vanished_input(folder):
        (folder / "blocks.txt").write_text((tmp_path / "gone.jsonl").read_text())
        return {}

    with pytest.raises(DataError, match=rf"demo: reading the input {re.escape(str(tmp_path / 'gone.jsonl'))} failed: "
                                        r"No such file or directory\. Check that it exists and is readable"):
        build_or_reuse(layout, STAGE, components(), reads_a_vanished_input)

    def writes_into_a_missing_subfolder(folder):
        (folder / "no-such-dir" / "blocks.txt").write_text("x")
        return {}

    with pytest.raises(StoreError, match=r"demo: writing the artifact .* failed: No such file or directory"):
        build_or_reuse(layout, STAGE, components(), writes_into_a_missing_subfolder)
    assert entries(layout) == []  # neither left a temp folder


def test_layout_paths_and_remote_roots(tmp_path, monkeypatch):
    from ptflow.errors import StoreError
    from ptflow.store.layout import Layout

    layout = Layout(tmp_path)
    assert layout.artifact("train", "k") == tmp_path / "cache" / "train" / "k"
    assert layout.work("train", "k") == tmp_path / "cache" / "train" / "k.work"
    assert layout.tmp("train", "k").name.startswith(".tmp-k-")
    assert Layout.node_tokens(layout.work("train", "k")).name.startswith(".k.tokens-")  # beside, not in, the work
    assert layout.output_dir(None, "run") == tmp_path / "runs" / "run"
    monkeypatch.setenv("PTFLOW_HOME", str(tmp_path / "home"))
    assert Layout.resolve().root == tmp_path / "home"
    assert Layout.resolve(str(tmp_path / "cfg")).root == tmp_path / "cfg"
    assert Layout.resolve(str(tmp_path / "cfg")).remote is None
    with pytest.raises(StoreError, match="the URL holds credentials"):
        Layout.resolve("s3://key:secret@bucket/ptflow")
    assert not (tmp_path / "home").exists()  # nothing is created until a stage writes


# --------------------------------------------------------------------------- disk full


def enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def fill_disk_in_build(monkeypatch):
    def build(folder):
        (folder / "blocks.txt").write_text("partial")
        enospc()
    return build


def fill_disk_at_manifest(monkeypatch):
    monkeypatch.setattr(store, "write_json_atomic", enospc)
    return Builder()


def fill_disk_inside_a_library(monkeypatch):
    def build(folder):  # torch.save / safetensors report a full disk as their own error, caused by the OSError
        (folder / "model.safetensors").write_bytes(b"\0" * 10)
        try:
            enospc()
        except OSError as exc:
            raise RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing "
                               "file data/0: file write failed") from exc
    return build


@pytest.mark.parametrize("fill", [fill_disk_in_build, fill_disk_at_manifest, fill_disk_inside_a_library])
def test_disk_full_is_a_clear_store_error_and_leaves_nothing_half_written(layout, monkeypatch, fill):
    from ptflow.errors import StoreError

    earlier = build_or_reuse(layout, STAGE, components(cutoff_len=1), Builder())
    key = stage_key(components())
    with monkeypatch.context() as patch:
        build = fill(patch)
        with pytest.raises(StoreError) as info:
            build_or_reuse(layout, STAGE, components(), build)
    message = str(info.value)
    assert message.startswith(f"{STAGE}: the disk is full: no space left to write the artifact "
                              f"{layout.artifact(STAGE, key)} (store {layout.root}).")
    assert "Free space on that disk or point `store:` (or PTFLOW_HOME) at a bigger one, then re-run" in message
    assert entries(layout) == [earlier.key]  # no partial entry, no temp folder; the earlier entry is intact
    assert store.check_files(earlier.dir, store.read_manifest(earlier.dir)) is None
    assert build_or_reuse(layout, STAGE, components(cutoff_len=1), Builder()).hit

    again = build_or_reuse(layout, STAGE, components(), Builder())  # space freed: the re-run builds it
    assert not again.hit and again.reason == "changed config.cutoff_len: 1 -> 64"
    assert entries(layout) == sorted([earlier.key, key])


def torch_save_on_a_full_disk(folder):
    (folder / "optimizer.pt").write_bytes(b"\0" * 10)
    raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")  # no errno at all


@pytest.mark.parametrize("free, expected", [(4096, "StoreError"), (1 << 30, "RuntimeError")])
def test_an_opaque_write_error_counts_as_disk_full_only_when_the_disk_is_full(layout, monkeypatch, free, expected):
    real_statvfs = os.statvfs

    def statvfs(path):
        st = real_statvfs(path)
        return os.statvfs_result((st.f_bsize, 1, st.f_blocks, free, free, *st[5:]))

    monkeypatch.setattr(os, "statvfs", statvfs)
    with pytest.raises(Exception) as info:
        build_or_reuse(layout, STAGE, components(), torch_save_on_a_full_disk)
    assert type(info.value).__name__ == expected
    if expected == "StoreError":
        assert "the disk is full" in str(info.value) and "(RuntimeError: [enforce fail" in str(info.value)
    assert entries(layout) == []


def test_disk_full_in_a_resumable_build_keeps_its_checkpoints(layout):
    from ptflow.errors import StoreError

    def build(folder):
        (folder / "checkpoint-2").mkdir()
        enospc()

    with pytest.raises(StoreError, match=r"the disk is full: .*its partial work in .*\.work is kept"):
        build_or_reuse(layout, STAGE, components(), build, resumable=True)
    assert entries(layout) == [f"{stage_key(components())}.work"]


def test_a_full_disk_never_leaves_a_torn_json_file(layout, tmp_path, monkeypatch):
    from ptflow.errors import StoreError

    target = tmp_path / "index.json"
    monkeypatch.setattr(os, "replace", enospc)
    with pytest.raises(StoreError, match=rf"the disk is full: no space left to write {target}\. Free space"):
        store.write_json_atomic(target, {"a": 1})
    assert list(tmp_path.iterdir()) == []
    data = tmp_path / "data.txt"
    data.write_text("x")
    memo = DigestMemo(layout)
    memo.digest(data)
    memo.save()  # best effort: a memo that cannot be saved only costs re-hashing next run
    assert not memo.path.exists()


# --------------------------------------------------------------------------- damage to real artifact files


def write_weights_and_blocks(folder):
    import numpy as np
    import torch
    from safetensors.torch import save_file

    save_file({"w": torch.arange(64, dtype=torch.float32).reshape(8, 8)}, str(folder / "model.safetensors"))
    np.save(folder / "train.npy", np.arange(4 * 16, dtype=np.uint16).reshape(4, 16))
    return {}


def truncate_safetensors(folder):
    rewrite(folder / "model.safetensors", lambda data: data[:-16])


def flip_token(data: bytes) -> bytes:
    """Token [2, 5] (37) of the 4x16 uint16 blocks becomes 36: the array is the file's last 128 bytes."""
    data = bytearray(data)
    data[len(data) - 128 + 37 * 2] ^= 1
    return bytes(data)


def edit_packed_token(folder):
    rewrite(folder / "train.npy", flip_token, later=True)


@pytest.mark.parametrize("damage, problem", [
    (truncate_safetensors, r"model\.safetensors has \d+ bytes, expected \d+"),
    (edit_packed_token, r"train\.npy content changed \(sha256 mismatch\)"),
])
def test_truncated_weights_and_edited_packed_data_are_rebuilt(layout, damage, problem):
    import numpy as np
    from safetensors.torch import load_file

    first = build_or_reuse(layout, STAGE, components(), write_weights_and_blocks)
    damage(first.dir)
    assert not store.is_cached(layout, STAGE, components())
    rebuilt = build_or_reuse(layout, STAGE, components(), write_weights_and_blocks)
    assert not rebuilt.hit and re.fullmatch(rf"cached entry is damaged \({problem}\); rebuilding it", rebuilt.reason)
    assert rebuilt.digest == first.digest
    assert load_file(str(rebuilt.dir / "model.safetensors"))["w"].shape == (8, 8)
    assert int(np.load(rebuilt.dir / "train.npy")[2, 5]) == 2 * 16 + 5


def test_an_entry_swapped_for_a_link_to_another_key_is_not_trusted(layout):
    short, long = build_or_reuse(layout, STAGE, components(48), Builder("short")), \
        build_or_reuse(layout, STAGE, components(64), Builder("long"))
    os.rename(long.dir, layout.root / "aside")
    os.symlink(short.dir, long.dir)  # the cutoff_len 64 key now points at the 48 entry
    build = Builder("long")
    again = build_or_reuse(layout, STAGE, components(64), build)
    assert not again.hit and build.calls == 1
    assert again.reason == (f"cached entry is not trusted (its manifest belongs to {STAGE}/{short.key[:12]}, not "
                            f"{STAGE}/{long.key[:12]}); rebuilding it")
    assert (again.dir / "blocks.txt").read_text() == "long" * 10 and not again.dir.is_symlink()
    assert (short.dir / "blocks.txt").read_text() == "short" * 10  # the link's target is untouched


def test_an_entry_outside_the_store_is_not_trusted_even_with_its_own_manifest(layout, tmp_path):
    first = build_or_reuse(layout, STAGE, components(), Builder())
    outside = tmp_path / "elsewhere"
    os.rename(first.dir, outside)
    os.symlink(outside, first.dir)
    found, why = store.lookup(layout, STAGE, first.key)
    assert found is None
    assert why == f"cached entry is not trusted (it is not a folder of the store but a link to {outside}); rebuilding it"


def test_finished_entry_files_are_read_only_and_the_store_still_evicts_and_rebuilds_them(layout):
    first = build_or_reuse(layout, STAGE, components(), Builder())
    for rel in ("blocks.txt", "sub/stats.json", MANIFEST):
        assert (first.dir / rel).stat().st_mode & 0o222 == 0, rel
    assert os.access(first.dir, os.W_OK)  # folders stay writable: renames and deletes still work
    damage_truncate(first.dir)
    rebuilt = build_or_reuse(layout, STAGE, components(), Builder())
    assert not rebuilt.hit and rebuilt.digest == first.digest


def build_with_extras(folder):
    (folder / "result.txt").write_text("final")
    for step in (2, 4):
        (folder / f"checkpoint-{step}").mkdir(exist_ok=True)
        (folder / f"checkpoint-{step}" / "state.bin").write_bytes(bytes(100))
    return {}


def test_a_damaged_extra_is_dropped_and_the_entry_stays_a_hit(layout, caplog):
    extras = lambda rel: rel.startswith("checkpoint-")  # noqa: E731
    first = build_or_reuse(layout, STAGE, components(), build_with_extras, skip_digest=extras)
    rewrite(first.dir / "checkpoint-2" / "state.bin", lambda data: data[:10])
    again = build_or_reuse(layout, STAGE, components(), build_with_extras, skip_digest=extras)
    assert again.hit and again.digest == first.digest
    assert sorted(p.name for p in again.dir.iterdir()) == ["checkpoint-4", MANIFEST, "result.txt"]
    assert "checkpoint-2 is damaged (checkpoint-2/state.bin has 10 bytes, expected 100)" in caplog.text
    assert sorted(store.read_manifest(again.dir)["files"]) == ["checkpoint-4/state.bin", "result.txt"]


def test_a_damaged_resumable_entry_keeps_its_intact_files_for_the_rebuild(layout):
    extras = lambda rel: rel.startswith("checkpoint-")  # noqa: E731
    first = build_or_reuse(layout, STAGE, components(), build_with_extras, resumable=True, skip_digest=extras)
    rewrite(first.dir / "result.txt", lambda data: b"")
    seen = []

    def resume(folder):
        seen.extend(sorted(p.name for p in folder.iterdir()))
        assert os.access(folder / "checkpoint-4" / "state.bin", os.W_OK) or os.getuid() == 0
        return build_with_extras(folder)

    again = build_or_reuse(layout, STAGE, components(), resume, resumable=True, skip_digest=extras)
    assert seen == ["checkpoint-2", "checkpoint-4"]  # the damaged result and the manifest are gone, checkpoints kept
    assert not again.hit and again.digest == first.digest


def test_a_fifo_in_place_of_a_file_is_reported_as_not_a_regular_file(layout):
    first = build_or_reuse(layout, STAGE, components(), Builder())
    (first.dir / "blocks.txt").unlink()
    os.mkfifo(first.dir / "blocks.txt")
    assert store.lookup(layout, STAGE, first.key)[1] == \
        "cached entry is damaged (blocks.txt is not a regular file); rebuilding it"


def test_verify_rehashes_a_file_whose_size_and_mtime_were_kept(layout):
    first = build_or_reuse(layout, STAGE, components(), Builder())
    path = first.dir / "blocks.txt"
    st = path.stat()
    rewrite(path, bytes.upper)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size, mtime restored: the fast check trusts it
    assert store.lookup(layout, STAGE, first.key)[0] is not None
    assert store.lookup(layout, STAGE, first.key, verify=True)[1] == \
        "cached entry is damaged (blocks.txt content changed (sha256 mismatch)); rebuilding it"
