"""Memory at paper scale, on CPU: decoding in chunks of whole groups gives exactly the unchunked responses,
and a token of probability zero is never sampled, even where the inverse-CDF search lands on one."""
import torch

import grpo
from conftest import colour_samples, fresh, text_samples
from speed import decode


def _rollout(policy, samples, chunk, seed=0):
    g = torch.Generator().manual_seed(seed)
    return grpo.sample_groups(policy, samples, group_size=3, max_new_tokens=8, generator=g, decode_chunk=chunk)


def test_chunked_decode_gives_identical_responses(tiny_vlm, tiny_lm, tmp_path):
    for policy, samples in ((fresh(tiny_lm, scale=0.1), text_samples(5)),
                            (fresh(tiny_vlm, scale=0.1), colour_samples(tmp_path, ["red", "blue", "red", "blue"]))):
        whole = _rollout(policy, samples, 0)
        for chunk in (1, 2, 3):
            part = _rollout(policy, samples, chunk)
            assert part.texts == whole.texts
            assert torch.equal(part.response_ids, whole.response_ids) and torch.equal(part.response_mask, whole.response_mask)
            assert torch.allclose(part.logprobs, whole.logprobs, atol=1e-5)
            assert torch.equal(part.finished, whole.finished)
        assert whole.response_ids.shape[0] == 3 * len(samples)


def test_auto_chunk_is_everything_on_cpu(tiny_lm):
    assert decode.auto_decode_chunk(tiny_lm, seq_len=4096, group_size=8, prompts=16) == 16


def test_zero_probability_tokens_are_never_sampled():
    """u = 1 - 2^-24 (the largest uniform below 1) times the total can round up to the total in float32, and
    the search then lands past the last nonzero entry: on the suppressed tail of the vocabulary."""
    logits = torch.full((2, 10), float("-inf"))
    logits[0, :3] = torch.tensor([0.0, 1.0, 2.0])
    logits[1, 5] = 0.0
    edge = torch.full((2,), 1 - 2**-24)
    picked = decode.sample_token(logits, 1.0, 1.0, u=edge)
    assert torch.isfinite(logits.gather(-1, picked[:, None])).all(), picked
    assert picked.tolist() == [2, 5]
    ones = decode.sample_token(logits, 1.0, 1.0, u=torch.ones(2))  # beyond the range: still a real token
    assert torch.isfinite(logits.gather(-1, ones[:, None])).all()


def _cuda_policy(arch: str, monkeypatch, free_gib: float, reserved_gib: float, allocated_gib: float):
    """A stand-in for a bf16 Qwen2.5-VL policy on a GPU whose memory figures are these (GiB)."""
    from types import SimpleNamespace

    from offline import tiny_model
    from scaling.shapes import shape_config

    gib = 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (int(free_gib * gib), 80 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: int(reserved_gib * gib))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: int(allocated_gib * gib))
    config = shape_config(arch, tiny_model.build_tokenizer(tiny_model.builtin_corpus()))
    return SimpleNamespace(device=torch.device("cuda"), model=SimpleNamespace(config=config, dtype=torch.bfloat16))


def test_auto_chunk_counts_the_allocators_idle_cache_as_free(monkeypatch):
    """After an update's peak PyTorch keeps ~65 GiB cached but unused: mem_get_info says 7 GiB free, yet a new KV
    cache can have 7 + (70 - 5) = 72 GiB. 7B, 16 prompts x G=8, 1,300 prompt + 2,048 new tokens: a prompt's 8 rows
    hold 8 x (2 x 28 layers x 4 KV heads x 128 x 3,584 positions x 2 bytes + 4 x 152,064 x 4 bytes of logits)
    = 1.549 GiB; half of 72 GiB holds 23 of them: all 16 prompts in one chunk (from free memory alone: 2)."""
    per_prompt = 8 * (2 * 28 * 4 * 128 * 3584 * 2 + 4 * 152064 * 4)
    assert abs(per_prompt / 2**30 - 1.549) < 1e-3
    policy = _cuda_policy("7b", monkeypatch, free_gib=7, reserved_gib=70, allocated_gib=5)
    assert decode.free_gpu_bytes(policy.device) == 72 * 2**30
    assert decode.auto_decode_chunk(policy, seq_len=1300 + 2048, group_size=8, prompts=16) == 16
    assert int(0.5 * 7 * 2**30 // per_prompt) == 2  # what mem_get_info alone would have allowed


def test_auto_chunks_are_even(monkeypatch):
    """16 prompts of which 15 fit: two chunks of 8 (two decode loops either way, the second not a 1-prompt one);
    7 fit: three chunks of 6; one fits: 16 chunks of 1."""
    per_prompt = 8 * (2 * 28 * 4 * 128 * 3584 * 2 + 4 * 152064 * 4)
    for fit, chunk in ((15, 8), (7, 6), (16, 16), (1, 1)):
        free = (fit + 0.5) * per_prompt / 0.5 / 2**30  # room for `fit` prompts and half another
        policy = _cuda_policy("7b", monkeypatch, free_gib=free, reserved_gib=0, allocated_gib=0)
        assert decode.auto_decode_chunk(policy, seq_len=3348, group_size=8, prompts=16) == chunk, fit

