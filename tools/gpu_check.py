"""`python -m tools.bench --gpu-check`: the whole CUDA path in one command, in under 8 minutes on one H100.

    python -m tools.bench --gpu-check                    # one GPU; writes gpu_check.json, prints a table
    python -m tools.bench --gpu-check --dry-run          # the same checks on the CPU with tiny shapes (< 1 min)

Nothing is downloaded: every model has Qwen2.5-VL-3B's or -7B's published architecture (scaling/shapes.py) with
random weights, and the project's small tokenizer; the prompts ask about a rendered synthetic map at the paper's
image budget (1,280 x 28 x 28 pixels). The checks, in order (`CHECKS`), each timed, each failing on its own:

  environment     torch, CUDA, the GPU, flash-attn / bitsandbytes present, the allocator setting
  decode_exact    2 layers at 3B's widths in float32: the fast decode, eager and compiled (inductor; inductor with
                  CUDA graphs), gives the plain no-cache decode's greedy tokens (speed.decode.plain_decode); sampled
                  ones compared too
  decode_speed    3B, bf16: the rollout's decode eager, inductor and with CUDA graphs against transformers'
                  generate: tokens/s, host syncs per token (HostSyncs, and torch.cuda's sync debug mode), the HBM
                  bandwidth bound
  step_3b         two grpo_steps at 3B: float32 master weights, bf16 autocast, gradient checkpointing, 8-bit
                  moments; finite, the decode chunk of step 2 = step 1's, peak memory against memory.plan
  step_7b         the paper's one-GPU recipe at 7B: bf16 weights, stochastic rounding, 8-bit moments,
                  micro-batch 4; the same verdicts
  vision_attention the 7B vision tower on one map: flash-attention 2 against SDPA (needs flash-attn)
  eval            eval.generate (greedy, batched) on 3B
  qlora_3b        3B saved and reloaded as train.py --qlora loads it (4-bit NF4 base), rank-64 adapters, two
                  steps (needs bitsandbytes)
A check that does not fit the time left is skipped and says so. `--dry-run` runs the same functions on the CPU
with tiny widths (2 layers, 64 wide, the published vocabularies), dynamo's eager backend for the compiled step,
and no memory verdict; it checks the script, not the GPU. Results: one JSON file and a table.
"""
from __future__ import annotations

import dataclasses
import gc
import json
import platform
import time
import traceback
import warnings
from pathlib import Path

import torch

BUDGET_S = 480
"""The whole check's time on one H100 (the estimates in CHECKS are guesses by reading until a GPU has run it)."""
TINY = dict(text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, mrope_section=[2, 3, 3]),
            vision=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2))
"""--dry-run's shape overrides (scaling/shapes.shape_config): the architecture and vocabulary kept, widths tiny."""


@dataclasses.dataclass
class Run:
    """What every check reads: device, dry run or not, the sizes, where maps are drawn."""

    device: torch.device
    dry: bool
    cache: Path
    prompts: int = 8  # decode_speed's prompts (G = 8 each)
    new_tokens: int = 128
    step_prompts: int = 4
    max_pixels: int = 1280 * 28 * 28

    @property
    def compiles(self) -> tuple[str, ...]:
        """The compiled decode modes checked: dynamo's eager backend in a dry run (the capture, no code generated)."""
        return ("eager",) if self.dry else ("inductor", "cudagraphs")

    def policy(self, arch: str, dtype: torch.dtype, **text):
        """A random-init policy of `arch`'s shape (tiny widths in a dry run), end-of-turn suppressed."""
        from tools import workloads as bench

        shape = dict(TINY["text"], **text) if self.dry else text
        policy = bench.shape_policy(arch, self.device, dtype, self.max_pixels, TINY["vision"] if self.dry else None,
                                    **shape)
        return bench.force_full_length(policy)

    def samples(self, n: int):
        from tools import workloads as bench

        return bench.bench_samples(n, True, self.cache / "bench-maps")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fresh_compiles() -> None:
    """Forget the compiled decode steps: each model, and each compile mode, gets its own compiles (dynamo counts
    recompiles of one function against a limit of 8, then runs it uncompiled)."""
    from speed import decode

    torch._dynamo.reset()
    decode._COMPILED.clear()


def peak_gib(run: Run) -> float | None:
    return torch.cuda.max_memory_allocated(run.device) / 2**30 if run.device.type == "cuda" else None


# ----------------------------------------------------------------------------- the checks

def environment(run: Run) -> dict:
    """Versions and what is installed: the facts every other figure depends on."""
    import os

    import transformers

    out = {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
           "cuda": torch.version.cuda, "device": str(run.device),
           "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF") or os.environ.get("PYTORCH_ALLOC_CONF")}
    for package in ("flash_attn", "bitsandbytes"):
        try:
            out[package] = __import__(package).__version__
        except ImportError:
            out[package] = None
    if run.device.type == "cuda":
        props = torch.cuda.get_device_properties(run.device)
        out.update(gpu=props.name, memory_gib=props.total_memory / 2**30, capability=f"{props.major}.{props.minor}")
    return {"ok": True, **out}


def decode_exact(run: Run) -> dict:
    """The fast decode (eager, then compiled) against the plain decode, float32, 2 layers at 3B's widths: greedy
    tokens must be the same; sampled ones are compared too (a random model's next-token distribution is nearly
    flat over 152k tokens, so float rounding between kernels may move an inverse-CDF pick on a GPU: the share of
    rows that agree is reported, and the log-prob gap over the positions before each row's first difference)."""
    from speed import decode

    policy = run.policy("3b", torch.float32, num_hidden_layers=2)  # (TF32 matmuls are off by default)
    samples = run.samples(2)
    out = {"ok": True}
    for temperature in (0.0, 1.0):
        go = lambda **k: decode.sample_groups(policy, samples, 4 if temperature else 1, 6 if run.dry else 48,  # noqa: E731
                                              temperature, generator=torch.Generator(run.device).manual_seed(0), **k)
        plain = go(plain=True)
        for mode in ("off", *run.compiles):
            fresh_compiles()
            fast = go(compile=mode)
            same = (fast.response_ids == plain.response_ids).cumprod(1).bool() & plain.response_mask.bool()
            key = f"{'greedy' if temperature == 0 else 'sampled'}_{mode}"
            out[f"{key}_rows_same"] = float(torch.equal(fast.response_ids, plain.response_ids)) if temperature == 0 \
                else float((fast.response_ids == plain.response_ids).all(1).float().mean())
            out[f"{key}_max_logprob_gap"] = float((fast.logprobs - plain.logprobs)[same].abs().max()) if same.any() else 0.0
            out["ok"] &= out[f"{key}_max_logprob_gap"] < 1e-3 and (temperature > 0 or out[f"{key}_rows_same"] == 1.0)
    return out


def decode_speed(run: Run) -> dict:
    """3B in bf16: the rollout's decode (eager, compiled) against generate; syncs; the bandwidth bound."""
    from tools import decode_bench

    policy = run.policy("3b", torch.bfloat16)
    samples = run.samples(1 if run.dry else run.prompts)
    tokens = 32 if run.dry else run.new_tokens
    out = {"ok": True}
    for mode in ("off", *run.compiles):  # generate and the sync counts measured once, with the eager step
        fresh_compiles()
        t0 = time.perf_counter()
        out[mode] = decode_bench.measure(policy, samples, new_tokens=tokens, steps=1 if run.dry else 2, compile=mode,
                                         baseline=out.get("off"))
        out[mode]["seconds_with_warmup"] = time.perf_counter() - t0
    out["compiled"] = max(run.compiles, key=lambda mode: out[mode]["tokens_per_s"])
    best = out[out["compiled"]]
    out["goal_2x_generate"] = best["speedup_vs_generate"] >= 2
    out["goal_sync_every_16"] = out["off"]["host_syncs_per_token"] <= 1 / 16
    if run.device.type == "cuda":
        out["cuda_syncs_per_token"] = cuda_syncs_per_token(policy, samples, tokens)
        # a token step reads every decoder weight and the LM head once (the input embedding only by row)
        embedding = policy.model.get_input_embeddings().weight
        weights = sum(p.numel() * p.element_size() for p in policy.model.model.language_model.parameters()
                      if p is not embedding)
        head = policy.model.get_output_embeddings().weight
        bound = best["rows"] * 3350e9 / (weights + head.numel() * head.element_size())  # H100 SXM; KV reads ignored
        out.update(bandwidth_bound_tokens_per_s=bound, frac_of_bound=best["tokens_per_s"] / bound)
    return out


def cuda_syncs_per_token(policy, samples, tokens: int) -> float:
    """torch.cuda's own count (sync debug mode warnings) per token: at the budget less at half of it, over the
    difference, as decode_bench counts HostSyncs."""
    from speed import decode

    fresh_compiles()
    go = lambda n: decode.sample_groups(policy, samples, 8, n, generator=torch.Generator(policy.device).manual_seed(0))  # noqa: E731
    go(tokens)  # compiles (the default mode) before anything is counted
    counts = []
    for n in (tokens, tokens // 2):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                go(n)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        counts.append(sum("synchroniz" in str(w.message) for w in seen))
    return (counts[0] - counts[1]) / (tokens - tokens // 2)


def grpo_steps(run: Run, policy, arch: str, scheme: str, eight_bit: bool, micro_batch: int, prompts: int,
               lora_rank: int = 0, qlora: bool = False) -> dict:
    """Two grpo_steps of `policy` (of shape `arch`, trained under `scheme`: memory.plan's name): finite, the same
    decode chunk both steps (the allocator's cache counted as free), peak memory against memory.plan (CUDA)."""
    import grpo
    import model as M
    import rewards
    from scaling import lora, memory, precision
    from speed import decode

    policy.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if lora_rank:
        lora.add_lora(policy.model, lora_rank, 2 * lora_rank)
    reference = policy.model if lora_rank else M.reference_model(policy)
    optimizer = precision.make_optimizer(policy.model, 1e-6, 1e-2, eight_bit=eight_bit and not lora_rank,
                                         stochastic_rounding=scheme == "stochastic")
    tokens = 8 if run.dry else run.new_tokens
    cfg = grpo.GRPOConfig(group_size=8, max_new_tokens=tokens, kl_coef=1e-3, micro_batch_size=micro_batch,
                          compile_decode="auto" if not run.dry else run.compiles[0])
    samples, chunks, steps = run.samples(prompts), [], []
    real = decode.auto_decode_chunk
    decode.auto_decode_chunk = lambda *a, **k: chunks.append(real(*a, **k)) or chunks[-1]
    try:
        if run.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(run.device)
        for _ in range(2):
            sync(run.device)
            t0 = time.perf_counter()
            metrics, _ = grpo.grpo_step(policy, reference, optimizer, samples, rewards.reward, cfg,
                                        torch.Generator(run.device).manual_seed(0))
            sync(run.device)
            steps.append({"seconds": time.perf_counter() - t0, **{k: metrics[k] for k in (
                "loss", "grad_norm", "time/rollout", "time/logprobs", "time/update", "skipped_nonfinite")}})
    finally:
        decode.auto_decode_chunk = real
    out = {"steps": steps, "decode_chunks": chunks, "peak_gib": peak_gib(run)}
    out["ok"] = all(s["skipped_nonfinite"] == 0 for s in steps) and len(set(chunks)) <= 1
    if run.device.type == "cuda":
        prompt_len = int(M.encode_prompts(policy, samples)["attention_mask"].sum(1).max())
        p = memory.plan(memory.shape_of(arch), scheme, eight_bit, 1, prompts, 8, prompt_len, tokens, micro_batch,
                        chunks[0] if chunks else prompts, lora_rank=lora_rank, qlora=qlora)
        out["plan_gib"] = p["peak"] / 2**30
        out["ok"] &= out["peak_gib"] <= 1.15 * out["plan_gib"] + 1.0  # the plan leaves out the vision tower's share
    return out


def has(package: str) -> bool:
    try:
        __import__(package)
        return True
    except ImportError:
        return False


def step_3b(run: Run) -> dict:
    """3B: float32 master weights under bf16 autocast, 8-bit moments (bitsandbytes; float32 ones without it)."""
    policy = run.policy("3b", torch.float32)
    policy.model.autocast_dtype = torch.bfloat16  # what model.load_policy sets for master weights
    eight_bit = has("bitsandbytes") and run.device.type == "cuda"
    return grpo_steps(run, policy, "3b", "master", eight_bit, micro_batch=8, prompts=2 if run.dry else run.step_prompts)


def step_7b(run: Run) -> dict:
    """7B, the paper's one-GPU recipe: bf16 weights, stochastic rounding, 8-bit moments (AdamWSR), micro-batch 4."""
    return grpo_steps(run, run.policy("7b", torch.bfloat16), "7b", "stochastic", True, micro_batch=4, prompts=2)


def qlora_3b(run: Run) -> dict:
    """QLoRA as train.py --qlora loads it: a random-init 3B saved to disk, reloaded with its linear layers in 4-bit
    NF4 (bitsandbytes), rank-64 adapters; two steps. Needs bitsandbytes and a GPU."""
    import tempfile

    import model as M

    if not has("bitsandbytes") or run.device.type != "cuda":
        return {"ok": None, "skipped": "needs bitsandbytes and CUDA"}
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as folder:
        M.save_policy(run.policy("3b", torch.bfloat16), folder)
        gc.collect()
        torch.cuda.empty_cache()
        from tools import workloads as bench

        policy = bench.force_full_length(M.load_policy(folder, dtype=torch.bfloat16, qlora=True))
    return grpo_steps(run, policy, "3b", "plain", False, micro_batch=8, prompts=run.step_prompts, lora_rank=64,
                      qlora=True)


def vision_attention(run: Run) -> dict:
    """The 7B vision tower on one map, flash-attention 2 against SDPA: the same features, and each one's time."""
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return {"ok": None, "skipped": "flash-attn is not installed"}
    import model as M

    policy = run.policy("7b", torch.bfloat16, num_hidden_layers=1)  # the vision tower is what is timed
    enc = M.encode_prompts(policy, run.samples(1))
    vision, out, feats = policy.model.model.visual, {}, {}
    for impl in ("flash_attention_2", "sdpa"):
        vision.config._attn_implementation = impl
        with torch.no_grad():
            for _ in range(2):  # warm-up, then timed
                sync(run.device)
                t0 = time.perf_counter()
                got = policy.model.get_image_features(enc["pixel_values"], enc["image_grid_thw"])
                sync(run.device)
        feats[impl] = torch.cat(list(got.pooler_output if hasattr(got, "pooler_output") else got)).float()
        out[f"{impl}_s"] = time.perf_counter() - t0
    out["max_abs_gap"] = float((feats["flash_attention_2"] - feats["sdpa"]).abs().max())
    out["ok"] = out["max_abs_gap"] < 0.1 * float(feats["sdpa"].abs().max())
    return out


def eval_generate(run: Run) -> dict:
    """eval.generate: greedy, batched, one response per question, on 3B."""
    import eval as evaluation

    policy = run.policy("3b", torch.bfloat16)
    samples = run.samples(4 if run.dry else 16)
    sync(run.device)
    t0 = time.perf_counter()
    texts, cut = evaluation.generate(policy, samples, 8 if run.dry else 64, batch_size=16, progress=False)
    sync(run.device)
    return {"ok": len(texts) == len(samples) and all(cut), "seconds": time.perf_counter() - t0, "responses": len(texts)}


CHECKS = [("environment", environment, 1), ("decode_exact", decode_exact, 60), ("decode_speed", decode_speed, 150),
          ("step_3b", step_3b, 60), ("step_7b", step_7b, 90), ("vision_attention", vision_attention, 20),
          ("eval", eval_generate, 20), ("qlora_3b", qlora_3b, 70)]
"""(name, function, estimated seconds on one H100: a guess by reading until a GPU has run this)."""


# ----------------------------------------------------------------------------- running them

def run_checks(dry: bool = False, out: str = "gpu_check.json", cache_dir: str = ".cache", budget_s: float = BUDGET_S,
               only: tuple[str, ...] = ()) -> dict:
    """Run CHECKS (or `only` those) in order within `budget_s`; write `out` (JSON) and print a table."""
    device = torch.device("cpu" if dry else "cuda")
    if not dry and not torch.cuda.is_available():
        raise ValueError("--gpu-check needs a CUDA GPU (--dry-run runs the same checks on the CPU with tiny shapes)")
    run = Run(device, dry, Path(cache_dir))
    start, results = time.perf_counter(), {}
    for name, fn, estimate in CHECKS:
        if only and name not in only:
            continue
        left = budget_s - (time.perf_counter() - start)
        if not dry and estimate > left:
            results[name] = {"ok": None, "skipped": f"out of time ({left:.0f} s left, ~{estimate} s needed)"}
            continue
        t0 = time.perf_counter()
        try:
            results[name] = fn(run)
        except Exception as e:  # noqa: BLE001  (a failing check is a result; the others still run)
            results[name] = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
        results[name]["seconds"] = time.perf_counter() - t0
        fresh_compiles()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    report = {"dry_run": dry, "total_s": time.perf_counter() - start, "budget_s": budget_s, "checks": results}
    Path(out).write_text(json.dumps(report, indent=2, default=str) + "\n")
    print_table(report)
    print(f"wrote {out}")
    return report


def print_table(report: dict) -> None:
    """One line per check: verdict, seconds, its headline figure."""
    mark = {True: "ok", False: "FAIL", None: "skip"}
    print(f"{'check':18s}{'result':>7s}{'s':>8s}  notes")
    for name, r in report["checks"].items():
        print(f"{name:18s}{mark[r.get('ok')]:>7s}{r.get('seconds', 0):8.1f}  {headline(r)}")
    print(f"total {report['total_s']:.0f} s of {report['budget_s']} s{' (dry run: CPU, tiny shapes)' if report['dry_run'] else ''}")


def headline(r: dict) -> str:
    if "error" in r or "skipped" in r:
        return r.get("error") or r["skipped"]
    if "compiled" in r:  # decode_speed
        eager, compiled = r["off"], r[r["compiled"]]
        return (f"eager {eager['tokens_per_s']:.0f} tok/s ({eager['speedup_vs_generate']:.2f}x generate), "
                f"{r['compiled']} {compiled['tokens_per_s']:.0f} ({compiled['speedup_vs_generate']:.2f}x), "
                f"{eager['host_syncs_per_token']:.4f} syncs/token")
    if "steps" in r:
        s = r["steps"][-1]
        plan = f", plan {r['plan_gib']:.1f} GiB" if "plan_gib" in r else ""
        peak = f", peak {r['peak_gib']:.1f} GiB" if r.get("peak_gib") is not None else ""
        return f"step {s['seconds']:.1f} s (rollout {s['time/rollout']:.1f}), chunks {r['decode_chunks']}{peak}{plan}"
    return ", ".join(f"{k}={v}" for k, v in r.items() if k not in ("ok", "seconds") and not isinstance(v, (dict, list)))[:120]
