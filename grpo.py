"""GRPO, from scratch: group-relative advantages, the clipped loss with a k3 KL penalty, one training step.

docs/rewardmap.md §4 / DeepSeekMath (arXiv 2402.03300) eq. 3, per response token t of response i in a
group of G responses to one prompt:

    rho_it = pi_theta(o_it | q, o_i<t) / pi_old(o_it | q, o_i<t)
    A_i    = (r_i - mean(r_group)) / (std(r_group) + eps)                          (group_advantages)
    L_it   = -min(rho_it * A_i, clip(rho_it, 1 - eps_clip, 1 + eps_clip) * A_i) + beta * KL_it
    KL_it  = exp(ref - logp) - (ref - logp) - 1   (k3, unbiased and >= 0)          (kl_k3)

averaged over response tokens (`aggregation="token"`) or within each response then over responses
(`"sequence"`, DeepSeekMath's 1/G sum_i 1/|o_i| sum_t), or summed and divided by a constant
(`"constant"`, Dr. GRPO's max_new_tokens x responses).

Read in this order: `GRPOConfig`; the math (`group_advantages`, `kl_k3`, `policy_loss`); `grpo_step`, one step
as five named phases (rollout -> score -> advantages -> reference log-probs -> update); then each phase.
What is there for speed or scale lives elsewhere and is marked where it is called: the batched KV-cached
rollout and the fused log-probs are speed/ (each beside its plain reference), several GPUs scaling/; the other
advantage estimators and DAPO's dynamic sampling are variants/.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

from model import Policy
from plumbing.flags import check
from scaling.distributed import all_sum, everyone, gather, world
from scaling.lora import adapters_disabled
from speed.decode import COMPILE_MODES, Rollout, sample_groups  # noqa: F401  (the rollout; eval.py decodes with it too)
from speed.logprobs import shared_prompt_logprobs
from variants import advantages as estimators
from variants.dynamic_sampling import dynamic_sampling

ESTIMATORS = ("grpo", "dr-grpo", "rloo", "reinforce++", "reinforce++-baseline")
"""The advantage estimators `advantages` knows (`--advantage`)."""
AGGREGATIONS = ("token", "sequence", "constant")


@dataclass(frozen=True)
class GRPOConfig:
    """The settings of one GRPO step (docs/rewardmap.md §4, §7). Each is a flag of train.py (`--group-size`)."""

    group_size: int = 8
    """G: responses sampled per prompt (paper 8, released script 4)"""
    temperature: float = 1.0
    """sampling temperature for rollouts (0: greedy)"""
    top_p: float = 1.0
    """nucleus sampling threshold for rollouts (1: off)"""
    max_new_tokens: int = 0
    """response token budget for judgement / counting questions (0: 4 for the tiny model, whose boxed answers are one token; 2048 otherwise)"""
    clip_eps: float = 0.2
    """PPO clip range epsilon of the ratio rho"""
    kl_coef: float = 1e-2
    """beta, the coefficient of the k3 KL penalty to the frozen reference (0 skips the reference; paper 1e-3, released script 1e-2)"""
    kl_clamp: float = 0.0
    """clamp each token's KL term at this value (released code: 10; 0: no clamp)"""
    entropy_coef: float = 0.0
    """weight of an entropy bonus in the loss (released code: 1e-3)"""
    ppo_epochs: int = 1
    """optimisation passes over each rollout batch (1: on-policy, the ratio is exactly 1)"""
    micro_batch_size: int = 64
    """responses per forward/backward pass (gradient accumulation over the rest)"""
    aggregation: str = "token"
    """loss averaging: 'token' (over all response tokens) | 'sequence' (per response first) | 'constant' (token sum / (token budget x responses): Dr. GRPO)"""
    std_scale: bool = True
    """divide advantages by the group std (the released code); --no-std-scale only centres them (the paper's text)"""
    advantage: str = "grpo"
    """advantage estimator: grpo | dr-grpo (also sets --aggregation constant unless given) | rloo | reinforce++ | reinforce++-baseline"""
    max_grad_norm: float = 1.0
    """gradient-norm clip before each optimizer step"""
    dynamic_sampling: bool = False
    """DAPO dynamic sampling: groups whose total rewards are all equal are replaced by groups of the stage's next prompts"""
    dynamic_sampling_max_draws: int = 0
    """dynamic sampling: extra prompts drawn per step at most (0: 3 x the batch)"""
    decode_chunk: int = 0
    """prompts decoded at a time, whole groups (0: as many as fit half the free GPU memory, in even chunks; all on CPU)"""
    compile_decode: str = field(default="auto", metadata={"choices": COMPILE_MODES})
    """the rollout's one-token decode step: auto (inductor on one GPU without a 4-bit base; eager otherwise) | off (eager) | inductor | cudagraphs (inductor + CUDA graphs, recorded again each rollout) | eager, aot_eager (dynamo's checking backends)"""

    def __post_init__(self):
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"--aggregation must be token, sequence or constant, got {self.aggregation!r}")
        if self.advantage not in ESTIMATORS:
            raise ValueError(f"--advantage must be one of {', '.join(ESTIMATORS)}, got {self.advantage!r}")
        if not self.std_scale and self.advantage != "grpo":
            raise ValueError(f"--no-std-scale only applies to --advantage grpo ({self.advantage} sets its own scale; "
                             "dr-grpo is GRPO without the std)")
        check(self, ("group_size", self.group_size >= 2, ">= 2: GRPO's advantage compares responses within a group"),
              ("micro_batch_size", self.micro_batch_size >= 1, ">= 1"), ("ppo_epochs", self.ppo_epochs >= 1, ">= 1"),
              ("kl_coef", self.kl_coef >= 0, ">= 0"), ("kl_clamp", self.kl_clamp >= 0, ">= 0"),
              ("clip_eps", self.clip_eps > 0, "> 0"), ("temperature", self.temperature >= 0, ">= 0"),
              ("top_p", 0 < self.top_p <= 1, "in (0, 1]"), ("entropy_coef", self.entropy_coef >= 0, ">= 0"),
              ("max_new_tokens", self.max_new_tokens >= 0, ">= 0"), ("decode_chunk", self.decode_chunk >= 0, ">= 0"),
              ("dynamic_sampling_max_draws", self.dynamic_sampling_max_draws >= 0, ">= 0"),
              ("compile_decode", self.compile_decode in COMPILE_MODES, f"one of {', '.join(COMPILE_MODES)}"))


# ============================================================================ ALGO LOGIC: the math

def group_advantages(rewards: Tensor, group_size: int, scale: bool = True, eps: float = 1e-6) -> Tensor:
    """A_i = (r_i - mean_g r) / (std_g r + eps) within each contiguous group of `group_size` (docs/rewardmap.md §4.1).

    rewards [B*G], row n answers prompt n // G. `std` is the unbiased sample std (as torch.std, TRL and verl);
    a group of equal rewards gives zeros, and so does a group of one. `scale=False` only centres (the paper's text).
    """
    r = rewards.float().view(-1, group_size)  # [B, G]
    centred = r - r.mean(dim=1, keepdim=True)
    if scale:
        std = r.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(r[:, :1])
        centred = centred / (std + eps)
    return centred.reshape(-1)  # [B*G]


def advantages(rewards: Tensor, group_size: int, estimator: str = "grpo", std_scale: bool = True,
               eps: float = 1e-6) -> Tensor:
    """One advantage per response [B*G] from the total rewards [B*G] (contiguous groups), by `estimator`:

        grpo                  (r - mean_g) / (std_g + eps)       (std_scale=False: r - mean_g)   group_advantages
        dr-grpo               r - mean_g                                                         variants/advantages.py
        rloo                  G/(G-1) (r - mean_g)
        reinforce++           (r - mean_B) / (std_B + eps)       B: the whole (global) batch
        reinforce++-baseline  whiten_B(r - mean_g)

    `std_scale=False` is GRPO's switch only (the other estimators fix their own scale)."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown advantage estimator {estimator!r}; choose one of {', '.join(ESTIMATORS)}")
    if not std_scale and estimator != "grpo":
        raise ValueError(f"std_scale=False is GRPO's option; {estimator!r} sets its own scale")
    if estimator == "grpo":
        return group_advantages(rewards, group_size, scale=std_scale, eps=eps)
    if estimator == "dr-grpo":
        return estimators.dr_grpo_advantages(rewards, group_size)
    if estimator == "rloo":
        return estimators.rloo_advantages(rewards, group_size)
    if estimator == "reinforce++":
        return estimators.reinforce_pp_advantages(rewards, eps)
    return estimators.reinforce_pp_baseline_advantages(rewards, group_size, eps)


def kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Per-token k3 estimator of KL(pi || pi_ref): exp(ref - logp) - (ref - logp) - 1 >= 0 (Schulman 2020).

    Computed as expm1(d) - d: exact near d = 0, where exp(d) - d - 1 cancels to rounding noise that can be
    negative (-1e-16 in float64); expm1(d) >= d holds in floating point too, so the result is never < 0."""
    d = ref_logp - logp
    return torch.expm1(d) - d


def policy_loss(logp: Tensor, old_logp: Tensor, ref_logp: Tensor | None, advantages: Tensor, mask: Tensor,
                clip_eps: float = 0.2, kl_coef: float = 1e-3, aggregation: str = "token",
                denom: float | None = None, entropy: Tensor | None = None, entropy_coef: float = 0.0,
                kl_clamp: float | None = None) -> tuple[Tensor, dict[str, float]]:
    """Clipped surrogate + k3 KL (module docstring), masked and aggregated to a scalar loss.

    The released code's two extras (docs/rewardmap.md §8): `entropy` [N, T] (the policy's, differentiable)
    with `entropy_coef` subtracts `entropy_coef * H_t` per token (a bonus for exploring), and `kl_clamp`
    caps each token's KL term (verl clamps its low-variance KL to [-10, 10]; k3 is never negative).

    logp / old_logp / ref_logp: [N, T]; advantages: [N] (one per response) or [N, T]; mask: [N, T] 0/1.
    `aggregation="constant"` is Dr. GRPO's (Liu et al. 2025, arXiv 2503.20783, §3.1 and its code's
    `masked_sum / generate_max_length`; TRL's loss_type "dr_grpo"): the summed token losses over a CONSTANT,
    the response token budget x the number of responses, so a token's weight depends neither on its own
    response's length (the 1/|o_i| of "sequence" favours long wrong answers and short right ones) nor on
    the batch's token count ("token"). Without `denom` the constant is mask.numel(), i.e. [N, T] with T the
    budget; grpo_step passes max_new_tokens x the whole batch's responses (`loss_denominator`).
    `denom` makes micro-batching exact: the summed loss is divided by it instead of by this micro-batch's
    own count. Pass the whole batch's response-token count (`"token"`), response count (`"sequence"`) or
    budget x response count (`"constant"`) and the gradients summed over micro-batches equal one pass over
    the whole batch, whatever the micro-batch size. Metrics (token means over this batch): clip_frac (tokens whose clipped term is
    active, so they get no gradient), approx_kl (k3 of pi_old vs pi_theta), kl (k3 to the reference).
    """
    mask = mask.to(logp.dtype)
    adv = advantages[:, None] if advantages.dim() == 1 else advantages
    ratio = torch.exp(logp - old_logp)
    surrogate = torch.min(ratio * adv, torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * adv)
    kl = kl_k3(logp, ref_logp) if (ref_logp is not None and kl_coef != 0) else torch.zeros_like(logp)
    if kl_clamp is not None:
        kl = kl.clamp(max=kl_clamp)
    per_token = -surrogate + kl_coef * kl
    if entropy is not None and entropy_coef != 0:
        per_token = per_token - entropy_coef * entropy
    if aggregation == "token":
        loss = (per_token * mask).sum() / (denom if denom is not None else mask.sum().clamp(min=1))
    elif aggregation == "sequence":
        per_seq = (per_token * mask).sum(1) / mask.sum(1).clamp(min=1)
        loss = per_seq.sum() / (denom if denom is not None else per_token.shape[0])
    elif aggregation == "constant":
        loss = (per_token * mask).sum() / (denom if denom is not None else max(mask.numel(), 1))
    else:
        raise ValueError(f"aggregation must be 'token', 'sequence' or 'constant', got {aggregation!r}")
    with torch.no_grad():
        n = mask.sum().clamp(min=1)
        clipped = ((ratio > 1 + clip_eps) & (adv > 0)) | ((ratio < 1 - clip_eps) & (adv < 0))
        values = torch.stack([(-surrogate * mask).sum() / n, (kl * mask).sum() / n,
                              (clipped * mask).sum() / n, (kl_k3(logp, old_logp) * mask).sum() / n]).tolist()
    return loss, dict(zip(["loss/policy", "kl", "clip_frac", "approx_kl"], values))


# ============================================================================ ALGO LOGIC: one step
# grpo_step reads as the five phases of docs/rewardmap.md §4.3, each one named call. What is there only for speed,
# scale or safety is marked [speed] / [multi-GPU] / [safety] / [variant] and can be skipped on a first read.

METRICS = {
    "reward/total": "mean total reward R over the B*G responses",
    "reward/format": "mean format reward",
    "reward/correctness": "mean correctness reward",
    "reward/detail": "mean detail reward (planning; 0 for the other types)",
    "reward/accuracy": "fraction of responses with correctness > 0",
    "reward/std": "std of the total reward over the whole batch",
    "groups/zero_std_frac": "fraction of groups whose rewards are all equal (under a group baseline: zero advantage, no gradient)",
    "sampling/drawn": "dynamic sampling: prompts sampled beyond the batch's own (0 without --dynamic-sampling)",
    "sampling/dropped": "dynamic sampling: groups sampled but not trained on (equal rewards, or beyond the batch)",
    "loss/policy": "clipped surrogate term, token mean over the updated rows",
    "kl": "k3 KL to the reference policy, token mean over the updated rows",
    "clip_frac": "fraction of updated tokens whose clipped term is active",
    "approx_kl": "k3 KL of pi_theta to pi_old (0 with one PPO epoch), token mean",
    "entropy": "policy entropy per response token, at sampling time",
    "loss": "total loss (surrogate + KL), mean over PPO epochs",
    "response_len": "mean response length in tokens",
    "tokens/completion": "response tokens sampled this step (with dynamic sampling: every round's)",
    "response_truncated_frac": "fraction of responses that hit the token budget without end-of-turn",
    "grad_norm": "gradient norm before clipping (mean over PPO epochs)",
    "skipped_nonfinite": "optimizer steps skipped for a non-finite loss or gradient",
    "rows_updated": "responses that went through the update",
    "time/rollout": "seconds: sampling (with dynamic sampling: its further rounds, their scoring included)",
    "time/scoring": "seconds: rewards and advantages",
    "time/logprobs": "seconds: reference (and pi_old) log-prob passes",
    "time/update": "seconds: policy forward, backward and optimizer steps",
}
"""What `grpo_step` reports, in this order (metrics.jsonl has one line of these per step)."""


def grpo_step(policy: Policy, reference, optimizer, samples, reward_fn, cfg: GRPOConfig,
              generator: torch.Generator | None = None, more=None) -> tuple[dict[str, float], list[str]]:
    """One GRPO step on the prompts `samples`: rollout -> score -> advantages -> reference log-probs -> update.

    `reward_fn(sample, response_text)` returns an object with .total, .format, .correctness, .detail.
    With `cfg.dynamic_sampling`, `more(n)` returns up to n further prompts (the curriculum's next ones; fewer
    or none when they run out), and the step trains on B groups with reward spread (`dynamic_sampling`).
    Returns `(metrics, responses)`: the floats named in `METRICS`, and every response the step sampled, in
    order: row n answers the (n // G)-th prompt, counting `samples` and then what `more` returned (without
    dynamic sampling: the B*G responses, row n answers samples[n // G]).
    """
    if cfg.max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={cfg.max_new_tokens}: give the response token budget (train.py resolves "
                         "its 0, the model's default, before the step)")
    if reference is None and cfg.kl_coef != 0:
        raise ValueError(f"kl_coef={cfg.kl_coef} needs a reference model (model.reference_model(policy)); "
                         "pass one, or set kl_coef=0")
    clock = _Clock(policy.device)
    G = cfg.group_size
    rollout = sample_groups(policy, samples, G, cfg.max_new_tokens, cfg.temperature, cfg.top_p, generator,
                            cfg.decode_chunk, compile=cfg.compile_decode)
    clock.lap("time/rollout")
    rewards = score(samples, rollout.texts, reward_fn, G)
    clock.lap("time/scoring")
    texts, sampling = rollout.texts, {"sampling/drawn": 0.0, "sampling/dropped": 0.0}
    if cfg.dynamic_sampling:  # [variant] DAPO: groups of equal rewards traded for groups of further prompts
        rescore = lambda new, new_texts: score(new, new_texts, reward_fn, G)  # noqa: E731
        rollout, rewards, texts, sampling = dynamic_sampling(policy, samples, rollout, rewards, more, rescore, cfg,
                                                             generator)
        clock.lap("time/rollout")
    adv = advantages(rewards["total"], G, cfg.advantage, cfg.std_scale).to(policy.device)
    clock.lap("time/scoring")
    batches = micro_batches(rollout, adv, cfg)
    ref_logp, old_logp = reference_logprobs(reference, policy.model, batches, cfg)
    clock.lap("time/logprobs")
    update = policy_update(policy.model, optimizer, batches, adv, ref_logp, old_logp,
                           loss_denominator(rollout, cfg), cfg)
    clock.lap("time/update")
    return step_metrics(rewards, rollout, update, clock.times, G, sampling), texts


# ============================================================================ the phases

def score(samples, texts: list[str], reward_fn, group_size: int) -> dict[str, Tensor]:
    """Reward parts of every response ([B*G] each: total, format, correctness, detail); row n answers
    samples[n // G]."""
    scores = [reward_fn(samples[i // group_size], text) for i, text in enumerate(texts)]
    return {k: torch.tensor([float(getattr(r, k)) for r in scores]) for k in ("total", "format", "correctness", "detail")}


def loss_denominator(rollout: Rollout, cfg: GRPOConfig) -> float:
    """The whole batch's normaliser (docs/rewardmap.md §4.2): its response-token count ("token"), response
    count ("sequence"), or response count x the token budget cfg.max_new_tokens ("constant", Dr. GRPO: the
    same for every step of a stage, whatever the responses' lengths). Every micro-batch divides by it, so the
    summed gradients are exactly those of one pass over the whole batch. [multi-GPU] Summed over the ranks:
    the whole step's batch."""
    responses = float(rollout.response_ids.shape[0])
    count = {"token": float(rollout.response_mask.sum()), "sequence": responses,
             "constant": responses * cfg.max_new_tokens}[cfg.aggregation]
    return max(all_sum(count)[0], 1.0)


@dataclass
class MicroBatch:
    """Rows of the rollout that go through one forward/backward together, cut to their longest response."""

    rows: Tensor  # [n] row indices into the rollout
    inputs: tuple  # (prompts, prompt_index, response_ids, response_mask) for model.shared_prompt_logprobs

    @property
    def mask(self) -> Tensor:
        return self.inputs[3]


def micro_batches(rollout: Rollout, advantages: Tensor, cfg: GRPOConfig) -> list[MicroBatch]:
    """Split the rollout's rows into micro-batches of `cfg.micro_batch_size` for gradient accumulation.

    [speed] Whole groups, longest groups first: a group's rows share one prompt, which
    `shared_prompt_logprobs` then computes once (a micro_batch_size that is a multiple of G keeps every
    group in one micro-batch); sorting groups by their longest response cuts padding.
    [speed] Without a KL term or an entropy bonus, rows with zero advantage have exactly zero gradient and are left
    out (the loss normaliser still counts them, so the update is unchanged). [multi-GPU] Not with several ranks:
    under FSDP each rank must run as many forwards as the others.
    """
    G, lengths = cfg.group_size, rollout.response_mask.sum(1).cpu()
    longest_first = torch.argsort(lengths.view(-1, G).max(1).values, descending=True, stable=True)
    order = (longest_first[:, None] * G + torch.arange(G)).flatten()
    if cfg.kl_coef == 0 and cfg.entropy_coef == 0 and world() == 1:
        order = order[advantages.cpu()[order] != 0]
    out = []
    for start in range(0, len(order), cfg.micro_batch_size):
        rows = order[start : start + cfg.micro_batch_size]
        T = max(int(lengths[rows].max()), 1)
        out.append(MicroBatch(rows, (rollout.prompts, rollout.prompt_index[rows], rollout.response_ids[rows, :T],
                                     rollout.response_mask[rows, :T])))
    return out


@torch.no_grad()
def reference_logprobs(reference, model, batches: list[MicroBatch], cfg: GRPOConfig
                       ) -> tuple[list[Tensor | None], list[Tensor | None]]:
    """Per micro-batch: log pi_ref of the sampled tokens (None when kl_coef is 0: no reference pass at
    all), and log pi_old when ppo_epochs > 1 (None otherwise: with one epoch pi_old is the current
    policy itself, see `policy_update`). pi_old comes from the same forward as the update's, so the
    ratio is exactly 1 before the first optimizer step even in bf16 (the decode's log-probs differ).
    With LoRA the reference is the policy's own model with its adapters disabled (lora.py): the base."""
    with adapters_disabled(model) if reference is model else contextlib.nullcontext():
        ref = [shared_prompt_logprobs(reference, *mb.inputs) if cfg.kl_coef != 0 else None for mb in batches]
    old = [shared_prompt_logprobs(model, *mb.inputs) if cfg.ppo_epochs > 1 else None for mb in batches]
    return ref, old


def policy_update(model, optimizer, batches: list[MicroBatch], advantages: Tensor, ref_logp: list, old_logp: list,
                  denom: float, cfg: GRPOConfig) -> dict[str, float]:
    """`cfg.ppo_epochs` optimizer steps on the clipped surrogate + KL loss (docs/rewardmap.md §4.2),
    accumulating gradients over the micro-batches, clipping the global gradient norm before each step.

    Returns the update's metrics (`METRICS`: loss, loss/policy, kl, clip_frac, approx_kl, grad_norm,
    skipped_nonfinite, rows_updated). [safety] A non-finite loss or gradient skips that optimizer step:
    gradients dropped, weights and optimizer state untouched, counted in `skipped_nonfinite`."""
    sums, n_seen, grad_norms, skipped = {}, 0.0, [], 0
    params = [p for group in optimizer.param_groups for p in group["params"]]  # (FSDP: the shards, not gathered copies)
    model.train()
    for epoch in range(cfg.ppo_epochs):
        optimizer.zero_grad(set_to_none=True)
        finite = True
        for mb, ref, old in zip(batches, ref_logp, old_logp):
            # [speed] each prompt computed once, gradients summed; the entropy only for an entropy bonus
            logp, entropy = (shared_prompt_logprobs(model, *mb.inputs, with_entropy=True) if cfg.entropy_coef
                             else (shared_prompt_logprobs(model, *mb.inputs), None))
            # one epoch: pi_old is the current policy, so rho == 1 exactly and the gradient is REINFORCE's
            # -A * grad log p (TRL does the same with num_iterations == 1)
            old = old if cfg.ppo_epochs > 1 else logp.detach()
            loss, m = policy_loss(logp, old, ref, advantages[mb.rows], mb.mask, cfg.clip_eps, cfg.kl_coef,
                                  cfg.aggregation, denom, entropy, cfg.entropy_coef, cfg.kl_clamp or None)
            loss.backward()
            w = float(mb.mask.sum())
            m["loss"] = float(loss.detach())
            finite &= math.isfinite(m["loss"])
            for k, v in m.items():
                sums[k] = sums.get(k, 0.0) + (v if k == "loss" else v * w)
            n_seen += w
        if not batches:  # [speed] every row skipped: step on zero gradients, as without the row skipping
            for p in params:
                p.grad = torch.zeros_like(p)
        norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm) if params else torch.tensor(0.0)
        grad_norms.append(float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm))  # sharded: a DTensor
        if everyone(finite) and math.isfinite(grad_norms[-1]):  # [multi-GPU] all ranks step, or none
            optimizer.step()
        else:  # [safety] never train on NaN/inf
            skipped += 1
        optimizer.zero_grad(set_to_none=True)
    keys = ("loss/policy", "kl", "clip_frac", "approx_kl", "loss")
    *totals, n_seen, rows = all_sum(*(sums.get(k, 0.0) for k in keys), n_seen, sum(len(mb.rows) for mb in batches))
    sums = dict(zip(keys, totals))  # [multi-GPU] over the whole batch (each rank's loss is its share of the total)
    out = {k: sums[k] / n_seen if n_seen else 0.0 for k in keys[:4]}
    out["loss"] = sums["loss"] / max(cfg.ppo_epochs, 1)
    out["grad_norm"] = sum(grad_norms) / len(grad_norms) if grad_norms else 0.0
    out["skipped_nonfinite"] = float(skipped)
    out["rows_updated"] = rows
    return out


def step_metrics(rewards: dict[str, Tensor], rollout: Rollout, update: dict[str, float], times: dict[str, float],
                 group_size: int, sampling: dict[str, float] | None = None) -> dict[str, float]:
    """Everything in `METRICS`, in its order, from the step's rewards, rollout, update and timings (the timings
    are this rank's; everything else is over the whole batch, gathered from every rank in rank order).
    `sampling`: dynamic sampling's counts (sampling/drawn, sampling/dropped and tokens/completion over every
    round); the rewards and the rollout are the trained batch's."""
    mine = {**rewards, "lengths": rollout.response_mask.sum(1), "finished": rollout.finished}
    parts = gather({k: v.detach().cpu() for k, v in mine.items()})  # one exchange for all of them
    whole = {k: torch.cat([part[k] for part in parts]) for k in mine}
    lengths, finished = whole.pop("lengths"), whole.pop("finished")
    rewards = whole
    entropy_sum = all_sum(float((rollout.entropy * rollout.response_mask).sum()))[0]
    total, n_rows = rewards["total"], len(lengths)
    m = {f"reward/{k}": float(v.mean()) for k, v in rewards.items()}
    m["reward/accuracy"] = float((rewards["correctness"] > 0).float().mean())
    m["reward/std"] = float(total.std()) if n_rows > 1 else 0.0
    m["groups/zero_std_frac"] = float((total.view(-1, group_size).std(1, unbiased=False) == 0).float().mean())
    m["entropy"] = entropy_sum / float(lengths.sum().clamp(min=1))
    m.update(response_len=float(lengths.mean()), **{"tokens/completion": float(lengths.sum())},
             response_truncated_frac=float((~finished).float().mean()))
    m.update({"sampling/drawn": 0.0, "sampling/dropped": 0.0, **(sampling or {})})
    m.update(update)
    m.update(times)
    return {k: m[k] for k in METRICS}


class _Clock:
    """[plumbing] Seconds per phase; waits for the GPU before each reading so a phase is charged its own work."""

    def __init__(self, device: torch.device):
        self.device, self.times, self.last = device, {}, time.perf_counter()

    def lap(self, name: str) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.times[name], self.last = self.times.get(name, 0.0) + now - self.last, now  # a phase may come back
