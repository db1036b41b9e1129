"""Shard tokenization on a Dask cluster: one Prefect task per missing shard, over prefect-dask's DaskTaskRunner.

By default prepare_dataset tokenizes with its own process pool on the machine it runs on. With
`data.dask_address: tcp://scheduler:8786`, the prepare_dataset task first builds every shard the
token cache lacks as a `tokenize_shard` task on that cluster's workers, then calls the stage,
which finds them cached and only packs. The cache entries are the same either way (same keys,
same bytes), so a later local run reuses them. Workers need ptflow installed and the store and
the data files at the same paths as the flow (a shared filesystem), see docs/deploy.md.

    built = tokenize_on_dask("tcp://127.0.0.1:8786", cfg.data, tokenizer, layout)
"""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from ptflow.config.schema import DataSection
from ptflow.data import dataset, shards
from ptflow.errors import ConfigError
from ptflow.store.entries import Artifact
from ptflow.store.layout import Layout
from tasks.policy import transient_only


@task(name="tokenize_shard", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[5, 30],
      retry_condition_fn=transient_only)
def tokenize_shard(root: str, tokenizer_dir: str, batch_size: int, job: shards.ShardTask) -> int:
    return shards.tokenize_task(root, tokenizer_dir, batch_size, job).tokens


def tokenize_on_dask(address: str, section: DataSection, tokenizer: Artifact, layout: Layout) -> int:
    """Build the token cache's missing shards on the cluster at `address`; how many were built."""
    try:  # an optional extra: only a run that names a scheduler needs it
        from prefect_dask import DaskTaskRunner
    except ImportError:
        raise ConfigError(f"data.dask_address: {address} needs prefect-dask and dask.distributed; install them with "
                          "pip install -c constraints.txt -e '.[dask]', or remove data.dask_address") from None
    jobs = dataset.shards_to_tokenize(section, tokenizer, layout)
    if not jobs:
        return 0
    common = {"root": str(layout.root), "tokenizer_dir": str(tokenizer.path),
              "batch_size": section.preprocessing_batch_size}
    with DaskTaskRunner(address=address) as runner:
        futures = [runner.submit(tokenize_shard, {**common, "job": job}) for job in jobs]
        for future in futures:
            future.result()  # a worker's DataError (bad line, ...) fails the stage here, finished shards stay cached
    return len(jobs)
