"""Checks the memory plan (scaling/memory.py) on the CPU: real grpo_step's at real widths, peak RSS against `plan`.

    python -m tools.bench --memory-plan --self-check      # 7B widths, 2 layers: ~6 min, ~17 GiB of RAM

`self_check` runs `measure` in a fresh process (`python -m tools.memory_check SHAPE STEPS`), so that the
process's peak RSS is the step's own: a Qwen2 text model with the shape's widths in bf16 (torch AdamW, bf16
moments, a bf16 reference; or LoRA adapters whose reference is the base), full-length responses, and compares
the RSS increase over the pre-model baseline with what `plan` predicts for the same shape and batch.
"""
from __future__ import annotations

import itertools
import json
import resource
import subprocess
import sys
import types
from pathlib import Path

from scaling.memory import GiB, lm_params, peak, plan

SEVEN_B_2L = dict(layers=2, hidden=3584, intermediate=18944, heads=28, kv_heads=4, vocab=152064, tied=False,
                  vision_params=0)
SMALL = dict(layers=2, hidden=1024, intermediate=2816, heads=16, kv_heads=4, vocab=32000, tied=False, vision_params=0)
ROOT = Path(__file__).resolve().parents[1]


def _rss() -> int:
    return int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()


def measure(s: dict, steps: int) -> dict:
    """In this process: build the shape's model, run `steps` grpo_step's, return its RSS figures (bytes)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    import grpo
    import model as M
    from offline import tiny_model
    from scaling import lora
    from transit.metro import Sample

    torch.manual_seed(0)
    tok = tiny_model.build_tokenizer(tiny_model.builtin_corpus())
    base = _rss()
    cfg = Qwen2Config(vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["intermediate"],
                      num_hidden_layers=s["layers"], num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"],
                      tie_word_embeddings=s["tied"], max_position_embeddings=4096)
    net = Qwen2ForCausalLM._from_config(cfg, dtype=torch.bfloat16, attn_implementation="sdpa")
    net.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    policy = M._make_policy(net, tok, None, "cpu", None, None)
    policy.suppress_ids = torch.cat([policy.suppress_ids, torch.tensor([policy.eos_id])])  # full-length responses
    if s["lora_rank"]:  # train.py --lora-rank: adapters on the default targets, the reference = adapters disabled
        lora.add_lora(net, s["lora_rank"], 2.0 * s["lora_rank"])
        ref = net
    else:
        ref = M.reference_model(policy)
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-6, foreach=False)
    q = "Is Alder Station on Line 2 of the metro map, and how many stations lie between Birch Station and Dove Station?"
    samples = [Sample(id=str(i), qtype="torf2", question=q, answer="no", image=None, metro={}) for i in range(s["prompts"])]
    count = itertools.count()
    reward = lambda sample, text: types.SimpleNamespace(total=float(next(count) % 3), format=0.0, correctness=0.0,  # noqa: E731
                                                        detail=0.0)
    gcfg = grpo.GRPOConfig(group_size=s["group_size"], max_new_tokens=s["response_len"], micro_batch_size=s["micro_batch"],
                           kl_coef=1e-3)
    prompt_len = M.encode_prompts(policy, samples)["input_ids"].shape[1]
    built = _rss()
    for _ in range(steps):
        grpo.grpo_step(policy, ref, opt, samples, reward, gcfg, generator=torch.Generator().manual_seed(0))
    top = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return dict(params=sum(p.numel() for n, p in net.named_parameters() if "lora_" not in n), prompt_len=prompt_len,
                base=base, built=built, peak=top)


def self_check(shape: dict = SEVEN_B_2L, prompts: int = 1, group_size: int = 2, response_len: int = 16,
               micro_batch: int = 2, steps: int = 2, verbose: bool = True, lora_rank: int = 0) -> dict:
    """Run `steps` real grpo_step's (bf16 weights, torch AdamW with bf16 moments, bf16 reference) in a
    subprocess; compare its peak RSS over the pre-model baseline with `plan` (2 steps: the second has moments).
    `lora_rank` > 0: LoRA adapters of that rank on the default targets (float32, float32 moments), the reference
    the same model with its adapters disabled, against plan's LoRA terms."""
    s = dict(shape, params=lm_params(shape))
    moments = 8 if lora_rank else 4  # torch AdamW keeps moments in the parameter's dtype: float32 adapters
    need = plan(s, "plain", False, 1, prompts, group_size, 64, response_len, micro_batch, prompts,
                moments_bytes=moments, foreach=False, lora_rank=lora_rank)["peak"]
    if verbose:
        print(f"self-check: {s['params']:,} params, plan says ~{need / GiB:.1f} GiB of RAM (bf16: float32 would "
              f"need ~{s['params'] * 20 / GiB:.0f} GiB), running {steps} grpo_step in a subprocess...", flush=True)
    arg = json.dumps(dict(shape, prompts=prompts, group_size=group_size, response_len=response_len,
                          micro_batch=micro_batch, lora_rank=lora_rank))
    done = subprocess.run([sys.executable, "-m", "tools.memory_check", arg, str(steps)], capture_output=True,
                          text=True, cwd=str(ROOT))
    if done.returncode != 0:
        raise RuntimeError(f"self-check subprocess failed:\n{done.stderr[-3000:]}")
    m = json.loads(done.stdout.strip().splitlines()[-1])
    assert m["params"] == s["params"], (m["params"], s["params"])
    p = plan(s, "plain", False, 1, prompts, group_size, m["prompt_len"], response_len, micro_batch, prompts,
             moments_bytes=moments, foreach=False, lora_rank=lora_rank)
    if lora_rank:  # CPU only: ATen's bf16 linear copies a frozen weight when its input is a strided slice, as
        # transformers' logits_to_keep hands the LM head in the rollout (+2 V H bytes; a trained weight is not copied)
        p["rollout_kv"] += 2 * s["vocab"] * s["hidden"]
        p["peak"] = peak(p)
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


if __name__ == "__main__":
    print(json.dumps(measure(json.loads(sys.argv[1]), int(sys.argv[2]))))
