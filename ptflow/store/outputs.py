"""Fill the user's `output_dir` with the files of finished artifacts, in LLaMA-Factory's layout.

Artifacts stay in the store; the output folder gets hard links (copies across
filesystems), so a 4 GB model is not duplicated. Files are linked, never edited: change
one in the output folder and the store detects it by digest and rebuilds. Each file is
placed by renaming a private link over it, so two runs exporting at once both succeed.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

from ptflow.errors import StoreError
from ptflow.store.entries import Artifact, tree_files
from ptflow.store.layout import MANIFEST


def prepare_output_dir(path: Path) -> Path:
    if path.exists() and not path.is_dir():
        raise StoreError(f"output.output_dir: {path} is a file; give a folder path")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreError(f"output.output_dir: cannot create {path}: {exc.strerror}") from None
    if not os.access(path, os.W_OK):
        raise StoreError(f"output.output_dir: {path} is not writable")
    return path


def export(artifact: Artifact | None, output_dir: Path, skip: tuple[str, ...] = ()) -> list[str]:
    """Link every file of `artifact` (but its manifest and `skip` prefixes) into `output_dir`."""
    if artifact is None:
        return []
    written = []
    for src in tree_files(artifact.dir):
        rel = src.relative_to(artifact.dir).as_posix()
        if rel.startswith(skip) or src.name == MANIFEST:
            continue
        dst = output_dir / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if not (dst.is_file() and not dst.is_symlink() and os.path.samefile(src, dst)):
            _place(src, dst)
        written.append(rel)
    return written


def _place(src: Path, dst: Path) -> None:
    """Link (or copy) `src` to a private name beside `dst`, then rename it over `dst`: a run exporting into
    the same folder at the same time never sees a missing or half-copied file, nor trips over this one's."""
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copy2(src, tmp)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)  # rename leaves both names when dst is already a link to the same file
