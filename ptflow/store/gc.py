"""Store hygiene: list the entries, sweep what crashes leave, and re-hash everything on request.

    ptflow cache list                              entries: stage, key, size, last use, the runs that use them
    ptflow cache gc [--dry-run] [--older-than D]   stale temp folders and files and streamed-token folders, finished
                                                   keys' work folders, idle lock files; with --older-than, entries no
                                                   run uses, idle D days
    ptflow cache verify [--dry-run]                re-hash every entry and every memoised input file

On an object store (`store: s3://...`) gc sweeps the bucket by the same rules after this machine's
cache directory: uploads left without their manifest (a writer killed mid-upload), checkpoint
folders of keys that have since finished, and with --older-than entries that no lineage and no run
on this machine uses, by the later of their upload and this machine's last use of its copy.

A run's store use is fast because it trusts a file whose size and mtime are unchanged; `verify`
is the slow path that trusts nothing. Nothing here removes a folder whose key lock another
process holds (a build in progress), and every removal renames the folder away first, so a
reader never sees half of it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from ptflow.store import sync
from ptflow.store.entries import (
    JSON_TMP,
    DigestMemo,
    file_problems,
    identity_problem,
    key_lock,
    read_manifest,
    remove_path,
    salvage,
    sha256_file,
)
from ptflow.store.layout import LOCK_SUFFIX, MANIFEST, TMP_PREFIX, TOKENS_INFIX, WORK_SUFFIX, Layout
from ptflow.store.lineage import read_lineage

log = logging.getLogger("ptflow.gc")

STALE_TMP_S = 30 * 60  # a temp folder untouched this long, with its key unlocked, was left by a crash
DAY_S = 24 * 3600


@dataclass
class Entry:
    """One finished store entry as `ptflow cache list` shows it."""

    stage: str
    key: str
    path: Path
    size_bytes: int
    last_used: float  # the folder's mtime: set when the entry is written or reused
    runs: list[str] = field(default_factory=list)


def list_entries(layout: Layout) -> list[Entry]:
    """Every finished entry, with the runs whose output folders link its files or whose lineage names it."""
    users = _references(layout)
    found = []
    for stage in layout.stages():
        for folder in sorted(layout.stage_dir(stage).iterdir()):
            if not _is_entry(folder):
                continue
            files = [p for p in folder.rglob("*") if p.is_file()]
            runs = sorted({run for p in files for run in users.get(_inode(p), ())} | users.get(("key", folder.name), set()))
            found.append(Entry(stage, folder.name, folder, sum(p.stat().st_size for p in files),
                               folder.stat().st_mtime, runs))
    return found


def _is_entry(folder: Path) -> bool:
    return folder.is_dir() and not folder.name.startswith(".") and "." not in folder.name \
        and (folder / MANIFEST).is_file()


def _inode(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_dev, st.st_ino


def _references(layout: Layout) -> dict:
    """(device, inode) -> run names whose runs/<run>/ folder holds that file; ("key", key) -> lineage run names."""
    users: dict = {}
    runs = layout.root / "runs"
    for run in sorted(runs.iterdir()) if runs.is_dir() else []:
        for path in run.rglob("*"):
            if path.is_file() and not path.is_symlink():
                users.setdefault(_inode(path), set()).add(run.name)
    lineage = layout.root / "lineage"
    for file in sorted(lineage.glob("*.jsonl")) if lineage.is_dir() else []:
        for record in read_lineage(layout, file.stem):
            users.setdefault(("key", record["key"]), set()).add(file.stem)
    return users


def collect(layout: Layout, dry_run: bool = False, older_than_days: float | None = None,
            stale_tmp_s: float = STALE_TMP_S, now: float | None = None) -> list[tuple[Path | str, str]]:
    """Remove (or with `dry_run` only list) what no run needs, here and on the object store; returns (path or
    URL, why) for each."""
    now = time.time() if now is None else now
    doomed = []
    for stage in layout.stages():
        for path in sorted(layout.stage_dir(stage).iterdir()):
            why = _why_stale(layout, stage, path, now, stale_tmp_s)
            if why:
                doomed.append((stage, path, why))
    if older_than_days is not None:
        doomed += [(e.stage, e.path, f"unused entry, last used {_age(now - e.last_used)} ago")
                   for e in list_entries(layout) if not e.runs and now - e.last_used > older_than_days * DAY_S]
    removed: list[tuple[Path | str, str]] = []
    for stage, path, why in doomed:
        if dry_run or _remove_unlocked(layout, stage, path):
            removed.append((path, why))
    for path, why in _stray_temp_files(layout, now, stale_tmp_s):
        if not dry_run:
            path.unlink(missing_ok=True)
        removed.append((path, why))
    return removed + collect_remote(layout, dry_run, older_than_days, stale_tmp_s, now)


def _stray_temp_files(layout: Layout, now: float, stale_tmp_s: float) -> list[tuple[Path, str]]:
    """`write_json_atomic`'s `.<name>.<pid>.tmp` files (the input-digest memo, a stage's index) that a kill -9
    between writing and renaming left; no lock guards them, and a write takes milliseconds, so age alone tells."""
    folders = [layout.root / "cache", *(layout.stage_dir(stage) for stage in layout.stages())]
    found = []
    for path in sorted(p for folder in folders if folder.is_dir() for p in folder.glob(".*.tmp")):
        if JSON_TMP.match(path.name) and path.is_file():
            old = now - path.stat().st_mtime
            if old > stale_tmp_s:
                found.append((path, f"temp file left by an interrupted write ({_age(old)} old)"))
    return found


def collect_remote(layout: Layout, dry_run: bool, older_than_days: float | None, stale_tmp_s: float,
                   now: float) -> list[tuple[str, str]]:
    """The sweep of `collect` on the object store this cache directory belongs to (none for a local store)."""
    remote = layout.remote
    if remote is None:
        return []
    folders: dict[tuple[str, str], dict[str, float]] = {}  # (stage, key or key.work) -> {file: modified}
    for rel, modified in remote.listing("cache").items():
        parts = rel.split("/")
        if len(parts) > 2:  # cache/<stage>/<folder>/<file>; stage bookkeeping files stay
            folders.setdefault((parts[0], parts[1]), {})["/".join(parts[2:])] = modified
    used = _remote_users(layout) if older_than_days is not None else set()
    removed = []
    for (stage, name), files in sorted(folders.items()):
        why = _why_remote_stale(layout, stage, name, files, folders, now, stale_tmp_s, older_than_days, used)
        if why and (dry_run or _remove_remote(layout, stage, name, files)):
            removed.append((f"{remote.url}/cache/{stage}/{name}", why))
    return removed


def _why_remote_stale(layout: Layout, stage: str, name: str, files: dict[str, float], folders: dict, now: float,
                      stale_tmp_s: float, older_than_days: float | None, used: set[str]) -> str | None:
    if name.endswith(WORK_SUFFIX):
        finished = MANIFEST in folders.get((stage, name.removesuffix(WORK_SUFFIX)), {})
        return "work folder (checkpoints) of a key that has since finished" if finished else None
    if "." in name or name.startswith("."):
        return None
    if MANIFEST not in files:
        newest = max(files.values())
        stale = now - newest > stale_tmp_s
        return f"upload left unfinished, no manifest.json ({_age(now - newest)} old)" if stale else None
    if older_than_days is None or name in used:
        return None
    local = layout.artifact(stage, name)
    last_used = max(files[MANIFEST], local.stat().st_mtime if local.is_dir() else 0.0)
    return f"unused entry, last used {_age(now - last_used)} ago" if now - last_used > older_than_days * DAY_S \
        else None


def _remote_users(layout: Layout) -> set[str]:
    """Keys some run needs: named by a lineage file on the object store, or linked by a run on this machine."""
    keys = {e.key for e in list_entries(layout) if e.runs}
    for rel in layout.remote.listing("lineage"):
        if rel.endswith(".jsonl") and "/" not in rel:
            keys |= {record["key"] for record in read_lineage(layout, rel.removesuffix(".jsonl"))}
    return keys


def _remove_remote(layout: Layout, stage: str, name: str, files: dict[str, float]) -> bool:
    """Delete a remote folder (an entry's manifest first) unless a build of its key runs on this machine."""
    key = name.removesuffix(WORK_SUFFIX)
    with key_lock(layout, stage, key, wait=False) as held:
        if not held:
            log.info("cache gc: keeping %s/cache/%s/%s (its key is locked by a running build)", layout.remote.url,
                     stage, name)
            return False
        if name.endswith(WORK_SUFFIX):
            sync.drop_work(layout, stage, key)
        elif MANIFEST in files:
            sync.drop(layout, stage, key)
        else:
            layout.remote.remove(f"cache/{stage}/{name}")
        layout.lock(stage, key).unlink(missing_ok=True)
    return True


def _why_stale(layout: Layout, stage: str, path: Path, now: float, stale_tmp_s: float) -> str | None:
    name = path.name
    if name.startswith(TMP_PREFIX) and path.is_dir() and now - path.stat().st_mtime > stale_tmp_s:
        return f"temp folder left by an interrupted write ({_age(now - path.stat().st_mtime)} old)"
    if name.startswith(".") and TOKENS_INFIX in name and path.is_dir() and now - path.stat().st_mtime > stale_tmp_s:
        return f"token files of a stopped streamed training run ({_age(now - path.stat().st_mtime)} untouched)"
    if name.endswith(WORK_SUFFIX) and _is_entry(layout.artifact(stage, name.removesuffix(WORK_SUFFIX))):
        return "work folder (checkpoints) of a key that has since finished"
    if name.startswith(".") and name.endswith(LOCK_SUFFIX):
        return "lock file"
    return None


def _key_of(path: Path) -> str:
    """The key a store path belongs to: `<key>`, `<key>.work`, `.<key>.lock`, `.tmp-<key>-<pid>-<id>`,
    `.<key>.tokens-<host>`."""
    name = path.name
    if name.startswith(TMP_PREFIX):
        return name.removeprefix(TMP_PREFIX).split("-")[0]
    return name.lstrip(".").split(".")[0]


def _remove_unlocked(layout: Layout, stage: str, path: Path) -> bool:
    """Remove `path` unless a process holds its key's lock (then it is in use and kept)."""
    key = _key_of(path)
    with key_lock(layout, stage, key, wait=False) as held:
        if not held:
            log.info("cache gc: keeping %s (its key is locked by a running build)", path)
            return False
        remove_path(layout, stage, key, path)
        layout.lock(stage, key).unlink(missing_ok=True)  # a lock file is only worth keeping while in use
    return True


def verify(layout: Layout, dry_run: bool = False) -> list[str]:
    """Re-hash every entry and every memoised input file; returns one line per problem found.

    A damaged entry is removed (a train entry keeps its intact checkpoints to resume from) so the
    next run rebuilds it; a changed input file gets its new digest, so the next run's keys see it.
    """
    problems = []
    for stage in layout.stages():
        for folder in sorted(layout.stage_dir(stage).iterdir()):
            if not _is_entry(folder) and not folder.is_symlink():
                continue
            manifest = read_manifest(folder)
            wrong = identity_problem(layout, stage, folder.name, folder, manifest)
            damaged = [] if wrong else list(file_problems(folder, manifest, verify=True).values())
            if wrong or damaged:
                problems.append(f"{stage}/{folder.name}: {wrong or '; '.join(damaged)}")
                if not dry_run:
                    with key_lock(layout, stage, folder.name):
                        salvage(layout, stage, folder.name, problems[-1], verify=True)
    return problems + verify_inputs(layout, dry_run)


def verify_inputs(layout: Layout, dry_run: bool = False) -> list[str]:
    """Re-hash every memoised input file and record the new digest of each changed one, so keys computed
    afterwards see the change (forcing a stage should call this: the memo trusts size and mtime)."""
    problems, memo = [], DigestMemo(layout)
    for name, (_, digest) in sorted(memo.memo.items()):
        path = Path(name)
        if not path.is_file():
            continue
        now = sha256_file(path)
        if now != digest:
            problems.append(f"input {path}: content changed although its size and mtime did not "
                            "(the next run re-keys what reads it)")
            st = path.stat()
            memo.memo[name] = [f"{st.st_size}:{st.st_mtime_ns}", now]
            memo.dirty = True
    if not dry_run:
        memo.save()
    return problems


def render(entries: list[Entry]) -> str:
    """The table `ptflow cache list` prints."""
    rows = [f"{'stage':<16} {'key':<12} {'size':>10}  {'last used':<19}  runs"]
    for e in entries:
        used = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.last_used))
        rows.append(f"{e.stage:<16} {e.key[:12]:<12} {_size(e.size_bytes):>10}  {used:<19}  {', '.join(e.runs) or '-'}")
    total = sum(e.size_bytes for e in entries)
    rows.append(f"{len(entries)} entries, {_size(total)} in {layout_root(entries)}")
    return "\n".join(rows)


def layout_root(entries: list[Entry]) -> str:
    return str(entries[0].path.parents[2]) if entries else "the store"


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _age(seconds: float) -> str:
    if seconds >= DAY_S:
        return f"{seconds / DAY_S:.1f} days"
    return f"{seconds / 60:.0f} min"
