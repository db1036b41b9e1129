"""Benchmark ptflow's train stage on the anchors' exact work, to compare with LLaMA-Factory side by side.

The work is the anchors' (`../shared/anchors/`): random-init llama-1.1b / llama-160m, their
32K BPE tokenizer and stdlib corpus, bf16, sequence 2048, micro-batch 8, 60 steps, steady
rate over steps 11-60. Each variant runs ptflow's own `prepare_dataset` + `train` stage
functions (the code the flow runs) in a fresh subprocess and writes a result JSON in the
anchors' shape (`run_<tag>.json`), so `summarize.py` tables it beside LLaMA-Factory.

    # assets first (corpus, tokenizer, model configs), as the anchors build them:
    python ../shared/anchors/build_assets.py --work /tmp/anchors --models llama-1.1b,llama-160m
    python bench/train_bench.py --anchors-work /tmp/anchors --models llama-160m --variants eager,compile
    python bench/train_bench.py --one ...   # (internal) run one variant in this process

Variants: eager, compile (whole model), layers (regional compile), liger, and combinations joined
with "+", e.g. compile+liger, layers+liger+pure (pure bf16), compile+cudnn (cuDNN attention).
"ddp" / "fsdp" train on --gpus processes (DDP, or FSDP2 with train.fsdp); every other variant pins
train.num_processes to 1. tokens/s is per device (the loop's throughput); tokens_per_s_total = x world.

    python bench/train_bench.py --anchors-work /tmp/anchors --variants layers+flash,layers+flash+ddp --dry-run
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FLAG_LABELS = {"eager": "eager", "compile": "torch.compile", "layers": "regional torch.compile",
               "liger": "liger fused CE", "pure": "pure bf16", "cudnn": "cuDNN attention", "flash": "flash SDPA",
               "docmask": "document masking", "flex": "flex_attention", "stream": "streamed data",
               "ddp": "DDP", "fsdp": "FSDP2"}
KNOWN_FLAGS = set(FLAG_LABELS)


def world_of(variant: str, gpus: int) -> int:
    return gpus if {"ddp", "fsdp"} & set(variant.split("+")) else 1


def train_section(variant: str, steps: int, mb: int, lr: float, gpus: int = 2, save_steps: int | None = None,
                  overrides: str = ""):
    """No checkpoints unless `save_steps` (LLaMA-Factory's anchor runs save_strategy: no too); `overrides`:
    train keys as key=value,... on top of the variant's (e.g. ddp_bucket_cap_mb=100,gradient_checkpointing=true)."""
    from ptflow.config.schema import TrainSection

    flags = set(variant.split("+"))
    unknown = flags - KNOWN_FLAGS
    if unknown:
        raise SystemExit(f"train_bench: unknown variant flag(s) {sorted(unknown)} in {variant!r}; known: {sorted(KNOWN_FLAGS)}")
    fields = dict(finetuning_type="full", learning_rate=lr, max_steps=steps, per_device_train_batch_size=mb,
                        lr_scheduler_type="cosine", warmup_steps=10, max_grad_norm=1.0, logging_steps=10,
                        save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500, bf16=True, pure_bf16="pure" in flags,
                        torch_compile=bool({"compile", "layers"} & flags),
                        compile_scope="layers" if "layers" in flags else "model", enable_liger_kernel="liger" in flags,
                        sdpa_backend="cudnn" if "cudnn" in flags else "flash" if "flash" in flags else "auto",
                        num_processes=world_of(variant, gpus), fsdp="fsdp" in flags,
                  # with checkpoints, a re-run of the same variant and store resumes from the newest (a kill -9 test);
                  # without, every run starts over
                  resume_from_checkpoint="auto" if save_steps else False)
    for item in filter(None, overrides.split(",")):
        key, sep, value = item.partition("=")
        if not sep or key not in TrainSection.model_fields:
            raise SystemExit(f"train_bench: --set {item!r}: expected train_key=value with a key of the train section")
        fields[key] = value  # pydantic converts "true" / "100"
    return TrainSection(**fields)


def prepare(a, model_name: str, variant: str):
    """ptflow's tokenizer + prepare_dataset stages for this model and variant (cached in the store)."""
    from ptflow.config.schema import DataSection, ModelSection
    from ptflow.data.dataset import prepare_dataset
    from ptflow.data.tokenizer import load_tokenizer
    from ptflow.store.layout import Layout

    work = Path(a.anchors_work)
    layout = Layout(a.store)
    flags = set(variant.split("+"))
    model = ModelSection(model_name_or_path=str(work / "models" / model_name), train_from_scratch=True,
                         attn_implementation="flex_attention" if "flex" in flags else "sdpa")
    tok = load_tokenizer(model, layout)
    data = prepare_dataset(DataSection(dataset=["stdlib_py"], dataset_dir=str(work / "data"), cutoff_len=a.seq,
                                       doc_mask="docmask" in flags, streaming="stream" in flags), tok, layout)
    return model, tok, data, layout


def run_one(a) -> dict:
    """Prepare (cached in the store) and train one variant; return the anchors-shaped result."""
    import torch

    from ptflow.train.loop import train

    started = time.perf_counter()
    model, tok, data, layout = prepare(a, a.model, a.variant)
    prep_s = time.perf_counter() - started
    section = train_section(a.variant, a.steps, a.mb, a.lr, a.gpus, a.save_steps, a.set)
    world = section.num_processes
    t0 = time.perf_counter()
    art = train(model, section, tok, data, layout, seed=0)
    stage_s = time.perf_counter() - t0
    log = [json.loads(line) for line in (art.dir / "trainer_log.jsonl").read_text().splitlines()]
    records = [r for r in log if "loss" in r]
    tokens_per_step = a.mb * a.seq  # per device
    # Each record's throughput (per device) covers the steps since the previous record (timed with a device sync).
    spans, prev = [], 0
    for r in records:
        spans.append((r, r["current_steps"] - prev))
        prev = r["current_steps"]
    steady = [(r, n) for r, n in spans if r["current_steps"] - n >= a.skip]  # windows wholly after step `skip`
    steady_s = sum(n * tokens_per_step / r["throughput"] for r, n in steady)
    steady_steps = sum(n for _, n in steady)
    steady_tps = steady_steps * tokens_per_step / steady_s
    windows = [r for r, _ in steady]
    return {"mode": "ptflow", "tag": a.tag, "model": a.model, "system": f"ptflow-{a.variant}",
            "system_label": "ptflow, " + " + ".join(FLAG_LABELS.get(f, f) for f in a.variant.split("+")),
            "mb": a.mb, "seq": a.seq, "steps": a.steps, "skip": a.skip, "variant": a.variant, "set": a.set,
            "steady_tokens_per_s": steady_tps, "steady_step_ms": 1000 * tokens_per_step / steady_tps,
            "steady_steps": steady_steps, "world_size": world, "tokens_per_s_total": steady_tps * world,
            "precision": art.stats.get("precision"), "final_loss": art.stats.get("final_loss"),
            "mfu": [r["mfu"] for r in windows], "first_step_s": art.stats.get("first_step_s"),
            "train_stage_s": stage_s, "prepare_s": prep_s, "losses": {r["current_steps"]: r["loss"] for r in log},
            "mem": {"max_allocated_gib": max(r["peak_mem_gib"] for r in log)},
            "data_wait_pct": [r["data_wait_pct"] for r in windows], "speedups": art.stats.get("speedups"),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "versions": {"torch": torch.__version__, **_versions()}}


def _versions() -> dict:
    import importlib.metadata as md

    out = {}
    for name in ("transformers", "accelerate", "liger-kernel", "triton"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--anchors-work", required=True, help="folder made by the anchors' build_assets.py")
    ap.add_argument("--models", default="llama-1.1b,llama-160m")
    ap.add_argument("--variants", default="eager,compile,compile+liger")
    ap.add_argument("--results", default=None, help="folder for run_<tag>.json (default <work>/results)")
    ap.add_argument("--store", default="/tmp/ptflow-bench-store")
    ap.add_argument("--mb", type=int, default=8)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--skip", type=int, default=10)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--save-steps", type=int, help="write a checkpoint every N steps (default: none); a re-run "
                    "of the same variant and store resumes from the newest")
    ap.add_argument("--set", default="", help="train keys over the variant's, as key=value,... "
                    "(e.g. ddp_bucket_cap_mb=100,gradient_checkpointing=true); recorded in the result")
    ap.add_argument("--timeout", type=int, default=400)
    ap.add_argument("--gpus", type=int, default=2, help="processes for the ddp / fsdp variants")
    ap.add_argument("--prepare-only", action="store_true", help="only fill the store's tokenizer and dataset caches")
    ap.add_argument("--dry-run", action="store_true", help="build each variant's train section and print it; no training")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    ap.add_argument("--tag", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:  # the stage's own log lines, timestamped: where a cold first step goes
        import logging

        logging.basicConfig(level=logging.INFO, format="%(asctime)s.%(msecs)03d %(name)s %(message)s", datefmt="%H:%M:%S")
        Path(a.result).write_text(json.dumps(run_one(a), indent=2))
        return
    if a.prepare_only:  # fill the store's tokenizer + dataset caches, so the timed variants start from them
        for model_name in a.models.split(","):
            for variant in a.variants.split(","):
                t0 = time.perf_counter()
                _, _, data, _ = prepare(a, model_name, variant)
                print(f"prepared {model_name} / {variant}: { {k: v for k, v in data.stats.items() if 'block' in k} } in "
                      f"{time.perf_counter() - t0:.1f} s ({'cached' if data.hit else 'built'})", flush=True)
        return
    if a.dry_run:
        for variant in a.variants.split(","):
            t = train_section(variant, a.steps, a.mb, a.lr, a.gpus, overrides=a.set)
            keys = ("num_processes", "fsdp", "bf16", "pure_bf16", "torch_compile", "compile_scope", "sdpa_backend",
                    "enable_liger_kernel", "max_steps", "per_device_train_batch_size", "logging_steps")
            flags = set(variant.split("+"))
            print(f"{variant}: " + ", ".join(f"{k}={getattr(t, k)}" for k in keys)
                  + f", attn_implementation={'flex_attention' if 'flex' in flags else 'sdpa'}, doc_mask={'docmask' in flags}")
        return
    results = Path(a.results or Path(a.anchors_work) / "results")
    results.mkdir(parents=True, exist_ok=True)
    rows = []
    for model in a.models.split(","):
        for variant in a.variants.split(","):
            tag = f"ptflow-{variant}_{model}_mb{a.mb}"
            out = results / f"run_{tag}.json"
            cmd = [sys.executable, __file__, "--one", "--anchors-work", a.anchors_work, "--model", model,
                   "--variant", variant, "--tag", tag, "--result", str(out), "--store", a.store, "--mb", str(a.mb),
                   "--seq", str(a.seq), "--steps", str(a.steps), "--skip", str(a.skip), "--lr", str(a.lr),
                   "--gpus", str(a.gpus), "--set", a.set, *(["--save-steps", str(a.save_steps)] if a.save_steps else [])]
            print(f"=== {tag}", flush=True)
            t0 = time.perf_counter()
            try:
                rc = subprocess.run(cmd, timeout=a.timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"}).returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
            wall = time.perf_counter() - t0
            if rc == 0:
                r = json.loads(out.read_text())
                r["wall_s"] = wall  # the variant's whole process: imports, prepare (cached after the first), train
                out.write_text(json.dumps(r, indent=2))
                rows.append((model, variant, f"{r['steady_tokens_per_s']:,.0f}", f"{max((m for m in r['mfu'] if m), default=0):.3f}",
                             f"{r['mem']['max_allocated_gib']:.1f}", f"{r['first_step_s']:.1f}"))
            else:
                rows.append((model, variant, f"FAILED ({rc})", "", "", ""))
            print(f"=== {tag}: {rows[-1][2]} tok/s in {time.perf_counter() - t0:.0f} s", flush=True)
    print("\n| model | variant | tokens/s | MFU | peak GiB | first step s |\n|---|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
