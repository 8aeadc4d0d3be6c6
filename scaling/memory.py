"""Peak GPU memory of one GRPO step (grpo.grpo_step), per GPU, as pure functions; and a CPU check of them.

`plan(...)` adds up, in bytes per GPU:
- static: weights, gradients, AdamW moments, frozen reference (precision.bytes_per_param), divided by
  `gpus` when sharded (FSDP2 under torchrun, distributed.py); with gpus > 1 also `gathered`: the root FSDP
  unit's weights (embedding, LM head, norms) stay gathered in bf16 through a phase, plus two gathered decoder
  layers (the one computing, the next prefetched);
- the largest of the phase terms (only one phase runs at a time):
  rollout   the decode chunk's expanded KV cache (2 x layers x kv heads x head dim x (prompt + response)
            x chunk*G rows) + the chunk's unexpanded prefill cache + ~5 float32 [rows, vocab] sampling copies;
  prefill   one layer's no-grad transients over the chunk's prompt tokens (+ its KV cache);
  reference the no-grad reference pass of one micro-batch (cache of prompt + response, one layer's transients);
  logprob   the update's forward/backward of one micro-batch over the full sequence (an upper bound:
            shared_prompt_logprobs computes each prompt once per group, then the responses): the per-layer
            boundary hidden states [rows, T, hidden] x layers, one layer's recomputed activations, the fused
            head's float32 chunk of logits (x3 in backward) and its float32 [vocab, hidden] weight-gradient;
  optimizer torch's foreach AdamW (CUDA) makes one float32 copy of the second moments (sqrt); bitsandbytes
            8-bit: none; single-tensor AdamW: one float32 denominator of the largest tensor; AdamWSR (the
            `stochastic` scheme): the temporaries of one slice of precision.SLICE elements (it updates each
            tensor a slice at a time), ~20 bytes per element, ~32 with 8-bit moments (`ADAMWSR_SLICE_BYTES`).
Assumptions: flash / memory-efficient attention (no [T, T] scores); the residual stream has the weights'
dtype (float32 under the `master` scheme's autocast), matmul outputs the compute dtype (bf16, float32
for the 'float32' scheme), RMSNorm upcasts to float32; KV cache in the compute dtype (the decode's cache
stores the float32 rotary keys of autocast in bf16: speed/decode.py); the vision encoder's activations and
the CUDA context / allocator fragmentation (~1-3 GiB) are left out; with gpus > 1 the prompts are split
evenly over the GPUs. `peak` = static + max(phases) is an upper bound: in the rollout the gradients are
already freed (zero_grad(set_to_none=True)).

LoRA (`plan(..., lora_rank=r)`, train.py --lora-rank; one GPU): the static part is the frozen base, 2 bytes x
params in bf16 (with `qlora`: NF4_BYTES per quantized weight, i.e. the linear layers of the language model and
the vision tower, bf16 for the rest, + `dequant`, the bf16 copy of the largest linear weight that
bitsandbytes' matmul_4bit makes), the float32 `adapters` (r (in + out) per projection, `lora_params`), their
float32 gradients and AdamW moments; no reference copy (pi_ref = adapters disabled) and no base gradients.
The phases are the ones above (backward still runs through the frozen base), less the head's [vocab, hidden]
weight-gradient (frozen), plus the adapters' own activations (`_adapter_bytes`). `fit_micro_batch` picks the
largest micro-batch that fits a card, `table` adds LoRA / QLoRA rows per card size (LORA_CARDS).

tools/memory_check.py checks `plan` on the CPU: a Qwen2 text model with real widths, real grpo_step's in a
subprocess, its peak RSS increase against `plan` for the same shape and batch.
"""
from __future__ import annotations

import json
import math

from scaling import precision, shapes

GiB = 2**30
# A card sold as N GB holds ~N GiB (GPU memory is binary: nvidia-smi shows 24,564 MiB on a 24 GB RTX 4090,
# 81,559 MiB on an 80 GB H100); the plan keeps CONTEXT_GIB of it for the CUDA context and allocator slack.
CONTEXT_GIB = 2.0


def card_usable_gib(card_gb: float) -> float:
    """GiB a step may use on a card of `card_gb` GB: the card's GiB less CONTEXT_GIB (80 GB: 78)."""
    return card_gb - CONTEXT_GIB


USABLE_GIB = card_usable_gib(80)  # 78.0, of an 80 GB GPU
# Image budgets (pixels): Qwen2.5-VL's image processor default, what the authors' model saw (the presets' budget;
# at most 16,384 visual tokens per map), and the reduced budget of the one-GPU recipes (at most 1,280).
DEFAULT_PIXELS = 12_845_056
REDUCED_PIXELS = 1280 * 28 * 28
PIXELS_PER_TOKEN = 28 * 28  # one visual token per 28 x 28 pixels (14-pixel patches, 2 x 2 merged)
PROMPT_TEXT_TOKENS = 20  # the chat template and a ReasonMap-Plus question around the image


def visual_tokens(width: int, height: int, max_pixels: int, min_pixels: int = 3136) -> int:
    """Visual tokens of a width x height map at an image budget: the image processor's resize (`smart_resize`:
    sides rounded to multiples of 28, shrunk to at most `max_pixels` keeping the aspect ratio), 28 x 28 px each."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    h, w = smart_resize(height, width, factor=28, min_pixels=min_pixels, max_pixels=max_pixels)
    return (h // 28) * (w // 28)


def paper_batch(max_pixels: int = DEFAULT_PIXELS) -> dict:
    """The paper preset's step (16 prompts x 8, 2,048 response tokens, micro-batch 8) at an image budget: the prompt
    of a map as large as the budget allows (max_pixels / 28^2 visual tokens) plus the question's text."""
    return dict(prompts=16, group_size=8, prompt_len=max_pixels // PIXELS_PER_TOKEN + PROMPT_TEXT_TOKENS,
                response_len=2048, micro_batch=8)


PAPER = paper_batch(REDUCED_PIXELS)  # at the one-GPU recipes' budget: prompt 1,300 tokens
# LoRA / QLoRA rows (lora.py, train.py --lora-rank / --qlora): one GPU of each of these sizes (GB), adapters of
# rank LORA_RANK, and the largest micro-batch of MICRO_BATCHES (tried in this order) that fits the card.
LORA_CARDS, LORA_RANK, MICRO_BATCHES = (24, 48, 80), 64, (8, 4, 2, 1)
# QLoRA's frozen base: bitsandbytes NF4 with double quantisation: 4 bits per weight, one absmax per block of 64
# weights, itself quantised to 8 bits with one float32 constant per 256 absmax (+ a few scalars per tensor, left
# out): 0.5 + 1/64 + 4/(64*256) = 0.515869140625 bytes per quantised weight. Only nn.Linear weights are quantised
# (the language model's projections and the vision tower's); embeddings, the LM head, norms, biases and the
# vision patch embedding (a Conv3d) stay bf16.
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)
# Bytes per slice element of AdamWSR's step temporaries at their peak. float32 moments: the float32 gradient,
# sqrt(v), the new weight, the rounding noise and the rounded bits (4 each). 8-bit moments, while sqrt(v) is
# re-quantized: the gradient, m, v, sqrt(v) (4 each) + quantize_blockwise's padded copy, scaled values and
# int32 indices (4 each) and the uint8 codes (1 each, this one's and m's): 30. Measured on CPU (peak RSS of a
# step on a 50 M-element bf16 tensor, slices of 2^24, 4 runs each): 20.0, and 28.1-31.9 bytes per slice element.
ADAMWSR_SLICE_BYTES = {False: 20, True: 32}


def _layer_params(s: dict) -> int:
    """Parameters of one Qwen2 decoder layer of shape `s`."""
    h, kv = s["hidden"], s["kv_heads"] * s["hidden"] // s["heads"]
    attn = h * h + h + 2 * (h * kv + kv) + h * h  # q (bias), k, v (bias), o
    return attn + 3 * h * s["intermediate"] + 2 * h


def lm_params(s: dict) -> int:
    """Parameters of the Qwen2 text decoder + embedding (+ untied LM head) of shape `s`."""
    return s["layers"] * _layer_params(s) + s["hidden"] + s["vocab"] * s["hidden"] * (1 if s["tied"] else 2)


def projections(s: dict) -> list[tuple[int, int]]:
    """(in, out) of one decoder layer's q, k, v, o, gate, up and down projections (lora.DEFAULT_TARGETS)."""
    h, i, kv = s["hidden"], s["intermediate"], s["kv_heads"] * s["hidden"] // s["heads"]
    return [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]


def lora_params(s: dict, rank: int) -> int:
    """Adapter parameters of lora.add_lora's default targets: A [rank, in] + B [out, rank] per projection."""
    return s["layers"] * sum(rank * (i + o) for i, o in projections(s))


def quantized_params(s: dict) -> int:
    """Weights QLoRA stores in NF4: the language model's projections and the vision tower's linear layers."""
    return s["layers"] * sum(i * o for i, o in projections(s)) + s.get("vision_linear", 0)


def base_weight_bytes(s: dict, qlora: bool) -> float:
    """The frozen LoRA base: every parameter in bf16; QLoRA: the quantized ones in NF4 (NF4_BYTES), the rest bf16."""
    q = quantized_params(s) if qlora else 0
    return q * NF4_BYTES + (s["params"] - q) * 2


def _vision_linears(out_hidden: int) -> list[tuple[int, int, int]]:
    """(in, out, count) of the Qwen2.5-VL vision tower's nn.Linear layers (shapes.VISION): per block qkv, proj,
    gate, up, down; then the patch merger's two-layer MLP over 2x2 merged patches into the LM's width."""
    v = shapes.VISION
    d, i, n, m = v["hidden_size"], v["intermediate_size"], v["depth"], v["hidden_size"] * v["spatial_merge_size"] ** 2
    return [(d, 3 * d, n), (d, d, n), (d, i, n), (d, i, n), (i, d, n), (m, m, 1), (m, out_hidden, 1)]


def shape_of(arch: str) -> dict:
    """The shape dict of Qwen2.5-VL-3B / 7B (shapes.QWEN25_VL, parameters counted on the meta device)."""
    a, c = shapes.QWEN25_VL[arch], shapes.count_shape_params(arch)
    vision = _vision_linears(a["hidden_size"])
    return dict(layers=a["num_hidden_layers"], hidden=a["hidden_size"], intermediate=a["intermediate_size"],
                heads=a["num_attention_heads"], kv_heads=a["num_key_value_heads"], vocab=a["vocab_size"],
                tied=a["tie_word_embeddings"], vision_params=c["vision_params"], params=c["params"],
                vision_linear=sum(i * o * n for i, o, n in vision), vision_largest=max(i * o for i, o, _ in vision))


def _layer_grad_bytes(s: dict, tokens: int, c: int, r: int) -> int:
    """Activations one decoder layer keeps for backward (+ its backward temporaries), `tokens` tokens."""
    h, i, kv = s["hidden"], s["intermediate"], s["kv_heads"] * s["hidden"] // s["heads"]
    norms = 2 * (8 * h + r * h + c * h)  # float32 upcast + normalised copy, input, bf16 cast for the linear
    attn = c * (5 * h + 4 * kv)  # q k v, rotary outputs, attention output, o_proj input
    mlp = 4 * c * i + 2 * c * i  # gate, up, act, act*up; backward grads of two of them
    return tokens * (norms + attn + mlp + 2 * r * h)  # + the incoming / outgoing hidden gradient


def _adapter_bytes(s: dict, tokens: int, rank: int, grad: bool) -> int:
    """What lora.LoraLinear adds to one decoder layer over `tokens` tokens: the widest adapter's float32 B output
    and its scaled copy (8 x intermediate bytes a token, a transient, in forward and again in backward); with
    grad also what autograd saves for the adapters' weight gradients: each adapter's float32 copy of its input
    (q, k, v, and gate, up cast their shared input separately: 6 of width hidden, down's of width intermediate)
    and A's float32 output (rank wide, 7 of them)."""
    h, i = s["hidden"], s["intermediate"]
    saved = 4 * (6 * h + i) + 7 * 4 * rank if grad else 0
    return tokens * (8 * i + saved)


def _layer_nograd_bytes(s: dict, tokens: int, c: int, r: int) -> int:
    """Transient memory of one decoder layer's no-grad forward over `tokens` tokens."""
    return tokens * (3 * c * s["intermediate"] + (8 + 2 * r) * s["hidden"])


def _kv_bytes(s: dict, rows: int, seq: int, c: int) -> int:
    """KV cache: 2 x layers x kv heads x head dim x seq x rows x bytes."""
    return 2 * s["layers"] * s["kv_heads"] * (s["hidden"] // s["heads"]) * seq * rows * c


def _head_chunk_bytes(s: dict, rows: int) -> int:
    """One chunk of the fused head's float32 logits over `rows` rows (model._rows_per_chunk: ~256 MB at most)."""
    return min(rows, max(1, (1 << 26) // s["vocab"])) * s["vocab"] * 4


STATIC = ("weights", "adapters", "gradients", "optimizer", "reference", "gathered", "dequant")  # held throughout
PHASES = ("rollout_kv", "prefill", "reference_pass", "logprob", "optimizer_step")  # one at a time


def plan(shape: dict, scheme: str, eight_bit: bool, gpus: int, prompts: int, group_size: int, prompt_len: int,
         response_len: int, micro_batch: int, decode_chunk: int, gradient_checkpointing: bool = True,
         moments_bytes: int | None = None, foreach: bool = True, lora_rank: int = 0, qlora: bool = False) -> dict:
    """Bytes per GPU of each part of one GRPO step and the `peak` (module docstring). `lora_rank` > 0: LoRA
    (train.py --lora-rank, one GPU, scheme 'plain': the frozen base in bf16, or in NF4 with `qlora`)."""
    s, P, G = shape, shape["params"], group_size
    b = precision.bytes_per_param(scheme, eight_bit)
    if moments_bytes is not None:  # e.g. torch AdamW on bf16 weights keeps bf16 moments: 4
        b["moments"] = moments_bytes
    c = 4 if scheme == "float32" else 2  # compute (matmul output) dtype
    r = b["weights"]  # residual stream dtype = weights dtype
    if lora_rank:  # the base frozen (no gradients, no moments), the reference = adapters disabled (no copy)
        if gpus != 1 or scheme != "plain":
            raise ValueError("LoRA plans are for one GPU and scheme 'plain' (train.py: a bf16 base, no master copy)")
        A = lora_params(s, lora_rank)  # float32 adapters, their float32 gradients and AdamW moments
        out = dict(weights=base_weight_bytes(s, qlora), adapters=4 * A, gradients=4 * A, optimizer=A * b["moments"],
                   reference=0)
        # QLoRA: bitsandbytes' matmul_4bit dequantizes the weight it multiplies into bf16 (forward and backward)
        out["dequant"] = 2 * max(max(i * o for i, o in projections(s)), s.get("vision_largest", 0)) if qlora else 0
    elif qlora:
        raise ValueError("qlora needs lora_rank > 0")
    else:
        out = {k: P * b[v] / gpus for k, v in (("weights", "weights"), ("gradients", "grads"),
                                               ("optimizer", "moments"), ("reference", "reference"))}
        out["adapters"] = out["dequant"] = 0
    prompts_here = math.ceil(prompts / gpus)
    chunk = min(decode_chunk, prompts_here)
    rows, seq = chunk * G, prompt_len + response_len
    out["rollout_kv"] = _kv_bytes(s, rows, seq, c) + _kv_bytes(s, chunk, prompt_len, c) + 5 * rows * s["vocab"] * 4
    out["prefill"] = _layer_nograd_bytes(s, chunk * prompt_len, c, r) + _kv_bytes(s, chunk, prompt_len, c)
    if lora_rank:  # the rollout runs the adapters (the reference pass does not: adapters disabled)
        out["prefill"] += _adapter_bytes(s, chunk * prompt_len, lora_rank, grad=False)
    mb = min(micro_batch, prompts_here * G)
    out["reference_pass"] = (_kv_bytes(s, mb, seq, c) + _layer_nograd_bytes(s, mb * response_len, c, c)
                             + 2 * mb * response_len * s["hidden"] * c + _head_chunk_bytes(s, mb * response_len))
    tokens = mb * seq
    boundaries = (s["layers"] + 1) * tokens * s["hidden"] * r  # checkpoint inputs + the final norm's output
    layers = 1 if gradient_checkpointing else s["layers"]
    head_grad = 0 if lora_rank else 4 * s["vocab"] * s["hidden"]  # LoRA: the head is frozen, no weight-gradient
    head = 3 * _head_chunk_bytes(s, mb * response_len) + head_grad + mb * response_len * s["hidden"] * (r + c)
    out["logprob"] = boundaries + layers * _layer_grad_bytes(s, tokens, c, r) + head
    if lora_rank:  # backward still runs through the frozen base to reach the adapters: the same terms, plus theirs
        out["logprob"] += layers * _adapter_bytes(s, tokens, lora_rank, grad=True)
    if gpus > 1:  # FSDP2: the gathered root (+ two layers) in bf16; the root's gradient unsharded, then float32 to reduce
        root = s["vocab"] * s["hidden"] * (1 if s["tied"] else 2)
        out["gathered"] = 2 * (root + 2 * _layer_params(s))
        out["logprob"] += 6 * root
        # the rollout gathers every unit once and keeps it until the rollout ends (distributed.gathered): the whole
        # model in bf16, less what `gathered` already holds
        out["rollout_kv"] += 2 * P - out["gathered"]
    else:
        out["gathered"] = 0
    trained = lora_params(s, lora_rank) if lora_rank else P / gpus
    largest = lora_rank * s["intermediate"] if lora_rank else s["vocab"] * s["hidden"]
    if scheme == "stochastic":  # AdamWSR, a slice at a time
        out["optimizer_step"] = ADAMWSR_SLICE_BYTES[eight_bit] * min(precision.SLICE, largest)
    elif eight_bit:
        out["optimizer_step"] = 0  # bitsandbytes' fused kernel
    elif not foreach:
        out["optimizer_step"] = largest * b["moments"] // 2  # single-tensor AdamW: one denominator
    else:
        out["optimizer_step"] = 4 * trained  # foreach sqrt of the float32 second moments
    out["peak"] = peak(out)
    out["decode_chunk"] = chunk
    return out


def peak(parts: dict) -> float:
    """What is held throughout (STATIC) plus the largest of the phases, which run one at a time (PHASES)."""
    return sum(parts[k] for k in STATIC) + max(parts[k] for k in PHASES)


def auto_chunk(shape: dict, scheme: str, eight_bit: bool, gpus: int, usable_gib: float = USABLE_GIB, **batch) -> int:
    """speed.decode.auto_decode_chunk's choice: prompts whose G rows (their KV cache over prompt + response, rounded
    up to the decode's window of 256 positions, and ~4 float32 vocab-sized logit rows each) fit half the memory
    left free (of `usable_gib`, the card's), split evenly; `batch` may carry plan's lora_rank / qlora."""
    p = plan(shape, scheme, eight_bit, gpus, decode_chunk=1, **batch)
    static = sum(p[k] for k in STATIC if k != "gathered")
    seq = -(-(batch["prompt_len"] + batch["response_len"]) // 256) * 256
    per_prompt = batch["group_size"] * (_kv_bytes(shape, 1, seq, 2) + 16 * shape["vocab"])
    free = max(0.0, usable_gib * GiB - static)
    prompts = math.ceil(batch["prompts"] / gpus)
    fit = max(1, min(prompts, int(0.5 * free // per_prompt)))
    return -(-prompts // -(-prompts // fit))  # even chunks: 16 prompts that fit 15 at a time go as 2 x 8


SCHEMES = (("master", False), ("master+8bit", True), ("stochastic", False), ("stochastic+8bit", True))
# A paper-preset row that does not fit is followed by one at the largest micro-batch of MICRO_BATCHES that does
# (`recommended`), when one does: the update is the same (micro-batches accumulate gradients with an exact
# normaliser, grpo.loss_denominator), only the log-prob pass's activations shrink. E.g. 7B on one GPU with bf16
# weights + stochastic rounding + 8-bit moments at the reduced budget: the states take 62.0 GiB, and the log-prob
# pass of a micro-batch of 8 full-length responses (17.4 GiB) brings the peak to 79.4 GiB, over the 78 usable; a
# micro-batch of 4 (10.1 GiB) gives 72.1, 5.9 GiB for what the plan leaves out (vision activations, fragmentation).


def fit_micro_batch(shape: dict, usable_gib: float, micro_batches=MICRO_BATCHES, scheme: str = "plain",
                    eight_bit: bool = False, gpus: int = 1, **batch) -> tuple[int, dict, bool]:
    """The first micro-batch of `micro_batches` (largest first) whose plan, with auto_chunk's decode chunk for
    `usable_gib`, fits it: (micro_batch, plan, True); if none does, the last one tried with fits False.
    `batch`: PAPER's other settings, and plan's lora_rank / qlora."""
    for mb in micro_batches:
        b = {**batch, "micro_batch": mb}
        p = plan(shape, scheme, eight_bit, gpus, decode_chunk=auto_chunk(shape, scheme, eight_bit, gpus, usable_gib, **b), **b)
        if p["peak"] <= usable_gib * GiB:
            return mb, p, True
    return mb, p, False


def _row(arch: str, scheme: str, gpus: int, micro_batch: int, p: dict, usable: float, **extra) -> dict:
    return dict(arch=arch, scheme=scheme, gpus=gpus, card_gb=round(usable + CONTEXT_GIB), usable_gib=usable,
                micro_batch=micro_batch, **extra, peak_gib=round(p["peak"] / GiB, 1), fits=p["peak"] <= usable * GiB,
                parts_gib={k: round(v / GiB, 2) for k, v in p.items() if k not in ("peak", "decode_chunk")},
                decode_chunk=p["decode_chunk"])


def table(archs=("3b", "7b"), gpu_counts=(1, 2, 4, 8), usable_gib: float = USABLE_GIB, cards=LORA_CARDS,
          lora_rank: int = LORA_RANK, max_pixels: int = DEFAULT_PIXELS) -> list[dict]:
    """Rows (arch, scheme, gpus, card_gb, micro_batch, peak GiB, fits, parts) at the paper preset with the image
    budget `max_pixels` (`paper_batch`; the rows record it); after a row that does not fit, the same at the largest
    smaller micro-batch that fits, if one does (`recommended`: True); then, for each card size in `cards` (GB), LoRA
    and QLoRA rows (scheme 'lora' / 'qlora', adapters of rank `lora_rank`, one GPU) at the largest micro-batch
    of MICRO_BATCHES that fits card_usable_gib(card) (fits False: not even 1)."""
    rows, shapes, paper = [], {arch: shape_of(arch) for arch in archs}, paper_batch(max_pixels)
    for arch, s in shapes.items():
        for name, eight in SCHEMES:
            scheme = name.split("+")[0]
            for g in gpu_counts:
                common = dict(lora_rank=0, max_pixels=max_pixels, implemented=g == 1 or name == "master")
                p = plan(s, scheme, eight, g, decode_chunk=auto_chunk(s, scheme, eight, g, usable_gib, **paper), **paper)
                rows.append(_row(arch, name, g, paper["micro_batch"], p, usable_gib, recommended=False, **common))
                if not rows[-1]["fits"]:
                    smaller = tuple(mb for mb in MICRO_BATCHES if mb < paper["micro_batch"])
                    mb, p, fits = fit_micro_batch(s, usable_gib, smaller, scheme, eight, g,
                                                  **{k: v for k, v in paper.items() if k != "micro_batch"})
                    if fits:
                        rows.append(_row(arch, name, g, mb, p, usable_gib, recommended=True, **common))
    for arch, s in shapes.items():
        for name in ("lora", "qlora"):
            for card in cards:
                batch = {k: v for k, v in paper.items() if k != "micro_batch"}
                mb, p, _ = fit_micro_batch(s, card_usable_gib(card), lora_rank=lora_rank, qlora=name == "qlora", **batch)
                rows.append(_row(arch, name, 1, mb, p, card_usable_gib(card), lora_rank=lora_rank, recommended=False,
                                 implemented=True, max_pixels=max_pixels))
    return rows


def sft_rl_rows(arch: str = "7b", max_pixels: int = DEFAULT_PIXELS) -> list[dict]:
    """The paper's SFT comparison (train.py --preset sft-rl): its SFT (LoRA rank 8, micro-batch 1: one question and
    its ~16-token answer per forward) on one GPU, then its RL (the released script: G = 4, micro-batch 1) on 8 GPUs
    (`master`) or on one (`stochastic` + 8-bit moments). Peak GiB per GPU at the image budget `max_pixels`."""
    s, pl = shape_of(arch), paper_batch(max_pixels)["prompt_len"]
    sft = plan(s, "plain", False, 1, prompts=1, group_size=1, prompt_len=pl, response_len=16, micro_batch=1,
               decode_chunk=1, lora_rank=8)
    rows = [dict(arch=arch, phase="sft (LoRA rank 8)", scheme="plain", gpus=1, peak_gib=round(sft["peak"] / GiB, 1))]
    rl = dict(prompts=16, group_size=4, prompt_len=pl, response_len=2048, micro_batch=1)
    for scheme, eight, gpus in (("master", False, 8), ("stochastic", True, 1)):
        p = plan(s, scheme, eight, gpus, decode_chunk=auto_chunk(s, scheme, eight, gpus, **rl), **rl)
        rows.append(dict(arch=arch, phase="rl (G 4)", scheme=scheme + ("+8bit" if eight else ""), gpus=gpus,
                         peak_gib=round(p["peak"] / GiB, 1)))
    return rows


def print_table(rows: list[dict]) -> None:
    """Human table, then one JSON line with every row."""
    pixels = rows[0]["max_pixels"] if rows else DEFAULT_PIXELS
    print(f"Peak GPU memory per GPU of one GRPO step, paper preset ({paper_batch(pixels)}: image budget {pixels:,} "
          f"pixels), gradient checkpointing, "
          f"{USABLE_GIB:.0f} GiB usable. gpus > 1: weights/grads/optimizer/reference sharded by FSDP2 under "
          "torchrun (train.py runs that for `master`; impl. no: a plan only). mb: micro-batch (* = the largest that fits, "
          "not the paper's).")
    head = (f"{'model':6} {'scheme':16} {'gpus':>4} {'mb':>3} {'static':>7} {'rollout':>8} {'logprob':>8} "
            f"{'opt.step':>8} {'peak GiB':>9} fits")
    print(head + " impl.")
    lora = [r for r in rows if r["lora_rank"]]
    for r in rows:
        if r is (lora or [None])[0]:
            print(f"LoRA (lora.py, train.py --lora-rank {r['lora_rank']}; qlora: + --qlora, the base in NF4) on ONE GPU "
                  f"of `card` GB, {CONTEXT_GIB:.0f} GiB of it kept for the CUDA context: the frozen base in bf16 / NF4, "
                  f"rank-{r['lora_rank']} float32 adapters on q,k,v,o,gate,up,down + their gradients and AdamW moments, "
                  f"no reference copy (adapters disabled); mb: the largest of {MICRO_BATCHES} that fits (fits no: "
                  "none does).")
            print(head.replace(f"{'gpus':>4}", f"{'card':>4}") + " usable")
        p = r["parts_gib"]
        static = sum(p[k] for k in STATIC)
        mb = f"{r['micro_batch']}{'*' if r['recommended'] else ''}"
        last = f"{r['usable_gib']:.0f}" if r["lora_rank"] else ("yes" if r["implemented"] else "no")
        print(f"{r['arch']:6} {r['scheme']:16} {r['card_gb'] if r['lora_rank'] else r['gpus']:>4} {mb:>3} "
              f"{static:7.1f} {p['rollout_kv']:8.1f} {p['logprob']:8.1f} {p['optimizer_step']:8.1f} "
              f"{r['peak_gib']:9.1f} {'yes' if r['fits'] else 'no ':4} {last}")
    print(json.dumps({"memory_plan": rows}))


# ----------------------------------------------------------------------------- the CPU check
