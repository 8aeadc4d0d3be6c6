"""DAPO's dynamic sampling (`--dynamic-sampling`, docs/rewardmap.md §4.4): a step trains only on groups whose
rewards differ, drawing further prompts of the stage until it has a batch of them. Not in the paper; an
alternative to its detail reward against the same problem (groups of equal rewards give no gradient)."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from model import Policy, encode_prompts
from speed.decode import Rollout, sample_groups, select


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


def dynamic_sampling(policy: Policy, samples, rollout: Rollout, rewards: dict[str, Tensor], more, score,
                     cfg, generator=None) -> tuple[Rollout, dict[str, Tensor], list[str], dict]:
    """DAPO's dynamic sampling (Yu et al. 2025, "DAPO: An Open-Source LLM Reinforcement Learning System at
    Scale", arXiv 2503.14476, §3.2 and eq. 11: train only on groups with 0 < #correct < G, over-sampling
    until the batch is full). Here: B = len(samples) groups are wanted with total-reward spread (`has_signal`).

    While fewer than B groups have signal, draw further prompts with `more(n)` (the curriculum's next ones),
    sample their groups and `score(prompts, texts)` them. Each round draws n = ceil(missing x drawn / with-signal) prompts (the
    missing count at the signal rate seen so far in this step; missing x drawn when none had signal), so a
    sparse step needs few rounds, each one batched decode; at most `max_draws` prompts per step in all, and
    none once `more` runs dry. The trained batch is the first B groups with signal in draw order; when the cap
    or the data ends the search, the earliest zero-signal groups fill it up to B (DAPO keeps the batch size;
    they add only their KL term and count in the loss normaliser). Groups with signal beyond the B-th
    (the last round's surplus) are dropped. The rollout is returned unchanged when no prompt was drawn.

    Returns (trained rollout, its rewards, every sampled response in draw order, metrics: sampling/drawn =
    prompts drawn beyond `samples`, sampling/dropped = groups not trained on, tokens/completion = every
    round's tokens). `cfg`: the step's GRPOConfig. One process only (train.py checks it): ranks would draw
    different numbers of prompts, and FSDP needs every rank to run the same forwards."""
    if more is None:
        raise ValueError("dynamic sampling needs `more`, a source of further prompts")
    G, target = cfg.group_size, len(samples)
    cap = max_draws(cfg.dynamic_sampling_max_draws, target)
    drawn, rounds, scores = list(samples), [rollout], [rewards]
    signal = has_signal(rewards["total"], G)
    while int(signal.sum()) < target and len(drawn) - target < cap:
        missing, found = target - int(signal.sum()), int(signal.sum())
        new = list(more(min(math.ceil(missing * len(drawn) / max(found, 1)), cap - (len(drawn) - target))))
        if not new:
            break  # the stage's prompts are used up
        extra = sample_groups(policy, new, G, cfg.max_new_tokens, cfg.temperature, cfg.top_p, generator, cfg.decode_chunk,
                              compile=cfg.compile_decode)
        scores.append(score(new, extra.texts))
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
    kept = encode_prompts(policy, [drawn[i] for i in keep.tolist()])
    trained = select(rounds, rows, kept, policy.pad_id)
    return trained, {k: torch.cat([s[k] for s in scores])[rows] for k in rewards}, texts, counts
