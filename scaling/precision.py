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
  gradients stay 2 bytes; the optimizer keeps float32 moments (8 bytes per weight), or, with
  `--eight-bit-adam`, 8-bit block-wise quantized moments (2 bytes per weight + the block scales:
  `quantize_blockwise`), still with the float32 update and the stochastically rounded write. bitsandbytes'
  8-bit AdamW has no stochastic rounding, so this is the one scheme that fits Qwen2.5-VL-7B's states in
  ~62 GiB and keeps its updates.

Bytes per parameter of each part (policy weights + gradients + AdamW moments + frozen bf16 reference):

    scheme                         weights  grads  moments           reference  total
    float32 (CPU default)          4        4      8                 4          20
    master (fp32 master, bf16)     4        4      8 (2* with 8-bit) 2          18 (12*)
    stochastic (bf16 + SR)         2        2      8 (2* with 8-bit) 2          14 (8*)
    plain bf16 (updates vanish)    2        2      8 (2* with 8-bit) 2          14 (8*)

    * + 8/256: one float32 absmax per block of 256 values, for each of the two moments.

`bytes_per_param` computes these; the README turns them into what fits where.
"""
from __future__ import annotations

import contextlib
import functools

import torch
from torch import Tensor, nn

SCHEMES = ("master", "stochastic")
BLOCK = 256  # values per quantization block, each with its own float32 absmax (as bitsandbytes' 8-bit optimizers)
SLICE = 1 << 24  # elements AdamWSR updates at a time (a multiple of BLOCK): its float32 temporaries never grow
# with the largest tensor (Qwen2.5-VL-7B's embedding: 545 M elements, 2 GiB per float32 copy)


def bytes_per_param(scheme: str, eight_bit_moments: bool = False) -> dict[str, float]:
    """Bytes per parameter of weights, gradients, AdamW moments and the bf16 reference, for a scheme
    ('float32', 'master', 'stochastic', or 'plain' bf16). 8-bit moments: one uint8 code per moment value
    plus one float32 absmax per BLOCK values of each moment (bitsandbytes' blocks are 256 too)."""
    weights = {"float32": 4, "master": 4, "stochastic": 2, "plain": 2}[scheme]
    moments = 2 + 2 * 4 / BLOCK if eight_bit_moments else 8
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


@functools.lru_cache(maxsize=None)
def dynamic_map(signed: bool, device: torch.device = torch.device("cpu")) -> Tensor:
    """The codebook of 8-bit block-wise quantization, ascending float32 values on [-1, 1] (signed) or
    [0, 1]: the "dynamic" map of Dettmers et al. 2022 (8-bit Optimizers via Block-wise Quantization,
    arXiv:2110.02861), i.e. 10^-e x a linearly spaced fraction. Decade (10^-(k+1), 10^-k] holds half as
    many codes as the decade above it (1, 2, 4, ..., 64 signed / 128 unsigned at the top): the precision
    is finest near the block's absmax and the range reaches 1e-6 (signed) / 1e-7 (unsigned) of it, which
    a linear 8-bit map (smallest step 1/127) would round to zero.

    Unsigned: 0 and 255 values in [1e-7, 1] (8 decades) = 256 codes. Signed: 0 and +-127 values in
    [1e-6, 1] (7 decades) = 255 codes, symmetric, so that 0, +1 and -1 are all codes and a block's absmax
    is exact whatever its sign (bitsandbytes spends the 256th code on a +1 without a -1); uint8 255 is
    unused. The largest gap is the top decade's, 0.9/64 (0.9/128 unsigned): a value is off by at most half
    of it times its block's absmax. Cached: do not modify the returned tensor."""
    decades = 7 if signed else 8
    positive = torch.cat([10.0 ** (k - decades + 1) * torch.linspace(0.1, 1, 2**k + 1, dtype=torch.float64)[1:]
                          for k in range(decades)])
    code = torch.cat([-positive.flip(0), torch.zeros(1, dtype=torch.float64), positive]) if signed else \
        torch.cat([torch.zeros(1, dtype=torch.float64), positive])
    return code.to(device, torch.float32)


def quantize_blockwise(x: Tensor, signed: bool) -> tuple[Tensor, Tensor]:
    """Block-wise 8-bit quantization (Dettmers et al. 2022): the flattened `x` in blocks of BLOCK values
    (the last one may be shorter), each scaled by its absmax, each value stored as the uint8 index of the
    nearest code of `dynamic_map(signed)` (torch.bucketize against the midpoints between codes). Zeros
    stay exactly zero and each block's absmax is exact (0 and +-1 are codes). On the unsigned map only 0
    itself rounds to code 0: any positive value gets at least the smallest positive code (1e-7 x absmax),
    so a positive sqrt(v) never comes back as 0 (see AdamWSR). Returns (codes [numel] uint8, absmax
    [ceil(numel / BLOCK)] float32)."""
    flat = x.reshape(-1).float()
    n = flat.numel()
    blocks = torch.nn.functional.pad(flat, (0, -n % BLOCK)).view(-1, BLOCK)
    absmax = torch.linalg.vector_norm(blocks, float("inf"), dim=1)
    scaled = blocks / absmax.clamp_min(torch.finfo(torch.float32).tiny)[:, None]  # an all-zero block stays 0
    code = dynamic_map(signed, x.device)
    midpoints = (code[1:] + code[:-1]) / 2
    if not signed:
        midpoints[0] = 0  # between 0 and the smallest positive code: only 0 itself rounds down to 0
    return torch.bucketize(scaled, midpoints, out_int32=True).view(-1)[:n].to(torch.uint8), absmax


def dequantize_blockwise(codes: Tensor, absmax: Tensor, signed: bool) -> Tensor:
    """The flat float32 values of `codes` (uint8, as quantize_blockwise returns them) and their blocks'
    `absmax`: code value x its block's absmax."""
    x = dynamic_map(signed, codes.device)[codes.reshape(-1).int()]
    full = x.numel() // BLOCK * BLOCK
    x[:full].view(-1, BLOCK).mul_(absmax[: full // BLOCK, None])
    x[full:].mul_(absmax[full // BLOCK :])  # the last, shorter block (if any)
    return x


class AdamWSR(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, as torch.optim.AdamW) for bf16 weights: moments and update in
    float32, the new weight written back with `stochastic_round_`. On float32 weights it is exactly
    torch.optim.AdamW. The rounding generator's state is part of `state_dict`, so resume is exact.

    Each parameter is updated SLICE elements at a time, so the step's float32 temporaries (gradient,
    moments, denominator, new weight, rounding noise) are bounded by SLICE elements, not by the largest
    tensor. On CPU the noise is drawn in the same order whatever the slicing; on CUDA a different SLICE
    draws different (equally unbiased) noise.

    `eight_bit_moments`: the state keeps the moments as 8-bit block-wise codes (Dettmers et al. 2022:
    `quantize_blockwise`) instead of float32, 2 bytes per weight + 8/256 for the block scales instead of 8;
    each step dequantizes a slice, does the same float32 AdamW math, writes the weight as above, and
    re-quantizes. The first moment m uses the signed map. The second moment is stored as sqrt(v) on the
    unsigned map, for two reasons: (1) v ~ g^2 spans twice as many decades as |g|: gradients 10^4 apart
    within a block give v 10^8 apart, past the map's 1e-7, so small v's would round to 0, while m (not
    squared) does not, and an update m / (sqrt(v) + eps) with v = 0 is m / 1e-8, a weight blown away;
    sqrt(v), in the gradient's units like m, spans the same range as m (measured on CPU, gradient scales
    10^4 apart within every block, 50 steps: v itself on the same map rounds 12% of the v's to 0 and makes
    steps of up to ~1e4 x lr; sqrt(v): no zeros, steps of at most 1.7 x lr, float32 AdamW's 1.0 x lr).
    (2) Even so, the unsigned
    quantization never rounds a positive value to 0 (`quantize_blockwise`), so a nonzero v always keeps a
    nonzero denominator, at least 1e-7 x its block's largest sqrt(v). Adam's denominator is sqrt(v)
    anyway, so its relative error is the code's own. Rounding is to the nearest code, as bitsandbytes'
    blockwise optimizer does; the float32 values (not the re-quantized ones) make the current step."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, seed: int = 0, eight_bit_moments: bool = False):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.eight_bit_moments = eight_bit_moments
        device = next(p.device for g in self.param_groups for p in g["params"])
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def _new_state(self, p: Tensor) -> dict:
        """Zero moments: float32 like `p`, or (8-bit) uint8 codes of 0 shaped like `p` and one float32 absmax
        per BLOCK values of the flattened `p`."""
        if not self.eight_bit_moments:
            return {"step": 0, "exp_avg": torch.zeros_like(p, dtype=torch.float32),
                    "exp_avg_sq": torch.zeros_like(p, dtype=torch.float32)}
        blocks = -(-p.numel() // BLOCK)
        return {"step": 0,
                "m_codes": torch.full_like(p, 127, dtype=torch.uint8),  # 127: the signed map's 0
                "m_absmax": torch.zeros(blocks, device=p.device),
                "sqrt_v_codes": torch.zeros_like(p, dtype=torch.uint8),  # 0: the unsigned map's 0
                "sqrt_v_absmax": torch.zeros(blocks, device=p.device)}

    @torch.no_grad()
    def step(self, closure=None):
        """One AdamW step on every parameter with a gradient, SLICE elements at a time."""
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state.update(self._new_state(p))
                state["step"] += 1
                weights, grads = p.view(-1), p.grad.reshape(-1)
                for start in range(0, p.numel(), SLICE):
                    self._update(weights[start : start + SLICE], grads[start : start + SLICE], state, start, group)

    def _update(self, w: Tensor, grad: Tensor, state: dict, start: int, group: dict) -> None:
        """AdamW on one slice: `w` is a view of elements [start, start + len) of a flattened weight."""
        beta1, beta2 = group["betas"]
        t, stop, grad = state["step"], start + w.numel(), grad.float()
        if self.eight_bit_moments:
            blocks = slice(start // BLOCK, -(-stop // BLOCK))  # SLICE is a multiple of BLOCK: whole blocks
            m = dequantize_blockwise(state["m_codes"].view(-1)[start:stop], state["m_absmax"][blocks], signed=True)
            v = dequantize_blockwise(state["sqrt_v_codes"].view(-1)[start:stop], state["sqrt_v_absmax"][blocks],
                                     signed=False).square_()
        else:  # views: updated in place
            m, v = state["exp_avg"].view(-1)[start:stop], state["exp_avg_sq"].view(-1)[start:stop]
        m.lerp_(grad, 1 - beta1)
        v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        sqrt_v = v.sqrt()
        if self.eight_bit_moments:
            for name, value, signed in (("m", m, True), ("sqrt_v", sqrt_v, False)):
                codes, absmax = quantize_blockwise(value, signed)
                state[name + "_codes"].view(-1)[start:stop] = codes
                state[name + "_absmax"][blocks] = absmax
        denom = sqrt_v.div_((1 - beta2**t) ** 0.5).add_(group["eps"])
        new = w.float().mul_(1 - group["lr"] * group["weight_decay"])
        new.addcdiv_(m, denom, value=-group["lr"] / (1 - beta1**t))
        if w.dtype == torch.float32:
            w.copy_(new)
        else:
            stochastic_round_(w, new, self.generator)

    def state_dict(self) -> dict:
        """torch's optimizer state plus the rounding generator's state."""
        return {**super().state_dict(), "rounding_rng": self.generator.get_state()}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore each state tensor at its saved dtype (float32 moments; uint8 codes and float32 absmax),
        and the generator. torch would cast every tensor of a bf16 parameter's state to bf16 (lossy for
        float32 moments and absmax, and a bf16 copy of the whole state on the GPU on the way), so it only
        gets the step counts."""
        state_dict = dict(state_dict)
        rng = state_dict.pop("rounding_rng", None)
        saved = state_dict["state"]
        keeps = "m_codes" if self.eight_bit_moments else "exp_avg"
        if any(keeps not in s for s in saved.values()):
            raise ValueError(f"the saved optimizer state has no {keeps!r}: it was saved "
                             f"{'without' if self.eight_bit_moments else 'with'} 8-bit moments "
                             "(resume with the same --eight-bit-adam)")
        super().load_state_dict({**state_dict, "state": {i: {k: v for k, v in s.items() if not torch.is_tensor(v)}
                                                          for i, s in saved.items()}})
        params = [p for g in self.param_groups for p in g["params"]]
        for index, s in saved.items():
            for key, value in s.items():
                if torch.is_tensor(value):
                    self.state[params[index]][key] = value.to(params[index].device, copy=True)
        if rng is not None:
            self.generator.set_state(rng)


def make_optimizer(model: nn.Module, lr: float, weight_decay: float = 1e-2, eight_bit: bool = False,
                   stochastic_rounding: bool = False, seed: int = 0):
    """AdamW (docs/rewardmap.md §7: lr 1e-6, weight decay 1e-2 in the paper). `stochastic_rounding`:
    precision.AdamWSR, whose bf16 weights keep updates smaller than their rounding step (the `stochastic`
    scheme), with 8-bit block-wise moments if `eight_bit` (bitsandbytes would round the bf16 weights to
    nearest, so its small updates would vanish). `eight_bit` alone: bitsandbytes' 8-bit AdamW (for float32
    master weights, where round-to-nearest loses nothing)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if stochastic_rounding:
        return AdamWSR(params, lr=lr, weight_decay=weight_decay, seed=seed, eight_bit_moments=eight_bit)
    if eight_bit:
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ImportError("--eight-bit-adam needs the optional package bitsandbytes (pip install bitsandbytes; "
                              "CUDA only)") from None
        return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
