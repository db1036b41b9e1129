"""Tables for bench/gpu_bench_call.sh: LLaMA-Factory's best vs ptflow on one GPU, ptflow DDP/FSDP on several.

Reads the run_<tag>.json files (the anchors' shape: lf_anchor.py and bench/train_bench.py write them) and the
call's plan_status.jsonl, writes results.json (every run with FLOPs/MFU, the pairs, the plan's outcome) and a
markdown table. MFU here = (6N + 12·L·d·S) FLOPs per token (N = all parameters, both embedding tables: the
anchors' summarize.py formula, the same for both systems) x tokens/s per GPU / 989 TFLOP/s (H100/H200 dense
bf16 datasheet).

    python bench/gpu_bench_report.py --results /tmp/anchors/results --models-dir /tmp/anchors/models \
        --status /tmp/anchors/plan_status.jsonl --summarize .anchors/summarize.py --out results.json --table table.md
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

PEAK = 989e12


def load_summarize(path: Path):
    spec = importlib.util.spec_from_file_location("anchors_summarize", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def base_variant(variant: str) -> str:
    return "+".join(f for f in variant.split("+") if f not in ("ddp", "fsdp"))


def last_loss(r: dict) -> tuple[int, float] | None:
    if r["system"] == "lf":
        hist = [h for h in r.get("log_history", []) if "loss" in h and "step" in h]
        return (hist[-1]["step"], hist[-1]["loss"]) if hist else None
    losses = {int(k): v for k, v in (r.get("losses") or {}).items()}
    if not losses:
        return None
    step = max(losses)
    return step, losses[step]


def first_step(r: dict) -> float | None:
    """Seconds from the run's start (LF: run_exp; ptflow: the train stage) to the end of step 1."""
    return r.get("first_step_from_start_s", r.get("first_step_s")) if r["system"] == "lf" else r.get("first_step_s")


def fmt(x, spec=",.0f", none="–"):
    return none if x is None else format(x, spec)


def describe(r: dict) -> str:
    if r["system"] == "lf":
        extra = [a for a in ("enable_liger_kernel", "torch_compile") if (r.get("args") or {}).get(a)]
        return "LLaMA-Factory " + (r.get("versions") or {}).get("llamafactory", "") + " (" + (", ".join(
            f"{a}=true" for a in extra) or "default") + ")"
    return f"ptflow `{r['variant']}`"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", type=Path, required=True)
    ap.add_argument("--models-dir", type=Path, required=True)
    ap.add_argument("--status", type=Path)
    ap.add_argument("--summarize", type=Path, default=Path(".anchors/summarize.py"))
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--skip", type=int, default=10)
    ap.add_argument("--deadline", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--table", type=Path, required=True)
    a = ap.parse_args()

    summ = load_summarize(a.summarize)
    configs = {p.parent.name: json.loads(p.read_text()) for p in sorted(a.models_dir.glob("*/config.json"))}
    runs = {}
    for f in sorted(a.results.glob("run_*.json")):
        r = json.loads(f.read_text())
        nums = summ.model_numbers(configs[r["model"]], r["seq"])
        tps = r["steady_tokens_per_s"]  # per GPU for ptflow's multi-GPU runs (its loop's throughput)
        r["flops"] = nums
        r["mfu_6N_attn_989"] = nums["flops_per_token_6N_attn"] * tps / PEAK
        r["mfu_6N_989"] = nums["flops_per_token_6N"] * tps / PEAK
        r.setdefault("world_size", 1)
        runs[r["tag"]] = r
    status = [json.loads(line) for line in a.status.read_text().splitlines() if line.strip()] \
        if a.status and a.status.exists() else []

    lf = {r["model"]: r for r in runs.values() if r["system"] == "lf"}  # one LF (best) setting per model
    pt1 = [r for r in runs.values() if r["system"] != "lf" and r["world_size"] == 1]
    ptn = [r for r in runs.values() if r["system"] != "lf" and r["world_size"] > 1]
    gpu = next((r.get("gpu") for r in runs.values() if r.get("gpu")), "GPU")
    window = f"steps {a.skip + 1}–{a.steps}"

    lines = [f"## One GPU ({gpu}): LLaMA-Factory's best vs ptflow, same work and numerics",
             "",
             f"Random-init Llama, bf16 autocast with fp32 master weights unless the variant says `pure`, sequence 2048, "
             f"micro-batch 8, steady tokens/s over {window}. First step = seconds to the end of step 1 (compile "
             "included), from LLaMA-Factory's run_exp start / ptflow's train stage start (both: data opened, model "
             "built); LLaMA-Factory's count from the Trainer's train_begin is in results.json (first_step_s). "
             "Each run's Inductor/Triton cache starts empty unless the runs table says it is shared.",
             "",
             "| model | LLaMA-Factory best | tok/s | MFU | first step s | peak GiB | ptflow variant | tok/s | MFU "
             "| first step s | peak GiB | **ptflow / LF** | loss at last step (LF / ptflow) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    pairs = []
    for r in sorted(pt1, key=lambda r: (r["model"] != "llama-1.1b", "pure" in r["variant"], r["variant"])):
        b = lf.get(r["model"])
        ratio = r["steady_tokens_per_s"] / b["steady_tokens_per_s"] if b else None
        ll_b, ll_r = (last_loss(b) if b else None), last_loss(r)
        pairs.append({"model": r["model"], "lf": b["tag"] if b else None, "ptflow": r["tag"], "ratio": ratio})
        loss = f"{ll_b[1]:.3f} / {ll_r[1]:.3f} (step {ll_r[0]})" if ll_b and ll_r else \
            f"– / {ll_r[1]:.3f}" if ll_r else "–"
        lines.append(
            f"| {r['model']} | {describe(b) if b else 'not run'} | {fmt(b and b['steady_tokens_per_s'])} | "
            f"{fmt(b and b['mfu_6N_attn_989'], '.3f')} | {fmt(b and first_step(b), '.1f')} | "
            f"{fmt(b and (b.get('mem') or {}).get('max_allocated_gib'), '.1f')} | {describe(r)} | "
            f"{fmt(r['steady_tokens_per_s'])} | {fmt(r['mfu_6N_attn_989'], '.3f')} | {fmt(r.get('first_step_s'), '.1f')} | "
            f"{fmt((r.get('mem') or {}).get('max_allocated_gib'), '.1f')} | **{fmt(ratio, '.2f')}×** | {loss} |")
    for m, b in sorted(lf.items()):
        if not any(p["model"] == m for p in pairs):
            lines.append(f"| {m} | {describe(b)} | {fmt(b['steady_tokens_per_s'])} | {fmt(b['mfu_6N_attn_989'], '.3f')} | "
                         f"{fmt(first_step(b), '.1f')} | {fmt((b.get('mem') or {}).get('max_allocated_gib'), '.1f')} "
                         "| ptflow not run | | | | | | |")

    multi = []
    if ptn:
        lines += ["", "## Several GPUs (ptflow)", "",
                  "Micro-batch 8 per GPU (global batch × GPUs). Efficiency = tokens/s per GPU ÷ the same variant's "
                  "one-GPU tokens/s in this call. Peak memory is rank 0's.",
                  "", "| model | variant | GPUs | tok/s per GPU | tok/s total | **efficiency** | vs LF best (total ÷ LF one GPU) "
                  "| MFU per GPU | first step s | peak GiB | loss at last step |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in sorted(ptn, key=lambda r: r["variant"]):
            one = next((x for x in pt1 if x["model"] == r["model"] and x["variant"] == base_variant(r["variant"])), None)
            eff = r["steady_tokens_per_s"] / one["steady_tokens_per_s"] if one else None
            total = r["steady_tokens_per_s"] * r["world_size"]
            b = lf.get(r["model"])
            ll = last_loss(r)
            multi.append({"tag": r["tag"], "world_size": r["world_size"], "per_gpu": r["steady_tokens_per_s"],
                          "total": total, "efficiency": eff, "one_gpu": one["tag"] if one else None})
            lines.append(f"| {r['model']} | `{r['variant']}` | {r['world_size']} | {fmt(r['steady_tokens_per_s'])} | "
                         f"{fmt(total)} | **{fmt(eff, '.3f')}** | {fmt(b and total / b['steady_tokens_per_s'], '.2f')}× | "
                         f"{fmt(r['mfu_6N_attn_989'], '.3f')} | {fmt(r.get('first_step_s'), '.1f')} | "
                         f"{fmt((r.get('mem') or {}).get('max_allocated_gib'), '.1f')} | "
                         f"{f'{ll[1]:.3f} (step {ll[0]})' if ll else '–'} |")

    if status:
        lines += ["", f"## Runs (deadline {a.deadline} s after the script's start)", "",
                  "| run | status | started at s | wall s (process) | estimated s | note |", "|---|---|---|---|---|---|"]
        for s in status:
            lines.append(f"| {s['name']} | {s['status']}{' rc=' + str(s['rc']) if s['status'] not in ('ok', 'skipped') else ''} | "
                         f"{s['started_s']} | {s['wall_s']} | {s['est_s']} | {s.get('detail', '')} |")
    table = "\n".join(lines) + "\n"
    a.table.write_text(table)
    a.out.write_text(json.dumps({"gpu": gpu, "steps": a.steps, "skip": a.skip, "deadline_s": a.deadline,
                                 "mfu_definition": __doc__, "pairs": pairs, "multi_gpu": multi, "status": status,
                                 "runs": runs, "table_markdown": table}, indent=2, default=str))
    print(table)


if __name__ == "__main__":
    main()
