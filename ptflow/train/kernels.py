"""Speed options for the training model: liger fused kernels and torch.compile, together.

With `torch_compile` and `enable_liger_kernel` both on, the decoder body is compiled in place
and the LM head + loss run as liger's fused linear cross-entropy outside the compiled graph:
the full-vocabulary logits are never materialised, and Dynamo never sees the fp32 head that
breaks LLaMA-Factory's compile + liger combination. Without compile, liger also replaces
RMSNorm, SwiGLU and RoPE (which Inductor fuses by itself when compiling).
"""

from __future__ import annotations

import logging

from ptflow.config.schema import TrainSection
from ptflow.errors import ModelError

log = logging.getLogger("ptflow.kernels")


def base_causal_lm(model):
    """The transformers *ForCausalLM under a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def apply_speedups(model, train: TrainSection) -> list[str]:
    """Patch/compile `model` in place (state-dict keys unchanged); returns what was applied."""
    applied = []
    causal_lm = base_causal_lm(model)
    if train.enable_liger_kernel:
        try:
            from liger_kernel.transformers.monkey_patch import (
                _apply_liger_kernel_to_instance,
            )
        except ImportError:
            raise ModelError("train.enable_liger_kernel: liger-kernel is not installed "
                             "(pip install liger-kernel; it needs a CUDA GPU and Triton)") from None
        body_kernels = not train.torch_compile
        _apply_liger_kernel_to_instance(model=causal_lm, rope=body_kernels, rms_norm=body_kernels,
                                        swiglu=body_kernels, fused_linear_cross_entropy=True)
        applied.append("liger fused linear cross-entropy" + (" + RMSNorm/SwiGLU/RoPE" if body_kernels else ""))
    if train.torch_compile:
        decoder = getattr(causal_lm, causal_lm.base_model_prefix)
        if train.compile_scope == "layers":
            for layer in decoder.layers:
                layer.compile(dynamic=False)
            applied.append("torch.compile (each decoder layer)")
        else:
            keep_packed_check_eager(causal_lm)
            if train.enable_liger_kernel:
                decoder.compile(dynamic=False)
                applied.append("torch.compile (decoder)")
            else:
                model.compile(dynamic=False)
                applied.append("torch.compile (whole model)")
    return applied


def keep_packed_check_eager(model) -> None:
    """Let SDPA see a plain causal mask (is_causal, flash-eligible) when the whole decoder is compiled.

    transformers looks for packed sequences in the position ids before building the mask; that is a
    data-dependent check, which it gives up under tracing and builds a dense (batch, 1, S, S) mask
    instead, ruling out the flash kernel. Running that one check outside the graph (a graph break before
    the layers) restores the causal fast path; with doc_mask it still finds the packed documents.
    flex_attention builds its own block mask and is left as measured.
    """
    if model.config._attn_implementation != "sdpa":
        return
    import torch
    from transformers import masking_utils

    check = masking_utils.find_packed_sequence_indices
    if not getattr(check, "_ptflow_eager", False):
        eager = torch.compiler.disable(check, recursive=True)
        eager._ptflow_eager = True
        masking_utils.find_packed_sequence_indices = eager


def attention_backend(train: TrainSection):
    """Context manager pinning PyTorch SDPA to the configured kernel (no-op for auto)."""
    from contextlib import nullcontext

    if train.sdpa_backend == "auto":
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
               "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}[train.sdpa_backend]
    return sdpa_kernel([backend])
