"""AdamW for bf16 weights that loses no update on average: fp32 arithmetic, stochastic rounding back to bf16.

With bf16 weights (`train.pure_bf16`) a plain AdamW step rounds `w - lr * update` to the nearest
bf16 value, so an update smaller than half a bf16 ulp of its weight (0.4 % of it) is dropped:
at lr 5e-5 one step leaves about 43 % of a Llama's weights bit-identical, and training stalls.
Here the step is computed in fp32 (moments kept in fp32) and the new weight is rounded *up or
down at random*, with the probability of rounding up equal to the fraction of the ulp covered,
so every update lands in expectation (stochastic rounding, as in torchao's bf16 AdamW and
Zamirai et al. 2020). Weights stay 2 bytes each; no fp32 master copy is kept.

The rounding noise of step t is drawn from a generator seeded with (seed, t): DDP replicas round
identically (they stay in sync) and a resumed run rounds as the uninterrupted one did.
"""

from __future__ import annotations

import math

import torch

LOW_BITS = 0xFFFF  # the 16 bits of an fp32 number that bf16 drops


def stochastic_round_(target: torch.Tensor, value: torch.Tensor, generator: torch.Generator | None = None) -> None:
    """Write fp32 `value` into bf16 `target`, rounding each element up with probability = its dropped fraction."""
    bits = value.view(torch.int32)
    noise = torch.randint(0, LOW_BITS + 1, bits.shape, dtype=torch.int32, device=bits.device, generator=generator)
    # adding noise to the dropped bits carries into the kept ones with exactly that probability; then truncate
    rounded = (bits + noise) & ~LOW_BITS
    target.copy_(rounded.view(torch.float32))  # exact: the low bits are zero


def local(tensor: torch.Tensor) -> torch.Tensor:
    """The local shard of an FSDP (DTensor) parameter or gradient; the tensor itself otherwise."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


class StochasticRoundingAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, bias-corrected moments) for bf16 parameters, stochastically rounded."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, seed: int = 0):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay,
                                  "rounding_step": 0})
        self.seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}

    def _generator(self, device: torch.device, step: int) -> torch.Generator:
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device)
            self._generators[device].manual_seed(self.seed * 1_000_003 + step)  # reseeded once per step
        return self._generators[device]

    def load_state_dict(self, state_dict: dict) -> None:
        """As torch's, but the moments stay fp32 (torch casts every state tensor to its parameter's dtype)."""
        super().load_state_dict(state_dict)
        params = [p for group in self.param_groups for p in group["params"]]
        for index, saved in state_dict["state"].items():
            for key in ("exp_avg", "exp_avg_sq"):
                if key in saved:
                    self.state[params[int(index)]][key] = saved[key].to(params[int(index)].device, torch.float32)

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        self._generators.clear()
        self._step = self.param_groups[0]["rounding_step"] + 1  # in the state dict: a resume continues it
        for group in self.param_groups:
            group["rounding_step"] = self._step
            beta1, beta2 = group["betas"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                self._update(param, group, beta1, beta2)
        return loss

    def _update(self, param: torch.Tensor, group: dict, beta1: float, beta2: float) -> None:
        weight, grad = local(param), local(param.grad).float()
        state = self.state[param]
        if not state:  # moments shaped (and sharded) like the parameter, in fp32
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(param, dtype=torch.float32)
            state["exp_avg_sq"] = torch.zeros_like(param, dtype=torch.float32)
        state["step"] += 1
        step = int(state["step"])
        exp_avg, exp_avg_sq = local(state["exp_avg"]), local(state["exp_avg_sq"])
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2 ** step)).add_(group["eps"])
        updated = weight.float()
        updated.mul_(1 - group["lr"] * group["weight_decay"])
        updated.addcdiv_(exp_avg, denom, value=-group["lr"] / (1 - beta1 ** step))
        if weight.dtype == torch.bfloat16:
            stochastic_round_(weight, updated, self._generator(weight.device, self._step))
        else:
            weight.copy_(updated)
