"""The advantage estimators researchers compare GRPO's with (`--advantage`, docs/rewardmap.md §4.1).

GRPO's own group-relative advantage is grpo.group_advantages; here: Dr. GRPO, RLOO, REINFORCE++ and its
baseline variant, one advantage per response from the step's total rewards; grpo.advantages picks one. Rewards
come as [B*G] in contiguous groups of G (row n answers prompt n // G). The batch-wide ones use the whole
global batch under torchrun (distributed.all_sum), so every rank gets what one process would compute.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from scaling.distributed import all_sum


def _centred(rewards: Tensor, group_size: int) -> Tensor:
    """r_i - mean_g r within each contiguous group of `group_size`."""
    r = rewards.float().view(-1, group_size)
    return (r - r.mean(dim=1, keepdim=True)).reshape(-1)


def dr_grpo_advantages(rewards: Tensor, group_size: int) -> Tensor:
    """Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training: A Critical Perspective", arXiv 2503.20783,
    §3.1): A_i = r_i - mean_g r, the group mean as baseline without GRPO's division by the group std.

    The std division weights a question by 1/std of its rewards: almost-always-right and almost-always-wrong
    questions get larger updates (the paper's "question-level difficulty bias"). The paper's other fix, the
    length bias of 1/|o_i|, is the loss's: `aggregation="constant"` (train.py's `--advantage dr-grpo` sets both)."""
    return _centred(rewards, group_size)


def rloo_advantages(rewards: Tensor, group_size: int) -> Tensor:
    """RLOO (Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization for Learning from
    Human Feedback in LLMs", arXiv 2402.14740, eq. 6): each response's baseline is the mean of the OTHER G - 1
    rewards of its group,

        A_i = r_i - 1/(G-1) sum_{j != i} r_j = G/(G-1) (r_i - mean_g r),

    so the baseline does not depend on the sample it scores (unbiased). A group of one gets zeros."""
    if group_size < 2:
        return torch.zeros_like(rewards.float())
    return _centred(rewards, group_size) * (group_size / (group_size - 1))


def _batch_whiten(x: Tensor, eps: float) -> Tensor:
    """(x - mean_batch x) / (std_batch x + eps) over the WHOLE step's batch: under torchrun the mean and the
    (unbiased) std come from `all_sum` of every rank's sum, count and squared deviations, so each rank gets
    exactly the advantages one process would compute on the whole batch (two passes in float64: no
    cancellation of a sum of squares)."""
    x64 = x.double()
    total, count = all_sum(float(x64.sum()), float(x64.numel()))
    mean = total / max(count, 1.0)
    (squares,) = all_sum(float(((x64 - mean) ** 2).sum()))
    std = math.sqrt(squares / (count - 1)) if count > 1 else 0.0
    return ((x64 - mean) / (std + eps)).float()


def reinforce_pp_advantages(rewards: Tensor, eps: float = 1e-6) -> Tensor:
    """REINFORCE++ (Hu 2025, "REINFORCE++: A Simple and Efficient Approach for Aligning Large Language
    Models", arXiv 2501.03262, eq. 10, outcome reward only): A_i = (r_i - mean_batch r) / (std_batch r + eps),
    normalised over the whole global batch, with no per-prompt baseline.

    The KL penalty stays in the loss (`kl_coef`), not folded into a per-token reward as in the paper's eq. 8,
    so each response has one advantage and the whitening is over responses (OpenRLHF whitens its per-token
    returns over tokens). std is the unbiased one, as in `group_advantages`. Note: a group of equal rewards
    still gets non-zero advantages here (the baseline is the batch's, not the group's)."""
    return _batch_whiten(rewards.float(), eps)


def reinforce_pp_baseline_advantages(rewards: Tensor, group_size: int, eps: float = 1e-6) -> Tensor:
    """REINFORCE++-baseline (Hu 2025, arXiv 2501.03262 §"REINFORCE++-Baseline"; OpenRLHF `reinforce_baseline`):
    subtract the group mean first (the prompt's baseline), then normalise over the whole global batch,

        c_i = r_i - mean_g r,     A_i = (c_i - mean_batch c) / (std_batch c + eps),

    i.e. GRPO's centring with one batch-wide scale instead of a per-group std (no difficulty bias)."""
    return _batch_whiten(_centred(rewards, group_size), eps)
