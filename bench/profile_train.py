"""Where a training step's GPU time goes: torch.profiler over ptflow's model setup and step.

Builds the model the way the train stage does (ptflow.model + ptflow.kernels), runs a few
warm-up steps and then profiles N steps of forward + backward + clip + fused AdamW on random
tokens, and prints the top kernels and the time per kernel family.

    python bench/profile_train.py --model-dir /tmp/anchors/models/llama-160m --variant compile
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FAMILIES = [("attention", ("flash", "fmha", "attention", "cudnn", "sdpa")), ("gemm", ("gemm", "sm90_xmma", "cutlass", "nvjet", "cublas")),
            ("optimizer", ("adam", "multi_tensor", "foreach")), ("cross-entropy", ("cross_entropy", "nll", "log_softmax", "liger")),
            ("embedding", ("embedding", "index")), ("triton (fused elementwise)", ("triton",)),
            ("elementwise/other", ("")) ]


def family(name: str) -> str:
    low = name.lower()
    for fam, keys in FAMILIES:
        if any(k in low for k in keys):
            return fam
    return "elementwise/other"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--variant", default="compile", help="eager, compile, compile+liger, layers, ... (+pure, +cudnn)")
    ap.add_argument("--mb", type=int, default=8)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--top", type=int, default=25)
    a = ap.parse_args()

    import torch
    from torch.profiler import ProfilerActivity, profile

    from ptflow.config.schema import ModelSection, TrainSection
    from ptflow.train.kernels import apply_speedups, attention_backend
    from ptflow.train.model import build_model

    flags = set(a.variant.split("+"))
    train = TrainSection(bf16=True, pure_bf16="pure" in flags, torch_compile=bool({"compile", "layers"} & flags),
                         compile_scope="layers" if "layers" in flags else "model", enable_liger_kernel="liger" in flags,
                         sdpa_backend="cudnn" if "cudnn" in flags else "auto")
    section = ModelSection(model_name_or_path=a.model_dir, train_from_scratch=True)
    model = build_model(section, Path(a.model_dir), 0, 0).cuda()
    if train.pure_bf16:
        model.to(torch.bfloat16)
    print("applied:", apply_speedups(model, train))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-4, fused=True)
    vocab = model.config.vocab_size
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=not train.pure_bf16)

    def step():
        x = torch.randint(0, vocab, (a.mb, a.seq), device="cuda")
        with autocast, attention_backend(train):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    t0 = time.perf_counter()
    step()
    torch.cuda.synchronize()
    print(f"first step {time.perf_counter() - t0:.1f} s")
    for _ in range(a.warmup):
        step()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(a.steps):
        step()
    end.record()
    torch.cuda.synchronize()
    step_ms = start.elapsed_time(end) / a.steps
    print(f"{a.variant}: {step_ms:.1f} ms/step, {a.mb * a.seq / step_ms * 1000:,.0f} tok/s (unprofiled)")
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(a.steps):
            step()
        torch.cuda.synchronize()
    kernels = [e for e in prof.key_averages() if e.device_time_total > 0]
    total = sum(e.device_time_total for e in kernels) / 1000 / a.steps
    by_family = defaultdict(float)
    for e in kernels:
        by_family[family(e.key)] += e.device_time_total / 1000 / a.steps
    print(f"GPU busy {total:.1f} ms/step of {step_ms:.1f} ms wall ({100 * total / step_ms:.0f}%)")
    for fam, ms in sorted(by_family.items(), key=lambda kv: -kv[1]):
        print(f"  {fam:<28} {ms:7.2f} ms  {100 * ms / total:5.1f}%")
    print(f"top {a.top} kernels (ms/step, calls/step):")
    for e in sorted(kernels, key=lambda e: -e.device_time_total)[: a.top]:
        print(f"  {e.device_time_total / 1000 / a.steps:7.2f}  {e.count // a.steps:4d}  {e.key[:110]}")


if __name__ == "__main__":
    main()
