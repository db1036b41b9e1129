"""A store root on object storage (s3://, gs://, any fsspec URL), reached from a local cache directory.

Stages read and write local paths (memory-mapped blocks, atomic renames), which object stores
do not offer, so a remote store has a cache directory on each machine that is laid out like a
local store; `ptflow.store.sync` moves entries between the two. This module only names the
bucket: it checks the URL, picks the cache directory, and ties that directory to its URL with a
marker file (`remote.json`), so any process that opens the cache directory (a tokenizer worker,
a torchrun rank) finds the same bucket without being handed it.

Credentials never pass through here: fsspec's backends read them from their usual places (AWS_*
variables, ~/.aws, GOOGLE_APPLICATION_CREDENTIALS, fsspec config), and a URL that embeds them is
refused, so the config, Prefect parameters, logs and manifests hold only the bare URL.
"""

from __future__ import annotations

import hashlib
import json
import os
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from ptflow.errors import StoreError, is_transient

if TYPE_CHECKING:
    import fsspec

# fsspec (and asyncio under it) is imported only for a URL store: a local store, and every tokenizer worker
# process importing this module through the store layout, starts about 60 ms sooner without it.

MARKER = "remote.json"
EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}  # protocol -> pip extra of ptflow that installs it


def is_remote(root: str) -> bool:
    """Whether a store root names an object store (a URL whose protocol is not the local filesystem)."""
    if "://" not in root:
        return False
    from fsspec.utils import infer_storage_options

    return infer_storage_options(root)["protocol"] not in ("file", "local")


def check_url(url: str) -> str:
    """The URL without a trailing slash, or StoreError: credentials in it, or no installed backend."""
    parts = urlsplit(url)
    if "@" in parts.netloc or parts.query:
        shown = f"{parts.scheme}://<redacted>@{parts.netloc.rsplit('@', 1)[-1]}{parts.path}"
        raise StoreError(f"store {shown}: the URL holds credentials; give only the bucket and prefix "
                         f"({parts.scheme}://bucket/prefix) and put credentials where the storage library reads "
                         "them: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or ~/.aws for s3://, "
                         "GOOGLE_APPLICATION_CREDENTIALS for gs://, or fsspec's config. See docs/deploy.md.")
    if not parts.netloc:
        raise StoreError(f"store {url!r}: no bucket in the URL; write {parts.scheme}://bucket/prefix")
    import fsspec

    try:
        fsspec.get_filesystem_class(parts.scheme)
    except (ImportError, ValueError) as exc:
        extra = EXTRAS.get(parts.scheme)
        fix = f"pip install 'ptflow[{extra}]'" if extra else f"install the fsspec backend for {parts.scheme}://"
        raise StoreError(f"store {url}: no filesystem for {parts.scheme}:// is installed ({exc}); {fix}") from None
    return url.rstrip("/")


def cache_dir(url: str) -> Path:
    """This machine's cache directory for `url`: $PTFLOW_CACHE_DIR, else <PTFLOW_HOME or ~/.cache/ptflow>/remote/<hash>."""
    explicit = os.environ.get("PTFLOW_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser().resolve()
    home = os.environ.get("PTFLOW_HOME")
    base = Path(home) if home and "://" not in home else Path.home() / ".cache" / "ptflow"
    return (base.expanduser() / "remote" / hashlib.sha256(url.encode()).hexdigest()[:16]).resolve()


def bind(root: Path, url: str) -> None:
    """Tie the cache directory `root` to `url` (once); a directory that caches another store is refused."""
    marker = root / MARKER
    bound_url = _read_marker(marker)
    if bound_url == url:
        return
    if bound_url is not None:
        raise StoreError(f"cache directory {root} caches the store {bound_url}, not {url}; give each store its own "
                         "cache directory (PTFLOW_CACHE_DIR) or unset PTFLOW_CACHE_DIR for the default")
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = marker.with_name(f".{MARKER}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"url": url}))
        os.replace(tmp, marker)
    except OSError as exc:
        raise StoreError(f"cannot create the local cache directory {root} for the store {url}: {exc.strerror}. "
                         "Set PTFLOW_CACHE_DIR to a writable folder.") from None


def bound(root: Path) -> "Remote | None":
    """The object store whose cache directory is `root`, or None for a local store."""
    url = _read_marker(root / MARKER)
    return Remote(url) if url else None


def _read_marker(marker: Path) -> str | None:
    try:
        return json.loads(marker.read_text())["url"]
    except OSError:
        return None  # no marker (a local store), or no folder yet: the store's own checks name the problem
    except (ValueError, KeyError, TypeError):
        raise StoreError(f"{marker} is unreadable; delete it (it only names the store this cache directory "
                         "belongs to) and re-run") from None


class Remote:
    """The bucket side of a store: files addressed by their path relative to the store root."""

    def __init__(self, url: str):
        self.url = url  # the only state: a Layout holding it stays a plain, picklable value

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        return self._open()[0]

    def path(self, rel: str) -> str:
        return f"{self._open()[1].rstrip('/')}/{rel}".rstrip("/")

    def _open(self) -> tuple[fsspec.AbstractFileSystem, str]:
        import fsspec

        return fsspec.core.url_to_fs(self.url)  # fsspec keeps one filesystem instance per URL and options

    def read(self, rel: str) -> bytes | None:
        """A small file's bytes, or None when it does not exist (one GET, no listing cache)."""
        try:
            return self._call("read", rel, self.fs.cat_file, self.path(rel))
        except FileNotFoundError:
            return None

    def files(self, rel: str) -> dict[str, int]:
        """Every file under `rel`, as {path relative to rel: size}; {} when there is none."""
        return {name: info.get("size", 0) for name, info in self._find(rel).items()}

    def listing(self, rel: str) -> dict[str, float]:
        """Every file under `rel`, as {path relative to rel: last-modified time (epoch seconds)}; {} when none."""
        return {name: _modified(info) for name, info in self._find(rel).items()}

    def _find(self, rel: str) -> dict[str, dict]:
        folder = self.path(rel)
        self.fs.invalidate_cache(folder)
        try:
            found = self._call("list", rel, self.fs.find, folder, detail=True)
        except FileNotFoundError:
            return {}
        return {name[len(folder) + 1:]: info for name, info in found.items()
                if info.get("type") != "directory" and name.startswith(folder + "/")}

    def put(self, local: Path, rel: str) -> None:
        self._call("upload", rel, self.fs.put_file, str(local), self.path(rel))

    def get(self, rel: str, local: Path) -> None:
        local.parent.mkdir(parents=True, exist_ok=True)
        self._call("download", rel, self.fs.get_file, self.path(rel), str(local))

    def remove(self, rel: str) -> None:
        """Delete a file or everything under a folder; absent is fine."""
        target = self.path(rel)
        try:
            self._call("delete", rel, self.fs.rm, target, recursive=True)
        except FileNotFoundError:
            pass
        self.fs.invalidate_cache(target)

    def _call(self, action: str, rel: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except FileNotFoundError:
            raise
        except Exception as exc:  # botocore/google errors are not all OSError; name the store, never credentials
            error = StoreError(f"store {self.url}: {action} of {rel} failed ({type(exc).__name__}: {str(exc)[:300]}). "
                               "Check the network and the credentials the storage library reads (AWS_* variables "
                               "or ~/.aws for s3://, GOOGLE_APPLICATION_CREDENTIALS for gs://); finished stages "
                               "stay cached.")
            error.transient = is_transient(exc)  # a dropped connection is worth a task retry; a denied key is not
            raise error from exc

    def __repr__(self) -> str:
        return f"Remote({self.url!r})"



def _modified(info: dict) -> float:
    """A listed file's last-modified time from the field its backend fills (s3: LastModified, gcs: updated, memory:
    created), in epoch seconds; 0 when it has none."""
    value = info.get("LastModified") or info.get("mtime") or info.get("updated") or info.get("created") or 0
    if isinstance(value, datetime):
        return value.timestamp()
    if isinstance(value, str):
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    return float(value)
