"""grpo_step with ppo_epochs > 1: pi_old is fixed across the epochs, the ratio is exactly 1 in the first epoch,
clipping becomes active in later ones, and the loss is the hand-computed clipped surrogate."""
import math

import pytest
import torch

import grpo
from scaling import precision
from conftest import fresh, text_samples


class Score:
    """A reward that differs within every group (so every advantage is nonzero): the response's length."""

    def __init__(self, text: str):
        self.total = self.correctness = float(len(text))
        self.format = self.detail = 0.0


def test_ppo_epochs_keep_pi_old_and_clip_later_epochs(tiny_lm, monkeypatch):
    policy = fresh(tiny_lm, scale=0.1)
    calls = []
    real_loss = grpo.policy_loss

    def recording_loss(logp, old, ref, adv, mask, clip_eps, kl_coef, aggregation, denom, *rest):
        loss, m = real_loss(logp, old, ref, adv, mask, clip_eps, kl_coef, aggregation, denom, *rest)
        calls.append(dict(logp=logp.detach().clone(), old=old.clone(), adv=adv.clone(), mask=mask.clone(),
                          loss=loss.item(), clip_frac=m["clip_frac"], denom=denom, eps=clip_eps))
        return loss, m

    monkeypatch.setattr(grpo, "policy_loss", recording_loss)
    cfg = grpo.GRPOConfig(group_size=4, max_new_tokens=6, kl_coef=0.0, ppo_epochs=3, micro_batch_size=64)
    optimizer = precision.make_optimizer(policy.model, lr=0.05, weight_decay=0.0)  # big steps: the ratio leaves [0.8, 1.2]
    metrics, _ = grpo.grpo_step(policy, None, optimizer, text_samples(2), lambda s, t: Score(t), cfg,
                                torch.Generator().manual_seed(0))
    assert len(calls) == 3  # one micro-batch, three epochs
    first, *later = calls
    assert torch.equal(first["logp"], first["old"])  # epoch 0: rho == 1 exactly, from the same forward
    assert first["clip_frac"] == 0.0
    assert all(torch.equal(c["old"], first["old"]) for c in later)  # pi_old fixed across epochs
    assert not torch.equal(later[-1]["logp"], first["old"])  # while the policy moved
    assert max(c["clip_frac"] for c in later) > 0  # clipping is active after the first update
    for c in calls:  # the loss is the token-mean clipped surrogate, computed here by hand
        total, mask = 0.0, c["mask"]
        for i in range(mask.shape[0]):
            for t in range(mask.shape[1]):
                if mask[i, t]:
                    rho = math.exp(c["logp"][i, t] - c["old"][i, t])
                    a = float(c["adv"][i])
                    total -= min(rho * a, min(max(rho, 1 - c["eps"]), 1 + c["eps"]) * a)
        assert c["loss"] == pytest.approx(total / c["denom"], rel=1e-4, abs=1e-6)
    assert metrics["clip_frac"] > 0 and metrics["approx_kl"] > 0
