"""grpo.py: the math against hand-computed numbers, the batched decode against naive references,
grpo_step's bookkeeping, and a learning test on the real code path."""
import math
import time

import pytest
import torch
from conftest import R, colour_samples, fresh, text_samples
from hypothesis import given, settings
from hypothesis import strategies as st

import grpo
import model as M
from scaling import precision
from speed import logprobs
from speed import decode


# ----------------------------------------------------------------------------- advantages, KL, loss

def test_group_advantages_hand_computed():
    r = torch.tensor([1.0, 0, 0, 0, 3, 1, 2, 2])
    # group 1: mean .25, centred [.75,-.25,-.25,-.25], unbiased std sqrt((.5625 + 3 * .0625) / 3) = .5
    # group 2: mean 2, centred [1,-1,0,0], unbiased std sqrt(2 / 3)
    a = grpo.group_advantages(r, 4, scale=True, eps=0.0)
    s = math.sqrt(2 / 3)
    assert torch.allclose(a, torch.tensor([1.5, -0.5, -0.5, -0.5, 1 / s, -1 / s, 0, 0]))
    c = grpo.group_advantages(r, 4, scale=False)
    assert torch.allclose(c, torch.tensor([0.75, -0.25, -0.25, -0.25, 1, -1, 0, 0]))


def test_group_advantages_equal_rewards_give_zeros():
    a = grpo.group_advantages(torch.tensor([2.0, 2, 2, 0, 0, 0]), 3)
    assert torch.equal(a, torch.zeros(6))
    assert torch.equal(grpo.group_advantages(torch.tensor([1.0, 5.0]), 1), torch.zeros(2))  # G = 1


def test_kl_k3_values():
    logp, ref = torch.tensor([0.0, -1.0]), torch.tensor([math.log(0.5), -1.0])
    k = grpo.kl_k3(logp, ref)
    assert torch.allclose(k, torch.tensor([0.5 + math.log(2) - 1, 0.0]))


@settings(max_examples=200, deadline=None)
@given(st.floats(-30, 0), st.floats(-30, 0))
def test_kl_k3_non_negative(a, b):
    k = grpo.kl_k3(torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64))
    assert k >= 0 and (a != b or k == 0)


@pytest.mark.parametrize("adv,rho,loss,grad,clipped", [
    (1.0, 1.5, -1.2, 0.0, 1.0),   # A > 0, ratio above 1 + eps: clipped at 1.2, no gradient
    (1.0, 0.5, -0.5, -0.5, 0.0),  # A > 0, ratio below 1 - eps: unclipped rho * A, d(-rho A)/dlogp = -rho
    (-1.0, 0.5, 0.8, 0.0, 1.0),   # A < 0, ratio below 1 - eps: clipped at 0.8 * A, no gradient
    (-1.0, 1.5, 1.5, 1.5, 0.0),   # A < 0, ratio above 1 + eps: unclipped, gradient -A * rho
])
def test_clipped_loss_four_cases(adv, rho, loss, grad, clipped):
    logp = torch.tensor([[math.log(rho)]], requires_grad=True)
    old = torch.zeros(1, 1)
    out, m = grpo.policy_loss(logp, old, None, torch.tensor([adv]), torch.ones(1, 1), clip_eps=0.2, kl_coef=0.0)
    out.backward()
    assert out.item() == pytest.approx(loss, abs=1e-6)
    assert logp.grad.item() == pytest.approx(grad, abs=1e-6)
    assert m["clip_frac"] == clipped


def test_token_vs_sequence_aggregation():
    # response 0 has 1 token, response 1 has 3; ratio 1, no KL: per-token loss = -A
    logp = torch.zeros(2, 3)
    mask = torch.tensor([[1.0, 0, 0], [1, 1, 1]])
    adv = torch.tensor([1.0, -1.0])
    tok, _ = grpo.policy_loss(logp, logp, None, adv, mask, kl_coef=0.0, aggregation="token")
    seq, _ = grpo.policy_loss(logp, logp, None, adv, mask, kl_coef=0.0, aggregation="sequence")
    assert tok.item() == pytest.approx((-1 + 3) / 4)
    assert seq.item() == pytest.approx((-1 + 1) / 2)
    # with KL: token-mean of -A + beta * k3
    ref = torch.full((2, 3), -0.5)
    k3 = math.exp(-0.5) + 0.5 - 1
    tok, m = grpo.policy_loss(logp, logp, ref, adv, mask, kl_coef=0.1, aggregation="token")
    assert tok.item() == pytest.approx(0.5 + 0.1 * k3) and m["kl"] == pytest.approx(k3)


def test_entropy_bonus_and_kl_clamp_hand_computed():
    """The released code's extras: loss per token -A*rho + beta*min(k3, clamp) - c*H, sequence-averaged."""
    logp = torch.zeros(1, 2, requires_grad=True)
    ref = torch.tensor([[3.0, 0.5]])  # k3 = e^3 - 3 - 1 = 16.09 (clamped to 10) and e^0.5 - 1.5 = 0.1487
    ent = torch.tensor([[2.0, 1.0]], requires_grad=True)
    loss, m = grpo.policy_loss(logp, logp.detach(), ref, torch.tensor([1.0]), torch.ones(1, 2), kl_coef=0.01,
                               aggregation="sequence", entropy=ent, entropy_coef=1e-3, kl_clamp=10.0)
    k3 = math.exp(0.5) - 1.5
    assert loss.item() == pytest.approx(((-1 + 0.01 * 10 - 1e-3 * 2) + (-1 + 0.01 * k3 - 1e-3 * 1)) / 2)
    assert m["kl"] == pytest.approx((10 + k3) / 2)
    loss.backward()
    assert ent.grad[0].tolist() == pytest.approx([-1e-3 / 2, -1e-3 / 2])  # the bonus pushes entropy up
    # the clamped token's KL passes no gradient; the other's does: d/dlogp beta * k3 = beta * (1 - e^(ref - logp))
    assert logp.grad[0, 0].item() == pytest.approx(-1 / 2)
    assert logp.grad[0, 1].item() == pytest.approx((-1 + 0.01 * (1 - math.exp(0.5))) / 2)


@pytest.mark.parametrize("aggregation", ["token", "sequence"])
def test_denominator_makes_micro_batches_exact(aggregation):
    g = torch.Generator().manual_seed(0)
    logp = (torch.randn(6, 5, generator=g) - 2).requires_grad_()
    old, ref = logp.detach() + 0.1 * torch.randn(6, 5, generator=g), logp.detach() - 0.3
    adv = torch.randn(6, generator=g)
    mask = (torch.arange(5)[None] < torch.tensor([5, 1, 3, 2, 4, 5])[:, None]).float()
    full, _ = grpo.policy_loss(logp, old, ref, adv, mask, aggregation=aggregation)
    (g_full,) = torch.autograd.grad(full, logp)
    denom = mask.sum() if aggregation == "token" else 6
    parts = [grpo.policy_loss(logp[i], old[i], ref[i], adv[i], mask[i], aggregation=aggregation, denom=denom)[0]
             for i in (slice(0, 2), slice(2, 3), slice(3, 6))]
    (g_parts,) = torch.autograd.grad(sum(parts), logp)
    assert sum(parts).item() == pytest.approx(full.item(), rel=1e-6)
    assert torch.allclose(g_parts, g_full, atol=1e-7)


def test_ratio_one_gives_reinforce_gradient():
    """With old = logp (ratio 1) and no KL, grad of the loss = -(1/n) sum_t A * grad log p(token)."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 3, 7, generator=g, requires_grad=True)
    tokens = torch.randint(0, 7, (4, 3), generator=g)
    mask = torch.tensor([[1.0, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]])
    adv = torch.tensor([0.5, -1.0, 2.0, 0.0])
    logp = torch.log_softmax(logits, -1).gather(-1, tokens[..., None]).squeeze(-1)
    loss, m = grpo.policy_loss(logp, logp.detach(), logp.detach(), adv, mask, kl_coef=1e-3)
    (ours,) = torch.autograd.grad(loss, logits)
    logp2 = torch.log_softmax(logits, -1).gather(-1, tokens[..., None]).squeeze(-1)
    (reinforce,) = torch.autograd.grad(-(adv[:, None] * logp2 * mask).sum() / mask.sum(), logits)
    assert torch.allclose(ours, reinforce, atol=1e-7) and m["clip_frac"] == 0 and m["kl"] == 0


# ----------------------------------------------------------------------------- the batched decode

def _generate_greedy(policy, samples, max_new):
    enc = M.encode_prompts(policy, samples)
    kw = {k: enc[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw") if k in enc}
    if policy.is_vlm:
        kw["mm_token_type_ids"] = (enc["input_ids"] == policy.model.config.image_token_id).int()
    out = policy.model.generate(**kw, max_new_tokens=max_new, do_sample=False, suppress_tokens=policy.suppress_ids.tolist(),
                                eos_token_id=policy.eos_id, pad_token_id=policy.pad_id)
    return out[:, enc["input_ids"].shape[1]:]


@pytest.mark.parametrize("kind", ["vlm", "lm"])
def test_greedy_decode_matches_transformers_generate(kind, tiny_vlm, tiny_lm, tmp_path):
    """Prompts of different lengths (left padding), mrope positions from images of different sizes."""
    policy = fresh(tiny_vlm if kind == "vlm" else tiny_lm, scale=0.1)
    samples = colour_samples(tmp_path, ["red", "blue", "red"], sizes=[(150, 60), (60, 60), (90, 120)]) \
        if kind == "vlm" else text_samples(3)
    ro = grpo.sample_groups(policy, samples, group_size=1, max_new_tokens=12, temperature=0.0)
    ref = _generate_greedy(policy, samples, 12)
    assert len(set(ro.response_ids.flatten().tolist())) > 3  # not a degenerate repeated token
    T = ro.response_ids.shape[1]
    assert torch.equal(ro.response_ids, ref[:, :T])
    # group_size > 1 with greedy: all members of a group equal their prompt's single greedy answer
    ro4 = grpo.sample_groups(policy, samples, group_size=4, max_new_tokens=12, temperature=0.0)
    assert torch.equal(ro4.response_ids, ro.response_ids.repeat_interleave(4, 0))


def test_wrong_rotary_positions_are_detected(tiny_vlm, tmp_path):
    """Negative control: shifting the response positions by one changes the log-probs visibly."""
    policy = fresh(tiny_vlm, scale=0.1)
    ro = grpo.sample_groups(policy, colour_samples(tmp_path, ["red", "blue"]), 2, 6,
                            generator=torch.Generator().manual_seed(0))
    prompts = dict(ro.prompts, next_pos=ro.prompts["next_pos"] + 1)
    lp = logprobs.response_logprobs(policy.model, M.join_prompt_response(prompts, ro.prompt_index, ro.response_ids,
                                                                  ro.response_mask))
    assert ((lp - ro.logprobs) * ro.response_mask).abs().max() > 1e-2


def test_sampling_is_reproducible(tiny_vlm, tmp_path):
    samples = colour_samples(tmp_path, ["red", "blue"])
    run = lambda seed: grpo.sample_groups(tiny_vlm, samples, 4, 8, generator=torch.Generator().manual_seed(seed))
    a, b, c = run(0), run(0), run(1)
    assert torch.equal(a.response_ids, b.response_ids) and a.texts == b.texts
    assert not torch.equal(a.response_ids, c.response_ids)
    # top_p reaches the sampler: a nucleus this small holds only the most likely token, i.e. greedy decoding
    top = grpo.sample_groups(tiny_vlm, samples, 4, 8, top_p=1e-6, generator=torch.Generator().manual_seed(0))
    greedy = grpo.sample_groups(tiny_vlm, samples, 4, 8, temperature=0.0)
    assert torch.equal(top.response_ids, greedy.response_ids) and not torch.equal(a.response_ids, greedy.response_ids)


def _forced_end(stop_at, eos, calls):
    """A decode.forward_logits that makes end-of-turn certain for decode row n at step stop_at[n] (step t >= 1 is
    the t-th decode forward; None: never forced), and counts the forwards in `calls`."""
    real = decode.forward_logits

    def forward(model, batch, cache=None, **kw):
        out = real(model, batch, cache=cache, **kw)
        calls.append(out.logits.shape[0])
        t = len(calls) - 1  # call 0 is the prefill (gives step 0's logits)
        rows = [n for n, k in enumerate(stop_at) if k == t and t > 0]
        if rows:
            out.logits = out.logits.clone()
            out.logits[rows, -1, eos] = 1e4
        return out

    return forward


def test_finished_rows_stop_and_others_are_unaffected(tiny_lm, monkeypatch):
    """Rows made to end at known steps stop there (pad + mask 0 after, finished True); the rows that never end run
    to max_new_tokens with exactly the tokens and log-probs of an undisturbed decode (finished False); when every
    row has ended, the loop stops and the response is trimmed to the longest."""
    policy = fresh(tiny_lm, scale=0.05)
    samples, G, T, eos = text_samples(4), 4, 10, policy.eos_id
    run = lambda stop_at, calls: (monkeypatch.setattr(decode, "forward_logits", _forced_end(stop_at, eos, calls)),
                                  grpo.sample_groups(policy, samples, G, T, temperature=0.7,
                                                     generator=torch.Generator().manual_seed(0)))[1]
    a = run([None] * 16, [])
    assert a.response_ids.shape == (16, T)

    def expected_lengths(stop_at):  # the first end-of-turn: forced, or one the undisturbed decode sampled itself
        out = []
        for n, k in enumerate(stop_at):
            natural = (a.response_ids[n] == eos).nonzero()
            ends = [int(natural[0]) + 1] if len(natural) else []
            out.append(min(ends + ([k + 1] if k is not None else []) + [T]))
        return out

    # some rows end (at steps 1..6), some never do
    stop_at = [None, 1, 2, None, 3, 4, None, 5, 6, None, 1, None, 2, 3, None, 4]
    b = run(stop_at, [])
    lengths = b.response_mask.sum(1).long().tolist()
    assert lengths == expected_lengths(stop_at)
    assert b.finished.any() and not b.finished.all() and b.response_ids.shape[1] == T
    for n in range(16):
        L = lengths[n]
        assert torch.equal(b.response_ids[n, :L - 1], a.response_ids[n, :L - 1])  # same tokens up to the end
        assert torch.allclose(b.logprobs[n, :L - 1], a.logprobs[n, :L - 1], atol=1e-5)
        assert (b.response_ids[n, L:] == policy.pad_id).all() and (b.response_mask[n, L:] == 0).all()
        assert (b.logprobs[n, L:] == 0).all() and (b.response_mask[n, :L] == 1).all()
        assert bool(b.finished[n]) == bool(b.response_ids[n, L - 1] == eos) and (L == T or b.finished[n])
        assert (b.response_ids[n, : L - 1] != eos).all()
        if stop_at[n] is None and L == T:  # never ended: the whole undisturbed response
            assert not b.finished[n] and torch.equal(b.response_ids[n], a.response_ids[n])
    assert sum(1 for n in range(16) if stop_at[n] is None and not b.finished[n]) >= 4
    assert b.texts == policy.tokenizer.batch_decode([r[:L] for r, L in zip(b.response_ids.tolist(), lengths)],
                                                    skip_special_tokens=True)
    # every row ends by step 5: all finished, the loop stops there (no more forwards) and trims to the longest
    stop_at = [1 + n % 5 for n in range(16)]
    calls = []
    c = run(stop_at, calls)
    lengths = c.response_mask.sum(1).long().tolist()
    assert lengths == expected_lengths(stop_at) and c.finished.all()
    assert c.response_ids.shape[1] == max(lengths) <= 6 < T
    assert len(calls) == max(lengths)  # the prefill + one forward per decode step until the last row ended
    for n in range(16):
        assert torch.equal(c.response_ids[n, :lengths[n] - 1], a.response_ids[n, :lengths[n] - 1])
        assert c.response_ids[n, lengths[n] - 1] == eos and (c.response_ids[n, lengths[n]:] == policy.pad_id).all()


def test_special_tokens_are_never_sampled(tiny_vlm, tmp_path):
    policy = fresh(tiny_vlm)
    specials = policy.suppress_ids
    with torch.no_grad():  # make the special tokens the model's favourites
        policy.model.lm_head.weight[specials] *= 50
    ro = grpo.sample_groups(policy, colour_samples(tmp_path, ["red", "blue"]), 8, 6,
                            generator=torch.Generator().manual_seed(0))
    assert not torch.isin(ro.response_ids, specials).any()


# ----------------------------------------------------------------------------- grpo_step

def _colour_reward(sample, text):
    """0.5 for boxing a colour (\\boxed{red} / \\boxed{blue}), +1 if the first one boxed is right."""
    found = sorted((text.find(f"\\boxed{{{c}}}"), c) for c in ("red", "blue") if f"\\boxed{{{c}}}" in text)
    fmt = float(bool(found))
    cor = float(fmt > 0 and found[0][1] == sample.answer)
    return R(total=0.5 * fmt + cor, format=fmt, correctness=cor)


def _random_reward(sample, text):
    return R(total=float(len(text) % 3), format=1.0, correctness=float(len(text) % 2))


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_grpo_step_updates_policy_not_reference(tiny_vlm, tmp_path):
    policy = fresh(tiny_vlm)
    reference = M.reference_model(policy)
    before_ref, before = _state(reference), _state(policy.model)
    opt = precision.make_optimizer(policy.model, lr=1e-3)
    cfg = grpo.GRPOConfig(group_size=4, max_new_tokens=5, micro_batch_size=3, kl_coef=0.05)
    samples = colour_samples(tmp_path, ["red", "blue"])
    g = torch.Generator().manual_seed(0)
    for _ in range(2):
        metrics, responses = grpo.grpo_step(policy, reference, opt, samples, _random_reward, cfg, generator=g)
    assert len(responses) == 8 and all(isinstance(r, str) for r in responses)
    for key in ("reward/total", "reward/format", "reward/correctness", "reward/detail", "reward/accuracy",
                "groups/zero_std_frac", "loss/policy", "kl", "clip_frac", "entropy", "response_len", "grad_norm",
                "skipped_nonfinite", "time/rollout", "time/scoring", "time/logprobs", "time/update",
                "tokens/completion"):
        assert isinstance(metrics[key], float) and math.isfinite(metrics[key]), key
    assert metrics["kl"] > 0 and metrics["skipped_nonfinite"] == 0 and metrics["entropy"] > 0
    assert all(torch.equal(v, reference.state_dict()[k]) for k, v in before_ref.items())
    assert any(not torch.equal(v, policy.model.state_dict()[k]) for k, v in before.items())


def test_kl_zero_never_calls_the_reference(tiny_vlm, tmp_path):
    class Explodes(torch.nn.Module):
        def forward(self, *a, **k):
            raise AssertionError("reference forward with kl_coef == 0")

    policy = fresh(tiny_vlm)
    opt = precision.make_optimizer(policy.model, lr=1e-3)
    cfg = grpo.GRPOConfig(group_size=4, max_new_tokens=4, kl_coef=0.0, ppo_epochs=2)
    m, _ = grpo.grpo_step(policy, Explodes(), opt, colour_samples(tmp_path, ["red", "blue"]), _random_reward, cfg,
                          generator=torch.Generator().manual_seed(0))
    assert m["kl"] == 0.0


def test_nonfinite_loss_skips_the_update(tiny_vlm, tmp_path):
    policy = fresh(tiny_vlm)
    before = _state(policy.model)
    opt = precision.make_optimizer(policy.model, lr=1e-2)
    cfg = grpo.GRPOConfig(group_size=4, max_new_tokens=4)
    nan_reward = lambda s, t: R(total=float("nan"))
    m, _ = grpo.grpo_step(policy, M.reference_model(policy), opt, colour_samples(tmp_path, ["red", "blue"]),
                          nan_reward, cfg, generator=torch.Generator().manual_seed(0))
    assert m["skipped_nonfinite"] == 1.0
    assert all(torch.equal(v, policy.model.state_dict()[k]) for k, v in before.items())
    assert len(opt.state) == 0 and all(p.grad is None for p in policy.model.parameters())


@pytest.mark.parametrize("aggregation,kl_coef", [("token", 0.01), ("sequence", 0.0)])
def test_update_does_not_depend_on_micro_batch_size(aggregation, kl_coef, tiny_lm):
    results = []
    for micro in (3, 64):
        policy = fresh(tiny_lm, scale=0.05)
        ref = M.reference_model(fresh(tiny_lm, scale=0.05, seed=1))
        opt = torch.optim.SGD(policy.model.parameters(), lr=0.5)
        cfg = grpo.GRPOConfig(group_size=4, max_new_tokens=6, micro_batch_size=micro, kl_coef=kl_coef,
                              aggregation=aggregation, max_grad_norm=1e9)
        m, _ = grpo.grpo_step(policy, ref, opt, text_samples(3), _random_reward, cfg,
                              generator=torch.Generator().manual_seed(0))
        results.append((m, policy.model.state_dict()))
    (m1, s1), (m2, s2) = results
    assert m1["grad_norm"] == pytest.approx(m2["grad_norm"], rel=1e-4) and m1["grad_norm"] > 0
    assert all(torch.allclose(s1[k], s2[k], atol=1e-6) for k in s1)


def test_grpo_learns_the_colour_of_the_image(tiny_cache, tmp_path):
    """The real path (tiny Qwen2.5-VL, images, batched decode, grpo_step) learns a toy verifiable task:
    answer \\boxed{red} or \\boxed{blue} for the colour filling the image. Reward 0.5 for one boxed
    answer, +1 if it is the right one. A random model rarely boxes an answer; chance once it does is 50%."""
    torch.manual_seed(0)
    policy = M.build_tiny_policy(seed=0, cache_dir=tiny_cache)
    policy = fresh(policy)
    import random

    rng = random.Random(0)
    colours = [rng.choice(["red", "blue"]) for _ in range(48)]
    sizes = [(rng.randint(60, 140), rng.randint(60, 140)) for _ in range(48)]
    pool = colour_samples(tmp_path, colours, sizes)
    opt = precision.make_optimizer(policy.model, lr=2e-3, weight_decay=0.0)
    cfg = grpo.GRPOConfig(group_size=8, max_new_tokens=4, kl_coef=0.0, micro_batch_size=64)
    g = torch.Generator().manual_seed(0)
    history, t0 = [], time.time()
    for step in range(160):
        batch = [pool[rng.randrange(len(pool))] for _ in range(8)]
        m, _ = grpo.grpo_step(policy, None, opt, batch, _colour_reward, cfg, generator=g)
        history.append((m["reward/total"], m["reward/accuracy"]))
    first = sum(h[1] for h in history[:10]) / 10
    last = sum(h[1] for h in history[-20:]) / 20
    print(f"colour task: accuracy {first:.2f} (first 10 steps) -> {last:.2f} (last 20), "
          f"reward {history[0][0]:.2f} -> {sum(h[0] for h in history[-20:]) / 20:.2f}, {time.time() - t0:.0f}s")
    assert first < 0.2 and last > 0.85


def test_sample_token_matches_softmax_masks_and_nucleus():
    """Inverse-CDF sampling draws from softmax(logits / T); -inf tokens never; top-p keeps the nucleus."""
    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([[0.0, 1.0, 2.0, float("-inf"), 0.5]]).repeat(100_000, 1)
    for t in (1.0, 0.5):
        freq = torch.bincount(decode.sample_token(logits, t, 1.0, g), minlength=5).float() / len(logits)
        assert torch.allclose(freq, torch.softmax(logits[0] / t, -1), atol=0.01)
        assert freq[3] == 0
    # top-p 0.7: sorted probs .579 (kept), .213 (mass before .579 < .7: kept), .129 (before .792: dropped)
    freq = torch.bincount(decode.sample_token(logits, 1.0, 0.7, g), minlength=5).float() / len(logits)
    p = torch.softmax(logits[0], -1)
    assert torch.allclose(freq, torch.tensor([0, p[1], p[2], 0, 0]) / (p[1] + p[2]), atol=0.01)
    assert torch.equal(decode.sample_token(logits[:3], 0.0, 1.0, g), torch.tensor([2, 2, 2]))  # greedy


def _freq(logits, temperature, top_p, n=50_000, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = logits.repeat_interleave(n, 0)
    drawn = decode.sample_token(rows, temperature, top_p, g).view(len(logits), n)
    return torch.stack([torch.bincount(d, minlength=logits.shape[-1]).float() / n for d in drawn])


def test_top_p_samples_only_the_nucleus_with_renormalised_frequencies():
    """Probabilities .5 .3 .15 .05 (shuffled over the vocabulary, a second row in another order): the nucleus is the
    most likely tokens, up to the first whose cumulative mass passes top_p, sampled in proportion to their
    probabilities (seeded: the frequencies below are exact for this seed, the tolerance is ~4.5 sigma)."""
    p = torch.tensor([[0.15, 0.5, 0.05, 0.3, 0.0], [0.3, 0.05, 0.0, 0.15, 0.5]])  # 0.0: a -inf logit
    logits = p.log()

    def expect(keep):  # keep: per row, the kept token ids
        out = torch.zeros_like(p)
        for r, ids in enumerate(keep):
            out[r, ids] = p[r, ids] / p[r, ids].sum()
        return out
    # top_p 0.7: .5 (mass before 0) and .3 (mass before .5 < .7) kept, frequencies 5/8 and 3/8
    f = _freq(logits, 1.0, 0.7)
    assert f[0, [0, 2, 4]].sum() == 0 and f[1, [1, 2, 3]].sum() == 0  # never outside the nucleus
    assert torch.allclose(f, expect([[1, 3], [4, 0]]), atol=0.01)
    assert torch.allclose(f[0, [1, 3]], torch.tensor([5 / 8, 3 / 8]), atol=0.01)
    # top_p 0.45: only the most likely token
    assert torch.equal(_freq(logits, 1.0, 0.45, n=5_000), expect([[1], [4]]))
    # top_p 0.9: .5 .3 .15 (mass before .8 < .9), never .05 (mass before .95)
    assert torch.allclose(_freq(logits, 1.0, 0.9), expect([[1, 3, 0], [4, 0, 3]]), atol=0.01)
    # the nucleus is taken on softmax(logits / T): at T = .5 the probabilities are .685 .247 .062 .007, so top_p .6
    # keeps one token (at T = 1 it keeps two)
    assert torch.equal(_freq(logits, 0.5, 0.6, n=5_000), expect([[1], [4]]))
    assert torch.allclose(_freq(logits, 1.0, 0.6), expect([[1, 3], [4, 0]]), atol=0.01)
    # top_p 1.0 is off: every finite-logit token, at its probability
    assert torch.allclose(_freq(logits, 1.0, 1.0), p, atol=0.01)


def test_sampler_logprobs_equal_the_update_forward(tiny_vlm, tmp_path):
    """The decode's own log-probs (fp32) are the shared-prompt training forward's, row by row."""
    policy = fresh(tiny_vlm, scale=0.1)
    samples = colour_samples(tmp_path, ["red", "blue", "red"], sizes=[(150, 60), (60, 60), (90, 120)])
    ro = grpo.sample_groups(policy, samples, 4, 6, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        lp = logprobs.shared_prompt_logprobs(policy.model, ro.prompts, ro.prompt_index, ro.response_ids, ro.response_mask)
    assert torch.allclose(lp * ro.response_mask, ro.logprobs * ro.response_mask, atol=1e-4)


def test_micro_batches_keep_groups_whole(tiny_lm, monkeypatch):
    """Each micro-batch holds whole groups, so every prompt is computed once per pass."""
    policy = fresh(tiny_lm)
    seen = []
    real = grpo.shared_prompt_logprobs

    def spy(model, prompts, prompt_index, *rest):
        seen.append(sorted(prompt_index.tolist()))
        return real(model, prompts, prompt_index, *rest)

    monkeypatch.setattr(grpo, "shared_prompt_logprobs", spy)
    cfg = grpo.GRPOConfig(group_size=4, max_new_tokens=6, micro_batch_size=8, kl_coef=1e-3)
    opt = precision.make_optimizer(policy.model, lr=1e-3)
    grpo.grpo_step(policy, M.reference_model(policy), opt, text_samples(3), _random_reward, cfg,
                   generator=torch.Generator().manual_seed(0))
    assert seen and all(len(s) % 4 == 0 for s in seen)
    for s in seen:  # every prompt present in a micro-batch appears with all G of its rows
        assert all(s.count(p) == 4 for p in set(s))
