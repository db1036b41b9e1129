"""A few optimizer steps through `Ranks` in each mode; run under torchrun by tests/test_distributed.py and
tests/test_gpu.py, and called in-process (one rank) for the reference.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/distributed_worker.py OUT.json [cuda]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from tiny_assets import tiny_llama_config
from transformers import AutoModelForCausalLM

from ptflow.config.schema import TrainSection
from ptflow.train.batches import Slicing, StepBatch
from ptflow.train.distributed import Ranks
from ptflow.train.step import StepRunner

STEPS, MICRO, ACCUMULATION, SEQ = 3, 2, 2, 16
ROWS = 2 * MICRO * ACCUMULATION  # the global batch of a step: 2 ranks x micro-batch x accumulation


def global_rows() -> tuple[torch.Tensor, torch.Tensor]:
    """Every step's rows (the same, so the loss falls) and their lengths: padded rows of different token counts,
    so the step's token count is all-reduced."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 200, (ROWS, SEQ), generator=generator)
    return ids, torch.randint(4, SEQ + 1, (ROWS,), generator=generator)


def step_batch(cut: Slicing) -> StepBatch:
    ids, lengths = global_rows()
    micro, labelled = [], 0
    for i in range(cut.accumulation):
        rows = torch.from_numpy(cut.rows(torch.arange(ROWS).numpy(), i))
        mask = torch.arange(SEQ)[None, :] < lengths[rows][:, None]
        labels = ids[rows].masked_fill(~mask, -100)
        labelled += int((labels[:, 1:] != -100).sum())
        micro.append(tuple(t.to(cut.device) if t is not None else None
                           for t in (ids[rows], labels, mask.long(), None)))
    return StepBatch(micro, labelled, torch.tensor(float(labelled), device=cut.device))


def train_steps(ranks: Ranks, fsdp: bool) -> dict:
    """Losses and gradient norms of STEPS AdamW steps (the first decoder layer frozen, as `freeze` training)."""
    torch.manual_seed(0)
    net = AutoModelForCausalLM.from_config(tiny_llama_config())
    for param in net.model.layers[0].parameters():
        param.requires_grad_(False)  # DDP must not wait for gradients that never come (find_unused_parameters off)
    net = ranks.wrap(net, fsdp=fsdp)
    model = ranks.unwrap(net)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    runner = StepRunner(net, optimizer, scheduler, ranks, TrainSection(max_steps=STEPS, max_grad_norm=0.5),
                        padded=True)
    per_rank = MICRO * 2 // ranks.world  # one rank takes both ranks' rows, so the global batch is the same
    cut = Slicing(per_rank, ACCUMULATION, ranks.rank, ranks.world, SEQ, ranks.device)
    losses, norms = [], []
    for _ in range(STEPS):
        loss, norm = runner(step_batch(cut))
        losses.append(float(loss))
        norms.append(float(norm))
    return {"wrapper": type(net).__name__, "mode": ranks.mode, "losses": losses, "grad_norms": norms,
            "param_device": str(next(model.parameters()).device),
            "device_ids": getattr(net, "device_ids", None)}


def launch(out: Path, cuda: bool = False) -> dict:
    """This file under torchrun on two processes (gloo CPU ranks, or one GPU each with NCCL); rank 0's report."""
    here = Path(__file__).resolve().parent
    # ahead of the caller's path, not instead of it (a GPU machine may carry packages on PYTHONPATH)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(here.parent), str(here),
                                                                     os.environ.get("PYTHONPATH")]))}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(name, None)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             __file__, str(out), *(["cuda"] if cuda else [])],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(out.read_text())


def main(out: str, cuda: bool) -> None:
    ranks = Ranks.open(cpu=not cuda)  # creates the group
    report = {"world": ranks.world, "device": str(ranks.device),
              "backend": torch.distributed.get_backend()}
    for mode in ("ddp", "fsdp"):
        joined = Ranks.open(cpu=not cuda)  # the group exists now: joins it
        report[mode] = train_steps(joined, fsdp=mode == "fsdp")
    ranks.barrier()
    if ranks.is_main:
        with open(out, "w") as f:
            json.dump(report, f)
    ranks.close()


if __name__ == "__main__":
    main(sys.argv[1], len(sys.argv) > 2 and sys.argv[2] == "cuda")
