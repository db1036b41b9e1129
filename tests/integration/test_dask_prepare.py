"""Preparation on a real dask.distributed cluster (scheduler + worker processes) through prefect-dask's DaskTaskRunner:
the same token cache entries and byte-identical blocks as the local process pool."""

from __future__ import annotations

import hashlib
from pathlib import Path

from distributed import LocalCluster  # noqa: E402
from prefect import flow  # noqa: E402

from ptflow.config.schema import DataSection  # noqa: E402
from ptflow.data import sources  # noqa: E402
from ptflow.data.dataset import prepare_dataset  # noqa: E402
from ptflow.store.layout import Layout  # noqa: E402
from tasks.tokenize import tokenize_on_dask  # noqa: E402


def token_cache(layout: Layout) -> dict[str, str]:
    """Every tokenize entry's files, by key and name -> sha256 (manifests aside: they hold build times)."""
    root = layout.root / "cache" / "tokenize"
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.glob("*/*.npy"))}


def test_shards_tokenized_on_a_dask_cluster_give_the_local_blocks(prefect_api, tmp_path, tiny_data_dir,
                                                                   tokenizer_artifact, monkeypatch):
    monkeypatch.setattr(sources, "MIN_SHARD_BYTES", 8192)  # planned in this process: ~16 shards for the workers
    section = DataSection(dataset="stdlib_docs,three", dataset_dir=str(tiny_data_dir), cutoff_len=32, val_size=0.1,
                          doc_mask=True, preprocessing_num_workers=1)
    local = prepare_dataset(section, tokenizer_artifact, Layout(tmp_path / "local"))
    on_dask = Layout(tmp_path / "dask")
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        address = cluster.scheduler_address

        @flow(name="prepare-on-dask")
        def prepare_on_dask():
            built = tokenize_on_dask(address, section, tokenizer_artifact, on_dask)
            return built, prepare_dataset(section, tokenizer_artifact, on_dask)

        built, remote = prepare_on_dask()
        assert len(cluster.scheduler_info["workers"]) == 2
    assert built == local.stats["shards_built"] > 2
    assert remote.stats["shards_built"] == 0 and remote.stats["shards_reused"] == built  # packing only
    assert token_cache(on_dask) == token_cache(Layout(tmp_path / "local"))  # the same keys, the same bytes
    for name in ("train.npy", "eval.npy", "train_doc_starts.npy", "train_doc_offsets.npy"):
        assert (Path(remote.path) / name).read_bytes() == (Path(local.path) / name).read_bytes()
    assert remote.digest == local.digest
