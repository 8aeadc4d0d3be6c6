"""bf16 training whose updates do not vanish (docs/rewardmap.md §7): two schemes, chosen by `--bf16-update`.

At the paper's lr 1e-6, an AdamW step moves a weight by about 1e-6. bf16 keeps 8 significant bits, so a
weight of 0.02 can only move in steps of 2^-6 * 2^-7 ~ 1.2e-4: a plain bf16 AdamW rounds almost every
update back to the old value and the run barely trains. The two fixes:

- `master` (the default; what the authors' FSDP code does): the trainable weights stay float32 and every
  forward runs under `torch.autocast(bfloat16)`, so the matmuls are bf16 while the optimizer adds each
  small update to a float32 weight. Costs 4 bytes per weight instead of 2, and float32 gradients.
- `stochastic`: the weights are bf16; `AdamWSR` computes the update in float32 and writes the new weight
  back with stochastic rounding (round up with probability equal to the distance to the lower bf16
  neighbour, over the gap), which is unbiased: a weight that should move by 1e-6 moves by 0 or by one
  bf16 step with the right odds, so over many steps it moves by ~lr per step on average. Weights and
  gradients stay 2 bytes; the optimizer keeps float32 moments (8 bytes per weight).

Bytes per parameter of each part (policy weights + gradients + AdamW moments + frozen bf16 reference):

    scheme                         weights  grads  moments          reference  total
    float32 (CPU default)          4        4      8                4          20
    master (fp32 master, bf16)     4        4      8 (2 with 8-bit) 2          18 (12)
    stochastic (bf16 + SR)         2        2      8                2          14
    plain bf16 (updates vanish)    2        2      8 (2 with 8-bit) 2          14 (8)

`bytes_per_param` computes these; the README turns them into what fits where.
"""
from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

SCHEMES = ("master", "stochastic")


def bytes_per_param(scheme: str, eight_bit_moments: bool = False) -> dict[str, int]:
    """Bytes per parameter of weights, gradients, AdamW moments and the bf16 reference, for a scheme
    ('float32', 'master', 'stochastic', or 'plain' bf16)."""
    weights = {"float32": 4, "master": 4, "stochastic": 2, "plain": 2}[scheme]
    moments = 2 if eight_bit_moments else 8
    reference = 4 if scheme == "float32" else 2
    return {"weights": weights, "grads": weights, "moments": moments, "reference": reference,
            "total": 2 * weights + moments + reference}


def autocast(model: nn.Module):
    """The context every forward of `model` runs in: bf16 autocast when the model keeps float32 master
    weights for bf16 compute (`model.autocast_dtype`, set by `model.load_policy`), else nothing."""
    dtype = getattr(model, "autocast_dtype", None)
    if dtype is None:
        return contextlib.nullcontext()
    device = next(model.parameters()).device.type
    return torch.autocast(device_type=device, dtype=dtype)


def stochastic_round_(target: Tensor, source: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Write float32 `source` into bf16 `target`, rounding each value up or down at random with the
    odds that make the result unbiased (E[target] = source).

    A bf16 number is the top 16 bits of a float32. Adding a uniform random integer in [0, 2^16) to the
    float32's bit pattern and dropping the low 16 bits rounds up exactly when the random number exceeds
    the distance to the next bf16 value, i.e. with probability (source - lower) / (upper - lower)."""
    bits = source.detach().float().contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, bits.shape, dtype=torch.int32, device=bits.device, generator=generator)
    rounded = (bits + noise).bitwise_and_(-65536)  # -65536 == 0xFFFF0000: keep the top 16 bits
    return target.copy_(rounded.view(torch.float32))  # exact: the low 16 bits are zero


class AdamWSR(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, as torch.optim.AdamW) for bf16 weights: moments and update in
    float32, the new weight written back with `stochastic_round_`. On float32 weights it is exactly
    torch.optim.AdamW. The rounding generator's state is part of `state_dict`, so resume is exact."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, seed: int = 0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        device = next(p.device for g in self.param_groups for p in g["params"])
        self.generator = torch.Generator(device=device).manual_seed(seed)

    @torch.no_grad()
    def step(self, closure=None):
        """One AdamW step on every parameter with a gradient."""
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad.float()
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
                state["step"] += 1
                m, v, t = state["exp_avg"], state["exp_avg_sq"], state["step"]
                m.lerp_(grad, 1 - beta1)
                v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                denom = (v.sqrt() / (1 - beta2**t) ** 0.5).add_(group["eps"])
                new = p.float().mul_(1 - group["lr"] * group["weight_decay"])
                new.addcdiv_(m, denom, value=-group["lr"] / (1 - beta1**t))
                if p.dtype == torch.float32:
                    p.copy_(new)
                else:
                    stochastic_round_(p, new, self.generator)

    def state_dict(self) -> dict:
        """torch's optimizer state plus the rounding generator's state."""
        return {**super().state_dict(), "rounding_rng": self.generator.get_state()}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore moments at float32 (torch would cast them to the bf16 weights' dtype) and the generator."""
        state_dict = dict(state_dict)
        rng = state_dict.pop("rounding_rng", None)
        super().load_state_dict(state_dict)
        params = [p for g in self.param_groups for p in g["params"]]
        for index, saved in state_dict["state"].items():
            for key in ("exp_avg", "exp_avg_sq"):
                if key in saved:
                    self.state[params[index]][key] = saved[key].to(params[index].device, torch.float32, copy=True)
        if rng is not None:
            self.generator.set_state(rng)


def make_optimizer(model: nn.Module, lr: float, weight_decay: float = 1e-2, eight_bit: bool = False,
                   stochastic_rounding: bool = False, seed: int = 0):
    """AdamW (docs/rewardmap.md §7: lr 1e-6, weight decay 1e-2 in the paper); bitsandbytes 8-bit AdamW if
    asked; `stochastic_rounding`: precision.AdamWSR, whose bf16 weights keep updates smaller than their
    rounding step (the `stochastic` scheme)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if stochastic_rounding:
        if eight_bit:
            raise ValueError("--eight-bit-adam has no stochastic rounding (bitsandbytes updates bf16 weights with "
                             "round-to-nearest, so small updates vanish): use --bf16-update master with it")
        return AdamWSR(params, lr=lr, weight_decay=weight_decay, seed=seed)
    if eight_bit:
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ImportError("--eight-bit-adam needs the optional package bitsandbytes (pip install bitsandbytes; "
                              "CUDA only)") from None
        return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
