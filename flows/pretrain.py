"""The pretraining flow: LLaMA-Factory's run_pt as cached, resumable Prefect stages.

    ptflow run configs/quickstart.yaml            # CLI (embedded Prefect, no server needed)
    ptflow deploy                                 # work pools + the deployments of prefect.yaml

Parameters are the config path and dotted overrides, never the config's values, so
nothing secret reaches Prefect's stored parameters. A re-run (or a flow-level retry, set per
deployment in prefect.yaml) reuses every finished stage and resumes training from its newest
checkpoint; `orchestration.force` / `from_stage` redo chosen stages, and training runs here or
on the gpu work pool (`orchestration.placement`, see tasks/placement.py).
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

import tasks  # noqa: F401  (routes ptflow logs into Prefect)
from ptflow.config.loading import load_config
from ptflow.preflight import preflight
from ptflow.publish.evaluate import existing_model
from ptflow.store.gc import verify_inputs
from ptflow.store.layout import Layout
from ptflow.store.outputs import export, prepare_output_dir
from tasks.placement import train_model
from tasks.runner import report_metrics, report_stages, run_stage
from tasks.stages import evaluate, load_tokenizer, plot_loss, prepare_dataset, push_to_hub, write_model_card
from tasks.ui import show_card, show_plots, show_publish


@flow(name="pretrain")
def pretrain(config_path: str, overrides: list[str] | None = None) -> dict:
    cfg = load_config(config_path, overrides or [])
    preflight(cfg, config_path)
    layout = Layout.resolve(cfg.store)
    output_dir = prepare_output_dir(layout.output_dir(cfg.output.output_dir, cfg.run_name))
    redo = cfg.orchestration.forced_stages()
    if redo:  # a forced stage re-hashes its inputs: the fast check trusts size and mtime
        verify_inputs(layout)

    tokenizer = run_stage(load_tokenizer, cfg.model, layout=layout, redo=redo)
    dataset = run_stage(prepare_dataset, cfg.data, tokenizer, seed=cfg.seed, layout=layout, redo=redo)
    if cfg.train.do_train:
        model = train_model(cfg, config_path, overrides or [], tokenizer, dataset, layout, redo)
        export(model, output_dir)
    else:  # evaluate-only: the given model folder, keyed by its files' content
        model = existing_model(cfg.model, layout)
    evaluation = None
    if cfg.eval.do_eval and dataset.stats["eval_blocks"]:
        evaluation = run_stage(evaluate, cfg.eval, model, dataset, layout=layout, redo=redo,
                                use_cpu=cfg.train.use_cpu)
        export(evaluation, output_dir)
    plots = card = None
    run_label = f"{flow_run.get_flow_name()}/{flow_run.get_name()} ({flow_run.get_id()})"
    if cfg.train.do_train:
        plots = run_stage(plot_loss, model, layout=layout, redo=redo) if cfg.output.plot_loss else None
        export(plots, output_dir)
        provenance = {"prefect flow run": run_label, "prefect flow run url": flow_run.get_flow_run_ui_url()}
        card = run_stage(write_model_card, cfg, tokenizer, dataset, model, evaluation, plots,
                         provenance=provenance, layout=layout, redo=redo)
        export(card, output_dir)
        show_plots(plots)
        show_card(card, plots)
    hub = None
    if cfg.output.push_to_hub:
        hub = push_to_hub(cfg.output, output_dir, [model, evaluation, plots, card], cfg.run_name, dataset.digest,
                          run_label)
        show_publish(hub)

    stages = report_stages([tokenizer, dataset, model, evaluation, plots, card])
    report_metrics(model, evaluation)
    results = evaluation.stats if evaluation else {}
    summary = {"output_dir": str(output_dir), "store": str(layout.root), "stages": stages,
               "train_loss": model.stats.get("train_loss"), "first_loss": model.stats.get("first_loss"),
               "final_loss": model.stats.get("final_loss"),
               "eval_loss": results.get("eval_loss"), "perplexity": results.get("perplexity"),
               "hub_commit_url": hub.commit_url if hub else None}
    get_run_logger().info("outputs in %s (eval_loss %s, perplexity %s)", output_dir, summary["eval_loss"],
                          summary["perplexity"])
    return summary
