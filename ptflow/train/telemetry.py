"""Training throughput numbers: tokens/s per device, MFU, peak memory, data-wait share, ETA.

MFU = achieved model FLOPs / peak dense bf16 FLOPs of the device, with model FLOPs per token
= 6 x N + 12 x layers x hidden x sequence, as torchtitan and the PaLM paper (appendix B) count
them: N counts the parameters that do a matrix multiply per token, i.e. all but the input
embedding table (a lookup; the LM head, tied or not, is counted); the second term is the
attention score and value matmuls (12 L H Q T with H x Q = hidden). Counting the embedding
table in N, as a plain parameter count does, inflates MFU most for small models with large
vocabularies. Peak FLOPs come from the table below; unknown devices and CPUs report None.
"""

from __future__ import annotations

import resource
import sys

import torch

# Dense bf16 peak FLOP/s (no sparsity), from vendor data sheets.
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100 NVL": 835e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,  # SXM
    "GH200": 989e12,
    "B200": 2250e12,
    "A100": 312e12,
    "A10G": 125e12,
    "L40S": 362e12,
    "L4": 121e12,
    "RTX 4090": 165e12,
}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_FLOPS.items():  # ordered: specific names before their prefixes
        if key in name:
            return value
    return None


def flops_per_token(n_params: int, n_layers: int, hidden: int, seq_len: int) -> float:
    """Training FLOPs per token: `n_params` should be `matmul_parameters(model)`, not the full count."""
    return 6.0 * n_params + 12.0 * n_layers * hidden * seq_len


def matmul_parameters(model) -> int:
    """Parameters used in a matrix multiply per token: all but the input embedding table, unless tied to the head."""
    total = sum(p.numel() for p in model.parameters())
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    if head is not None and head.weight is embedding:
        return total  # the shared table is the head's matmul too
    return total - embedding.numel()


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**30 if sys.platform == "darwin" else 2**20)


def format_seconds(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
