"""Log-probs of sampled tokens, fast, each beside the plain version the tests compare it with.

The update needs log pi(token) of every response token (and, for an entropy bonus, the policy's entropy there).
The plain way, `plain_response_logprobs`, runs the whole prompt + response through the model and takes a
log-softmax over the full [rows, T, vocab] logits. Two things make that slow or large at paper scale:

- the logits: at 7B a micro-batch's are [8, 2049, 152064] = 4.6 GiB in bf16. `head_logprobs` fuses the LM head
  with the log-softmax a chunk of rows at a time (`_HeadLogProbs`, its own backward), so they never exist whole;
- the prompt: the G rows of a group share their prompt (map image tokens, usually longer than the response),
  and the plain pass computes it G times. `shared_prompt_logprobs` computes each prompt once, keeps its KV cache,
  and runs only the response tokens.
tests/test_model.py checks both against `plain_response_logprobs`.
"""
from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn
from transformers import DynamicCache

from model import forward_hidden, forward_logits, join_prompt_response, kv_cache
from scaling import lora
from scaling.distributed import fsdp_entry


@fsdp_entry
def plain_response_logprobs(model: nn.Module, batch: dict) -> Tensor:
    """The reference: log-probs [N, T] (float32) of the last `batch["response_len"]` tokens of each row, from the
    full logits of one forward pass over prompt + response (`join_prompt_response`)."""
    T = batch["response_len"]
    logits = forward_logits(model, batch).logits[:, -T - 1 : -1].float()  # position t predicts token t+1
    return logits.log_softmax(-1).gather(-1, batch["input_ids"][:, -T:, None]).squeeze(-1)


# ----------------------------------------------------------------------------- the LM head fused with log-softmax

class _HeadLogProbs(torch.autograd.Function):
    """log p(token) = z[token] - logsumexp(z) with z = h W^T (+ s (h A^T) B^T for a LoRA adapter on the head) from
    hidden states h [R, H], the LM head W [V, H] and, when given, the adapter A [r, H], B [V, r] and scale s,
    `chunk` rows at a time, and (when asked) the entropy of each row's distribution.

    The LM head and the log-softmax are computed together: forward keeps only h, W (A, B) and per-row values;
    backward recomputes one chunk's logits at a time, so no [rows, vocab] tensor ever exists beyond one chunk (at
    7B a micro-batch's logits would be [8, 2049, 152064] = 4.6 GiB in bf16). Gradients: with dz = g (onehot - p)
    (- g_H p (log p + H) for the entropy), dh = dz W and dW = dz^T h, accumulated over chunks in float32; with an
    adapter, u = h A^T: dB = s dz^T u, dA = s (dz B)^T h, and dh gains s (dz B) A. dW is only computed when W
    trains (a frozen LoRA base never holds a [V, H] float32 gradient). `dtype`: the GEMMs' dtype (bf16 under float32
    master weights, as autocast would run the head; None: the hidden states'); logits and log-softmax in float32.
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, lora_a: Tensor | None, lora_b: Tensor | None, scale: float,
                tokens: Tensor, chunk: int, with_entropy: bool, dtype: torch.dtype | None = None):
        dtype = dtype or hidden.dtype
        w = weight.to(dtype)
        logp, entropy = [], []
        for h, tk in zip(hidden.split(chunk), tokens.split(chunk)):
            z = _head_logits(h.to(dtype), w, lora_a, lora_b, scale)
            lse = z.logsumexp(-1)
            logp.append(z.gather(-1, tk[:, None]).squeeze(-1) - lse)
            if with_entropy:
                entropy.append(lse - ((z - lse[:, None]).exp() * z).sum(-1))
        logp = torch.cat(logp)
        entropy = torch.cat(entropy) if with_entropy else logp.new_zeros(0)
        ctx.save_for_backward(hidden, weight, lora_a, lora_b, tokens, entropy)
        ctx.chunk, ctx.scale, ctx.dtype = chunk, scale, dtype
        return logp, entropy

    @staticmethod
    def backward(ctx, grad: Tensor, grad_entropy: Tensor):
        hidden, weight, lora_a, lora_b, tokens, entropy = ctx.saved_tensors
        with_entropy = entropy.numel() > 0 and grad_entropy is not None
        s, w = ctx.scale, weight.to(ctx.dtype)
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if ctx.needs_input_grad[1] else None
        grad_a = torch.zeros_like(lora_a) if lora_a is not None else None
        grad_b = torch.zeros_like(lora_b) if lora_b is not None else None
        for start in range(0, hidden.shape[0], ctx.chunk):
            rows = slice(start, start + ctx.chunk)
            h, tk, g = hidden[rows].to(ctx.dtype), tokens[rows], grad[rows]
            logp = _head_logits(h, w, lora_a, lora_b, s).log_softmax(-1)
            p = logp.exp()
            dz = -p * g[:, None]
            dz.scatter_add_(-1, tk[:, None], g[:, None])
            if with_entropy:
                dz -= p * (logp + entropy[rows, None]) * grad_entropy[rows, None]
            if lora_a is not None:  # the adapter's path in its own (float32) dtype, as LoraLinear computes it
                hf, dzf = h.to(lora_a.dtype), dz.to(lora_b.dtype)
                dzb = dzf @ lora_b
                grad_b += s * (dzf.T @ (hf @ lora_a.T))
                grad_a += s * (dzb.T @ hf)
            dz = dz.to(ctx.dtype)
            grad_hidden[rows] = dz @ w
            if lora_a is not None:
                grad_hidden[rows] += (s * (dzb @ lora_a)).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight += (dz.T @ h).float()
        grad_weight = grad_weight.to(weight.dtype) if grad_weight is not None else None
        return grad_hidden, grad_weight, grad_a, grad_b, None, None, None, None, None


def _head_logits(h: Tensor, w: Tensor, lora_a: Tensor | None, lora_b: Tensor | None, scale: float) -> Tensor:
    """One chunk's logits in float32: h W^T, plus s (h A^T) B^T with an adapter on the head."""
    z = (h @ w.T).float()
    if lora_a is not None:
        z = z + scale * ((h.to(lora_a.dtype) @ lora_a.T) @ lora_b.T).float()
    return z


def head_logprobs(model: nn.Module, hidden: Tensor, tokens: Tensor, chunk: int | None = None,
                  with_entropy: bool = False):
    """Log-probs [N, T] (float32) of `tokens` [N, T] given the decoder's `hidden` [N, T, H] that predict
    them, through the model's LM head without materialising the [N, T, vocab] logits (`_HeadLogProbs`);
    with `with_entropy`, the pair (logp, entropy). A LoRA adapter on the head (lora.LoraLinear) is included
    unless it is disabled (the reference policy). [speed] Under float32 master weights the head's GEMMs run in
    the autocast dtype (bf16), as the model's other layers do: not four float32 [rows, H] x [H, 152k] GEMMs."""
    head = model.get_output_embeddings()
    a = b = None
    scale = 1.0
    if isinstance(head, lora.LoraLinear):
        if not head.disabled:
            a, b, scale = head.lora_A.weight, head.lora_B.weight, head.scaling
        head = head.base_layer
    weight = head.weight
    shape, chunk = tokens.shape, _rows_per_chunk(weight.shape[0], chunk)
    logp, entropy = _HeadLogProbs.apply(hidden.reshape(-1, hidden.shape[-1]), weight, a, b, scale,
                                        tokens.reshape(-1), chunk, with_entropy, getattr(model, "autocast_dtype", None))
    return (logp.view(shape), entropy.view(shape)) if with_entropy else logp.view(shape)


def _rows_per_chunk(vocab: int, chunk: int | None) -> int:
    """Rows per chunk: by default a float32 [rows, vocab] block of ~256 MB (e.g. ~440 rows for Qwen's 152k)."""
    return chunk or max(1, (1 << 26) // vocab)


@fsdp_entry
def response_logprobs(model: nn.Module, batch: dict, chunk: int | None = None, with_entropy: bool = False):
    """Per-token log-probs [N, T] (float32) of the last `batch["response_len"]` tokens of each row (and, with
    `with_entropy`, the policy's entropy [N, T] there, differentiable: the pair (logp, entropy)).

    `batch` comes from `join_prompt_response` (left-padded prompt + right-padded response). Only the T
    response positions go through the LM head, fused with the log-softmax (`head_logprobs`). Padded response
    positions hold garbage: mask them.
    """
    T = batch["response_len"]
    hidden = forward_hidden(model, batch).last_hidden_state[:, -T - 1 : -1]  # position t predicts t+1
    return head_logprobs(model, hidden, batch["input_ids"][:, -T:], chunk, with_entropy)


def _checkpointed(model: nn.Module) -> bool:
    """True when transformers' gradient-checkpointed layers will replay their forward in backward (training + grad)."""
    return model.training and torch.is_grad_enabled() and any(
        getattr(m, "gradient_checkpointing", False) for m in model.modules())


class ReplayCache(DynamicCache):
    """A KV cache that gradient-checkpointed layers may write. transformers drops a plain cache under checkpointing,
    because the backward pass replays each layer's forward and would write it twice; without a cache the prompt
    would be computed G times. Here each write remembers what the layer's cache held before it, and a replay (a
    write from inside the backward pass) gets those states followed by its own new ones, exactly what the forward
    got, and stores nothing. A layer's writes are replayed in reverse order (the response pass's before the
    prompt pass's: the prompt's keys only get their gradient from the responses), so each layer keeps a stack."""

    def __init__(self):
        super().__init__()
        self.before: dict[int, list] = {}

    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args, **kwargs):
        if torch._C._current_graph_task_id() != -1:  # the backward pass replaying a checkpointed layer
            keys, values = self.before[layer_idx].pop()
            if keys is None:
                return key_states, value_states
            return torch.cat([keys, key_states], -2), torch.cat([values, value_states], -2)
        layer = self.layers[layer_idx] if layer_idx < len(self.layers) else None
        held = (layer.keys, layer.values) if layer is not None and layer.is_initialized else (None, None)
        self.before.setdefault(layer_idx, []).append(held)
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)


@contextlib.contextmanager
def _cache_under_checkpointing(model: nn.Module):
    """Let the model's checkpointed layers keep the (replay-safe) cache they are given."""
    layers = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False)]
    for m in layers:
        m._can_checkpoint_with_cache = True
    try:
        yield
    finally:
        for m in layers:
            del m._can_checkpoint_with_cache  # back to the class's False


@fsdp_entry
def shared_prompt_logprobs(model: nn.Module, prompts: dict, prompt_index: Tensor, response_ids: Tensor,
                           response_mask: Tensor, chunk: int | None = None, with_entropy: bool = False):
    """`response_logprobs(model, join_prompt_response(...))`, computing each distinct prompt only once.

    The GRPO rows of a group share their prompt, and prompts (map text, image tokens) are usually longer
    than responses, so the full-sequence pass spends most of its FLOPs recomputing the same prompt G
    times. Here: prefill the distinct prompts with a KV cache (vision encoder once per image), select the
    cache rows for each response (differentiable: prompt gradients are summed over the group), then run
    only the response tokens. Same positions and masks as the decode, so the same log-probs up to float
    rounding. Under gradient checkpointing too: the cache is then a `ReplayCache`, which the backward pass's
    replay of each layer reads as the forward did.
    `with_entropy`: also the entropy at each response position, as in `response_logprobs`.
    """
    checkpointed = _checkpointed(model)
    with _cache_under_checkpointing(model) if checkpointed else contextlib.nullcontext():
        return _shared_prompt_logprobs(model, prompts, prompt_index, response_ids, response_mask, chunk, with_entropy,
                                       ReplayCache() if checkpointed else None)


def _shared_prompt_logprobs(model, prompts, prompt_index, response_ids, response_mask, chunk, with_entropy, cache):
    uniq, rows = torch.unique(prompt_index, return_inverse=True)
    empty = response_ids[:len(uniq), :0]
    batch = join_prompt_response(prompts, uniq, empty, empty.float())  # the distinct prompts alone
    out = forward_hidden(model, batch, cache=cache, use_cache=True)
    hidden = out.last_hidden_state[rows, -1:]  # the last prompt position predicts response token 0
    T = response_ids.shape[1]
    if T > 1:  # response tokens 0..T-2 predict tokens 1..T-1, attending to the cached prompt
        cache = cache if cache is not None else kv_cache(out)  # (a checkpointed model returns none: use ours)
        cache.batch_select_indices(rows)
        pos = prompts["next_pos"][prompt_index, None] + torch.arange(T - 1, device=response_ids.device)
        step = dict(input_ids=response_ids[:, :-1],
                    attention_mask=torch.cat([batch["attention_mask"][rows], response_mask[:, :-1].long()], 1),
                    position_ids=pos[None].expand(3, -1, -1) if batch["position_ids"].dim() == 3 else pos)
        hidden = torch.cat([hidden, forward_hidden(model, step, cache=cache).last_hidden_state], 1)
    # one pass through the head: two would each hold a [vocab, hidden] weight-gradient in backward
    return head_logprobs(model, hidden, response_ids, chunk, with_entropy)
