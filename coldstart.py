"""A supervised cold start before GRPO (`train.py --cold-start N`; not in the paper, off by default).

The paper starts GRPO from Qwen2.5-VL-7B-Instruct, which already answers a yes/no question with yes or no and a
counting question with a number. The tiny model starts from random weights and, trained by GRPO alone, ends each
stage giving one answer to every question, whatever its type (docs/rewardmap.md §5). A cold start (as DeepSeek-R1
does before RL) gives it what an instruct model has: `steps` AdamW steps of next-token training (lr `lr`) on the
answers of the judgement and counting training questions, in the form a response gives them (`\\boxed{yes}`; no
planning: its route blocks are left to the detail reward). Run before the reference policy is copied, so the
reference is the cold-started model, as it would be the instruct model.

Batches are drawn from a generator seeded with `seed` alone, so the cold start is the same on every run of a
config: `--resume` redoes it to rebuild the same reference, then loads the checkpoint's weights into the policy.
"""
from __future__ import annotations

import random

import torch
from tqdm import tqdm

from model import Policy, response_logprobs
from prompts import encode_prompts, join_prompt_response


def answer_target(sample) -> str:
    """The response a judgement / counting question should get: its answer, boxed."""
    return f"\\boxed{{{sample.answer}}}"


def cold_start(policy: Policy, samples, steps: int, lr: float, batch_size: int = 16, seed: int = 0,
               progress: bool = False) -> list[float]:
    """`steps` steps of next-token training of `policy` on `answer_target` (+ end-of-turn) of the non-planning
    `samples`; returns each step's mean negative log-likelihood per answer token (`progress`: a progress bar)."""
    pool = [s for s in samples if s.qtype != "planning"]
    if steps and not pool:
        raise ValueError("--cold-start: the training data has no judgement or counting questions to learn answers from")
    rng = random.Random(f"{seed}:cold-start")
    optimizer = torch.optim.AdamW([p for p in policy.model.parameters() if p.requires_grad], lr=lr)
    was_training = policy.model.training
    policy.model.train()
    losses = []
    bar = tqdm(total=steps, desc="cold start", dynamic_ncols=True, disable=not progress)
    for _ in range(steps):
        batch = rng.sample(pool, min(batch_size, len(pool)))
        targets = [policy.tokenizer.encode(answer_target(s), add_special_tokens=False) + [policy.eos_id] for s in batch]
        width = max(map(len, targets))
        ids = torch.tensor([t + [policy.pad_id] * (width - len(t)) for t in targets], device=policy.device)
        mask = torch.tensor([[1.0] * len(t) + [0.0] * (width - len(t)) for t in targets], device=policy.device)
        rows = torch.arange(len(batch), device=policy.device)
        logp = response_logprobs(policy.model, join_prompt_response(encode_prompts(policy, batch), rows, ids, mask))
        loss = -(logp * mask).sum() / mask.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        bar.update()
        bar.set_postfix(nll=f"{losses[-1]:.3f}", refresh=False)
    bar.close()
    policy.model.train(was_training)
    return losses
