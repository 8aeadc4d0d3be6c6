"""speed/: each fast path against the plain reference beside it (the tests that let the speed machinery be trusted)."""
import pytest
import torch
from conftest import colour_samples, fresh, text_samples

import grpo
import model as M
from speed import decode, logprobs


@pytest.mark.parametrize("kind", ["lm", "vlm"])
def test_fast_decode_gives_the_plain_decodes_responses(kind, tiny_lm, tiny_vlm, tmp_path):
    """The static-cache, G-fold expanded decode samples the same tokens as recomputing the whole sequence at every
    step with no cache (same uniforms), with the same log-probs, entropies and ends."""
    policy = fresh(tiny_lm if kind == "lm" else tiny_vlm, scale=0.05)
    samples = text_samples(3) if kind == "lm" else colour_samples(tmp_path, ["red", "blue", "red"],
                                                                  sizes=[(150, 60), (60, 60), (90, 120)])
    run = lambda plain: decode.sample_groups(policy, samples, 4, 9, temperature=1.0, plain=plain,  # noqa: E731
                                             generator=torch.Generator().manual_seed(3))
    fast, plain = run(False), run(True)
    assert torch.equal(fast.response_ids, plain.response_ids)
    assert torch.equal(fast.response_mask, plain.response_mask) and torch.equal(fast.finished, plain.finished)
    assert fast.texts == plain.texts
    m = fast.response_mask.bool()
    assert torch.allclose(fast.logprobs[m], plain.logprobs[m], atol=1e-4)
    assert torch.allclose(fast.entropy[m], plain.entropy[m], atol=1e-4)


@pytest.mark.parametrize("kind", ["lm", "vlm"])
def test_fused_and_shared_prompt_logprobs_equal_the_plain_ones(kind, tiny_lm, tiny_vlm, tmp_path):
    """The fused LM head (response_logprobs) and the prompt computed once per group (shared_prompt_logprobs) give
    the log-probs of one plain forward with a full log-softmax, and the same gradients."""
    policy = fresh(tiny_lm if kind == "lm" else tiny_vlm, scale=0.05)
    samples = text_samples(3) if kind == "lm" else colour_samples(tmp_path, ["red", "blue"])
    ro = grpo.sample_groups(policy, samples, 3, 7, generator=torch.Generator().manual_seed(0))
    inputs = (ro.prompts, ro.prompt_index, ro.response_ids, ro.response_mask)
    batch = M.join_prompt_response(*inputs)
    mask = ro.response_mask

    def value_and_grad(fn):
        policy.model.zero_grad()
        lp = fn()
        (lp * mask).sum().backward()
        grads = {n: p.grad.clone() for n, p in policy.model.named_parameters() if p.grad is not None}
        return lp.detach() * mask, grads

    plain, g_plain = value_and_grad(lambda: logprobs.plain_response_logprobs(policy.model, batch))
    for fast in (lambda: logprobs.response_logprobs(policy.model, batch),
                 lambda: logprobs.shared_prompt_logprobs(policy.model, *inputs)):
        got, g_got = value_and_grad(fast)
        assert torch.allclose(got, plain, atol=1e-5)
        assert g_got.keys() == g_plain.keys()
        for name in g_plain:
            assert torch.allclose(g_got[name], g_plain[name], atol=1e-5, rtol=1e-4), name


def test_zero_advantage_rows_are_kept_when_an_entropy_bonus_is_on(tiny_lm, monkeypatch):
    """Without a KL term, rows whose advantage is zero have no policy gradient and are skipped; with an entropy
    bonus they still have its gradient, so they must go through the update."""
    policy = fresh(tiny_lm)
    seen = []
    real = grpo.policy_update

    def spy(model, optimizer, batches, *a, **k):
        seen.append(sum(len(mb.rows) for mb in batches))
        return real(model, optimizer, batches, *a, **k)

    monkeypatch.setattr(grpo, "policy_update", spy)
    flat = lambda sample, text: type("R", (), dict(total=1.0, format=0.0, correctness=0.0, detail=0.0))()  # noqa: E731
    opt = torch.optim.SGD(policy.model.parameters(), lr=0.1)
    for entropy_coef, rows in ((0.0, 0), (1e-3, 8)):
        cfg = grpo.GRPOConfig(group_size=4, max_new_tokens=3, kl_coef=0.0, entropy_coef=entropy_coef)
        before = {n: p.detach().clone() for n, p in policy.model.named_parameters()}
        grpo.grpo_step(policy, None, opt, text_samples(2), flat, cfg, generator=torch.Generator().manual_seed(0))
        assert seen[-1] == rows
        moved = any(not torch.equal(before[n], p) for n, p in policy.model.named_parameters())
        assert moved == bool(entropy_coef)  # the entropy gradient moves the weights; nothing else would
