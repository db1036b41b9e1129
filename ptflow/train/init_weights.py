"""Random weights for a from-scratch model: built without memory on the meta device, then initialised where it trains.

A from-scratch model is constructed on `meta` (no memory, no work), placed on its device with
`to_empty` (after FSDP2 has sharded it, so each rank allocates only its shards) and initialised
by the model's own `_init_weights`, module by module, on full-size tensors on that device. A
sharded parameter gets its slice of the full tensor. Every rank draws the same numbers in the same
order, so the weights do not depend on the world size or on the wrapper: FSDP over any number of
ranks, DDP and one process start from the same model on the same kind of device.

Why: a ~10B model built on the CPU and then sharded costs each rank 41 GB of host memory (which the
GPU hosts grant slowly) and minutes of single-socket random number generation; on the meta device the
build takes seconds and each GPU holds only its shards. Any parameter or buffer that `_init_weights`
leaves untouched is caught (it stays NaN) and named, rather than training from garbage memory.
"""

from __future__ import annotations

import torch

from ptflow.errors import ModelError
from ptflow.train.kernels import base_causal_lm


def initialize(model: torch.nn.Module, device: torch.device, seed: int) -> None:
    """Allocate the meta-built `model` on `device` (its shards, if FSDP2 sharded it) and initialise it in place."""
    hf = base_causal_lm(model)
    if not hasattr(hf, "_init_weights"):
        raise ModelError(f"model: {type(hf).__name__} has no _init_weights, so it cannot be initialised from scratch")
    shared = second_names(model)  # tied weights (the head sharing the embedding): initialised once, by their first owner
    model.to_empty(device=device)
    if hasattr(hf, "tie_weights") and not _sharded(next(model.parameters())):
        hf.tie_weights()  # to_empty may give each name its own tensor; a tied head must share the embedding again
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, module in model.named_modules():
            params = {n: p for n, p in module.named_parameters(recurse=False) if (name, n) not in shared}
            buffers = {n: b for n, b in module.named_buffers(recurse=False) if b is not None and b.is_floating_point()}
            if not params and not buffers:
                continue
            full = {n: _nan_full(p, device) for n, p in params.items()}
            for b in buffers.values():
                b.fill_(float("nan"))
            for n, tensor in full.items():  # the module sees plain full-size tensors while it initialises
                module._parameters[n] = torch.nn.Parameter(tensor, requires_grad=params[n].requires_grad)
            try:
                hf._init_weights(module)
            finally:
                for n, p in params.items():
                    module._parameters[n] = p
            for n, p in params.items():
                _fill(p, full[n], f"{name}.{n}" if name else n)
            for n, b in buffers.items():
                if torch.isnan(b).any():
                    raise ModelError(f"model: {type(hf).__name__}._init_weights does not initialise the buffer "
                                     f"{name}.{n}; this architecture cannot be trained from scratch here")


def second_names(model: torch.nn.Module) -> set[tuple[str, str]]:
    """(module, parameter) names under which an already-seen parameter appears again."""
    seen, again = set(), set()
    for name, module in model.named_modules():
        for n, p in module.named_parameters(recurse=False):
            (again.add((name, n)) if id(p) in seen else seen.add(id(p)))
    return again


def _sharded(param: torch.Tensor) -> bool:
    return hasattr(param, "device_mesh")


def _nan_full(param: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A full-size tensor for `param` (its global shape when sharded), NaN until initialised."""
    return torch.full(tuple(param.shape), float("nan"), dtype=param.dtype, device=device)


def _fill(param: torch.Tensor, full: torch.Tensor, name: str) -> None:
    if torch.isnan(full).any():
        raise ModelError(f"model: the model's _init_weights does not initialise {name}; this architecture cannot be "
                         "trained from scratch here")
    if _sharded(param):
        from torch.distributed.tensor import distribute_tensor

        # every rank holds the same full tensor (same seed, same order): each keeps its own slice, no communication
        param.copy_(distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None))
    else:
        param.copy_(full)
