"""Moving store entries between a machine's cache directory and the object store (manifest last).

An entry on the object store is visible only through its `manifest.json`, which is uploaded after
every other file of the entry: a reader treats a remote folder without a manifest as absent, so a
writer killed mid-upload leaves nothing that can be taken for finished (the next writer of that
key overwrites the leftovers). A fetched entry is downloaded beside its final place, checked file
by file against the manifest (size and sha256), stamped with the manifest's mtimes so later local
checks stay cheap, made read-only like an entry built here, and renamed into place; one that fails
the check is a miss and is rebuilt.

Every function is a no-op for a local store (`layout.remote is None`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from ptflow import faults
from ptflow.store.layout import MANIFEST, Layout
from ptflow.store.remote import Remote

log = logging.getLogger("ptflow.store")


def relative(layout: Layout, path: Path) -> str:
    return path.relative_to(layout.root).as_posix()


def remote_manifest(remote: Remote, rel: str) -> dict | None:
    """The manifest of a remote entry, or None when the entry is absent or unfinished."""
    data = remote.read(f"{rel}/{MANIFEST}")
    if data is None:
        return None
    try:
        return json.loads(data)
    except ValueError:
        return None  # a manifest is uploaded whole, so this is foreign data: treat the entry as absent


def fetch_entry(layout: Layout, stage: str, key: str, verify: Callable[[Path, dict], str | None],
                seal: Callable[[Path], None]) -> str:
    """Download the remote entry `stage/key` into the cache directory when it is finished there.

    Returns "" when it was fetched or is absent remotely, else what is wrong with the remote copy
    (`verify(folder, manifest)` found a file missing or changed): the caller rebuilds it. `seal(folder)`
    finishes the copy as a locally built entry is finished (its files read-only).
    """
    remote, final = layout.remote, layout.artifact(stage, key)
    if remote is None:
        return ""
    rel = relative(layout, final)
    manifest = remote_manifest(remote, rel)
    if manifest is None:
        return ""
    tmp = layout.tmp(stage, key)
    try:
        for name in manifest.get("files", {}):
            remote.get(f"{rel}/{name}", tmp / name)
        problem = verify(tmp, manifest)
        if problem:
            return f"the copy on {remote.url} is damaged ({problem})"
        for name, entry in manifest["files"].items():
            os.utime(tmp / name, ns=(entry["mtime_ns"], entry["mtime_ns"]))
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        seal(tmp)
        try:
            os.replace(tmp, final)
        except OSError:
            if not (final / MANIFEST).is_file():  # not another process of this machine fetching it too
                raise
        log.info("%s: fetched %s from %s", stage, key[:12], remote.url)
        return ""
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def publish_entry(layout: Layout, stage: str, key: str, manifest: dict, replace: bool = False) -> None:
    """Upload a finished local entry: its files, then its manifest.

    Skipped when the store already has the entry (content-addressed: a worker that published
    this key first has an equally good copy), unless `replace`: the remote copy was found damaged.
    """
    remote = layout.remote
    if remote is None:
        return
    folder = layout.artifact(stage, key)
    rel = relative(layout, folder)
    if replace:
        remote.remove(f"{rel}/{MANIFEST}")  # readers see it absent while it is rewritten
    elif remote_manifest(remote, rel) is not None:
        return
    for name in manifest.get("files", {}):
        remote.put(folder / name, f"{rel}/{name}")
    faults.point(f"{stage}:uploading")
    remote.put(folder / MANIFEST, f"{rel}/{MANIFEST}")
    log.info("%s: uploaded %s to %s", stage, key[:12], remote.url)


def drop_work(layout: Layout, stage: str, key: str) -> None:
    """Delete the remote unfinished build of `stage/key` (its checkpoints), once the entry is published."""
    if layout.remote is not None:
        layout.remote.remove(relative(layout, layout.work(stage, key)))


def drop(layout: Layout, stage: str, key: str) -> None:
    """Delete `stage/key` from the object store: its manifest first, so no reader sees a half-deleted entry."""
    remote = layout.remote
    if remote is None:
        return
    rel = relative(layout, layout.artifact(stage, key))
    remote.remove(f"{rel}/{MANIFEST}")
    remote.remove(rel)
    drop_work(layout, stage, key)


def pull_file(layout: Layout, path: Path) -> None:
    """Replace the local copy of a store bookkeeping file (lineage, index) by the object store's, if it has one."""
    remote = layout.remote
    if remote is None:
        return
    data = remote.read(relative(layout, path))
    if data is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.pull")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def push_file(layout: Layout, path: Path) -> None:
    """Upload a store bookkeeping file after this machine changed it (last writer wins; see docs/caching.md)."""
    if layout.remote is not None and path.is_file():
        layout.remote.put(path, relative(layout, path))
