"""Drive and read back ptflow's production path on a real Prefect server (used by bench/gpu_flow.sh).

Everything goes through Prefect's client against PREFECT_API_URL (or --api):

    python bench/gpu_flow_report.py trigger --runs RUNS.jsonl --label a --config CFG [-o key=value ...]
        [--env NAME=VALUE ...] [--expect JSON] [--wait] [--timeout S]
            create a flow run of pretrain/nightly with the deployment's own overrides plus -o ones
            (config_path replaced by CFG), record it in RUNS.jsonl; --wait polls it to a final state
    python bench/gpu_flow_report.py wait FLOW_RUN_ID [--timeout S]
    python bench/gpu_flow_report.py report --runs RUNS.jsonl --json OUT.json --md OUT.md [--logs-dir DIR]
            per run: states, retries, task-run names ([hit]/[miss]/[resume from step N]), the train-stage
            children (pool, state, task names), artifacts (tables, progress), ptflow.* log lines read back
            with client.read_logs, the train artifact's manifest (world size, stats) and the lineage;
            evaluates each run's --expect checks and writes JSON + markdown
    python bench/gpu_flow_report.py overhead --runs RUNS.jsonl --label ov --bench-json run_X.json
        --json OUT.json --md OUT.md [--skip 10] [--mb 8] [--seq 2048]
            the flow's train stage against bench/train_bench.py's result on the same work

Expectations (--expect, a JSON object), all optional:
    state            final state type of the pretrain run (COMPLETED, FAILED, ...)
    parent_tasks     task-run names that must be among the pretrain run's task runs
    child_task_regex regex that the newest train-stage child's task-run names must match (one of them)
    children         number of train-stage children (a flow-level retry adds one)
    min_run_count    the pretrain run's run_count (2 after one flow-level retry)
    logs_regex       regexes each of which must match a log line of the run or its children
    world_size       the trained model's world size (its key's components)
    speedups_regex   regex on the train artifact's stats["speedups"] (e.g. "FSDP over 2 processes")
    stage_reason_regex {"stage": regex} on the reasons in the run's `stages` table artifact
    lineage          {"run_name": ..., "index": i}: this run's model is entry i of the lineage file, and its
                     parent is entry i-1 (none for i = 0)
    tokens_per_step  the train stats' tokens_per_step (micro-batch x sequence x world size)
    stages           {"stage": "hit"|"miss"} from the run's `stages` table artifact
    message_regex    regex on the final state message (for expected failures)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path


def api_url(args) -> str:
    url = getattr(args, "api", None) or os.environ.get("PREFECT_API_URL")
    if not url:
        sys.exit("gpu_flow_report: set PREFECT_API_URL or pass --api")
    return url


def client(url: str):
    from prefect.client.orchestration import SyncPrefectClient

    return SyncPrefectClient(url)


def _iso(t) -> str | None:
    return t.isoformat() if t is not None else None


def _secs(a, b) -> float | None:
    return round((b - a).total_seconds(), 2) if a is not None and b is not None else None


# --------------------------------------------------------------------------- trigger / wait


def trigger(args) -> int:
    url = api_url(args)
    env = dict(item.split("=", 1) for item in args.env)
    with client(url) as api:
        deployment = api.read_deployment_by_name(args.deployment)
        params = dict(deployment.parameters)
        params["config_path"] = args.config
        params["overrides"] = [*params.get("overrides", []), *args.override]
        job_variables = {"env": {**((deployment.job_variables or {}).get("env") or {}), **env}} if env else None
        run = api.create_flow_run_from_deployment(deployment.id, parameters=params, job_variables=job_variables,
                                                  name=args.name)
    record = {"label": args.label, "id": str(run.id), "name": run.name, "parameters": params,
              "job_variables": job_variables, "expect": json.loads(args.expect) if args.expect else {},
              "triggered_at": time.time()}
    if args.runs:
        with open(args.runs, "a") as f:
            f.write(json.dumps(record) + "\n")
    print(f"{args.label}: flow run {run.name} {run.id}", flush=True)
    if not args.wait:
        print(run.id)
        return 0
    return wait_for(url, str(run.id), args.timeout, args.label)


def wait_for(url: str, run_id: str, timeout: float, label: str = "") -> int:
    started, last = time.monotonic(), None
    with client(url) as api:
        while True:
            run = api.read_flow_run(run_id)
            state = run.state
            line = f"{state.type.value}/{state.name}" if state else "no state"
            if line != last:
                print(f"{label or run_id}: {line} after {time.monotonic() - started:.0f} s", flush=True)
                last = line
            if state is not None and state.is_final():
                if state.message and not state.is_completed():
                    print(f"{label or run_id}: {state.message[:2000]}", flush=True)
                return 0 if state.is_completed() else 1
            if time.monotonic() - started > timeout:
                print(f"{label or run_id}: still {line} after {timeout:.0f} s; cancelling it", flush=True)
                from prefect.states import Cancelling

                try:  # the worker stops its process; the deployment's concurrency slot frees for the next run
                    api.set_flow_run_state(run_id, Cancelling(message=f"gpu_flow: over its {timeout:.0f} s"),
                                           force=True)
                except Exception as exc:  # noqa: BLE001  (report and go on)
                    print(f"{label or run_id}: cancel failed: {exc}", flush=True)
                return 2
            time.sleep(1)


def wait(args) -> int:
    return wait_for(api_url(args), args.flow_run_id, args.timeout)


# --------------------------------------------------------------------------- read back


def read_all_logs(api, run_ids: list[str]) -> list:
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.client.schemas.sorting import LogSort

    logs, offset = [], 0
    while True:
        page = api.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=run_ids)), limit=200,
                             offset=offset, sort=LogSort.TIMESTAMP_ASC)
        logs.extend(page)
        if len(page) < 200:
            return logs
        offset += 200


def task_runs_of(api, run_id: str) -> list[dict]:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    runs = api.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))
    runs.sort(key=lambda t: t.start_time or t.expected_start_time or t.created)
    return [{"name": t.name, "state": t.state.type.value if t.state else None,
             "state_name": t.state.name if t.state else None, "start": _iso(t.start_time), "end": _iso(t.end_time),
             "seconds": _secs(t.start_time, t.end_time), "run_count": t.run_count} for t in runs]


def children_of(api, run_id: str) -> list:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    found = api.read_flow_runs(flow_run_filter=FlowRunFilter(
        parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[run_id])))
    return sorted(found, key=lambda r: r.created)


def artifacts_of(api, run_id: str) -> list[dict]:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    found = api.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id])))
    out = []
    for a in found:
        data = a.data
        if isinstance(data, str) and a.type == "table":
            try:
                data = json.loads(data)
            except ValueError:
                pass
        if isinstance(data, str) and len(data) > 4000:  # markdown with embedded PNGs: keep the head
            data = data[:4000] + f"... ({len(a.data)} characters)"
        out.append({"key": a.key, "type": a.type, "description": a.description, "data": data})
    return out


def flow_run_info(api, run) -> dict:
    state = run.state
    return {"id": str(run.id), "name": run.name, "flow": api.read_flow(run.flow_id).name,
            "state": state.type.value if state else None, "state_name": state.name if state else None,
            "message": (state.message or "")[:3000] if state else "", "work_pool": run.work_pool_name,
            "run_count": run.run_count, "retries": run.empirical_policy.retries if run.empirical_policy else None,
            "created": _iso(run.created), "start": _iso(run.start_time), "end": _iso(run.end_time),
            "seconds": _secs(run.start_time, run.end_time),
            "seconds_from_created": _secs(run.created, run.end_time),
            "total_run_time_s": run.total_run_time.total_seconds() if run.total_run_time else None,
            "parameters": run.parameters}


def read_run(api, rec: dict) -> dict:
    run = api.read_flow_run(rec["id"])
    info = flow_run_info(api, run)
    info["label"] = rec["label"]
    info["job_variables"] = rec.get("job_variables")
    info["tasks"] = task_runs_of(api, rec["id"])
    info["artifacts"] = artifacts_of(api, rec["id"])
    kids = []
    for child in children_of(api, rec["id"]):
        c = flow_run_info(api, child)
        c["tasks"] = task_runs_of(api, str(child.id))
        c["artifacts"] = artifacts_of(api, str(child.id))
        kids.append(c)
    info["children"] = kids
    logs = read_all_logs(api, [rec["id"], *(c["id"] for c in kids)])
    info["log_count"] = len(logs)
    info["loggers"] = sorted({log.name for log in logs})
    info["logs"] = [{"t": _iso(log.timestamp), "logger": log.name, "level": log.level,
                     "flow_run": str(log.flow_run_id)[:8], "message": log.message} for log in logs]
    info["ptflow_lines"] = [f"{x['t'][11:19]} {x['logger']}: {x['message']}" for x in info["logs"]
                            if x["logger"].startswith("ptflow")]
    info["store"] = store_facts(info)
    return info


def table(info: dict, key: str) -> list[dict]:
    for a in info["artifacts"]:
        if a["key"] == key and isinstance(a["data"], list):
            return a["data"]
    return []


def store_facts(info: dict) -> dict:
    """The train artifact's manifest (world size, stats) and the trainer log, read from the shared store."""
    stages = {row["stage"]: row for row in table(info, "stages")}
    train = stages.get("train")
    if not train or not train.get("path"):
        return {}
    folder = Path(train["path"])
    facts: dict = {"train_path": str(folder)}
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError) as exc:
        return {**facts, "error": f"manifest: {exc}"}
    # The world size a model trained with: its checkpoints' fingerprint (the key holds no device count).
    checkpoints = sorted(folder.glob("checkpoint-*/ptflow_checkpoint.json"), key=lambda p: int(p.parent.name[11:]))
    if checkpoints:
        facts["world_size"] = json.loads(checkpoints[-1].read_text()).get("fingerprint", {}).get("world_size")
    else:
        facts["world_size"] = _find(manifest, "world_size")
    facts["stats"] = {k: v for k, v in (manifest.get("stats") or {}).items()
                      if isinstance(v, (int, float, str, bool, list)) or v is None}
    log_path = folder / "trainer_log.jsonl"
    if log_path.exists():
        facts["trainer_log"] = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    return facts


def _find(obj, key):
    if isinstance(obj, dict):
        if key in obj:
            return obj[key]
        for v in obj.values():
            found = _find(v, key)
            if found is not None:
                return found
    return None


def steady_tokens_per_s(trainer_log: list[dict], skip: int, tokens_per_step: int, logging_steps: int = 10):
    """bench/train_bench.py's formula: each record's throughput covers its own window of logging_steps steps."""
    windows = [r for r in trainer_log if "loss" in r and r.get("current_steps", 0) > skip and r.get("throughput")]
    if not windows:
        return None
    steady_s = sum(logging_steps * tokens_per_step / r["throughput"] for r in windows)
    return len(windows) * logging_steps * tokens_per_step / steady_s


# --------------------------------------------------------------------------- checks


def check(info: dict, expect: dict, store_root: str | None) -> list[dict]:
    results = []

    def add(name, ok, detail):
        results.append({"check": name, "ok": bool(ok), "detail": detail})

    if "state" in expect:
        add("state", info["state"] == expect["state"], f"{info['state']} ({info['state_name']})")
    if "message_regex" in expect:
        add("message", re.search(expect["message_regex"], info["message"] or "", re.S), info["message"][:300])
    names = [t["name"] for t in info["tasks"]]
    for name in expect.get("parent_tasks", []):
        add(f"task {name}", name in names, names)
    kids = [c for c in info["children"] if c["flow"] == "train-stage"]
    if "children" in expect:
        add("train-stage children", len(kids) == expect["children"],
            [f"{c['name']} {c['state']} pool={c['work_pool']}" for c in kids])
    if kids:
        add("children on the gpu pool", all(c["work_pool"] == "gpu" for c in kids), [c["work_pool"] for c in kids])
    if "child_task_regex" in expect:
        newest = [t["name"] for t in kids[-1]["tasks"]] if kids else []
        add("newest child's train task", any(re.fullmatch(expect["child_task_regex"], n) for n in newest), newest)
    if "min_run_count" in expect:
        add("run_count", (info["run_count"] or 0) >= expect["min_run_count"], info["run_count"])
    all_lines = [f"{x['logger']}: {x['message']}" for x in info["logs"]]
    for rx in expect.get("logs_regex", []):
        hit = next((line for line in all_lines if re.search(rx, line)), None)
        add(f"log /{rx}/", hit is not None, hit[:300] if hit else f"{len(all_lines)} lines searched")
    if "world_size" in expect:
        add("world_size (checkpoint fingerprint)", info["store"].get("world_size") == expect["world_size"],
            info["store"].get("world_size"))
    if "tokens_per_step" in expect:
        got = info["store"].get("stats", {}).get("tokens_per_step")
        add("tokens_per_step (micro-batch x seq x world)", got == expect["tokens_per_step"], got)
    if "speedups_regex" in expect:
        speedups = " | ".join(map(str, info["store"].get("stats", {}).get("speedups") or []))
        add("speedups", re.search(expect["speedups_regex"], speedups), speedups)
    if "stages" in expect:
        got = {row["stage"]: row["cache"] for row in table(info, "stages")}
        add("stages table", all(got.get(k) == v for k, v in expect["stages"].items()), got)
    if "stage_reason_regex" in expect:
        reasons = {row["stage"]: row["reason"] for row in table(info, "stages")}
        for stage, rx in expect["stage_reason_regex"].items():
            add(f"{stage} reason", re.search(rx, reasons.get(stage) or ""), reasons.get(stage))
    if "lineage" in expect and store_root:  # this run's entry sits at `index`; its parent is the entry before
        want = expect["lineage"]
        path = Path(store_root) / "lineage" / f"{want['run_name']}.jsonl"
        entries = [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
        mine = [i for i, e in enumerate(entries) if e.get("flow_run") == info["id"]]
        i = want["index"]
        ok = mine == [i] and (entries[i].get("parent") == (entries[i - 1].get("key") if i else None))
        add(f"lineage entry {i}", ok,
            [{k: (str(e.get(k)) or "")[:12] for k in ("key", "parent", "dataset", "flow_run")} for e in entries])
    return results


# --------------------------------------------------------------------------- report


def load_runs(path: str) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def report(args) -> int:
    url = api_url(args)
    records = load_runs(args.runs)
    out: dict = {"api": url, "generated": time.strftime("%Y-%m-%d %H:%M:%S"), "runs": []}
    with client(url) as api:
        out["work_pools"] = {p.name: p.type for p in api.read_work_pools()}
        out["deployments"] = {f"{api.read_flow(d.flow_id).name}/{d.name}": {
            "pool": d.work_pool_name, "entrypoint": d.entrypoint, "parameters": d.parameters,
            "job_variables": d.job_variables, "pull_steps": d.pull_steps}
            for d in api.read_deployments()}
        for rec in records:
            info = read_run(api, rec)
            info["checks"] = check(info, rec.get("expect") or {}, args.store)
            out["runs"].append(info)
    out["all_checks_ok"] = all(c["ok"] for r in out["runs"] for c in r["checks"])
    if args.logs_dir:  # every log line, per run, for the tarball
        Path(args.logs_dir).mkdir(parents=True, exist_ok=True)
        for r in out["runs"]:
            Path(args.logs_dir, f"prefect-logs-{r['label']}.txt").write_text(
                "\n".join(f"{x['t']} {x['flow_run']} {x['level']:>2} {x['logger']}: {x['message']}" for x in r["logs"]))
    slim = {**out, "runs": [{k: v for k, v in r.items() if k != "logs"} for r in out["runs"]]}
    for r in slim["runs"]:
        if r.get("store", {}).get("trainer_log"):
            r["store"] = {**r["store"], "trainer_log": r["store"]["trainer_log"][-5:]}
    Path(args.json).write_text(json.dumps(slim, indent=2, default=str))
    Path(args.md).write_text(markdown(out))
    bad = [f"{r['label']}: {c['check']}" for r in out["runs"] for c in r["checks"] if not c["ok"]]
    print(f"report: {len(out['runs'])} runs, {sum(len(r['checks']) for r in out['runs'])} checks, "
          f"{'all passed' if not bad else 'FAILED: ' + '; '.join(bad)}")
    return 0 if not bad else 1


def markdown(out: dict) -> str:
    lines = [f"# ptflow on a real Prefect server ({out['generated']})", "",
             f"Work pools: {out['work_pools']}", "", "| deployment | pool | entrypoint |", "|---|---|---|"]
    lines += [f"| {name} | {d['pool']} | {d['entrypoint']} |" for name, d in out["deployments"].items()]
    lines += ["", "| run | flow run | state | wall s | run_count | train-stage children | checks |",
              "|---|---|---|---|---|---|---|"]
    for r in out["runs"]:
        kids = ", ".join(f"{c['name']} {c['state']} ({c['seconds']} s)" for c in r["children"])
        ok = sum(c["ok"] for c in r["checks"])
        lines.append(f"| {r['label']} | {r['name']} | {r['state']} | {r['seconds']} | {r['run_count']} | {kids} | "
                     f"{ok}/{len(r['checks'])} |")
    for r in out["runs"]:
        lines += ["", f"## {r['label']}: {r['name']} ({r['state']}/{r['state_name']})", ""]
        if r["message"] and r["state"] != "COMPLETED":
            lines += ["```", r["message"][:1500], "```", ""]
        lines.append("Task runs: " + ", ".join(f"`{t['name']}` {t['state']} {t['seconds']} s" for t in r["tasks"]))
        for c in r["children"]:
            lines.append(f"- child {c['flow']} `{c['name']}` on pool {c['work_pool']}: {c['state']}/{c['state_name']}"
                         f" in {c['seconds']} s; tasks: " +
                         ", ".join(f"`{t['name']}` {t['state']} {t['seconds']} s" for t in c["tasks"]))
        for key in ("stages", "metrics"):
            rows = table(r, key)
            if rows:
                cols = list(rows[0])
                lines += ["", f"`{key}` artifact:", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
                lines += ["| " + " | ".join(str(row.get(c, ""))[:90] for c in cols) + " |" for row in rows]
        facts = r.get("store") or {}
        if facts.get("world_size") is not None:
            lines += ["", f"Train artifact: world_size {facts['world_size']}, "
                          f"stats {json.dumps({k: facts['stats'].get(k) for k in ('parameters', 'total_steps', 'resumed_from', 'final_loss', 'train_runtime', 'first_step_s', 'speedups') if k in facts.get('stats', {})})}"]
        lines += ["", "Checks:", ""]
        lines += [f"- {'PASS' if c['ok'] else 'FAIL'} {c['check']}: `{str(c['detail'])[:300]}`" for c in r["checks"]]
        lines += ["", f"Logs read back through the API: {r['log_count']} lines, loggers {r['loggers']}; "
                      f"ptflow.* lines ({len(r['ptflow_lines'])}):", "", "```"]
        lines += [x[:400] for x in r["ptflow_lines"][:60]] + ["```"]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- overhead


def overhead(args) -> int:
    url = api_url(args)
    rec = next(r for r in load_runs(args.runs) if r["label"] == args.label)
    with client(url) as api:
        info = read_run(api, rec)
    bench = json.loads(Path(args.bench_json).read_text()) if args.bench_json and Path(args.bench_json).exists() \
        else None
    tokens_per_step = args.mb * args.seq
    facts = info.get("store") or {}
    log = facts.get("trainer_log") or []
    kids = [c for c in info["children"] if c["flow"] == "train-stage"]
    train_task = next((t for c in kids for t in c["tasks"] if t["name"].startswith("train")), None)
    flow = {"state": info["state"], "pretrain_wall_s": info["seconds"],
            "pretrain_from_created_s": info["seconds_from_created"],
            "train_stage_flow_run_s": kids[-1]["seconds"] if kids else None,
            "train_stage_from_created_s": kids[-1]["seconds_from_created"] if kids else None,
            "train_task_s": train_task["seconds"] if train_task else None,
            "train_task_name": train_task["name"] if train_task else None,
            "parent_tasks": {t["name"]: t["seconds"] for t in info["tasks"]},
            "steady_tokens_per_s": steady_tokens_per_s(log, args.skip, tokens_per_step),
            "first_step_s": facts.get("stats", {}).get("first_step_s"),
            "world_size": facts.get("world_size") or (facts.get("stats", {}).get("tokens_per_step") or 0) // tokens_per_step
            or None,
            "peak_mem_gib": max((r.get("peak_mem_gib") or 0 for r in log), default=None),
            "final_loss": facts.get("stats", {}).get("final_loss")}
    result = {"label": args.label, "flow": flow, "bench": None, "comparison": {}}
    if bench:
        result["bench"] = {k: bench.get(k) for k in ("model", "variant", "steps", "mb", "seq", "steady_tokens_per_s",
                                                     "first_step_s", "train_stage_s", "prepare_s", "gpu", "versions")}
        result["bench"]["wall_s"] = args.bench_wall
        cmp = result["comparison"]
        if flow["steady_tokens_per_s"] and bench.get("steady_tokens_per_s"):
            cmp["steady_throughput_ratio_flow_over_bench"] = flow["steady_tokens_per_s"] / bench["steady_tokens_per_s"]
        if flow["train_task_s"] and bench.get("train_stage_s"):
            cmp["train_task_minus_bench_train_s"] = flow["train_task_s"] - bench["train_stage_s"]
        if flow["train_stage_from_created_s"] and bench.get("train_stage_s"):
            cmp["train_stage_flow_run_minus_bench_train_s"] = flow["train_stage_from_created_s"] - bench["train_stage_s"]
        if flow["pretrain_from_created_s"] and args.bench_wall:
            cmp["pretrain_run_minus_bench_wall_s"] = flow["pretrain_from_created_s"] - args.bench_wall
        if flow["first_step_s"] is not None and bench.get("first_step_s") is not None:
            cmp["first_step_delta_s"] = flow["first_step_s"] - bench["first_step_s"]
    Path(args.json).write_text(json.dumps(result, indent=2, default=str))
    md = ["# Train stage in the flow vs bench/train_bench.py alone", "",
          f"Work: {args.mb} x {args.seq} tokens per device-step, steady rate over steps > {args.skip} "
          "(bench/train_bench.py's formula on each side's trainer_log.jsonl).", "",
          "| | flow (pretrain/nightly -> train-stage/gpu) | train_bench.py |", "|---|---|---|"]
    b = result["bench"] or {}

    def fmt(v, spec="{:,.1f}"):
        return spec.format(v) if isinstance(v, (int, float)) else str(v)

    md += [f"| steady tokens/s | {fmt(flow['steady_tokens_per_s'], '{:,.0f}')} | {fmt(b.get('steady_tokens_per_s'), '{:,.0f}')} |",
           f"| first step s | {fmt(flow['first_step_s'])} | {fmt(b.get('first_step_s'))} |",
           f"| train() wall s (flow: `{flow['train_task_name']}` task run) | {fmt(flow['train_task_s'])} | {fmt(b.get('train_stage_s'))} |",
           f"| train-stage flow run, created -> end s | {fmt(flow['train_stage_from_created_s'])} | |",
           f"| whole run s (flow: pretrain created -> end; bench: its process) | {fmt(flow['pretrain_from_created_s'])} | {fmt(b.get('wall_s'))} |",
           f"| prepare s (flow: prepare_dataset task) | {fmt(next((v for k, v in flow['parent_tasks'].items() if k.startswith('prepare_dataset')), None))} | {fmt(b.get('prepare_s'))} |",
           "", "Comparison: `" + json.dumps({k: round(v, 4) for k, v in result["comparison"].items()}) + "`", "",
           f"Flow state {flow['state']}, world size {flow['world_size']}, peak memory {flow['peak_mem_gib']} GiB; "
           f"parent task runs: {flow['parent_tasks']}"]
    Path(args.md).write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0 if flow["state"] == "COMPLETED" else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--api", help="Prefect API URL (default $PREFECT_API_URL)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("trigger")
    p.add_argument("--deployment", default="pretrain/nightly")
    p.add_argument("--runs", help="JSONL file recording the runs made (for report)")
    p.add_argument("--label", required=True)
    p.add_argument("--name", help="flow run name")
    p.add_argument("--config", required=True, help="config path as the workers see it")
    p.add_argument("-o", "--override", action="append", default=[])
    p.add_argument("--env", action="append", default=[], help="job variable env NAME=VALUE (merged into the "
                   "deployment's env)")
    p.add_argument("--expect", help="JSON checks for report")
    p.add_argument("--wait", action="store_true")
    p.add_argument("--timeout", type=float, default=600)
    p = sub.add_parser("wait")
    p.add_argument("flow_run_id")
    p.add_argument("--timeout", type=float, default=600)
    p = sub.add_parser("report")
    p.add_argument("--runs", required=True)
    p.add_argument("--json", required=True)
    p.add_argument("--md", required=True)
    p.add_argument("--logs-dir")
    p.add_argument("--store", default=os.environ.get("PTFLOW_HOME"))
    p = sub.add_parser("overhead")
    p.add_argument("--runs", required=True)
    p.add_argument("--label", required=True)
    p.add_argument("--bench-json")
    p.add_argument("--bench-wall", type=float)
    p.add_argument("--json", required=True)
    p.add_argument("--md", required=True)
    p.add_argument("--skip", type=int, default=10)
    p.add_argument("--mb", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048)
    args = ap.parse_args()
    return {"trigger": trigger, "wait": wait, "report": report, "overhead": overhead}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
