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
