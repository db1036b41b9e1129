"""The `ptflow` command.

    ptflow run CONFIG [section.key=value ...]       run the pretraining flow (embedded Prefect by default)
    ptflow validate CONFIG [section.key=value ...]  check the config and its inputs without running
    ptflow config-reference [--llamafactory]         print every config key with its default and meaning
                                                     (--llamafactory: every LLaMA-Factory key and what it becomes)
    ptflow convert-lf LF.yaml [-o OUT.yaml]          write the ptflow YAML of a LLaMA-Factory pt YAML
    ptflow deploy [--pool-type gpu=kubernetes]       create prefect.yaml's work pools and apply its deployments
    ptflow cache list|gc|verify [--store DIR]        the store's entries; sweep crash leftovers; re-hash all
    ptflow runs [--store PATH]                       the runs in this store: state, last step, output folder, lineage
    ptflow --version

`run` and `validate` also take a LLaMA-Factory pt YAML as it is (flat keys, `stage: pt`) and print
what each key became; its overrides may be flat (`learning_rate=3e-4`) or dotted.

User errors (config, data, model, checkpoint) print a readable message and exit 2 without
a traceback; anything else is a bug and keeps its traceback. Ctrl-C or SIGTERM stops a run at
once: the run's flow and task runs end Crashed, its children (torchrun, Prefect's embedded
server) are ended, and one line says how to resume (exit 130; 143 for SIGTERM).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import ptflow
from ptflow import interrupt
from ptflow.errors import PtflowError

QUIET_PREFECT = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_LOGGING_EXTRA_LOGGERS": "ptflow",
    "TOKENIZERS_PARALLELISM": "true",
    # Prefect waits 20 s for its embedded server; a first start (database migrations) on a busy machine needs more.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ptflow", description="Pretraining as a cached, resumable Prefect flow.")
    parser.add_argument("--version", action="version", version=f"ptflow {ptflow.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("run", "run the pretraining flow"), ("validate", "check a config without running")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("config", help="YAML run config, e.g. configs/quickstart.yaml")
        p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.learning_rate=3e-4")
    p = sub.add_parser("config-reference", help="print every config key (markdown)")
    p.add_argument("--llamafactory", action="store_true", help="print every LLaMA-Factory key and what it becomes")
    p = sub.add_parser("convert-lf", help="write the ptflow YAML of a LLaMA-Factory pt YAML")
    p.add_argument("config", help="LLaMA-Factory YAML (stage: pt, flat keys)")
    p.add_argument("-o", "--output", help="file to write (default: print it)")
    p = sub.add_parser("deploy", help="create the work pools of prefect.yaml and apply its deployments")
    p.add_argument("--project-dir", default=".", help="folder with prefect.yaml (default: current folder)")
    p.add_argument("--pool-type", action="append", default=[], metavar="POOL=TYPE",
                   help="work pool type for a pool that does not exist yet (default process), e.g. gpu=kubernetes")
    p.add_argument("--code-dir", help="where workers find this project (PTFLOW_PROJECT_DIR; default: --project-dir)")
    p.add_argument("--dry-run", action="store_true", help="print the prefect commands instead of running them")
    add_cache_parser(sub)
    p = sub.add_parser("runs", help="list the runs in this store: state, last step, output folder, lineage")
    p.add_argument("--store", help="store root (default: $PTFLOW_HOME, else ~/.cache/ptflow)")
    args = parser.parse_args(argv)
    try:
        if args.command == "cache":
            return cache(args)
        if args.command == "validate":
            return validate(args.config, args.overrides)
        if args.command == "run":
            return run(args.config, args.overrides)
        if args.command == "deploy":
            from flows.deploy import deploy

            return deploy(args.project_dir, args.pool_type, args.code_dir, args.dry_run)
        if args.command == "convert-lf":
            return convert_lf(args.config, args.output)
        if args.command == "runs":
            return list_runs(args.store)
        if args.llamafactory:
            from ptflow.config.llamafactory import reference_table

            print(reference_table())
            return 0
        from ptflow.config.schema import describe_fields

        print(describe_fields())
        return 0
    except PtflowError as exc:
        print(f"ptflow: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        interrupt.ignore_more()
        how = f"; resume with: {resume_command(args)}" if args.command == "run" else ""
        print(f"\nptflow: stopped by {'SIGTERM' if isinstance(exc, interrupt.Stopped) else 'Ctrl-C'}{how} "
              "(finished stages are reused, training continues from its newest checkpoint)", file=sys.stderr)
        return 143 if isinstance(exc, interrupt.Stopped) else 130


def resume_command(args: argparse.Namespace) -> str:
    return shlex.join(["ptflow", "run", args.config, *args.overrides])


def add_cache_parser(sub) -> None:
    p = sub.add_parser("cache", help="list, sweep (gc) or re-hash (verify) the store")
    p.add_argument("action", choices=("list", "gc", "verify"))
    p.add_argument("--store", help="store root (default: PTFLOW_HOME, else ~/.cache/ptflow)")
    p.add_argument("--dry-run", action="store_true", help="gc/verify: say what would be removed, remove nothing")
    p.add_argument("--older-than", type=float, metavar="DAYS",
                   help="gc: also remove entries no run uses that were last used more than DAYS ago")


def cache(args) -> int:
    from ptflow.store import gc
    from ptflow.store.layout import Layout

    layout = Layout.resolve(args.store)
    if args.action == "list":
        print(gc.render(gc.list_entries(layout)))
        return 0
    if args.action == "gc":
        removed = gc.collect(layout, dry_run=args.dry_run, older_than_days=args.older_than)
        for path, why in removed:
            print(f"{'would remove' if args.dry_run else 'removed'} {path}  ({why})")
        print(f"ptflow cache gc: {len(removed)} {'to remove' if args.dry_run else 'removed'} in {layout.root}")
        return 0
    problems = gc.verify(layout, dry_run=args.dry_run)
    for line in problems:
        print(line)
    print(f"ptflow cache verify: {len(problems)} problem(s) in {layout.root}"
          + ("" if not problems or args.dry_run else "; damaged entries removed, the next run rebuilds them"))
    return 1 if problems else 0


def validate(config: str, overrides: list[str]) -> int:
    from ptflow.config.loading import load_config
    from ptflow.preflight import preflight

    print_llamafactory_notes(config, overrides)
    cfg = load_config(config, overrides)
    preflight(cfg, config)
    print(f"{config}: OK ({', '.join(cfg.data.dataset)} -> {cfg.model.model_name_or_path}, "
          f"cutoff_len {cfg.data.cutoff_len}, {cfg.train.finetuning_type} training)")
    return 0


def run(config: str, overrides: list[str]) -> int:
    for key, value in QUIET_PREFECT.items():
        os.environ.setdefault(key, value)
    if os.environ.get("PREFECT_HOME"):  # Prefect's embedded server cannot create its SQLite file's folder
        os.makedirs(os.path.expanduser(os.environ["PREFECT_HOME"]), exist_ok=True)
    if not os.environ.get("PREFECT_API_URL"):  # the embedded server keeps its SQLite database in PREFECT_HOME
        check_prefect_home()
    from ptflow.config.loading import load_config
    from ptflow.preflight import preflight

    print_llamafactory_notes(config, overrides)
    cfg = load_config(config, overrides)
    preflight(cfg, config)  # fail before Prefect starts
    from flows.console import keep_bars_apart
    from flows.pretrain import pretrain
    from tasks.slots import is_embedded

    keep_bars_apart()
    interrupt.install()
    started = time.perf_counter()
    with recorded_run(cfg, config, overrides) as record:
        if is_embedded():  # importing it imports Prefect's whole server (3 s), which a real server's runs never need
            from flows.embedded import start_embedded_server

            start_embedded_server()
        summary = pretrain(config_path=config, overrides=list(overrides))
        record["summary"] = summary
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


PREFECT_HOME_MIN_FREE = 64 << 20


def check_prefect_home() -> None:
    """Prefect's database on a full disk fails as dozens of tracebacks and leaves the flow Running: refuse first."""
    from ptflow.errors import StoreError

    home = os.path.expanduser(os.environ.get("PREFECT_HOME") or "~/.prefect")
    folder = home if os.path.isdir(home) else os.path.dirname(home.rstrip("/")) or "."
    try:
        st = os.statvfs(folder)
    except OSError:
        return  # Prefect will say what is wrong with the folder itself
    free = st.f_bavail * st.f_frsize
    if free < PREFECT_HOME_MIN_FREE:
        raise StoreError(f"PREFECT_HOME {home}: the disk is full ({free >> 20} MiB free; Prefect's database needs "
                         f"at least {PREFECT_HOME_MIN_FREE >> 20} MiB). Free space there or point PREFECT_HOME at "
                         "another disk (or PREFECT_API_URL at a server), then re-run.")
@contextmanager
def recorded_run(cfg, config: str, overrides: list[str]) -> Iterator[dict]:
    """Keep this run's record (`ptflow runs`) and say what a re-used run_name replaces."""
    from ptflow.store import runs
    from ptflow.store.entries import read_manifest
    from ptflow.store.layout import Layout

    layout = Layout.resolve(cfg.store)
    output_dir = layout.output_dir(cfg.output.output_dir, cfg.run_name)
    note = runs.begin(layout, cfg.run_name, config, list(overrides), cfg.model_dump(mode="json"), output_dir)
    if note:
        print(f"ptflow: {note}", flush=True)
    since, state, outcome = time.time(), "failed", {}
    try:
        yield outcome
        state = "completed"
    except KeyboardInterrupt:
        state = "stopped"
        raise
    finally:
        train = [row for row in outcome.get("summary", {}).get("stages", []) if row["stage"] == "train"]
        last_step = read_manifest(Path(train[0]["path"]))["stats"].get("total_steps") if train else \
            runs.newest_checkpoint_since(layout, since)
        runs.finish(layout, cfg.run_name, state, last_step)


def list_runs(store: str | None) -> int:
    from ptflow.store import runs
    from ptflow.store.layout import Layout

    print(runs.format_runs(runs.list_runs(Layout.resolve(store))))
    return 0


def print_llamafactory_notes(config: str, overrides: list[str], file=None) -> None:
    """A LLaMA-Factory file: say what each key became, which defaults were applied, what is ignored."""
    from ptflow.config.llamafactory import explain_file

    notes = explain_file(config, overrides)
    if notes:
        print(notes, file=file or sys.stdout, flush=True)


def convert_lf(config: str, output: str | None) -> int:
    from ptflow.config.llamafactory import convert_file
    from ptflow.errors import ConfigError

    print_llamafactory_notes(config, [], file=sys.stderr)  # stdout may be the YAML itself
    text, _ = convert_file(config)
    if not output:
        print(text, end="")
        return 0
    if Path(output).exists() and Path(output).resolve() == Path(config).resolve():
        raise ConfigError(output, ["-o names the LLaMA-Factory file itself; write the ptflow YAML to another file"])
    Path(output).write_text(text, encoding="utf-8")
    print(f"ptflow: wrote {output} (check it with `ptflow validate {output}`)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
