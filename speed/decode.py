"""Sampling G responses per prompt, fast, beside the plain version the tests compare it with.

The rollout is most of a GRPO step's time. `sample_groups` returns a `Rollout`: for each prompt its G responses,
their tokens, log-probs and entropies at sampling time. How each chunk of prompts is decoded:

- `plain_decode`, the reference: every token step runs the whole prompt + response so far through the model (no
  KV cache), then samples. Simple, and quadratic in the response length.
- `decode`, what training uses: each prompt is prefilled once (the vision tower once per image), its KV cache
  repeated G-fold into a preallocated cache (`expanded_static_cache`), and the G x chunk rows decode one token per
  step (`one_token`), attending to the cache. What keeps a GPU busy there:
  * the step has fixed shapes and no host sync: it attends through a 4-D mask to a window of the cache (its first
    positions, rounded up to `WINDOW`: never the whole preallocated budget), so `torch.compile` captures it whole
    (`decode_step`: fused kernels, or CUDA graphs, one launch per token instead of ~1,300); "are all rows done?" is
    asked every `CHECK_EVERY` tokens on CUDA;
  * it runs PyTorch's SDPA even when the model's full-sequence passes use flash-attention 2 (`sdpa_decode`: flash-
    attn's padded path syncs with the host in every layer of every token);
  * the cache holds keys and values in the compute dtype (bf16 under float32 master weights, not float32 keys).
Both decodes draw the same uniform numbers (one per row and step, drawn up front), so they give the same tokens up
to float rounding (tests/test_speed.py), and the responses do not depend on how the prompts are chunked
(`auto_decode_chunk`: as many as fit the GPU memory, in even chunks).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers.cache_utils import Cache, StaticLayer

from model import Policy, encode_prompts, forward_logits, join_prompt_response, kv_cache
from scaling.distributed import all_min, everyone, gathered, world

WINDOW = 256
"""The decode attends to the cache's first positions rounded up to a multiple of this: few distinct shapes (one CUDA
graph each) and, early in a long response, far fewer key/value reads than the whole prompt + 2,048 budget."""
CHECK_EVERY = 16
"""Token steps between two "are all rows done?" checks on CUDA, where each is a host sync that drains the GPU's
queue (on a CPU, which has no queue to drain, every step: the loop stops as soon as the last row ends)."""
COMPILE_MODES = ("auto", "off", "inductor", "cudagraphs", "eager", "aot_eager")
"""`compile` of `sample_groups` (`--compile-decode`): auto (inductor on CUDA in one process without a 4-bit base;
otherwise off) | off (eager) | inductor (fused kernels) | cudagraphs (inductor, and the step replayed as CUDA graphs:
one launch per token; each rollout's new cache means new graphs, recorded again every rollout and kept by
PyTorch's graph trees: not the default until a long GPU run shows what that costs) | eager, aot_eager (dynamo's
checking backends: the step captured whole, no code generated; tests)."""


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
                  plain: bool = False, compile: str = "auto", check_every: int = 0) -> Rollout:
    """`group_size` responses for each sample, decoded `decode_chunk` prompts at a time (whole groups; 0:
    `auto_decode_chunk`) by `decode` (`plain=True`: by `plain_decode`, the reference). `compile`: one of
    `COMPILE_MODES`, how `decode` runs its one-token step; `check_every`: token steps between two checks whether
    every row is done (0: `CHECK_EVERY` on CUDA, 1 on a CPU).

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
        step = None if plain else decode_step(policy, compile)
        with gathered(model):  # [multi-GPU] each layer gathered once for the whole rollout, not once per token
            parts = [run(policy, prompts, torch.arange(start, min(start + chunk, B), device=policy.device), G,
                         max_new_tokens, temperature, top_p,
                         uniforms[:, start * G : (start + chunk) * G] if uniforms is not None else None,
                         **({} if plain else {"step": step, "check_every": check_every}))
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
           top_p: float, uniforms: Tensor | None, step=None, check_every: int = 0) -> dict[str, Tensor]:
    """Decode G responses for each of the prompts `rows` (indices into `prompts`) with a KV cache: tokens,
    per-token log-probs, entropies and mask [n, T], and `done` [n] (ended with end-of-turn). `step`: the one-token
    step (`one_token`, or its compiled form from `decode_step`); `check_every` as in `sample_groups`."""
    model, step = policy.model, step or one_token
    check_every = check_every or (CHECK_EVERY if policy.device.type == "cuda" else 1)
    empty = prompts["input_ids"][rows, :0]
    batch = join_prompt_response(prompts, rows, empty, empty.float())  # the chunk's prompts (and their images)
    prefill = forward_logits(model, batch, use_cache=True, logits_to_keep=1)
    L, N = batch["input_ids"].shape[1], len(rows) * G
    # the prompts are prefilled once and their cache expanded G-fold into a preallocated cache
    cache = expanded_static_cache(model, kv_cache(prefill), G, round_up(L + max_new_tokens, WINDOW))
    logits = prefill.logits[:, -1].repeat_interleave(G, 0)
    del prefill  # the prefill's output is not needed during the decode
    # which cache positions each row attends to: its prompt (not the left padding), then each response token
    seen = torch.zeros(N, cache.capacity, dtype=torch.bool, device=policy.device)
    seen[:, :L] = batch["attention_mask"].bool().repeat_interleave(G, 0)
    next_pos = prompts["next_pos"][rows].repeat_interleave(G)
    out = _Tokens(policy, N, max_new_tokens)
    with sdpa_decode(model):
        for t in range(max_new_tokens):
            if t > 0:  # token t-1 goes in at cache position L + t - 1; the window covers every position written so far
                seen[:, L + t - 1] = True
                cache.window = seen[:, None, None, : min(cache.capacity, round_up(L + t, WINDOW))].contiguous()
                pos = (next_pos + t - 1)[:, None]
                logits = step(model, cache, out.tokens[:, t - 1 : t], pos[None].expand(3, N, 1) if policy.is_vlm else pos)
            out.sample(t, logits, temperature, top_p, uniforms[t] if uniforms is not None else None)
            # "all done?" is a host sync: on CUDA asked every CHECK_EVERY tokens (finished rows emit pad until then);
            # [multi-GPU] under FSDP every rank runs each forward, so a rank stops only when every rank is done
            if (t + 1) % check_every == 0 and everyone(bool(out.done.all())):
                break
    return out.result()


def one_token(model, cache: "WindowCache", ids: Tensor, pos: Tensor) -> Tensor:
    """Logits [N, vocab] of the token after `ids` [N, 1] at rotary positions `pos` ([N, 1], or [3, N, 1] for
    mrope), attending to the cache through its window mask. Fixed shapes for a given window, no host sync."""
    step = dict(input_ids=ids, attention_mask=cache.window, position_ids=pos)
    return forward_logits(model, step, cache=cache, logits_to_keep=1).logits[:, -1]


_COMPILED: dict = {}


def decode_step(policy: Policy, compile: str = "auto"):
    """The one-token step `decode` runs: `one_token` as it is, or under torch.compile (`COMPILE_MODES`; fullgraph:
    a host sync inside would break the graph, and fails instead). Compiled once per mode and reused: dynamo
    compiles again when the window, the row count or the cache size first changes, then treats them as dynamic."""
    if compile not in COMPILE_MODES:
        raise ValueError(f"--compile-decode must be one of {', '.join(COMPILE_MODES)}, got {compile!r}")
    if compile == "auto":
        quantized = getattr(policy.model, "hf_quantizer", None) is not None
        compile = "inductor" if policy.device.type == "cuda" and world() == 1 and not quantized else "off"
    if compile == "off":
        return one_token
    if compile not in _COMPILED:
        graphs = compile == "cudagraphs" and policy.device.type == "cuda"
        compiled = torch.compile(one_token, backend="inductor" if compile == "cudagraphs" else compile, fullgraph=True,
                                 mode="reduce-overhead" if graphs else None)

        def step(*args):
            if graphs:
                torch.compiler.cudagraph_mark_step_begin()  # the previous step's logits are consumed
            return compiled(*args)

        _COMPILED[compile] = step
    return _COMPILED[compile]


@contextlib.contextmanager
def sdpa_decode(model):
    """[speed] The cached decode runs PyTorch's SDPA attention whatever the model's full-sequence passes use (the
    prefill and the vision tower keep flash-attention 2 where it is installed). With flash-attention 2 a padded
    one-token step unpads in every layer (`nonzero` + `.item()`: ~56 host syncs per token step of a 28-layer
    model); SDPA takes `one_token`'s 4-D mask as it is."""
    text = model.config.get_text_config()
    before = text._attn_implementation
    text._attn_implementation = "sdpa"
    try:
        yield
    finally:
        text._attn_implementation = before


class WindowLayer(StaticLayer):
    """One decoder layer's preallocated keys and values [N, heads, capacity, dim] in a fixed dtype, written in place;
    attention reads the first `cache.window.shape[-1]` positions only."""

    def __init__(self, capacity: int, cache: "WindowCache"):
        super().__init__(max_cache_len=capacity)
        self.cache = cache

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        dtype = self.keys.dtype  # under autocast the rotated keys come in float32: stored in the compute dtype
        keys, values = super().update(key_states.to(dtype), value_states.to(dtype))
        n = self.cache.window.shape[-1]
        return keys[:, :, :n], values[:, :, :n]


class WindowCache(Cache):
    """transformers' static KV cache, attended through `window`: a boolean mask [N, 1, 1, w] over the first w cache
    positions (True: this row attends there), set by `decode` before each step and passed as the attention mask."""

    def __init__(self, layers: int, capacity: int):
        super().__init__(layers=[WindowLayer(capacity, self) for _ in range(layers)])
        self.capacity, self.window = capacity, None


def expanded_static_cache(model, prefill_cache, group_size: int, capacity: int) -> WindowCache:
    """The prompts' KV cache repeated G-fold into a preallocated `WindowCache` of `capacity` positions, in the
    dtype of the prefill's values (the compute dtype: bf16 under float32 master weights).

    A DynamicCache grows by torch.cat every decode step, copying the whole cache each time (~40% of a
    tiny model's decode time on CPU); the static one writes each new key/value in place.
    """
    text = model.config.get_text_config()
    if any(kind != "full_attention" for kind in getattr(text, "layer_types", None) or ()):
        raise ValueError(f"{type(model).__name__}: the decode's cache supports full-attention layers only")
    cache = WindowCache(len(prefill_cache.layers), capacity)
    for layer, src in zip(cache.layers, prefill_cache.layers):
        B, H, L, D = src.keys.shape
        dtype = src.values.dtype
        layer.lazy_initialization(src.keys.new_empty(B * group_size, H, 0, D, dtype=dtype),
                                  src.values.new_empty(B * group_size, H, 0, src.values.shape[-1], dtype=dtype))
        layer.keys[:, :, :L].unflatten(0, (B, group_size)).copy_(src.keys[:, None])  # no [N, H, L, D] temporary
        layer.values[:, :, :L].unflatten(0, (B, group_size)).copy_(src.values[:, None])
        layer.cumulative_length.fill_(L)
    return cache


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def free_gpu_bytes(device: torch.device) -> int:
    """Bytes a new tensor can have on the GPU: the driver's free memory plus what PyTorch's caching allocator holds
    without using it (reserved - allocated). `mem_get_info` alone counts those cached blocks as used: after an
    update's peak it would see a few GiB free of 80 and shrink every later rollout's decode chunks."""
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def auto_decode_chunk(policy: Policy, seq_len: int, group_size: int, prompts: int, budget: float = 0.5) -> int:
    """Prompts per decode chunk: all of them on CPU; on CUDA as many as keep what a prompt's G rows hold (their
    cache: 2 x layers x KV heads x head dim x `seq_len` (rounded up to WINDOW) positions in the compute dtype; and
    the float32 logits the sampler works on, ~4 x vocab floats per row) within `budget` of `free_gpu_bytes`, at
    least one, the same on every rank, split evenly (16 prompts that fit 15 at a time: 2 chunks of 8, not 15 + 1)."""
    if policy.device.type != "cuda":
        return prompts
    text = policy.model.config.get_text_config()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    dtype = getattr(policy.model, "autocast_dtype", None) or policy.model.dtype
    per_row = (2 * text.num_hidden_layers * text.num_key_value_heads * head_dim * round_up(seq_len, WINDOW)
               * torch.finfo(dtype).bits // 8 + 4 * text.vocab_size * 4)
    fit = int(all_min(max(1, min(prompts, int(budget * free_gpu_bytes(policy.device) // (per_row * group_size))))))
    chunks = -(-prompts // fit)
    return -(-prompts // chunks)


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
