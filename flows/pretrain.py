"""The pretraining flow: LLaMA-Factory's run_pt as cached, resumable Prefect stages.

    ptflow run configs/quickstart.yaml            # CLI (embedded Prefect, no server needed)
    prefect deploy flows/pretrain.py:pretrain     # as a deployment

Parameters are the config path and dotted overrides, never the config's values, so
nothing secret reaches Prefect's stored parameters.
"""

from __future__ import annotations

import tasks  # noqa: F401  (routes ptflow logs into Prefect)
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from ptflow.config import load_config
from ptflow.layout import Layout
from ptflow.outputs import export, prepare_output_dir
from ptflow.preflight import preflight
from tasks.runner import report_stages, run_stage
from tasks.stages import evaluate, load_tokenizer, plot_loss, prepare_dataset, train, write_model_card


@flow(name="pretrain")
def pretrain(config_path: str, overrides: list[str] | None = None) -> dict:
    cfg = load_config(config_path, overrides or [])
    preflight(cfg, config_path)
    layout = Layout.resolve(cfg.store)
    output_dir = prepare_output_dir(layout.output_dir(cfg.output.output_dir, cfg.run_name))

    tokenizer = run_stage(load_tokenizer, cfg.model, layout=layout)
    dataset = run_stage(prepare_dataset, cfg.data, tokenizer, seed=cfg.seed, layout=layout)
    model = run_stage(train, cfg.model, cfg.train, tokenizer, dataset, seed=cfg.seed, layout=layout)
    export(model, output_dir)
    evaluation = None
    if cfg.eval.do_eval and dataset.stats["eval_blocks"]:
        evaluation = run_stage(evaluate, cfg.eval, model, dataset, layout=layout)
        export(evaluation, output_dir)
    plots = run_stage(plot_loss, model, layout=layout) if cfg.output.plot_loss else None
    export(plots, output_dir)
    provenance = {"prefect flow run": f"{flow_run.get_flow_name()}/{flow_run.get_name()} ({flow_run.get_id()})"}
    card = run_stage(write_model_card, cfg, tokenizer, dataset, model, evaluation, plots,
                     provenance=provenance, layout=layout)
    export(card, output_dir)

    stages = report_stages([tokenizer, dataset, model, evaluation, plots, card])
    results = evaluation.stats if evaluation else {}
    create_markdown_artifact((card.dir / "README.md").read_text(), key="model-card", description="Model card")
    summary = {"output_dir": str(output_dir), "store": str(layout.root), "stages": stages,
               "train_loss": model.stats.get("train_loss"), "first_loss": model.stats.get("first_loss"),
               "final_loss": model.stats.get("final_loss"),
               "eval_loss": results.get("eval_loss"), "perplexity": results.get("perplexity")}
    get_run_logger().info("outputs in %s (eval_loss %s, perplexity %s)", output_dir, summary["eval_loss"],
                          summary["perplexity"])
    return summary
