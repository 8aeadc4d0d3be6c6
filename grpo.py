"""GRPO, from scratch: group sampling, group-relative advantages, clipped loss + k3 KL, one step.

docs/rewardmap.md §4 / DeepSeekMath (arXiv 2402.03300) eq. 3, per response token t of response i in a
group of G:

    rho_it = pi_theta(o_it | q, o_i<t) / pi_old(o_it | q, o_i<t)
    A_i    = (r_i - mean(r_group)) / (std(r_group) + eps)                          (group_advantages)
    L_it   = -min(rho_it * A_i, clip(rho_it, 1 - eps_clip, 1 + eps_clip) * A_i) + beta * KL_it
    KL_it  = exp(ref - logp) - (ref - logp) - 1   (k3, unbiased and >= 0)          (kl_k3)

averaged over response tokens (`aggregation="token"`) or within each response then over responses
(`"sequence"`, DeepSeekMath's 1/G sum_i 1/|o_i| sum_t), or summed and divided by a constant
(`"constant"`, Dr. GRPO's max_new_tokens x responses). advantages.py holds `group_advantages` and the other
estimators (Dr. GRPO, RLOO, REINFORCE++ and its baseline variant; `advantages` picks one).
Read in this order: the pure functions of the math; `sample_groups`, the rollout; `grpo_step`, one step
as five named phases (rollout -> score -> advantages -> reference log-probs -> update), with DAPO's
dynamic sampling (`dynamic_sampling`) as an optional second half of the score phase.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass

import torch
from torch import Tensor

from advantages import (ESTIMATORS, advantages, dr_grpo_advantages, group_advantages,  # noqa: F401
                        reinforce_pp_advantages, reinforce_pp_baseline_advantages, rloo_advantages)
from lora import adapters_disabled
from distributed import all_min, all_sum, everyone, gather, world
from model import Policy, encode_prompts, forward_logits, join_prompt_response, kv_cache, shared_prompt_logprobs


@dataclass
class GRPOConfig:
    """The knobs of one GRPO step (docs/rewardmap.md §4, §7); train.py fills it from its flags."""

    group_size: int = 8  # G: responses sampled per prompt (paper 8, released script 4)
    temperature: float = 1.0  # sampling temperature (the paper: 1.0); 0 means greedy
    top_p: float = 1.0  # nucleus sampling mass (1.0 = off)
    max_new_tokens: int = 256  # response length cap (paper: 2048)
    clip_eps: float = 0.2  # PPO clip range epsilon for the ratio rho
    kl_coef: float = 1e-3  # beta, weight of the k3 KL to the reference (paper 1e-3, released 1e-2); 0 skips the reference pass
    ppo_epochs: int = 1  # optimizer steps per rollout batch (1 = on-policy, ratio is exactly 1)
    micro_batch_size: int = 16  # responses per forward/backward (gradient accumulation over micro-batches)
    aggregation: str = "token"  # "token": mean over all response tokens; "sequence": per response, then over responses;
    # "constant": summed, divided by max_new_tokens x responses (Dr. GRPO)
    std_scale: bool = True  # divide advantages by the group std (released code) or only centre them (paper text)
    advantage: str = "grpo"  # the estimator (ESTIMATORS): grpo | dr-grpo | rloo | reinforce++ | reinforce++-baseline
    dynamic_sampling: bool = False  # DAPO: replace groups of equal rewards by groups of further prompts (`more`)
    dynamic_sampling_max_draws: int = 0  # dynamic sampling: extra prompts per step at most (0: 3 x the step's batch)
    max_grad_norm: float = 1.0  # global gradient-norm clip before each optimizer step
    entropy_coef: float = 0.0  # weight of an entropy bonus on the policy's tokens (released code: 1e-3; 0: none)
    decode_chunk: int = 0  # prompts decoded at a time (whole groups; 0: auto_decode_chunk, all at once on CPU)
    kl_clamp: float | None = None  # clamp the per-token k3 KL at this value (released code: 10; None: no clamp)


# ----------------------------------------------------------------------------- the math

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


# ----------------------------------------------------------------------------- rollout

@dataclass
class Rollout:
    """G responses for each of B prompts; row n belongs to prompt n // G (groups are contiguous)."""

    prompts: dict  # encode_prompts(...) of the B prompts (ids, mask, rotary positions, pixels)
    group_size: int
    prompt_index: Tensor  # [N] prompt of each row
    response_ids: Tensor  # [N, T] sampled tokens; pad after the end-of-turn token
    response_mask: Tensor  # [N, T] 1.0 on response tokens (end-of-turn included), 0.0 on padding
    texts: list[str]  # decoded responses (special tokens skipped)
    logprobs: Tensor  # [N, T] log pi(token) at temperature 1 over the full vocabulary, at sampling time
    entropy: Tensor  # [N, T] entropy of pi (temperature 1) at each response position, at sampling time
    finished: Tensor  # [N] True where the response ended with end-of-turn (False: hit max_new_tokens)


def _sample_token(logits: Tensor, temperature: float, top_p: float, generator=None, u: Tensor | None = None) -> Tensor:
    """Sample one token per row from softmax(logits / temperature), restricted to the top-p nucleus.

    Inverse-CDF sampling: one uniform number per row (`u` [N] in [0, 1), else drawn from `generator`) against
    the cumulative unnormalised probabilities. Same distribution as torch.multinomial, ~4x cheaper per decode
    step on CPU (multinomial's setup dominated a tiny model's step). Masked (-inf) logits get probability 0
    and are never chosen: a float32 cumulative sum over a 152k vocabulary is not exactly monotone on every
    device, and `u * total` can round up to the total, so a token of probability 0 that the search lands
    on is replaced by the row's most likely token (a sampled <|image_pad|> would break the next forward)."""
    if temperature <= 0:
        return logits.argmax(-1)
    scaled = logits / temperature
    p = torch.exp(scaled - scaled.max(-1, keepdim=True).values)
    if top_p < 1.0:
        sorted_p, idx = p.sort(dim=-1, descending=True)
        outside = sorted_p.cumsum(-1) - sorted_p > top_p * sorted_p.sum(-1, keepdim=True)  # mass before exceeds top_p
        p = torch.zeros_like(p).scatter_(-1, idx, sorted_p.masked_fill(outside, 0.0))
    cdf = p.cumsum(-1)
    if u is None:
        u = torch.rand(p.shape[0], generator=generator, device=p.device)
    picked = torch.searchsorted(cdf, u[:, None] * cdf[:, -1:], right=True).squeeze(-1).clamp_(max=p.shape[-1] - 1)
    return torch.where(p.gather(-1, picked[:, None]).squeeze(-1) > 0, picked, p.argmax(-1))  # [safety]


def _expanded_static_cache(model, prefill_cache, group_size: int, max_len: int):
    """[speed] The prompts' KV cache repeated G-fold into a preallocated StaticCache of `max_len` positions.

    A DynamicCache grows by torch.cat every decode step, copying the whole cache each time (~40% of a
    tiny model's decode time on CPU); the static one writes each new key/value in place.
    """
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=max_len)
    for i, layer in enumerate(prefill_cache.layers):  # first update allocates [N, heads, max_len, dim] and copies
        cache.layers[i].update(layer.keys.repeat_interleave(group_size, 0), layer.values.repeat_interleave(group_size, 0))
    return cache


@torch.no_grad()
def sample_groups(policy: Policy, samples, group_size: int, max_new_tokens: int, temperature: float = 1.0,
                  top_p: float = 1.0, generator: torch.Generator | None = None, decode_chunk: int = 0) -> Rollout:
    """`group_size` responses for each sample: one batched, KV-cached decode per chunk of prompts.

    1. Prefill the chunk's left-padded prompts once (vision encoder once per image), keeping the last logits.
    2. Expand the KV cache, logits, mask and positions G-fold (repeat_interleave on the batch dim), so
       rows n*G .. n*G+G-1 continue prompt n.
    3. Decode all the chunk's rows together. Token t of a row sits at rotary position `next_pos + t`: for
       Qwen2.5-VL that is max(prompt mrope position) + 1 + t on all three (t, h, w) axes, which is what
       transformers' generate computes from `rope_deltas`; for text models it is prompt length + t.
       Positions are passed explicitly, so no hidden `rope_deltas` state in the model is relied on.
    Special tokens other than end-of-turn are never sampled (a sampled <|image_pad|> breaks the next
    forward). Finished rows emit pad and are masked; a chunk stops when every row is done.
    [speed / memory] `decode_chunk` prompts (whole groups) are decoded at a time (0: `auto_decode_chunk`), so the
    expanded KV cache of a paper-scale batch need not fit at once; every uniform number the sampling uses is
    drawn up front (one per row and step, from `generator`, which must live on the policy's device), so
    the responses do not depend on the chunking. `temperature=0`: greedy decoding (eval.py, group_size=1).
    """
    model, G, B = policy.model, group_size, len(samples)
    was_training = model.training
    model.eval()  # also lets gradient-checkpointed models use the KV cache
    try:
        prompts = encode_prompts(policy, samples)
        uniforms = (torch.rand(max_new_tokens, B * G, generator=generator, device=policy.device)
                    if temperature > 0 else None)
        chunk = decode_chunk or auto_decode_chunk(policy, prompts["input_ids"].shape[1] + max_new_tokens, G, B)
        parts = [_decode(policy, prompts, torch.arange(start, min(start + chunk, B), device=policy.device), G,
                         max_new_tokens, temperature, top_p,
                         uniforms[:, start * G : (start + chunk) * G] if uniforms is not None else None)
                 for start in range(0, B, chunk)]
    finally:
        model.train(was_training)
    cat = lambda key, fill: _pad_cat([p[key] for p in parts], fill)  # noqa: E731
    tokens, mask = cat("tokens", policy.pad_id), cat("mask", 0.0)
    lengths = mask.sum(1).long().tolist()
    texts = policy.tokenizer.batch_decode([row[:n] for row, n in zip(tokens.tolist(), lengths)], skip_special_tokens=True)
    return Rollout(prompts=prompts, group_size=G, prompt_index=torch.arange(B, device=policy.device).repeat_interleave(G),
                   response_ids=tokens, response_mask=mask, texts=texts, logprobs=cat("logprobs", 0.0),
                   entropy=cat("entropy", 0.0), finished=torch.cat([p["done"] for p in parts]))


def auto_decode_chunk(policy: Policy, seq_len: int, group_size: int, prompts: int, budget: float = 0.5) -> int:
    """Prompts per decode chunk: all of them on CPU; on CUDA as many as keep the expanded KV cache (2 x layers
    x KV heads x head dim x `seq_len` positions x G rows per prompt, in the model's dtype) within `budget`
    of the free GPU memory (at least one prompt)."""
    if policy.device.type != "cuda":
        return prompts
    text = policy.model.config.get_text_config()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    per_prompt = (2 * text.num_hidden_layers * text.num_key_value_heads * head_dim * seq_len * group_size
                  * torch.finfo(getattr(policy.model, "autocast_dtype", None) or policy.model.dtype).bits // 8)
    free, _ = torch.cuda.mem_get_info(policy.device)
    return int(all_min(max(1, min(prompts, int(budget * free // per_prompt)))))  # [multi-GPU] same chunks on every rank


def _decode(policy: Policy, prompts: dict, rows: Tensor, G: int, max_new_tokens: int, temperature: float,
            top_p: float, uniforms: Tensor | None) -> dict[str, Tensor]:
    """Decode G responses for each of the prompts `rows` (indices into `prompts`): tokens, per-token
    log-probs, entropies and mask [n, T], and `done` [n] (ended with end-of-turn)."""
    model = policy.model
    empty = prompts["input_ids"][rows, :0]
    batch = join_prompt_response(prompts, rows, empty, empty.float())  # the chunk's prompts (and their images)
    out = forward_logits(model, batch, use_cache=True, logits_to_keep=1)
    # [speed] the prompts are prefilled once and their cache expanded G-fold into a preallocated static cache
    cache = _expanded_static_cache(model, kv_cache(out), G, batch["input_ids"].shape[1] + max_new_tokens)
    logits = out.logits[:, -1].repeat_interleave(G, 0)
    del out  # [memory] the prefill's output is not needed during the decode
    N = len(rows) * G
    prompt_mask = batch["attention_mask"].repeat_interleave(G, 0)
    attn = torch.cat([prompt_mask, prompt_mask.new_ones(N, max_new_tokens)], 1)
    next_pos = prompts["next_pos"][rows].repeat_interleave(G)
    tokens = torch.full((N, max_new_tokens), policy.pad_id, dtype=torch.long, device=policy.device)
    logps = torch.zeros(N, max_new_tokens, device=policy.device)
    entropy = torch.zeros(N, max_new_tokens, device=policy.device)
    mask = torch.zeros(N, max_new_tokens, device=policy.device)
    done = torch.zeros(N, dtype=torch.bool, device=policy.device)
    check_every = 16 if policy.device.type == "cuda" else 1
    for t in range(max_new_tokens):
        if t > 0:
            pos = (next_pos + t - 1)[:, None]
            pos = pos[None].expand(3, N, 1) if policy.is_vlm else pos
            step = dict(input_ids=tokens[:, t - 1 : t], attention_mask=attn[:, : prompt_mask.shape[1] + t],
                        position_ids=pos)
            logits = forward_logits(model, step, cache=cache, logits_to_keep=1).logits[:, -1]
        logits = logits.float()
        lse = logits.logsumexp(-1)  # the policy's own distribution (temperature 1, nothing suppressed)
        entropy[:, t] = lse - (torch.exp(logits - lse[:, None]) * logits).sum(-1)
        logits[:, policy.suppress_ids] = float("-inf")
        u = uniforms[t] if uniforms is not None else None
        nxt = _sample_token(logits, temperature, top_p, u=u).masked_fill(done, policy.pad_id)
        tokens[:, t] = nxt
        mask[:, t] = (~done).float()
        logps[:, t] = torch.where(done, 0.0, logits.gather(-1, nxt[:, None]).squeeze(-1) - lse)
        done |= nxt == policy.eos_id
        # [speed] "all done?" is a host sync: every token on CPU (free), every 16 on CUDA (no stall per token);
        # [multi-GPU] under FSDP every rank runs each forward, so a rank stops only when every rank is done
        if (t + 1) % check_every == 0 and everyone(bool(done.all())):
            break
    steps = max(int(mask.sum(1).max()), 1) if max_new_tokens else 0  # [speed] trim steps after the last end
    return dict(tokens=tokens[:, :steps], logprobs=logps[:, :steps], mask=mask[:, :steps],
                entropy=entropy[:, :steps], done=done)


# ----------------------------------------------------------------------------- one GRPO step
# ALGORITHM: grpo_step reads as the five phases of docs/rewardmap.md §4.3. Each phase is one named call;
# what is there only for speed (or safety) is marked [speed] / [safety] and can be skipped on a first read.

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
    if reference is None and cfg.kl_coef != 0:
        raise ValueError(f"kl_coef={cfg.kl_coef} needs a reference model (model.reference_model(policy)); "
                         "pass one, or set kl_coef=0")
    clock = _Clock(policy.device)
    G = cfg.group_size
    rollout = sample_groups(policy, samples, G, cfg.max_new_tokens, cfg.temperature, cfg.top_p, generator,
                            cfg.decode_chunk)
    clock.lap("time/rollout")
    rewards = score(samples, rollout.texts, reward_fn, G)
    clock.lap("time/scoring")
    texts, sampling = rollout.texts, {"sampling/drawn": 0.0, "sampling/dropped": 0.0}
    if cfg.dynamic_sampling:  # DAPO: groups of equal rewards traded for groups of further prompts
        rollout, rewards, texts, sampling = dynamic_sampling(policy, samples, rollout, rewards, more, reward_fn, cfg,
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


def score(samples, texts: list[str], reward_fn, group_size: int) -> dict[str, Tensor]:
    """Reward parts of every response ([B*G] each: total, format, correctness, detail); row n answers
    samples[n // G]."""
    scores = [reward_fn(samples[i // group_size], text) for i, text in enumerate(texts)]
    return {k: torch.tensor([float(getattr(r, k)) for r in scores]) for k in ("total", "format", "correctness", "detail")}


def has_signal(total: Tensor, group_size: int) -> Tensor:
    """[groups] True where a group's total rewards are not all equal: under a group baseline the others have
    zero advantage and add no policy gradient. On the TOTAL reward, not correctness (DAPO filters on
    accuracy): with the detail reward an all-wrong planning group can still rank its answers."""
    r = total.view(-1, group_size)
    return (r != r[:, :1]).any(1)


def max_draws(setting: int, batch: int) -> int:
    """Dynamic sampling's cap: prompts drawn per step beyond a batch of `batch` (`setting`, the config's
    dynamic_sampling_max_draws; 0: 3 x batch, DAPO's rule of thumb of ~3x over-sampling)."""
    return setting or 3 * batch


def dynamic_sampling(policy: Policy, samples, rollout: "Rollout", rewards: dict[str, Tensor], more, reward_fn,
                     cfg: GRPOConfig, generator=None) -> tuple["Rollout", dict[str, Tensor], list[str], dict]:
    """DAPO's dynamic sampling (Yu et al. 2025, "DAPO: An Open-Source LLM Reinforcement Learning System at
    Scale", arXiv 2503.14476, §3.2 and eq. 11: train only on groups with 0 < #correct < G, over-sampling
    until the batch is full). Here: B = len(samples) groups are wanted with total-reward spread (`has_signal`).

    While fewer than B groups have signal, draw further prompts with `more(n)` (the curriculum's next ones),
    sample and score their groups. Each round draws n = ceil(missing x drawn / with-signal) prompts (the
    missing count at the signal rate seen so far in this step; missing x drawn when none had signal), so a
    sparse step needs few rounds, each one batched decode; at most `max_draws` prompts per step in all, and
    none once `more` runs dry. The trained batch is the first B groups with signal in draw order; when the cap
    or the data ends the search, the earliest zero-signal groups fill it up to B (DAPO keeps the batch size;
    they add only their KL term and count in the loss normaliser). Groups with signal beyond the B-th
    (the last round's surplus) are dropped. The rollout is returned unchanged when no prompt was drawn.

    Returns (trained rollout, its rewards, every sampled response in draw order, metrics: sampling/drawn =
    prompts drawn beyond `samples`, sampling/dropped = groups not trained on, tokens/completion = every
    round's tokens). [multi-GPU] One process only: ranks would draw different numbers of prompts, and FSDP
    needs every rank to run the same forwards."""
    if more is None:
        raise ValueError("dynamic sampling needs `more`, a source of further prompts")
    if world() > 1:
        raise ValueError("--dynamic-sampling is not supported with several processes yet")
    G, target = cfg.group_size, len(samples)
    cap = max_draws(cfg.dynamic_sampling_max_draws, target)
    drawn, rounds, scores = list(samples), [rollout], [rewards]
    signal = has_signal(rewards["total"], G)
    while int(signal.sum()) < target and len(drawn) - target < cap:
        missing, found = target - int(signal.sum()), int(signal.sum())
        new = list(more(min(math.ceil(missing * len(drawn) / max(found, 1)), cap - (len(drawn) - target))))
        if not new:
            break  # the stage's prompts are used up
        extra = sample_groups(policy, new, G, cfg.max_new_tokens, cfg.temperature, cfg.top_p, generator, cfg.decode_chunk)
        scores.append(score(new, extra.texts, reward_fn, G))
        rounds.append(extra)
        drawn += new
        signal = torch.cat([signal, has_signal(scores[-1]["total"], G)])
    texts = [t for r in rounds for t in r.texts]
    tokens = float(sum(r.response_mask.sum() for r in rounds))
    order = torch.arange(len(drawn))
    keep = torch.cat([order[signal][:target], order[~signal]])[:target].sort().values  # signal first, then fill
    counts = {"sampling/drawn": float(len(drawn) - target), "sampling/dropped": float(len(drawn) - len(keep)),
              "tokens/completion": tokens}
    if len(rounds) == 1:
        return rollout, rewards, texts, counts
    rows = (keep[:, None] * G + torch.arange(G)).flatten()
    dev = rows.to(policy.device)
    cat = lambda key, fill: _pad_cat([getattr(r, key) for r in rounds], fill)[dev]  # noqa: E731
    kept = [drawn[i] for i in keep.tolist()]
    trained = Rollout(prompts=encode_prompts(policy, kept), group_size=G,
                      prompt_index=torch.arange(len(kept), device=policy.device).repeat_interleave(G),
                      response_ids=cat("response_ids", policy.pad_id), response_mask=cat("response_mask", 0.0),
                      texts=[texts[i] for i in rows.tolist()], logprobs=cat("logprobs", 0.0),
                      entropy=cat("entropy", 0.0), finished=torch.cat([r.finished for r in rounds])[dev])
    return trained, {k: torch.cat([s[k] for s in scores])[rows] for k in rewards}, texts, counts


def _pad_cat(tensors: list[Tensor], fill) -> Tensor:
    """[N_k, T_k] tensors right-padded with `fill` to the longest T and stacked along the rows."""
    T = max(t.shape[1] for t in tensors)
    return torch.cat([torch.nn.functional.pad(t, (0, T - t.shape[1]), value=fill) for t in tensors])


def loss_denominator(rollout: "Rollout", cfg: GRPOConfig) -> float:
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


def micro_batches(rollout: "Rollout", advantages: Tensor, cfg: GRPOConfig) -> list[MicroBatch]:
    """Split the rollout's rows into micro-batches of `cfg.micro_batch_size` for gradient accumulation.

    [speed] Whole groups, longest groups first: a group's rows share one prompt, which
    `shared_prompt_logprobs` then computes once (a micro_batch_size that is a multiple of G keeps every
    group in one micro-batch); sorting groups by their longest response cuts padding.
    [speed] Without a KL term, rows with zero advantage have exactly zero gradient and are left out
    (the loss normaliser still counts them, so the update is unchanged). [multi-GPU] Not with several ranks:
    under FSDP each rank must run as many forwards as the others.
    """
    G, lengths = cfg.group_size, rollout.response_mask.sum(1).cpu()
    longest_first = torch.argsort(lengths.view(-1, G).max(1).values, descending=True, stable=True)
    order = (longest_first[:, None] * G + torch.arange(G)).flatten()
    if cfg.kl_coef == 0 and world() == 1:
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
                                  cfg.aggregation, denom, entropy, cfg.entropy_coef, cfg.kl_clamp)
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


def step_metrics(rewards: dict[str, Tensor], rollout: "Rollout", update: dict[str, float], times: dict[str, float],
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
