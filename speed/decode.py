"""Sampling G responses per prompt, fast, beside the plain version the tests compare it with.

The rollout is most of a GRPO step's time. `sample_groups` returns a `Rollout`: for each prompt its G responses,
their tokens, log-probs and entropies at sampling time. How each chunk of prompts is decoded:

- `plain_decode`, the reference: every token step runs the whole prompt + response so far through the model (no
  KV cache), then samples. Simple, and quadratic in the response length.
- `decode`, what training uses: each prompt is prefilled once (the vision tower once per image), its KV cache
  repeated G-fold into a preallocated static cache (`expanded_static_cache`), and the G x chunk rows decode one
  token per step, attending to the cache.
Both draw the same uniform numbers (one per row and step, drawn up front), so they give the same tokens up to
float rounding (tests/test_grpo.py), and the responses do not depend on how the prompts are chunked
(`auto_decode_chunk`: as many as fit the GPU memory).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from model import Policy, encode_prompts, forward_logits, join_prompt_response, kv_cache
from scaling.distributed import all_min, everyone


@dataclass
class Rollout:
    """G responses for each of B prompts; row n belongs to prompt n // G (groups are contiguous)."""

    prompts: dict  # encode_prompts(...) of the B prompts (ids, mask, rotary positions, pixels)
    group_size: int
    prompt_index: Tensor  # [N] prompt of each row
    response_ids: Tensor  # [N, T] sampled tokens; pad after the end-of-turn token
    response_mask: Tensor  # [N, T] 1.0 on response tokens (end-of-turn included), 0.0 on padding
    texts: list[str]  # decoded responses (special tokens skipped)
    logprobs: Tensor  # [N, T] log pi(token) at temperature 1 over the full vocabulary, at sampling time
    entropy: Tensor  # [N, T] entropy of pi (temperature 1) at each response position, at sampling time
    finished: Tensor  # [N] True where the response ended with end-of-turn (False: hit max_new_tokens)


@torch.no_grad()
def sample_groups(policy: Policy, samples, group_size: int, max_new_tokens: int, temperature: float = 1.0,
                  top_p: float = 1.0, generator: torch.Generator | None = None, decode_chunk: int = 0,
                  plain: bool = False) -> Rollout:
    """`group_size` responses for each sample, decoded `decode_chunk` prompts at a time (whole groups; 0:
    `auto_decode_chunk`) by `decode` (`plain=True`: by `plain_decode`, the reference).

    Token t of a row sits at rotary position `next_pos + t`: for Qwen2.5-VL that is max(prompt mrope position)
    + 1 + t on all three (t, h, w) axes, which is what transformers' generate computes from `rope_deltas`; for
    text models it is prompt length + t. Positions are passed explicitly, so no hidden `rope_deltas` state in
    the model is relied on. Special tokens other than end-of-turn are never sampled (a sampled <|image_pad|>
    breaks the next forward). Finished rows emit pad and are masked. Every uniform number the sampling uses
    is drawn up front from `generator` (which must live on the policy's device), so the responses do not
    depend on the chunking. `temperature=0`: greedy decoding (eval.py, group_size=1).
    """
    model, G, B = policy.model, group_size, len(samples)
    was_training = model.training
    model.eval()  # also lets gradient-checkpointed models use the KV cache
    try:
        prompts = encode_prompts(policy, samples)
        uniforms = (torch.rand(max_new_tokens, B * G, generator=generator, device=policy.device)
                    if temperature > 0 else None)
        chunk = decode_chunk or auto_decode_chunk(policy, prompts["input_ids"].shape[1] + max_new_tokens, G, B)
        run = plain_decode if plain else decode
        parts = [run(policy, prompts, torch.arange(start, min(start + chunk, B), device=policy.device), G,
                     max_new_tokens, temperature, top_p,
                     uniforms[:, start * G : (start + chunk) * G] if uniforms is not None else None)
                 for start in range(0, B, chunk)]
    finally:
        model.train(was_training)
    cat = lambda key, fill: pad_cat([p[key] for p in parts], fill)  # noqa: E731
    tokens, mask = cat("tokens", policy.pad_id), cat("mask", 0.0)
    lengths = mask.sum(1).long().tolist()
    texts = policy.tokenizer.batch_decode([row[:n] for row, n in zip(tokens.tolist(), lengths)], skip_special_tokens=True)
    return Rollout(prompts=prompts, group_size=G, prompt_index=torch.arange(B, device=policy.device).repeat_interleave(G),
                   response_ids=tokens, response_mask=mask, texts=texts, logprobs=cat("logprobs", 0.0),
                   entropy=cat("entropy", 0.0), finished=torch.cat([p["done"] for p in parts]))


def sample_token(logits: Tensor, temperature: float, top_p: float, generator=None, u: Tensor | None = None) -> Tensor:
    """Sample one token per row from softmax(logits / temperature), restricted to the top-p nucleus.

    Inverse-CDF sampling: one uniform number per row (`u` [N] in [0, 1), else drawn from `generator`) against
    the cumulative unnormalised probabilities. Same distribution as torch.multinomial, ~4x cheaper per decode
    step on CPU (multinomial's setup dominated a tiny model's step). Masked (-inf) logits get probability 0
    and are never chosen: a float32 cumulative sum over a 152k vocabulary is not exactly monotone on every
    device, and `u * total` can round up to the total, so a token of probability 0 that the search lands
    on is replaced by the row's most likely token (a sampled <|image_pad|> would break the next forward)."""
    if temperature <= 0:
        return logits.argmax(-1)
    scaled = logits / temperature
    p = torch.exp(scaled - scaled.max(-1, keepdim=True).values)
    if top_p < 1.0:
        sorted_p, idx = p.sort(dim=-1, descending=True)
        outside = sorted_p.cumsum(-1) - sorted_p > top_p * sorted_p.sum(-1, keepdim=True)  # mass before exceeds top_p
        p = torch.zeros_like(p).scatter_(-1, idx, sorted_p.masked_fill(outside, 0.0))
    cdf = p.cumsum(-1)
    if u is None:
        u = torch.rand(p.shape[0], generator=generator, device=p.device)
    picked = torch.searchsorted(cdf, u[:, None] * cdf[:, -1:], right=True).squeeze(-1).clamp_(max=p.shape[-1] - 1)
    return torch.where(p.gather(-1, picked[:, None]).squeeze(-1) > 0, picked, p.argmax(-1))


class _Tokens:
    """The chunk's outputs, filled one token step at a time: tokens, log-probs, entropies, mask [N, T], done [N]."""

    def __init__(self, policy: Policy, N: int, T: int):
        dev = policy.device
        self.policy, self.T = policy, T
        self.tokens = torch.full((N, T), policy.pad_id, dtype=torch.long, device=dev)
        self.logprobs, self.entropy, self.mask = (torch.zeros(N, T, device=dev) for _ in range(3))
        self.done = torch.zeros(N, dtype=torch.bool, device=dev)

    def sample(self, t: int, logits: Tensor, temperature: float, top_p: float, u: Tensor | None) -> None:
        """Token t of every row from its logits [N, vocab] (finished rows: pad, masked out)."""
        logits = logits.float()
        lse = logits.logsumexp(-1)  # the policy's own distribution (temperature 1, nothing suppressed)
        self.entropy[:, t] = lse - (torch.exp(logits - lse[:, None]) * logits).sum(-1)
        logits[:, self.policy.suppress_ids] = float("-inf")
        nxt = sample_token(logits, temperature, top_p, u=u).masked_fill(self.done, self.policy.pad_id)
        self.tokens[:, t] = nxt
        self.mask[:, t] = (~self.done).float()
        self.logprobs[:, t] = torch.where(self.done, 0.0, logits.gather(-1, nxt[:, None]).squeeze(-1) - lse)
        self.done |= nxt == self.policy.eos_id

    def result(self) -> dict[str, Tensor]:
        """Trimmed after the last row's end (a chunk that stopped early has no all-pad columns)."""
        steps = max(int(self.mask.sum(1).max()), 1) if self.T else 0
        return dict(tokens=self.tokens[:, :steps], logprobs=self.logprobs[:, :steps], mask=self.mask[:, :steps],
                    entropy=self.entropy[:, :steps], done=self.done)


def plain_decode(policy: Policy, prompts: dict, rows: Tensor, G: int, max_new_tokens: int, temperature: float,
                 top_p: float, uniforms: Tensor | None) -> dict[str, Tensor]:
    """The reference decode of the prompts `rows` (indices into `prompts`), G responses each: at every step the
    whole prompt + response so far goes through the model, no cache. Returns what `decode` returns."""
    N = len(rows) * G
    index = rows.repeat_interleave(G)
    out = _Tokens(policy, N, max_new_tokens)
    for t in range(max_new_tokens):
        seen = torch.ones(N, t, device=policy.device)  # every response position is attended, as in `decode`
        batch = join_prompt_response(prompts, index, out.tokens[:, :t], seen)
        logits = forward_logits(policy.model, batch, logits_to_keep=1).logits[:, -1]
        out.sample(t, logits, temperature, top_p, uniforms[t] if uniforms is not None else None)
        if bool(out.done.all()):
            break
    return out.result()


def decode(policy: Policy, prompts: dict, rows: Tensor, G: int, max_new_tokens: int, temperature: float,
           top_p: float, uniforms: Tensor | None) -> dict[str, Tensor]:
    """Decode G responses for each of the prompts `rows` (indices into `prompts`) with a KV cache: tokens,
    per-token log-probs, entropies and mask [n, T], and `done` [n] (ended with end-of-turn)."""
    model = policy.model
    empty = prompts["input_ids"][rows, :0]
    batch = join_prompt_response(prompts, rows, empty, empty.float())  # the chunk's prompts (and their images)
    prefill = forward_logits(model, batch, use_cache=True, logits_to_keep=1)
    # the prompts are prefilled once and their cache expanded G-fold into a preallocated static cache
    cache = expanded_static_cache(model, kv_cache(prefill), G, batch["input_ids"].shape[1] + max_new_tokens)
    logits = prefill.logits[:, -1].repeat_interleave(G, 0)
    del prefill  # the prefill's output is not needed during the decode
    N = len(rows) * G
    prompt_mask = batch["attention_mask"].repeat_interleave(G, 0)
    attn = torch.cat([prompt_mask, prompt_mask.new_ones(N, max_new_tokens)], 1)
    next_pos = prompts["next_pos"][rows].repeat_interleave(G)
    out = _Tokens(policy, N, max_new_tokens)
    check_every = 16 if policy.device.type == "cuda" else 1
    for t in range(max_new_tokens):
        if t > 0:
            pos = (next_pos + t - 1)[:, None]
            pos = pos[None].expand(3, N, 1) if policy.is_vlm else pos
            step = dict(input_ids=out.tokens[:, t - 1 : t], attention_mask=attn[:, : prompt_mask.shape[1] + t],
                        position_ids=pos)
            logits = forward_logits(model, step, cache=cache, logits_to_keep=1).logits[:, -1]
        out.sample(t, logits, temperature, top_p, uniforms[t] if uniforms is not None else None)
        # "all done?" is a host sync: every token on CPU (free), every 16 on CUDA (no stall per token);
        # under FSDP every rank runs each forward, so a rank stops only when every rank is done
        if (t + 1) % check_every == 0 and everyone(bool(out.done.all())):
            break
    return out.result()


def expanded_static_cache(model, prefill_cache, group_size: int, max_len: int):
    """The prompts' KV cache repeated G-fold into a preallocated StaticCache of `max_len` positions.

    A DynamicCache grows by torch.cat every decode step, copying the whole cache each time (~40% of a
    tiny model's decode time on CPU); the static one writes each new key/value in place.
    """
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=max_len)
    for i, layer in enumerate(prefill_cache.layers):  # first update allocates [N, heads, max_len, dim] and copies
        cache.layers[i].update(layer.keys.repeat_interleave(group_size, 0), layer.values.repeat_interleave(group_size, 0))
    return cache


def auto_decode_chunk(policy: Policy, seq_len: int, group_size: int, prompts: int, budget: float = 0.5) -> int:
    """Prompts per decode chunk: all of them on CPU; on CUDA as many as keep the expanded KV cache (2 x layers
    x KV heads x head dim x `seq_len` positions x G rows per prompt, in the model's dtype) within `budget`
    of the free GPU memory (at least one prompt)."""
    if policy.device.type != "cuda":
        return prompts
    text = policy.model.config.get_text_config()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    per_prompt = (2 * text.num_hidden_layers * text.num_key_value_heads * head_dim * seq_len * group_size
                  * torch.finfo(getattr(policy.model, "autocast_dtype", None) or policy.model.dtype).bits // 8)
    free, _ = torch.cuda.mem_get_info(policy.device)
    return int(all_min(max(1, min(prompts, int(budget * free // per_prompt)))))  # the same chunks on every rank


def pad_cat(tensors: list[Tensor], fill) -> Tensor:
    """[N_k, T_k] tensors right-padded with `fill` to the longest T and stacked along the rows."""
    T = max(t.shape[1] for t in tensors)
    return torch.cat([torch.nn.functional.pad(t, (0, T - t.shape[1]), value=fill) for t in tensors])


def select(rounds: list[Rollout], rows: Tensor, prompts: dict, pad_id: int) -> Rollout:
    """The rollout made of rows `rows` (indices over the rounds' rows, in order) of several rollouts, whose
    prompts, re-encoded, are `prompts` (dynamic sampling keeps some groups of several rounds)."""
    dev = rows.to(rounds[0].response_ids.device)
    cat = lambda key, fill: pad_cat([getattr(r, key) for r in rounds], fill)[dev]  # noqa: E731
    texts = [t for r in rounds for t in r.texts]
    G = rounds[0].group_size
    return Rollout(prompts=prompts, group_size=G,
                   prompt_index=torch.arange(len(rows) // G, device=dev.device).repeat_interleave(G),
                   response_ids=cat("response_ids", pad_id), response_mask=cat("response_mask", 0.0),
                   texts=[texts[i] for i in rows.tolist()], logprobs=cat("logprobs", 0.0),
                   entropy=cat("entropy", 0.0), finished=torch.cat([r.finished for r in rounds])[dev])
