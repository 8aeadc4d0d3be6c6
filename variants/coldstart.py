"""A supervised cold start before GRPO (`train.py --cold-start N`; not in the paper; on for the tiny default).

The paper starts GRPO from Qwen2.5-VL-7B-Instruct, which already answers a yes/no question with yes or no, a
counting question with a number and a route question with a route. The tiny model starts from random weights and,
trained by GRPO alone, ends each stage giving one answer to every question, whatever its type (docs/rewardmap.md
§5). A cold start (as DeepSeek-R1 does before RL) gives it what an instruct model has: `steps` AdamW steps of
next-token training (lr `lr`) on the training questions' answers, in the form a response gives them
(`answer_target`: `\\boxed{yes}`, or the reference route for a planning question). Run before the reference policy
is copied, so the reference is the cold-started model, as it would be the instruct model.

Each batch draws a question type uniformly, then a question of that type, so a rare type gets as many updates as
a common one: counting3 has one question per map (38 of the tiny default's ~3,800 training questions; drawn in
proportion it would get 1% of the cold start).
Batches come from a generator seeded with `seed` alone, so the cold start is the same on every run of a config.
train.py keeps the cold-started weights in --out (`SAVED`): `--resume` loads them to rebuild the same reference
instead of redoing the steps, then loads the checkpoint's weights into the policy.
"""
from __future__ import annotations

import random
from pathlib import Path

import torch
from tqdm import tqdm

from model import Policy, encode_prompts, join_prompt_response
from speed.logprobs import response_logprobs


SAVED = "cold-start.pt"
"""The cold-started weights in --out: what a resumed run's reference is rebuilt from."""


def answer_target(sample) -> str:
    """The response a question should get: a judgement / counting answer boxed, a planning question's reference
    route as it stands (ReasonMap's `Route Name: ... -- ...` blocks, what the planning reward parses)."""
    return sample.answer if sample.qtype == "planning" else f"\\boxed{{{sample.answer}}}"


def cold_start(policy: Policy, samples, steps: int, lr: float, batch_size: int = 16, seed: int = 0,
               progress: bool = False) -> list[float]:
    """`steps` steps of next-token training of `policy` on `answer_target` (+ end-of-turn) of `samples`, each batch
    `batch_size` questions of uniformly drawn types; returns each step's mean negative log-likelihood per answer
    token (`progress`: a progress bar)."""
    by_type: dict[str, list] = {}
    for s in samples:
        by_type.setdefault(s.qtype, []).append(s)
    if steps and not by_type:
        raise ValueError("--cold-start: the training data has no questions to learn answers from")
    types = sorted(by_type)
    rng = random.Random(f"{seed}:cold-start")
    optimizer = torch.optim.AdamW([p for p in policy.model.parameters() if p.requires_grad], lr=lr)
    was_training = policy.model.training
    policy.model.train()
    losses = []
    bar = tqdm(total=steps, desc="cold start", dynamic_ncols=True, disable=not progress)
    for _ in range(steps):
        batch = [rng.choice(by_type[rng.choice(types)]) for _ in range(batch_size)]
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


def cold_start_once(policy: Policy, samples, steps: int, lr: float, seed: int, saved: Path, resume: bool,
                    progress: bool = True) -> None:
    """`cold_start`, then its weights saved to `saved` (atomically); a resumed run (`resume`) whose `saved` exists
    loads them instead of redoing the steps: the same weights, bit for bit (train.check_resume_config has made
    sure the resumed run's cold start settings are the saved run's)."""
    if resume and saved.is_file():
        policy.model.load_state_dict(torch.load(saved, map_location=policy.device, weights_only=True))
        print(f"cold start: the {steps} steps' weights loaded from {saved}")
        return
    nll = cold_start(policy, samples, steps, lr, seed=seed, progress=progress)
    tmp = saved.with_suffix(".tmp")
    torch.save(policy.model.state_dict(), tmp)
    tmp.replace(saved)  # a kill while saving leaves the old file or none, never half of one
    print(f"cold start: {steps} steps, answer NLL {nll[0]:.3f} -> {nll[-1]:.3f} (weights in {saved})")
