"""The train stage as a flow of its own, for the gpu work pool (deployment `train-stage/gpu` in prefect.yaml).

The pretrain flow calls it through run_deployment when `orchestration.placement: gpu-pool`.
It gets the config path and overrides (never the config's values) and the keys of its input
artifacts, finds those in the store that both pools share, trains (resuming from the newest
checkpoint of an interrupted run), evaluates the model on the same GPUs, and leaves both in
the store, where the parent finds them by key. A config and store that the gpu worker cannot read fail at once, naming the fix.
"""

from __future__ import annotations

from prefect import flow

import tasks  # noqa: F401  (routes ptflow logs into Prefect)
from ptflow.config.loading import load_config
from ptflow.store.layout import Layout
from ptflow.store.lineage import start_from_key
from ptflow.store.verdict import locate
from tasks.runner import run_stage
from tasks.stages import evaluate, train


@flow(name="train-stage")
def train_stage(config_path: str, tokenizer_key: str, dataset_key: str, overrides: list[str] | None = None,
                parent_key: str | None = None, force: bool = False) -> dict:
    cfg = load_config(config_path, overrides or [])
    layout = Layout.resolve(cfg.store)
    tokenizer = locate(layout, "load_tokenizer", tokenizer_key)
    dataset = locate(layout, "prepare_dataset", dataset_key)
    start = start_from_key(cfg, layout, parent_key)
    model = run_stage(train, start.section, cfg.train, tokenizer, dataset, seed=cfg.seed, layout=layout,
                      eval_batch_size=cfg.eval.per_device_eval_batch_size, redo={"train"} if force else ())
    if cfg.eval.do_eval and dataset.stats["eval_blocks"]:  # where the model is: the parent then finds it stored
        run_stage(evaluate, cfg.eval, model, dataset, layout=layout, redo={"evaluate"} if force else ())
    return {"key": model.key, "path": model.path, "hit": model.hit, "reason": model.reason,
            "resumed_from": model.stats.get("resumed_from"), "final_loss": model.stats.get("final_loss")}
