"""Run records: what `ptflow runs` lists, and what a re-used run_name replaces.

`<store>/run-records/<run_name>.json` describes the newest `ptflow run` of that run_name: its
state (running, completed, stopped, failed), config file, overrides and resolved config (secret
keys left out), output folder, pid and host, and its last training step. A record still saying
`running` whose process is gone (same host) is shown as `killed`. The lineage
(ptflow/store/lineage.py) stays the record of trained models; this is the record of runs.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
from pathlib import Path

from ptflow.store.layout import Layout

SECRET_PARTS = ("token", "secret", "password")
CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def flat_config(config: dict, prefix: str = "") -> dict:
    """`section.key -> value` of a dumped RunConfig, without keys that may hold secrets."""
    flat = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flat_config(value, f"{name}."))
        elif not any(part in key.lower() for part in SECRET_PARTS):
            flat[name] = value
    return flat


def read_record(layout: Layout, run_name: str) -> dict | None:
    try:
        return json.loads(layout.run_record(run_name).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _write(layout: Layout, run_name: str, record: dict) -> None:
    path = layout.run_record(run_name)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, indent=1, default=str), encoding="utf-8")
    os.replace(tmp, path)


def begin(layout: Layout, run_name: str, config_path: str, overrides: list[str], config: dict,
          output_dir: Path) -> str | None:
    """Record this run as running; returns a line saying what it replaces when the last run differed."""
    previous = read_record(layout, run_name)
    flat = flat_config(config)
    _write(layout, run_name, {"run_name": run_name, "state": "running", "config_path": config_path,
                              "overrides": overrides, "config": flat, "output_dir": str(output_dir),
                              "pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                              "finished": None, "last_step": None})
    if not previous or previous.get("config") == flat:
        return None
    changed = sorted(k for k in flat.keys() | previous["config"].keys() if flat.get(k) != previous["config"].get(k))
    shown = ", ".join(f"{k} {previous['config'].get(k)!r} -> {flat.get(k)!r}" for k in changed[:6])
    more = f" and {len(changed) - 6} more" if len(changed) > 6 else ""
    return (f"run_name {run_name!r} was last run with a different config ({previous.get('config_path')}, "
            f"{state_of(previous)}): {shown}{more}. This run replaces its outputs in {output_dir}; give another "
            "run_name to keep them.")


def finish(layout: Layout, run_name: str, state: str, last_step: int | None) -> None:
    record = read_record(layout, run_name)
    if record and record.get("pid") == os.getpid():
        _write(layout, run_name, {**record, "state": state, "finished": time.time(),
                                  "last_step": last_step if last_step is not None else record.get("last_step")})


def newest_checkpoint_since(layout: Layout, since: float) -> int | None:
    """The step of the newest training checkpoint written after `since` (what an interrupted run reached)."""
    best = None
    for folder in layout.stage_dir("train").glob("*.work/checkpoint-*"):
        match = CHECKPOINT.match(folder.name)
        mtime = folder.stat().st_mtime if match else 0.0
        if match and mtime >= since and (best is None or mtime > best[0]):
            best = (mtime, int(match.group(1)))
    return best[1] if best else None


def state_of(record: dict) -> str:
    if record.get("state") == "running" and record.get("host") == socket.gethostname() \
            and not _alive(record.get("pid")):
        return "killed"
    return record.get("state", "?")


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def list_runs(layout: Layout) -> list[dict]:
    """Every run_name with a record or a lineage, newest start first."""
    names = {p.stem for p in layout.run_records().glob("*.json")}
    names |= {p.stem for p in (layout.root / "lineage").glob("*.jsonl")} if layout.root.is_dir() else set()
    rows = []
    for name in names:
        record = read_record(layout, name) or {}
        lineage_file = layout.lineage_file(name)
        lineage = [json.loads(line) for line in lineage_file.read_text().splitlines() if line.strip()] \
            if lineage_file.is_file() else []
        last_step = record.get("last_step") or (lineage[-1].get("total_steps") if lineage else None)
        rows.append({"run_name": name, "state": state_of(record) if record else "completed",
                     "last_step": last_step, "output_dir": record.get("output_dir", str(layout.run_dir(name))),
                     "lineage": f"{len(lineage)} model(s), newest {lineage[-1]['key'][:12]}" if lineage else "-",
                     "started": record.get("started") or 0})
    return sorted(rows, key=lambda r: -r["started"])


def format_runs(rows: list[dict]) -> str:
    if not rows:
        return "no runs in this store yet"
    lines = [f"{'run_name':<20} {'state':<10} {'last step':>9}  {'started':<16}  {'lineage':<30}  output folder"]
    for r in rows:
        started = time.strftime("%Y-%m-%d %H:%M", time.localtime(r["started"])) if r["started"] else "-"
        lines.append(f"{r['run_name']:<20} {r['state']:<10} {r['last_step'] if r['last_step'] else '-':>9}  "
                     f"{started:<16}  {r['lineage']:<30}  {r['output_dir']}")
    return "\n".join(lines)
