"""The advantage estimators beside GRPO's (grpo.advantages) and Dr. GRPO's constant loss normaliser: hand-computed
values, the global-batch statistics of REINFORCE++ over several ranks, micro-batch exactness, and the flags."""
import math
import sys
import threading
from types import SimpleNamespace

import pytest
import torch
from conftest import R, fresh, text_samples

import grpo
import train
from variants import advantages as estimators

# two groups of G = 4 (the rewards of tests/test_grpo.py::test_group_advantages_hand_computed)
R4 = torch.tensor([1.0, 0, 0, 0, 3, 1, 2, 2])


def close(got, want):
    assert torch.allclose(got, torch.tensor(want, dtype=torch.float32), atol=1e-6), (got, want)


# ----------------------------------------------------------------------------- hand-computed values

def test_grpo_is_unchanged():
    s = math.sqrt(2 / 3)  # group 2: centred [1, -1, 0, 0], unbiased std sqrt(2 / 3); group 1: std .5
    close(grpo.advantages(R4, 4, "grpo", eps=0.0), [1.5, -0.5, -0.5, -0.5, 1 / s, -1 / s, 0, 0])
    close(grpo.advantages(R4, 4, "grpo", std_scale=False), [0.75, -0.25, -0.25, -0.25, 1, -1, 0, 0])
    assert torch.equal(grpo.advantages(R4, 4), grpo.group_advantages(R4, 4))  # the default is today's, bit for bit


def test_dr_grpo_centres_without_the_std():
    close(grpo.advantages(R4, 4, "dr-grpo"), [0.75, -0.25, -0.25, -0.25, 1, -1, 0, 0])


def test_rloo_leave_one_out_baseline():
    # r_i - mean of the other three: 1 - 0, 0 - 1/3 (x3); 3 - 5/3, 1 - 7/3, 2 - 6/3 (x2)
    close(grpo.advantages(R4, 4, "rloo"), [1, -1 / 3, -1 / 3, -1 / 3, 4 / 3, -4 / 3, 0, 0])
    r = torch.randn(15, generator=torch.Generator().manual_seed(0))
    loo = torch.stack([r[i] - torch.cat([r[i - i % 5 : i], r[i + 1 : i - i % 5 + 5]]).mean() for i in range(15)])
    assert torch.allclose(estimators.rloo_advantages(r, 5), loo, atol=1e-6)
    assert torch.equal(estimators.rloo_advantages(torch.tensor([1.0, 5.0]), 1), torch.zeros(2))  # G = 1: no other


def test_reinforce_pp_whitens_over_the_batch():
    # batch mean 9/8; deviations [-1/8, -9/8 x3, 15/8, -1/8, 7/8, 7/8]; squares sum to 71/8; unbiased var 71/56
    std = math.sqrt(71 / 56)
    dev = [-1 / 8, -9 / 8, -9 / 8, -9 / 8, 15 / 8, -1 / 8, 7 / 8, 7 / 8]
    close(grpo.advantages(R4, 4, "reinforce++", eps=0.0), [d / std for d in dev])
    # equal rewards inside a group still get advantages (the baseline is the batch's)
    a = grpo.advantages(torch.tensor([1.0, 1, 0, 0]), 2, "reinforce++")
    assert (a != 0).all() and a[0] > 0 > a[2]


def test_reinforce_pp_baseline_centres_per_group_then_whitens_over_the_batch():
    # group-centred [.75, -.25 x3, 1, -1, 0, 0]: batch mean 0, squares sum to 11/4, unbiased var 11/28
    std = math.sqrt(11 / 28)
    close(grpo.advantages(R4, 4, "reinforce++-baseline", eps=0.0),
          [c / std for c in [0.75, -0.25, -0.25, -0.25, 1, -1, 0, 0]])
    assert torch.equal(grpo.advantages(torch.tensor([2.0, 2, 5, 5]), 2, "reinforce++-baseline"), torch.zeros(4))


def test_unknown_estimator_and_std_switch_are_errors():
    with pytest.raises(ValueError, match="unknown advantage estimator"):
        grpo.advantages(R4, 4, "ppo")
    with pytest.raises(ValueError, match="std_scale=False is GRPO's option"):
        grpo.advantages(R4, 4, "rloo", std_scale=False)


# ----------------------------------------------------------------------------- several ranks

class ThreadWorld:
    """`n` ranks as threads: all_sum is a real all-reduce between them (a barrier, then every rank's values summed
    in rank order), so the batch statistics must go through it to be those of the whole batch."""

    def __init__(self, n: int):
        self.n, self.slots, self.barrier, self.local = n, [None] * n, threading.Barrier(n), threading.local()

    def all_sum(self, *values):
        self.slots[self.local.rank] = values
        self.barrier.wait()
        out = [sum(slot[i] for slot in self.slots) for i in range(len(values))]
        self.barrier.wait()  # nobody writes the next values before everyone has read these
        return out

    def run(self, fn, parts):
        results = [None] * self.n

        def body(rank):
            self.local.rank = rank
            results[rank] = fn(parts[rank])

        threads = [threading.Thread(target=body, args=(r,)) for r in range(self.n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return results


@pytest.mark.parametrize("estimator", grpo.ESTIMATORS)
def test_batch_statistics_are_global_over_ranks(estimator, monkeypatch):
    """Each rank holds whole groups of the step (distributed.my_share); REINFORCE++'s mean and std must be the
    whole batch's, so every rank's advantages equal the one-process advantages of its rows."""
    G = 4
    rewards = torch.randint(0, 5, (3 * 2 * G,), generator=torch.Generator().manual_seed(1)).float()
    rewards[8:12] += 10  # rank 1's groups score higher than rank 0's: per-rank statistics would differ
    one = grpo.advantages(rewards, G, estimator)
    world = ThreadWorld(3)
    monkeypatch.setattr(sys.modules["variants.advantages"], "all_sum", world.all_sum)
    parts = world.run(lambda r: grpo.advantages(r, G, estimator), list(rewards.split(2 * G)))
    assert torch.allclose(torch.cat(parts), one, atol=1e-6)


# ----------------------------------------------------------------------------- Dr. GRPO's constant normaliser

def test_constant_aggregation_hand_computed():
    # response 0 has 1 token, response 1 has 3; ratio 1, no KL: per-token loss -A; summed: -1 + 3 = 2
    logp = torch.zeros(2, 3, requires_grad=True)
    mask = torch.tensor([[1.0, 0, 0], [1, 1, 1]])
    adv = torch.tensor([1.0, -1.0])
    loss, _ = grpo.policy_loss(logp, logp.detach(), None, adv, mask, kl_coef=0.0, aggregation="constant")
    assert loss.item() == pytest.approx(2 / 6)  # no denom: [N, T] = 2 x 3, T the budget
    loss, _ = grpo.policy_loss(logp, logp.detach(), None, adv, mask, kl_coef=0.0, aggregation="constant", denom=8.0)
    assert loss.item() == pytest.approx(2 / 8)
    loss.backward()
    # every token's gradient is -A / (budget x responses), whatever its response's length
    assert logp.grad.flatten().tolist() == pytest.approx([-1 / 8, 0, 0, 1 / 8, 1 / 8, 1 / 8])


def test_constant_aggregation_micro_batches_are_exact():
    g = torch.Generator().manual_seed(0)
    logp = (torch.randn(6, 5, generator=g) - 2).requires_grad_()
    old, ref = logp.detach() + 0.1 * torch.randn(6, 5, generator=g), logp.detach() - 0.3
    adv = torch.randn(6, generator=g)
    mask = (torch.arange(5)[None] < torch.tensor([5, 1, 3, 2, 4, 5])[:, None]).float()
    full, _ = grpo.policy_loss(logp, old, ref, adv, mask, aggregation="constant")
    (g_full,) = torch.autograd.grad(full, logp)
    # the micro-batches are cut to their own longest response (micro_batches does), the constant is not
    parts = [grpo.policy_loss(logp[i, :w], old[i, :w], ref[i, :w], adv[i], mask[i, :w], aggregation="constant",
                              denom=6 * 5)[0] for i, w in ((slice(0, 2), 5), (slice(2, 3), 3), (slice(3, 6), 5))]
    (g_parts,) = torch.autograd.grad(sum(parts), logp)
    assert sum(parts).item() == pytest.approx(full.item(), rel=1e-6)
    assert torch.allclose(g_parts, g_full, atol=1e-7)


def test_loss_denominator_constant_is_budget_times_responses():
    rollout = SimpleNamespace(response_ids=torch.zeros(6, 3), response_mask=torch.tensor([[1.0, 1, 0]] * 6))
    for aggregation, want in (("token", 12.0), ("sequence", 6.0), ("constant", 6.0 * 7)):
        assert grpo.loss_denominator(rollout, grpo.GRPOConfig(aggregation=aggregation, max_new_tokens=7)) == want


def _length_reward(sample, text):
    return R(total=float(len(text) % 3))


def test_constant_update_does_not_depend_on_micro_batch_size(tiny_lm):
    results = []
    for micro in (4, 64):
        policy = fresh(tiny_lm, scale=0.05)
        opt = torch.optim.SGD(policy.model.parameters(), lr=0.5)
        cfg = grpo.GRPOConfig(group_size=4, max_new_tokens=6, micro_batch_size=micro, kl_coef=0.0,
                              aggregation="constant", advantage="dr-grpo", max_grad_norm=1e9)
        m, _ = grpo.grpo_step(policy, None, opt, text_samples(3), _length_reward, cfg,
                              generator=torch.Generator().manual_seed(0))
        results.append((m, policy.model.state_dict()))
    (m1, s1), (m2, s2) = results
    assert m1["grad_norm"] == pytest.approx(m2["grad_norm"], rel=1e-4) and m1["grad_norm"] > 0
    assert all(torch.allclose(s1[k], s2[k], atol=1e-6) for k in s1)


def test_grpo_step_uses_the_estimator(tiny_lm):
    """Every group's rewards equal, groups differ: no GRPO gradient (zero advantages, rows skipped with kl 0),
    but REINFORCE++'s batch baseline trains on every row."""
    by_prompt = lambda sample, text: R(total=float(sample.id) ** 2)  # noqa: E731  (0, 1, 4: mean 5/3)
    rows = {}
    for estimator in ("grpo", "rloo", "reinforce++"):
        policy = fresh(tiny_lm)
        cfg = grpo.GRPOConfig(group_size=2, max_new_tokens=3, kl_coef=0.0, advantage=estimator)
        m, _ = grpo.grpo_step(policy, None, torch.optim.SGD(policy.model.parameters(), lr=0.1), text_samples(3),
                              by_prompt, cfg, generator=torch.Generator().manual_seed(0))
        rows[estimator] = m["rows_updated"]
    assert rows == {"grpo": 0, "rloo": 0, "reinforce++": 6}


# ----------------------------------------------------------------------------- the flags

def test_advantage_flag_and_dr_grpo_aggregation():
    assert train.stage_config(train.parse_args(["--advantage", "rloo"]), "judgement").advantage == "rloo"
    dr = train.parse_args(["--advantage", "dr-grpo"])
    assert dr.aggregation == "constant" and train.stage_config(dr, "judgement").aggregation == "constant"
    # an explicit --aggregation wins (one of Dr. GRPO's two fixes alone), also over a preset's
    assert train.parse_args(["--advantage", "dr-grpo", "--aggregation", "token"]).aggregation == "token"
    assert train.parse_args(["--preset", "released", "--advantage", "dr-grpo"]).aggregation == "constant"
    assert train.parse_args(["--preset", "released"]).aggregation == "sequence"
    assert train.parse_args(["--aggregation", "constant"]).advantage == "grpo"


@pytest.mark.parametrize("argv, message", [
    (["--advantage", "ppo"], "--advantage must be one of grpo, dr-grpo"),
    (["--advantage", "rloo", "--no-std-scale"], "--no-std-scale only applies to --advantage grpo"),
    (["--aggregation", "max"], "--aggregation must be token, sequence or constant"),
    (["--dynamic-sampling-max-draws", "-1"], "--dynamic-sampling-max-draws must be >= 0"),
])
def test_bad_values_name_the_flag(argv, message):
    with pytest.raises(ValueError, match=message):
        train.parse_args(argv)
