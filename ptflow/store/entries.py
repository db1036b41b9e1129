"""Content-addressed artifacts: key them, find them, explain hits and misses, write them atomically.

A stage's key is sha256 over its *components*: stage name, the hash of its core modules'
source, the config fields it reads, and the content digests of its inputs (never their
paths). `build_or_reuse` returns the stored artifact when the key matches and its files are
intact, otherwise builds it in a private folder, writes `manifest.json`, and renames the
folder into place, so a crashed write is never mistaken for a finished one. A finished
entry's files are made read-only: they are hard-linked into output folders, and an in-place
write there must fail instead of changing the store.

An entry is trusted only if its manifest names its own stage and key and its real path lies in
the store (a folder swapped for a symlink to another key is a miss). Files outside the digest
(training checkpoints) are extras: a damaged one is dropped and the entry stays a hit; when a
resumable entry's content is damaged, its intact extras are kept so the rebuild resumes.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ptflow import __version__, faults
from ptflow.errors import DataError, PtflowError, StoreError
from ptflow.store import sync
from ptflow.store.layout import MANIFEST, Layout

log = logging.getLogger("ptflow.store")

CHUNK = 1 << 20


@dataclass(frozen=True)
class Artifact:
    """What a stage hands to the next: where its files are and what they contain."""

    stage: str
    key: str
    path: str
    digest: str
    stats: dict[str, Any] = field(default_factory=dict)
    hit: bool = False
    reason: str = ""

    @property
    def dir(self) -> Path:
        return Path(self.path)

    def as_cached(self, reason: str) -> "Artifact":
        return Artifact(self.stage, self.key, self.path, self.digest, self.stats, True, reason)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def sha256_files(paths: list[Path], workers: int | None = None) -> dict[Path, str]:
    """sha256 of many files at once: hashlib releases the GIL on large reads, so threads hash in parallel (a
    sharded checkpoint of a 10B model is ~120 GB in a few dozen files: minutes on one core)."""
    from concurrent.futures import ThreadPoolExecutor

    if len(paths) < 2:
        return {path: sha256_file(path) for path in paths}
    workers = workers or min(len(paths), 16, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sha256") as pool:
        return dict(zip(paths, pool.map(sha256_file, paths)))


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def tree_files(root: Path) -> Iterator[Path]:
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.name != MANIFEST:
            yield path


def files_digest(root: Path, skip: Callable[[str], bool] = lambda rel: False) -> tuple[str, dict[str, dict]]:
    """Digest of a folder by content: sha256 over (relative path, file sha256) pairs."""
    files, h = {}, hashlib.sha256()
    for path in tree_files(root):
        rel = path.relative_to(root).as_posix()
        st = path.stat()
        entry = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": None}
        if not skip(rel):
            entry["sha256"] = sha256_file(path)
            h.update(f"{rel}\0{entry['sha256']}\n".encode())
        files[rel] = entry
    return h.hexdigest(), files


class DigestMemo:
    """sha256 of input files, memoised by (path, size, mtime): unchanged big files are not re-read."""

    def __init__(self, layout: Layout):
        self.path = layout.root / "cache" / "input-digests.json"
        try:
            self.memo = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.memo = {}
        self.dirty = False

    def digest(self, file: Path) -> str:
        file = file.resolve()
        st = file.stat()
        stamp = f"{st.st_size}:{st.st_mtime_ns}"
        hit = self.memo.get(str(file))
        if hit and hit[0] == stamp:
            return hit[1]
        value = sha256_file(file)
        self.memo[str(file)] = [stamp, value]
        self.dirty = True
        return value

    def save(self) -> None:
        """Best effort: a memo that cannot be written (disk full) only means re-hashing next time."""
        if self.dirty:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                write_json_atomic(self.path, self.memo)
            except (OSError, StoreError) as exc:
                log.warning("could not save %s (%s); input digests will be recomputed next run", self.path,
                            getattr(exc, "strerror", None) or exc)
            self.dirty = False


JSON_TMP = re.compile(r"^\..+\.\d+\.tmp$")  # write_json_atomic's temp file, `.<name>.<pid>.tmp` (swept by gc)


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)  # a full disk leaves no half-written file behind
        if disk_full(exc):
            raise StoreError(f"the disk is full: no space left to write {path}. Free space on that disk or point "
                             "`store:` (or PTFLOW_HOME) at a bigger one, then re-run.") from exc
        raise


def stage_key(components: dict[str, Any]) -> str:
    return sha256_json(components)[:32]


def read_manifest(folder: Path) -> dict | None:
    try:
        return json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def file_problems(folder: Path, manifest: dict, verify: bool = False) -> dict[str, str]:
    """What is wrong with each damaged file in the manifest ({} when all are intact). The fast check trusts
    a file whose size and mtime are unchanged; `verify` re-hashes every digested file regardless."""
    problems = {}
    for rel, entry in manifest.get("files", {}).items():
        path = folder / rel
        try:
            st = path.stat()
        except OSError:
            problems[rel] = f"{rel} is missing"
            continue
        if not stat.S_ISREG(st.st_mode):
            problems[rel] = f"{rel} is not a regular file"
        elif st.st_size != entry["size"]:
            problems[rel] = f"{rel} has {st.st_size} bytes, expected {entry['size']}"
        elif (verify or st.st_mtime_ns != entry["mtime_ns"]) and entry.get("sha256") \
                and sha256_file(path) != entry["sha256"]:
            problems[rel] = f"{rel} content changed (sha256 mismatch)"
    return problems


def check_files(folder: Path, manifest: dict, verify: bool = False) -> str | None:
    """None when every file in the manifest is present and unchanged, else what is wrong (the first problem)."""
    return next(iter(file_problems(folder, manifest, verify).values()), None)


def explain_miss(layout: Layout, stage: str, components: dict[str, Any]) -> str:
    """Which key component differs from the newest finished artifact of this stage."""
    newest, newest_time = None, -1.0
    stage_dir = layout.stage_dir(stage)
    if stage_dir.is_dir():
        for entry in stage_dir.iterdir():
            if entry.is_dir() and not entry.name.startswith(".") and "." not in entry.name:
                try:
                    mtime = (entry / MANIFEST).stat().st_mtime
                except OSError:
                    continue
                if mtime > newest_time:
                    newest, newest_time = entry, mtime
    previous = read_manifest(newest) if newest else None
    if not previous:
        return "no earlier artifact of this stage in the store"
    old, new = _flatten(previous.get("components", {})), _flatten(components)
    changed = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    if not changed:
        return "key differs from the newest artifact only in encoding"
    parts = [f"{k}: {_short(old.get(k))} -> {_short(new.get(k))}" for k in changed[:4]]
    more = f" (+{len(changed) - 4} more)" if len(changed) > 4 else ""
    return "changed " + "; ".join(parts) + more


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): obj}


def _short(value: Any) -> str:
    text = json.dumps(value, default=str) if value is not None else "absent"
    return text if len(text) <= 24 else text[:12] + "…"


def identity_problem(layout: Layout, stage: str, key: str, folder: Path, manifest: dict | None) -> str | None:
    """Why the folder at `stage/key` is not that entry: a manifest of another stage or key, or a path leaving
    the store (a symlink swapped in); None when it is."""
    if manifest is None:
        return "manifest.json is missing or unreadable"
    if not isinstance(manifest, dict) or manifest.get("stage") != stage or manifest.get("key") != key:
        found = (manifest.get("stage"), manifest.get("key")) if isinstance(manifest, dict) else (None, None)
        return f"its manifest belongs to {found[0]}/{str(found[1])[:12]}, not {stage}/{key[:12]}"
    real = folder.resolve()
    if folder.is_symlink() or real.parent != layout.stage_dir(stage).resolve() or real.name != key:
        return f"it is not a folder of the store but a link to {real}"
    return None


def lookup(layout: Layout, stage: str, key: str, verify: bool = False) -> tuple[Artifact | None, str]:
    """The intact artifact for `key`, or None and why it cannot be used. Damaged extras (files outside the
    digest, e.g. an intermediate training checkpoint) are dropped and the entry is still returned."""
    folder = layout.artifact(stage, key)
    if not folder.is_dir():
        problem = sync.fetch_entry(layout, stage, key, check_files, make_read_only)  # an object store's: download it
        if problem or not folder.is_dir():
            return None, f"cached entry is damaged ({problem}); rebuilding it" if problem else ""
    manifest = read_manifest(folder)
    problem = identity_problem(layout, stage, key, folder, manifest)
    if problem:
        return None, f"cached entry is {'damaged' if manifest is None else 'not trusted'} ({problem}); rebuilding it"
    problems = file_problems(folder, manifest, verify)
    core = [why for rel, why in problems.items() if manifest["files"][rel].get("sha256")]
    if core:
        return None, f"cached entry is damaged ({core[0]}); rebuilding it"
    if problems:
        manifest = drop_extras(folder, manifest, problems)
    return _artifact(folder, manifest), ""


def drop_extras(folder: Path, manifest: dict, damaged: dict[str, str]) -> dict:
    """Remove the top-level folders (checkpoints) or files holding damaged extras and record that in the manifest."""
    doomed = sorted({rel.split("/")[0] for rel in damaged})
    for name in doomed:
        why = next(why for rel, why in damaged.items() if rel.split("/")[0] == name)
        log.warning("%s/%s: %s is damaged (%s); it is not part of the result, so it is dropped and the entry kept",
                    manifest["stage"], manifest["key"][:12], name, why)
        target = folder / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target, ignore_errors=True)
        else:
            target.unlink(missing_ok=True)
    files = {rel: e for rel, e in manifest["files"].items() if rel.split("/")[0] not in doomed}
    manifest = {**manifest, "files": files}
    write_json_atomic(folder / MANIFEST, manifest)
    return manifest


def make_read_only(folder: Path) -> None:
    """Clear the write bits of every file (folders stay writable, so ptflow can still rename and delete)."""
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            path.chmod(path.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


def make_writable(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            path.chmod(path.stat().st_mode | stat.S_IWUSR)


def salvage(layout: Layout, stage: str, key: str, damage: str, verify: bool = False) -> None:
    """Turn a damaged resumable entry back into its work folder without the damaged files and the manifest,
    so the rebuild resumes from the newest intact checkpoint instead of step 0. An entry without
    extras (checkpoints), or one that is not what its folder name says, is removed."""
    final, work = layout.artifact(stage, key), layout.work(stage, key)
    manifest = read_manifest(final)
    if final.is_symlink() or work.exists() or identity_problem(layout, stage, key, final, manifest) \
            or all(entry.get("sha256") for entry in manifest.get("files", {}).values()):
        remove_path(layout, stage, key, final)
        return
    damaged = file_problems(final, manifest, verify)
    os.replace(final, work)
    for rel in [MANIFEST, *damaged]:
        remove_path(layout, stage, key, work / rel)
    make_writable(work)
    log.warning("%s: %s; keeping its intact files and checkpoints to resume from", stage, damage.split("; ")[0])


def _touch(folder: Path) -> None:
    """Record a reuse in the folder's mtime (`ptflow cache list` shows it; gc --older-than reads it)."""
    try:
        os.utime(folder)
    except OSError:
        pass  # a read-only store still serves hits


def remove_path(layout: Layout, stage: str, key: str, path: Path) -> None:
    """Delete a file, link or folder (renamed away first, so no reader sees half of it)."""
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.is_dir():
        doomed = layout.tmp(stage, key)
        os.replace(path, doomed)
        shutil.rmtree(doomed, ignore_errors=True)


def _artifact(folder: Path, manifest: dict, hit: bool = True, reason: str = "") -> Artifact:
    return Artifact(manifest["stage"], manifest["key"], str(folder), manifest["digest"], manifest.get("stats", {}),
                    hit, reason)


def is_cached(layout: Layout, stage: str, components: dict[str, Any]) -> bool:
    found, _ = lookup(layout, stage, stage_key(components))
    return found is not None


@contextmanager
def key_lock(layout: Layout, stage: str, key: str, wait: bool = True) -> Iterator[bool]:
    """One builder per key across processes on this store; others wait and then reuse its result.

    Yields whether the lock is held: always with `wait`; without it (gc), False when someone holds it.
    """
    with file_lock(layout.lock(stage, key), wait) as handle:
        yield handle is not None


@contextmanager
def file_lock(path: Path, wait: bool = True) -> Iterator[Any]:
    """An exclusive flock on `path` (created, with its folder, when missing); yields the open file, or None when
    `wait` is off and another process holds it. A lock file that its holder (or `ptflow cache gc`) removed
    between our open and our lock is opened again, so two processes never hold locks on two different files
    of one path; so a holder may delete the file before it lets go."""
    while True:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            handle = open(path, "a+")
        except FileNotFoundError:
            continue  # its folder was removed between the mkdir and the open
        except OSError as exc:
            raise StoreError(f"cannot write to the store folder {path.parent}: {exc.strerror}. Fix its permissions, "
                             "or set `store:` in the config or PTFLOW_HOME to a writable folder.") from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            handle.close()
            yield None
            return
        try:
            same = os.fstat(handle.fileno()).st_ino == path.stat().st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        handle.close()
    with handle:
        try:
            yield handle
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
LOW_SPACE = 1 << 20


def disk_full(exc: BaseException | None, folder: Path | None = None) -> bool:
    """Whether `exc` means "no space left on device": an OSError (or one that caused it) says so, or, for a
    library error that hides it (torch.save reports "unexpected pos"), `folder`'s disk has under 1 MiB free."""
    first, seen = exc, set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in DISK_FULL:
            return True
        if "No space left on device" in str(exc) or "Disk quota exceeded" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    if folder is None or not isinstance(first, Exception) or isinstance(first, PtflowError):
        return False
    try:
        st = os.statvfs(folder)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < LOW_SPACE


def _input_of(exc: BaseException, work: Path, layout: Layout) -> str | None:
    """The file an OSError of a build names when it is not one the build writes (its work folder, the compile
    cache): an input it was reading."""
    name = getattr(exc, "filename", None) if isinstance(exc, OSError) else None
    if not name:
        return None
    path = Path(os.path.abspath(name))
    written = (work.resolve(), layout.compile_cache().resolve())
    return None if any(path == w or w in path.parents for w in written) else str(name)


def build_or_reuse(
    layout: Layout,
    stage: str,
    components: dict[str, Any],
    build: Callable[[Path], dict[str, Any]],
    *,
    resumable: bool = False,
    skip_digest: Callable[[str], bool] = lambda rel: False,
    quiet: bool = False,
) -> Artifact:
    """Return the artifact for these components, building it with `build(folder) -> stats` on a miss.

    `resumable` stages build in a stable `<key>.work` folder that survives a crash, so the
    next attempt can pick up its checkpoints; others build in a throwaway temp folder.
    `quiet` is for many small artifacts (token shards) whose caller explains hits and misses
    itself: it logs at debug level and skips the scan for the newest artifact to compare with.
    """
    key = stage_key(components)
    with key_lock(layout, stage, key):
        found, damage = lookup(layout, stage, key)
        if found:
            log.log(logging.DEBUG if quiet else logging.INFO, "%s: hit %s (all key components unchanged)", stage,
                    key[:12])
            _touch(found.dir)
            if layout.remote is not None:  # a local hit whose upload failed is uploaded now
                sync.publish_entry(layout, stage, key, read_manifest(found.dir) or {})
            return found.as_cached("all key components unchanged")
        reason = damage or ("not built yet" if quiet else explain_miss(layout, stage, components))
        log.log(logging.DEBUG if quiet else logging.INFO, "%s: miss %s (%s)", stage, key[:12], reason)
        final = layout.artifact(stage, key)
        if damage and resumable:
            salvage(layout, stage, key, damage)
        elif damage:
            remove_path(layout, stage, key, final)
        work = layout.work(stage, key) if resumable else layout.tmp(stage, key)
        try:
            work.mkdir(parents=True, exist_ok=True)
            started = time.time()
            stats = build(work)
            faults.point(f"{stage}:built")
            stats = {**stats, "build_s": round(time.time() - started, 3)}
            digest, files = files_digest(work, skip_digest)
            manifest = {"stage": stage, "key": key, "digest": digest, "components": components, "stats": stats,
                        "files": files, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "ptflow": __version__}
            write_json_atomic(work / MANIFEST, manifest)
            make_read_only(work)
            os.replace(work, final)
        except BaseException as exc:
            full = disk_full(exc, layout.stage_dir(stage))  # before cleaning up frees the space again
            if not resumable:
                shutil.rmtree(work, ignore_errors=True)
            if not (full or isinstance(exc, OSError)) or (isinstance(exc, StoreError) and not full):
                raise  # not a write problem, or a store error that already says what to do
            if full:
                kept = f"; its partial work in {work} is kept for the next attempt" if resumable else ""
                raise StoreError(f"{stage}: the disk is full: no space left to write the artifact {final} "
                                 f"(store {layout.root}){kept}. Free space on that disk or point `store:` "
                                 f"(or PTFLOW_HOME) at a bigger one, then re-run; finished stages stay cached. "
                                 f"({type(exc).__name__}: {str(exc)[:200]})") from exc
            unreadable = _input_of(exc, work, layout)
            if unreadable is not None:
                raise DataError(f"{stage}: reading the input {unreadable} failed: {exc.strerror or exc}. Check that "
                                "it exists and is readable (permissions, a mounted filesystem), then re-run; "
                                "finished stages stay cached.") from exc
            raise StoreError(f"{stage}: writing the artifact {final} failed: {exc.strerror or exc}. "
                             f"Free space or fix permissions, then re-run; finished stages stay cached.") from exc
        sync.publish_entry(layout, stage, key, manifest, replace=bool(damage))  # object store: files, manifest
        if resumable:
            sync.drop_work(layout, stage, key)
    return _artifact(final, manifest, hit=False, reason=reason)
