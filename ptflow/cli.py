"""The `ptflow` command.

    ptflow run CONFIG [section.key=value ...]       run the pretraining flow (embedded Prefect by default)
    ptflow validate CONFIG [section.key=value ...]  check the config and its inputs without running
    ptflow config-reference                          print every config key with its default and meaning
    ptflow deploy [--pool-type gpu=kubernetes]       create prefect.yaml's work pools and apply its deployments

User errors (config, data, model, checkpoint) print a readable message and exit 2 without
a traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from ptflow.errors import PtflowError

QUIET_PREFECT = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_LOGGING_EXTRA_LOGGERS": "ptflow",
    "TOKENIZERS_PARALLELISM": "true",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ptflow", description="Pretraining as a cached, resumable Prefect flow.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("run", "run the pretraining flow"), ("validate", "check a config without running")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("config", help="YAML run config, e.g. configs/quickstart.yaml")
        p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.learning_rate=3e-4")
    sub.add_parser("config-reference", help="print every config key (markdown)")
    p = sub.add_parser("deploy", help="create the work pools of prefect.yaml and apply its deployments")
    p.add_argument("--project-dir", default=".", help="folder with prefect.yaml (default: current folder)")
    p.add_argument("--pool-type", action="append", default=[], metavar="POOL=TYPE",
                   help="work pool type for a pool that does not exist yet (default process), e.g. gpu=kubernetes")
    p.add_argument("--code-dir", help="where workers find this project (PTFLOW_PROJECT_DIR; default: --project-dir)")
    p.add_argument("--dry-run", action="store_true", help="print the prefect commands instead of running them")
    args = parser.parse_args(argv)
    try:
        if args.command == "validate":
            return validate(args.config, args.overrides)
        if args.command == "run":
            return run(args.config, args.overrides)
        if args.command == "deploy":
            from ptflow.deploy import deploy

            return deploy(args.project_dir, args.pool_type, args.code_dir, args.dry_run)
        from ptflow.config import describe_fields

        print(describe_fields())
        return 0
    except PtflowError as exc:
        print(f"ptflow: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ptflow: interrupted; re-run the same command to resume (finished stages are cached)", file=sys.stderr)
        return 130


def validate(config: str, overrides: list[str]) -> int:
    from ptflow.config import load_config
    from ptflow.preflight import preflight

    cfg = load_config(config, overrides)
    preflight(cfg, config)
    print(f"{config}: OK ({', '.join(cfg.data.dataset)} -> {cfg.model.model_name_or_path}, "
          f"cutoff_len {cfg.data.cutoff_len}, {cfg.train.finetuning_type} training)")
    return 0


def run(config: str, overrides: list[str]) -> int:
    for key, value in QUIET_PREFECT.items():
        os.environ.setdefault(key, value)
    from ptflow.config import load_config
    from ptflow.preflight import preflight

    preflight(load_config(config, overrides), config)  # fail before Prefect starts
    from flows.pretrain import pretrain

    started = time.perf_counter()
    summary = pretrain(config_path=config, overrides=list(overrides))
    elapsed = time.perf_counter() - started
    print()
    print(f"ptflow: finished in {elapsed:.1f} s")
    for row in summary["stages"]:
        print(f"  {row['stage']:<17} {row['cache']:<4}  {row['reason']}")
    for key in ("first_loss", "final_loss", "eval_loss", "perplexity"):
        if summary.get(key) is not None:
            print(f"  {key:<17} {summary[key]:.4f}")
    print(f"  outputs in {summary['output_dir']}")
    if summary.get("hub_commit_url"):
        print(f"  published to {summary['hub_commit_url']}")
    if os.environ.get("PTFLOW_SUMMARY_JSON"):
        with open(os.environ["PTFLOW_SUMMARY_JSON"], "w") as f:
            json.dump({**summary, "wall_s": elapsed}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
