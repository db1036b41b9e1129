"""Every path ptflow writes, in one place.

    <root>/cache/<stage>/<key>/          a finished artifact (manifest.json last, then renamed in)
    <root>/cache/<stage>/<key>.work/     a resumable stage's work in progress (training checkpoints)
    <root>/cache/<stage>/.<key>.tokens-<host>/  a streamed training run's token files on node <host>, shared by
                                         its ranks there (ptflow/data/node_tokens.py); swept by gc when stale
    <root>/cache/<stage>/.tmp-<key>-*    a write in progress; never read, swept when stale (`ptflow cache gc`)
    <root>/cache/<stage>/.<key>.lock     the key's builder lock (flock)
    <root>/cache/<stage>/index.json      a stage's bookkeeping (tokenize: what each file was last tokenized with)
    <root>/runs/<run_name>/              the default output_dir of a run
    <root>/lineage/<run_name>.jsonl      the models a run_name has trained, oldest first (continual pretraining)
    <root>/compile-cache/<torch-triton-device>/   PyTorch's compile caches (Inductor, Triton), shared by train stages
    <root>/run-records/<run_name>.json   the newest `ptflow run` of a run_name: state, config, last step (`ptflow runs`)

The root is `store:` from the config, else $PTFLOW_HOME, else ~/.cache/ptflow: a local folder,
a `file://` URL, a shared filesystem (NFS, EFS, Filestore, a mounted bucket) that every worker
mounts at the same path, or an object store URL (s3://, gs://, any fsspec URL). For an object
store, `root` is this machine's cache directory for it (laid out as above, plus `remote.json`
naming the URL; see store/remote.py) and `remote` is the bucket that entries, checkpoints and
lineage are synced with (store/sync.py); `runs/` stays on the machine. Nothing is created at
import; folders appear when a stage writes (a remote store's cache directory when it is resolved).
"""

from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path

from ptflow.store import remote

MANIFEST = "manifest.json"
TMP_PREFIX = ".tmp-"
LOCK_SUFFIX = ".lock"
WORK_SUFFIX = ".work"
TOKENS_INFIX = ".tokens-"


class Layout:
    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        self.remote = remote.bound(self.root)  # the object store this folder caches, None for a local store

    @classmethod
    def resolve(cls, store: str | None = None) -> "Layout":
        root = str(store or os.environ.get("PTFLOW_HOME") or Path.home() / ".cache" / "ptflow")
        if remote.is_remote(root):
            url = remote.check_url(root)
            cache = remote.cache_dir(url)
            remote.bind(cache, url)
            return cls(cache)
        if "://" in root:  # file:// and the like
            from fsspec.utils import infer_storage_options  # only here: see store/remote.py

            root = infer_storage_options(root)["path"]
        return cls(root)

    def stage_dir(self, stage: str) -> Path:
        return self.root / "cache" / stage

    def artifact(self, stage: str, key: str) -> Path:
        return self.stage_dir(stage) / key

    def compile_cache(self) -> Path:
        """PyTorch's compile caches (ptflow/train/compile_cache.py), shared by every train stage of this store."""
        return self.root / "compile-cache"

    def work(self, stage: str, key: str) -> Path:
        return self.stage_dir(stage) / f"{key}{WORK_SUFFIX}"

    @staticmethod
    def node_tokens(work: Path) -> Path:
        """The token files a streamed training run in `work` shares among its ranks on this node: beside the work
        folder, not in it (the work folder becomes the entry), and named by host, so a store on a shared
        filesystem gives every node its own."""
        return work.with_name(f".{work.name.removesuffix(WORK_SUFFIX)}{TOKENS_INFIX}{socket.gethostname()}")

    def stage_index(self, stage: str) -> Path:
        """A stage's own bookkeeping file (token shards: what each file was last tokenized with)."""
        return self.stage_dir(stage) / "index.json"

    def tmp(self, stage: str, key: str) -> Path:
        return self.stage_dir(stage) / f"{TMP_PREFIX}{key}-{os.getpid()}-{uuid.uuid4().hex[:8]}"

    def lock(self, stage: str, key: str) -> Path:
        return self.stage_dir(stage) / f".{key}{LOCK_SUFFIX}"

    def stages(self) -> list[str]:
        """The stages that have a folder in the store."""
        cache = self.root / "cache"
        return sorted(p.name for p in cache.iterdir() if p.is_dir()) if cache.is_dir() else []


    def lineage_file(self, run_name: str) -> Path:
        return self.root / "lineage" / f"{run_name}.jsonl"

    def run_record(self, run_name: str) -> Path:
        return self.root / "run-records" / f"{run_name}.json"

    def run_records(self) -> Path:
        return self.root / "run-records"

    def run_dir(self, run_name: str) -> Path:
        return self.root / "runs" / run_name

    def output_dir(self, output_dir: str | None, run_name: str) -> Path:
        return Path(output_dir).expanduser().resolve() if output_dir else self.run_dir(run_name)

    def __repr__(self) -> str:
        return f"Layout({str(self.root)!r}{f', remote={self.remote.url!r}' if self.remote else ''})"

    def __reduce__(self):
        return (Layout, (str(self.root),))
