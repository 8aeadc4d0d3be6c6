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
  logprob   the update's forward/backward of one micro-batch over the full sequence (gradient checkpointing
            drops the prompt cache, so shared_prompt_logprobs falls back to prompt + response): the per-layer
            boundary hidden states [rows, T, hidden] x layers, one layer's recomputed activations, the fused
            head's float32 chunk of logits (x3 in backward) and its float32 [vocab, hidden] weight-gradient;
  optimizer torch's foreach AdamW (CUDA) makes one float32 copy of the second moments (sqrt); bitsandbytes
            8-bit: none; single-tensor AdamW: one float32 denominator of the largest tensor; AdamWSR (the
            `stochastic` scheme): the temporaries of one slice of precision.SLICE elements (it updates each
            tensor a slice at a time), ~20 bytes per element, ~32 with 8-bit moments (`ADAMWSR_SLICE_BYTES`).
Assumptions: flash / memory-efficient attention (no [T, T] scores); the residual stream has the weights'
dtype (float32 under the `master` scheme's autocast), matmul outputs the compute dtype (bf16, float32
for the 'float32' scheme), RMSNorm upcasts to float32; KV cache in the compute dtype (under autocast
the rotary keys may be float32: then the cache is up to 1.5x this); the vision encoder's activations and
the CUDA context / allocator fragmentation (~1-3 GiB) are left out; with gpus > 1 the prompts are split
evenly over the GPUs. `peak` = static + max(phases) is an upper bound: in the rollout the gradients are
already freed (zero_grad(set_to_none=True)).

`self_check` builds a Qwen2 text model with real widths, runs real grpo_step's in a subprocess and compares
the peak RSS increase over the pre-model baseline with `plan` for the same shape and batch.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys

import precision

GiB = 2**30
USABLE_GIB = 78.0  # of an 80 GB GPU
PAPER = dict(prompts=16, group_size=8, prompt_len=1300, response_len=2048, micro_batch=8)
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


def shape_of(arch: str) -> dict:
    """The shape dict of Qwen2.5-VL-3B / 7B (bench.QWEN25_VL, parameters counted on the meta device)."""
    import bench

    a, c = bench.QWEN25_VL[arch], bench.count_shape_params(arch)
    return dict(layers=a["num_hidden_layers"], hidden=a["hidden_size"], intermediate=a["intermediate_size"],
                heads=a["num_attention_heads"], kv_heads=a["num_key_value_heads"], vocab=a["vocab_size"],
                tied=a["tie_word_embeddings"], vision_params=c["vision_params"], params=c["params"])


def _layer_grad_bytes(s: dict, tokens: int, c: int, r: int) -> int:
    """Activations one decoder layer keeps for backward (+ its backward temporaries), `tokens` tokens."""
    h, i, kv = s["hidden"], s["intermediate"], s["kv_heads"] * s["hidden"] // s["heads"]
    norms = 2 * (8 * h + r * h + c * h)  # float32 upcast + normalised copy, input, bf16 cast for the linear
    attn = c * (5 * h + 4 * kv)  # q k v, rotary outputs, attention output, o_proj input
    mlp = 4 * c * i + 2 * c * i  # gate, up, act, act*up; backward grads of two of them
    return tokens * (norms + attn + mlp + 2 * r * h)  # + the incoming / outgoing hidden gradient


def _layer_nograd_bytes(s: dict, tokens: int, c: int, r: int) -> int:
    """Transient memory of one decoder layer's no-grad forward over `tokens` tokens."""
    return tokens * (3 * c * s["intermediate"] + (8 + 2 * r) * s["hidden"])


def _kv_bytes(s: dict, rows: int, seq: int, c: int) -> int:
    """KV cache: 2 x layers x kv heads x head dim x seq x rows x bytes."""
    return 2 * s["layers"] * s["kv_heads"] * (s["hidden"] // s["heads"]) * seq * rows * c


def _head_chunk_bytes(s: dict, rows: int) -> int:
    """One chunk of the fused head's float32 logits over `rows` rows (model._rows_per_chunk: ~256 MB at most)."""
    return min(rows, max(1, (1 << 26) // s["vocab"])) * s["vocab"] * 4


def plan(shape: dict, scheme: str, eight_bit: bool, gpus: int, prompts: int, group_size: int, prompt_len: int,
         response_len: int, micro_batch: int, decode_chunk: int, gradient_checkpointing: bool = True,
         moments_bytes: int | None = None, foreach: bool = True) -> dict:
    """Bytes per GPU of each part of one GRPO step and the `peak` (module docstring)."""
    s, P, G = shape, shape["params"], group_size
    b = precision.bytes_per_param(scheme, eight_bit)
    if moments_bytes is not None:  # e.g. torch AdamW on bf16 weights keeps bf16 moments: 4
        b["moments"] = moments_bytes
    c = 4 if scheme == "float32" else 2  # compute (matmul output) dtype
    r = b["weights"]  # residual stream dtype = weights dtype
    out = {k: P * b[v] / gpus for k, v in (("weights", "weights"), ("gradients", "grads"),
                                           ("optimizer", "moments"), ("reference", "reference"))}
    prompts_here = math.ceil(prompts / gpus)
    chunk = min(decode_chunk, prompts_here)
    rows, seq = chunk * G, prompt_len + response_len
    out["rollout_kv"] = _kv_bytes(s, rows, seq, c) + _kv_bytes(s, chunk, prompt_len, c) + 5 * rows * s["vocab"] * 4
    out["prefill"] = _layer_nograd_bytes(s, chunk * prompt_len, c, r) + _kv_bytes(s, chunk, prompt_len, c)
    mb = min(micro_batch, prompts_here * G)
    out["reference_pass"] = (_kv_bytes(s, mb, seq, c) + _layer_nograd_bytes(s, mb * response_len, c, c)
                             + 2 * mb * response_len * s["hidden"] * c + _head_chunk_bytes(s, mb * response_len))
    tokens = mb * seq
    boundaries = (s["layers"] + 1) * tokens * s["hidden"] * r  # checkpoint inputs + the final norm's output
    layers = 1 if gradient_checkpointing else s["layers"]
    head = 3 * _head_chunk_bytes(s, mb * response_len) + 4 * s["vocab"] * s["hidden"] + mb * response_len * s["hidden"] * (r + c)
    out["logprob"] = boundaries + layers * _layer_grad_bytes(s, tokens, c, r) + head
    if gpus > 1:  # FSDP2: the gathered root (+ two layers) in bf16; the root's gradient unsharded, then float32 to reduce
        root = s["vocab"] * s["hidden"] * (1 if s["tied"] else 2)
        out["gathered"] = 2 * (root + 2 * _layer_params(s))
        out["logprob"] += 6 * root
    else:
        out["gathered"] = 0
    largest = s["vocab"] * s["hidden"]
    if scheme == "stochastic":  # AdamWSR, a slice at a time
        out["optimizer_step"] = ADAMWSR_SLICE_BYTES[eight_bit] * min(precision.SLICE, largest)
    elif eight_bit:
        out["optimizer_step"] = 0  # bitsandbytes' fused kernel
    elif not foreach:
        out["optimizer_step"] = largest * b["moments"] // 2  # single-tensor AdamW: one denominator
    else:
        out["optimizer_step"] = 4 * P / gpus  # foreach sqrt of the float32 second moments
    phases = ("rollout_kv", "prefill", "reference_pass", "logprob", "optimizer_step")
    out["peak"] = sum(out[k] for k in ("weights", "gradients", "optimizer", "reference", "gathered")) + max(out[k] for k in phases)
    out["decode_chunk"] = chunk
    return out


def auto_chunk(shape: dict, scheme: str, eight_bit: bool, gpus: int, usable_gib: float = USABLE_GIB, **batch) -> int:
    """grpo.auto_decode_chunk's choice: prompts whose expanded KV cache fits half the memory left free."""
    p = plan(shape, scheme, eight_bit, gpus, decode_chunk=1, **batch)
    static = sum(p[k] for k in ("weights", "gradients", "optimizer", "reference"))
    per_prompt = _kv_bytes(shape, batch["group_size"], batch["prompt_len"] + batch["response_len"], 2)
    free = max(0.0, usable_gib * GiB - static)
    return max(1, min(math.ceil(batch["prompts"] / gpus), int(0.5 * free // per_prompt)))


SCHEMES = (("master", False), ("master+8bit", True), ("stochastic", False), ("stochastic+8bit", True))
# Settings that depart from PAPER to make a row fit, each printed as an extra row under the paper-preset one.
# 7B, bf16 weights + stochastic rounding + 8-bit moments (train.py --bf16-update stochastic --eight-bit-adam),
# one GPU: the states take 62.0 GiB, and the log-prob pass of a micro-batch of 8 full-length responses
# (17.4 GiB) would bring the peak to 79.4 GiB, over the 78 usable; a micro-batch of 4 (10.1 GiB) gives 72.1,
# 5.9 GiB for what the plan leaves out (vision encoder activations, allocator fragmentation). The update is
# the same: the micro-batches accumulate gradients with an exact normaliser (grpo.ppo_loss's `denom`).
RECOMMENDED = {("7b", "stochastic+8bit", 1): dict(micro_batch=4)}


def table(archs=("3b", "7b"), gpu_counts=(1, 2, 4, 8), usable_gib: float = USABLE_GIB) -> list[dict]:
    """Rows (arch, scheme, gpus, micro_batch, peak GiB, fits, parts) at the paper preset, plus a row for
    each RECOMMENDED departure from it (`recommended`: True)."""
    rows = []
    for arch in archs:
        s = shape_of(arch)
        for name, eight in SCHEMES:
            scheme = name.split("+")[0]
            for g in gpu_counts:
                extra = RECOMMENDED.get((arch, name, g))
                for batch in [PAPER] + ([{**PAPER, **extra}] if extra else []):
                    chunk = auto_chunk(s, scheme, eight, g, usable_gib, **batch)
                    p = plan(s, scheme, eight, g, decode_chunk=chunk, **batch)
                    rows.append(dict(arch=arch, scheme=name, gpus=g, micro_batch=batch["micro_batch"],
                                     recommended=batch is not PAPER, peak_gib=round(p["peak"] / GiB, 1),
                                     fits=p["peak"] <= usable_gib * GiB, implemented=g == 1 or name == "master",
                                     parts_gib={k: round(v / GiB, 2) for k, v in p.items() if k not in ("peak", "decode_chunk")},
                                     decode_chunk=p["decode_chunk"]))
    return rows


def print_table(rows: list[dict]) -> None:
    """Human table, then one JSON line with every row."""
    print(f"Peak GPU memory per GPU of one GRPO step, paper preset ({PAPER}), gradient checkpointing, "
          f"{USABLE_GIB:.0f} GiB usable. gpus > 1: weights/grads/optimizer/reference sharded by FSDP2 under "
          "torchrun (train.py runs that for `master`; impl. no: a plan only). mb: micro-batch (* = RECOMMENDED, "
          "not the paper's).")
    print(f"{'model':6} {'scheme':16} {'gpus':>4} {'mb':>3} {'static':>7} {'rollout':>8} {'logprob':>8} "
          f"{'opt.step':>8} {'peak GiB':>9} fits impl.")
    for r in rows:
        p = r["parts_gib"]
        static = p["weights"] + p["gradients"] + p["optimizer"] + p["reference"] + p["gathered"]
        mb = f"{r['micro_batch']}{'*' if r['recommended'] else ''}"
        print(f"{r['arch']:6} {r['scheme']:16} {r['gpus']:>4} {mb:>3} {static:7.1f} {p['rollout_kv']:8.1f} "
              f"{p['logprob']:8.1f} {p['optimizer_step']:8.1f} {r['peak_gib']:9.1f} {'yes' if r['fits'] else 'no ':4} "
              f"{'yes' if r['implemented'] else 'no'}")
    print(json.dumps({"memory_plan": rows}))


# ----------------------------------------------------------------------------- the CPU check

SEVEN_B_2L = dict(layers=2, hidden=3584, intermediate=18944, heads=28, kv_heads=4, vocab=152064, tied=False,
                  vision_params=0)
SMALL = dict(layers=2, hidden=1024, intermediate=2816, heads=16, kv_heads=4, vocab=32000, tied=False, vision_params=0)

_MEASURE = r"""
import itertools, json, resource, sys, types
import torch
import grpo, model as M
from metro import Sample
from transformers import Qwen2Config, Qwen2ForCausalLM
s, steps = json.loads(sys.argv[1]), int(sys.argv[2])
torch.manual_seed(0)
tok = M.build_tokenizer(M.builtin_corpus())
rss = lambda: int(open('/proc/self/statm').read().split()[1]) * resource.getpagesize()
base = rss()
cfg = Qwen2Config(vocab_size=s['vocab'], hidden_size=s['hidden'], intermediate_size=s['intermediate'],
                  num_hidden_layers=s['layers'], num_attention_heads=s['heads'], num_key_value_heads=s['kv_heads'],
                  tie_word_embeddings=s['tied'], max_position_embeddings=4096)
net = Qwen2ForCausalLM._from_config(cfg, dtype=torch.bfloat16, attn_implementation='sdpa')
net.gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False})
policy = M._make_policy(net, tok, None, 'cpu', None, None)
policy.suppress_ids = torch.cat([policy.suppress_ids, torch.tensor([policy.eos_id])])  # full-length responses
ref = M.reference_model(policy)
opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-6, foreach=False)
q = 'Is Alder Station on Line 2 of the metro map, and how many stations lie between Birch Station and Dove Station?'
samples = [Sample(id=str(i), qtype='torf2', question=q, answer='no', image=None, metro={}) for i in range(s['prompts'])]
count = itertools.count()
reward = lambda sample, text: types.SimpleNamespace(total=float(next(count) % 3), format=0.0, correctness=0.0, detail=0.0)
gcfg = grpo.GRPOConfig(group_size=s['group_size'], max_new_tokens=s['response_len'], micro_batch_size=s['micro_batch'],
                       kl_coef=1e-3)
prompt_len = M.encode_prompts(policy, samples)['input_ids'].shape[1]
built = rss()
for _ in range(steps):
    grpo.grpo_step(policy, ref, opt, samples, reward, gcfg, generator=torch.Generator().manual_seed(0))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps(dict(params=sum(p.numel() for p in net.parameters()), prompt_len=prompt_len,
                      base=base, built=built, peak=peak)))
"""


def self_check(shape: dict = SEVEN_B_2L, prompts: int = 1, group_size: int = 2, response_len: int = 16,
               micro_batch: int = 2, steps: int = 2, verbose: bool = True) -> dict:
    """Run `steps` real grpo_step's (bf16 weights, torch AdamW with bf16 moments, bf16 reference) in a
    subprocess; compare its peak RSS over the pre-model baseline with `plan` (2 steps: the second has moments)."""
    s = dict(shape, params=lm_params(shape))
    need = plan(s, "plain", False, 1, prompts, group_size, 64, response_len, micro_batch, prompts,
                moments_bytes=4, foreach=False)["peak"]
    if verbose:
        print(f"self-check: {s['params']:,} params, plan says ~{need / GiB:.1f} GiB of RAM (bf16: float32 would "
              f"need ~{s['params'] * 20 / GiB:.0f} GiB), running {steps} grpo_step in a subprocess...", flush=True)
    arg = json.dumps(dict(shape, prompts=prompts, group_size=group_size, response_len=response_len,
                          micro_batch=micro_batch))
    done = subprocess.run([sys.executable, "-c", _MEASURE, arg, str(steps)], capture_output=True, text=True,
                          cwd=str(__import__("pathlib").Path(__file__).parent))
    if done.returncode != 0:
        raise RuntimeError(f"self-check subprocess failed:\n{done.stderr[-3000:]}")
    m = json.loads(done.stdout.strip().splitlines()[-1])
    assert m["params"] == s["params"], (m["params"], s["params"])
    p = plan(s, "plain", False, 1, prompts, group_size, m["prompt_len"], response_len, micro_batch, prompts,
             moments_bytes=4, foreach=False)
    measured = m["peak"] - m["base"]
    out = dict(params=s["params"], prompt_len=m["prompt_len"], predicted_gib=p["peak"] / GiB,
               measured_gib=measured / GiB, ratio=p["peak"] / measured,
               built_gib=(m["built"] - m["base"]) / GiB, predicted_built_gib=(p["weights"] + p["reference"]) / GiB,
               parts_gib={k: round(v / GiB, 3) for k, v in p.items() if k != "decode_chunk"})
    out["agree"] = abs(out["ratio"] - 1) <= 0.2
    if verbose:
        print(f"predicted {out['predicted_gib']:.2f} GiB vs measured {out['measured_gib']:.2f} GiB peak "
              f"(ratio {out['ratio']:.3f}; weights+reference after build: predicted {out['predicted_built_gib']:.2f}"
              f", measured {out['built_gib']:.2f}) -> {'AGREE' if out['agree'] else 'DISAGREE'} within 20%")
        print(json.dumps({"self_check": out}))
    return out
