"""speed/: each fast path against the plain reference beside it (the tests that let the speed machinery be trusted)."""
import dataclasses

import pytest
import torch
from conftest import colour_samples, fresh, text_samples

import grpo
import model as M
from speed import decode, logprobs


def close_grads(got: dict, want: dict) -> None:
    """Gradients equal up to float32 rounding, which grows with the model's scale (the text model starts at larger
    weights and an induction circuit with large biases, tiny_model.TEXT_INIT; its embedding gradients are of order
    1, and a bias whose exact gradient nearly cancels keeps rounding of that order): absolute tolerance 1e-5 of the
    largest gradient entry of the model."""
    assert got.keys() == want.keys()
    scale = max(1.0, max(g.abs().max().item() for g in want.values()))
    for name in want:
        assert torch.allclose(got[name], want[name], atol=1e-5 * scale, rtol=1e-4), name


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
        close_grads(g_got, g_plain)


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


# ----------------------------------------------------------------------------- the decode step: window, compile, syncs

def _samples(kind, tmp_path):
    return text_samples(3) if kind == "lm" else colour_samples(tmp_path, ["red", "blue", "red"],
                                                              sizes=[(150, 60), (60, 60), (90, 120)])


@pytest.mark.parametrize("kind", ["lm", "vlm"])
def test_compiled_windowed_decode_gives_the_plain_decodes_responses(kind, tiny_lm, tiny_vlm, tmp_path, monkeypatch):
    """The one-token step under torch.compile (fullgraph: no graph break, so no host sync inside), attending through
    windows of 8 positions (several per response), samples what the plain no-cache decode samples. dynamo compiles
    it a bounded number of times (the first shapes; then the window, the row count and the cache's size, each made
    dynamic once it changes) and no more for further prompt lengths."""
    from torch._dynamo.testing import CompileCounter

    policy = fresh(tiny_lm if kind == "lm" else tiny_vlm, scale=0.05)
    monkeypatch.setattr(decode, "WINDOW", 8)
    counter, windows, sizes = CompileCounter(), [], set()
    compiled = torch.compile(decode.one_token, backend=counter, fullgraph=True)
    monkeypatch.setitem(decode._COMPILED, "eager", lambda model, cache, *a: windows.append(cache.window.shape[-1])
                        or sizes.add(cache.capacity) or compiled(model, cache, *a))
    run = lambda samples, chunk=0, **k: decode.sample_groups(  # noqa: E731
        policy, samples, 4, 20, generator=torch.Generator().manual_seed(3), decode_chunk=chunk, **k)
    other = (lambda n: [dataclasses.replace(s, question=s.question * n) for s in text_samples(2)]) if kind == "lm" else (
        lambda n: colour_samples(tmp_path, ["blue"] * n, sizes=[(28 * (1 + n), 56)] * n))
    samples = _samples(kind, tmp_path)
    try:
        compiled_ro, plain = run(samples, 2, compile="eager"), run(samples, plain=True)  # chunks of 8 and 4 rows
        eager = run(samples, compile="off")
        for n in (5, 2):  # other prompt lengths: other cache sizes
            run(other(n), compile="eager")
        frames, n_sizes = counter.frame_count, len(sizes)
        run(other(4), compile="eager")
    finally:
        torch._dynamo.reset()
    assert len(set(windows)) >= 3 and all(w % 8 == 0 for w in windows)  # windows of 8 positions, several of them
    assert n_sizes >= 2 and frames <= 4 and counter.frame_count == frames
    for fast in (compiled_ro, eager):
        assert torch.equal(fast.response_ids, plain.response_ids) and torch.equal(fast.response_mask, plain.response_mask)
        m = fast.response_mask.bool()
        assert torch.allclose(fast.logprobs[m], plain.logprobs[m], atol=1e-4)
        assert torch.allclose(fast.entropy[m], plain.entropy[m], atol=1e-4)


def test_the_window_covers_what_is_written_and_no_more(tiny_lm, monkeypatch):
    """At step t the cache returns its first round_up(L + t, WINDOW) positions (L: the padded prompt length), never
    the whole preallocated prompt + budget, and the rows' 4-D mask covers exactly that window."""
    policy = fresh(tiny_lm, scale=0.05)
    monkeypatch.setattr(decode, "WINDOW", 4)
    seen = []
    real = decode.one_token

    def spy(model, cache, ids, pos):
        seen.append((cache.window.shape, cache.capacity, int(cache.layers[0].cumulative_length)))
        return real(model, cache, ids, pos)

    monkeypatch.setattr(decode, "one_token", spy)
    ro = decode.sample_groups(policy, text_samples(2), 2, 9, generator=torch.Generator().manual_seed(0), compile="off")
    L = ro.prompts["input_ids"].shape[1]
    assert [s[2] for s in seen] == list(range(L, L + len(seen)))  # token t-1 goes in at position L + t - 1
    for t, (shape, capacity, _) in enumerate(seen, start=1):
        assert capacity == decode.round_up(L + 9, 4) and shape == (4, 1, 1, min(capacity, decode.round_up(L + t, 4)))


def test_the_decode_runs_sdpa_whatever_the_models_attention(tiny_vlm, tmp_path, monkeypatch):
    """The prefill keeps the model's attention implementation (flash-attention 2 on a GPU that has it; 'eager' here),
    the one-token steps run SDPA (no unpadding, no host sync per layer), and the setting is restored afterwards."""
    policy = fresh(tiny_vlm, scale=0.05)
    text = policy.model.config.get_text_config()
    monkeypatch.setattr(text, "_attn_implementation", "eager")
    used = []
    real = decode.forward_logits

    def spy(model, batch, cache=None, **k):
        used.append(("step" if batch["input_ids"].shape[1] == 1 and cache is not None else "prefill",
                     model.config.get_text_config()._attn_implementation))
        return real(model, batch, cache=cache, **k)

    monkeypatch.setattr(decode, "forward_logits", spy)
    samples = _samples("vlm", tmp_path)
    fast = decode.sample_groups(policy, samples, 3, 6, generator=torch.Generator().manual_seed(1), compile="off")
    assert used[0] == ("prefill", "eager") and set(used[1:]) == {("step", "sdpa")}
    assert text._attn_implementation == "eager"
    plain = decode.sample_groups(policy, samples, 3, 6, generator=torch.Generator().manual_seed(1), plain=True)
    assert torch.equal(fast.response_ids, plain.response_ids)  # eager prefill + SDPA steps == eager throughout


def test_the_decode_loop_syncs_with_the_host_once_every_16_tokens(tiny_vlm, tmp_path, monkeypatch):
    """Counted by tools/decode_bench.HostSyncs: the one-token step never syncs; the loop adds one sync per 16 tokens
    (the "all done?" check, at CUDA's interval), whatever the token budget; the responses are those of checking
    every token."""
    from tools.decode_bench import HostSyncs

    policy = fresh(tiny_vlm, scale=0.05)
    policy = dataclasses.replace(policy, suppress_ids=torch.cat([policy.suppress_ids, torch.tensor([policy.eos_id])]))
    samples = _samples("vlm", tmp_path)
    in_step = []
    real = decode.one_token

    def spy(*args):
        with HostSyncs() as counted:
            logits = real(*args)
        in_step.append(counted.count)
        return logits

    monkeypatch.setattr(decode, "one_token", spy)
    run = lambda T, every: decode.sample_groups(policy, samples, 2, T, generator=torch.Generator().manual_seed(0),  # noqa: E731
                                                compile="off", check_every=every)
    counts = {}
    for T in (32, 64):
        with HostSyncs() as counted:
            run(T, decode.CHECK_EVERY)
        counts[T] = counted.count
    assert in_step and set(in_step) == {0}
    assert (counts[64] - counts[32]) / 32 == 1 / 16
    assert torch.equal(run(20, 16).response_ids, run(20, 1).response_ids)


def test_host_syncs_counts_what_waits_for_a_value():
    from tools.decode_bench import HostSyncs

    x = torch.arange(6.0)
    with HostSyncs() as counted:
        y = (x * 2).cumsum(0)[x > 1]  # a boolean index: 1
        bool(y.sum() > 3), y.max().item(), x.nonzero(), x.tolist()  # 4 more
        torch.arange(3).repeat_interleave(torch.tensor([1, 2, 3]))  # output size unknown: 1
        torch.arange(3).repeat_interleave(torch.tensor([1, 2, 3]), output_size=6)  # given: none
        x.exp().softmax(0)  # none
    assert counted.count == 6, counted.where


def test_the_cache_holds_the_compute_dtype_under_master_weights(tiny_cache, tmp_path, monkeypatch):
    """Under bf16 autocast over float32 weights the rotated keys come out float32; the decode's cache stores them in
    bf16 like the values (the KV memory the plan budgets), and the step still matches the plain decode's tokens."""
    policy = M.build_tiny_policy(seed=0, cache_dir=tiny_cache, dtype=torch.bfloat16, master_weights=True)
    caches = []
    real = decode.expanded_static_cache
    monkeypatch.setattr(decode, "expanded_static_cache", lambda *a: caches.append(real(*a)) or caches[-1])
    samples = _samples("vlm", tmp_path)
    ro = decode.sample_groups(policy, samples, 2, 5, generator=torch.Generator().manual_seed(0), compile="off")
    layer = caches[0].layers[0]
    assert next(policy.model.parameters()).dtype == torch.float32
    assert layer.keys.dtype == layer.values.dtype == torch.bfloat16
    assert ro.response_mask.sum() > 0


@pytest.mark.parametrize("kind", ["lm", "vlm"])
def test_shared_prompt_under_gradient_checkpointing(kind, tiny_lm, tiny_vlm, tmp_path):
    """With gradient checkpointing (the paper preset) each prompt is still computed once per group (the first decoder
    layer sees the distinct prompts, then the responses), with the plain full-sequence pass's log-probs and
    gradients: the backward replay of every layer reads the ReplayCache as the forward did."""
    policy = fresh(tiny_lm if kind == "lm" else tiny_vlm, scale=0.05)
    samples = text_samples(3) if kind == "lm" else colour_samples(tmp_path, ["red", "blue"])
    ro = grpo.sample_groups(policy, samples, 3, 7, generator=torch.Generator().manual_seed(0))
    inputs = (ro.prompts, ro.prompt_index, ro.response_ids, ro.response_mask)
    mask = ro.response_mask
    policy.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    policy.model.train()
    decoder = policy.model.model.language_model if kind == "vlm" else policy.model.model
    rows_seen = []
    hook = decoder.layers[0].register_forward_pre_hook(lambda m, args, kw: rows_seen.append(
        tuple((args[0] if args else kw["hidden_states"]).shape[:2])), with_kwargs=True)

    def value_and_grad(fn):
        policy.model.zero_grad()
        lp = fn()
        (lp * mask).sum().backward()
        return lp.detach() * mask, {n: p.grad.clone() for n, p in policy.model.named_parameters() if p.grad is not None}

    try:
        plain, g_plain = value_and_grad(lambda: logprobs.plain_response_logprobs(policy.model,
                                                                                 M.join_prompt_response(*inputs)))
        rows_seen.clear()
        shared, g_shared = value_and_grad(lambda: logprobs.shared_prompt_logprobs(policy.model, *inputs))
    finally:
        hook.remove()
    n_prompts, L = ro.prompts["input_ids"].shape
    assert rows_seen == [(n_prompts, L), (len(mask), mask.shape[1] - 1)]  # each prompt once, then the responses
    assert torch.allclose(shared, plain, atol=1e-5)
    assert g_shared.keys() == g_plain.keys()
    close_grads(g_shared, g_plain)
