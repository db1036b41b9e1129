"""A train stage's checkpoints on an object store: uploaded as they are written, fetched to resume elsewhere.

With an object store, the work folder `<cache dir>/cache/train/<key>.work/` is mirrored at
`<store>/cache/train/<key>.work/`. After each checkpoint, rank 0 uploads the run's
`trainer_log.jsonl`, then the checkpoint's files, then its `ptflow_checkpoint.json` (last, as on
disk: a remote checkpoint without it is torn and never resumed from), and applies
`save_total_limit` to the remote copies. A train stage that starts on a machine whose work folder
is behind the store first downloads the newest complete remote checkpoint and the log, so a
preempted GPU pod resumes on another node. The store is found from the folder's cache directory
(store/remote.py's marker), so a torchrun rank needs no extra argument; for a local store both
calls return at once.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from ptflow import faults
from ptflow.store.remote import Remote, bound
from ptflow.train.checkpoint import META, NAME, is_complete, list_checkpoints

log = logging.getLogger("ptflow.checkpoint")


def _mirror(folder: Path) -> tuple[Remote, str] | None:
    """The object store and the path there of a work folder `<root>/cache/<stage>/<key>.work`, if any."""
    if len(folder.parents) < 3:
        return None
    root = folder.parents[2]
    remote = bound(root)
    return (remote, folder.relative_to(root).as_posix()) if remote else None


def _remote_steps(listing: dict[str, int]) -> dict[int, str]:
    """{step: checkpoint folder name} of the complete checkpoints in a remote work folder's listing."""
    steps = {}
    for rel in listing:
        name, _, rest = rel.partition("/")
        match = NAME.match(name)
        if match and rest == META:
            steps[int(match.group(1))] = name
    return steps


def publish_checkpoints(folder: Path, keep: int | None = None) -> None:
    """Upload the complete checkpoints of `folder` that the store lacks (metadata last), and the log."""
    mirror = _mirror(folder)
    if mirror is None:
        return
    remote, rel = mirror
    for path in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
        remote.put(path, f"{rel}/{path.name}")  # the log first: a resume truncates it to its checkpoint's step
    listing = remote.files(rel)
    uploaded = _remote_steps(listing)
    for step, path in list_checkpoints(folder):
        if step in uploaded or not is_complete(path):
            continue
        for file in sorted(p for p in path.rglob("*") if p.is_file() and p.name != META):
            remote.put(file, f"{rel}/{path.name}/{file.relative_to(path).as_posix()}")
        faults.point(f"checkpoint:uploading-{step}")
        remote.put(path / META, f"{rel}/{path.name}/{META}")
        uploaded[step] = path.name
        log.info("checkpoint: uploaded %s to %s", path.name, remote.url)
    for step in sorted(uploaded)[:-keep] if keep else ():  # save_total_limit, as on disk
        remote.remove(f"{rel}/{uploaded[step]}/{META}")
        remote.remove(f"{rel}/{uploaded[step]}")


def pull_checkpoints(folder: Path) -> Path | None:
    """Download the newest complete remote checkpoint (and the log) when it is newer than any here."""
    mirror = _mirror(folder)
    if mirror is None:
        return None
    remote, rel = mirror
    have = max((s for s, p in list_checkpoints(folder) if is_complete(p)), default=-1)
    listing = remote.files(rel)
    steps = _remote_steps(listing)
    if not steps or max(steps) <= have:
        return None
    name = steps[max(steps)]
    files = sorted((r for r in listing if r.startswith(f"{name}/")), key=lambda r: r == f"{name}/{META}")
    tmp = folder / f".tmp-fetch-{name}"
    shutil.rmtree(tmp, ignore_errors=True)
    for file in files:  # the metadata last, so a download cut short is a torn checkpoint, never a resumable one
        target = tmp / file.partition("/")[2]
        remote.get(f"{rel}/{file}", target)
        if target.stat().st_size != listing[file]:
            shutil.rmtree(tmp, ignore_errors=True)
            log.warning("checkpoint: %s on %s has a short file (%s); not resuming from it", name, remote.url, file)
            return None
    for file in (r for r in listing if "/" not in r):
        remote.get(f"{rel}/{file}", folder / f".{file}.fetch")
        os.replace(folder / f".{file}.fetch", folder / file)
    shutil.rmtree(folder / name, ignore_errors=True)
    os.replace(tmp, folder / name)
    log.info("checkpoint: fetched %s from %s to resume from it", name, remote.url)
    return folder / name
