"""`python -m tools.bench --decode`: the rollout's decode against transformers' `generate`, and its host syncs.

    python -m tools.bench --decode                 # the tiny Qwen2.5-VL, and 2 layers at Qwen2.5-VL-3B's widths
    python -m tools.bench --decode --compile-decode eager    # the step under torch.compile (any backend)

For each model (`MODELS`: prompts, on one rendered map, x G = 8 responses x new tokens), end-of-turn suppressed
so that both sides decode exactly that many tokens per row, temperature 1, the same special tokens suppressed:
- `tokens_per_s`: response tokens per second of `speed.decode.sample_groups`, as a GRPO step calls it (the
  prompts encoded, their images cached; prefill; decode; texts);
- `generate_tokens_per_s`: `model.generate(do_sample=True, num_return_sequences=G)` on the same encoded prompts;
- `speedup_vs_generate`: the median of their ratio over calls timed in turns (ours, generate, ours, ...: on a
  shared machine a change of load hits both sides alike) (goal: >= 2);
- `host_syncs_per_token`: host syncs (`HostSyncs`) per token step: those of one `sample_groups` call at the full
  token budget less those at half of it, over the difference (goal: <= 1/16: the decode loop asks "all rows
  done?" once every 16 tokens, as on CUDA, also when this runs on a CPU, and syncs nowhere else); `host_syncs_per_rollout`: the rest, once per call
  (tokenizing, mrope positions, the vision tower, the prefill, the texts); the same two for generate.
Median over --steps timed calls after one warm-up (which also compiles, with --compile-decode). Prints one line
per model and one JSON line.
"""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

SYNC_METHODS = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "argwhere",
                "masked_select", "unique", "unique_consecutive", "numpy", "equal", "allclose"}
"""Tensor functions that wait for a device's result on the host: values read as Python numbers, and outputs whose
size depends on the values (nonzero, masked_select, unique)."""


class HostSyncs(TorchFunctionMode):
    """Counts host syncs in the block (`.count`): calls of `SYNC_METHODS`, indexing with a boolean tensor, and a
    `repeat_interleave` whose output size is not given. It sees what Python calls, on any device (a CUDA run can
    cross-check with `torch.cuda.set_sync_debug_mode`); what runs inside a compiled graph has no sync to count
    (a sync breaks the graph, which `fullgraph=True` refuses)."""

    def __init__(self):
        super().__init__()
        self.count, self.where = 0, {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        syncs = name in SYNC_METHODS or (
            name == "__getitem__" and len(args) > 1 and _has_bool_tensor(args[1])) or (
            name == "repeat_interleave" and len(args) > 1 and isinstance(args[1], torch.Tensor)
            and kwargs.get("output_size") is None)
        if syncs:
            self.count += 1
            self.where[name] = self.where.get(name, 0) + 1
        return func(*args, **kwargs)


def _has_bool_tensor(index) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


MODELS = {"tiny-vlm": (4, 64), "3b-widths-2-layers": (2, 32)}
"""Model -> (prompts, new tokens per response) that `--decode` times; the wide model's steps are ~300x a tiny one's
on a CPU, so it decodes fewer rows."""


def make_policies(device: torch.device, cache_dir: Path, which=tuple(MODELS)) -> dict:
    """The models `--decode` times, end-of-turn suppressed: the tiny VLM, and Qwen2.5-VL-3B's real widths (hidden
    2,048, 16 / 2 heads, MLP 11,008, vocab 151,936, vision 1,280 wide) with 2 decoder layers and 2 vision blocks,
    random weights (~0.45 B parameters, most of them the embedding), in the compute dtype (bf16 on CUDA)."""
    import model as M
    from tools import workloads as bench

    out = {}
    for name in which:
        if name == "tiny-vlm":
            policy = M.build_tiny_policy(seed=0, cache_dir=cache_dir / "tiny-model", device=str(device))
        else:
            policy = bench.shape_policy("3b", device, M.compute_dtype() if device.type == "cuda" else torch.float32,
                                        max_pixels=112 * 112, vision=dict(depth=2), num_hidden_layers=2)
        out[name] = bench.force_full_length(policy)
    return out


def _seconds(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def count_syncs(fn) -> HostSyncs:
    with HostSyncs() as counted:
        fn()
    return counted


def measure(policy, samples, group_size: int = 8, new_tokens: int = 64, steps: int = 3, compile: str = "off",
            baseline: dict | None = None) -> dict:
    """The figures of the module docstring for one policy and prompts; `baseline`: an earlier `measure` of the same
    policy and prompts whose generate and host-sync figures are reused (not measured again)."""
    import model as M
    from speed import decode

    dev, B = policy.device, len(samples)

    def ours(tokens=new_tokens, mode=compile):
        return decode.sample_groups(policy, samples, group_size, tokens, compile=mode, check_every=decode.CHECK_EVERY,
                                    generator=torch.Generator(device=dev).manual_seed(0))

    enc = M.encode_prompts(policy, samples)
    inputs = {k: enc[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw") if k in enc}

    @torch.no_grad()
    def generate(tokens=new_tokens):
        policy.model.eval()
        return policy.model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=True,
                                     temperature=1.0, top_p=1.0, top_k=0, num_return_sequences=group_size,
                                     suppress_tokens=policy.suppress_ids.tolist(), pad_token_id=policy.pad_id)

    rollout = ours()  # warm-up (and compile)
    assert rollout.response_mask.sum(1).eq(new_tokens).all(), "end-of-turn must be suppressed: full-length responses"
    tokens = B * group_size * new_tokens
    if baseline is not None:
        ours_s = statistics.median(_seconds(ours, dev) for _ in range(steps))
        kept = {k: v for k, v in baseline.items() if "syncs" in k or k.startswith("generate_") or k in ("rows", "new_tokens", "prompt_tokens")}
        return {**kept, "tokens_per_s": tokens / ours_s, "speedup_vs_generate": baseline["generate_s"] / ours_s}
    generate()
    half = new_tokens // 2
    syncs = {}
    # counted with the step eager: the compiled step (fullgraph) has no sync to count, and a counting mode around a
    # compiled function would make dynamo trace it anew
    for name, fn in (("", lambda tokens=new_tokens: ours(tokens, "off")), ("generate_", generate)):
        full, part = count_syncs(fn), count_syncs(lambda: fn(half))
        per_token = (full.count - part.count) / (new_tokens - half)
        syncs.update({f"{name}host_syncs_per_token": per_token, f"{name}host_syncs_per_rollout": full.count - per_token * new_tokens})
        if not name:
            syncs["host_syncs"] = full.where
    pairs = [(_seconds(ours, dev), _seconds(generate, dev)) for _ in range(steps)]  # in turns
    ours_s, gen_s = (statistics.median(p[i] for p in pairs) for i in (0, 1))
    return {"rows": B * group_size, "new_tokens": new_tokens, "prompt_tokens": int(enc["attention_mask"].sum(1).max()),
            "tokens_per_s": tokens / ours_s, "generate_tokens_per_s": tokens / gen_s,
            "speedup_vs_generate": statistics.median(g / o for o, g in pairs), "generate_s": gen_s, **syncs}


def run(cache_dir: str = ".cache", steps: int = 3, compile: str = "off", device: str | None = None,
        models: dict = MODELS) -> dict:
    """`--decode`: measure each model; print one line each and one JSON line; return the figures."""
    from tools import workloads as bench

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cache = Path(cache_dir)
    out = {"device": dev.type, "threads": torch.get_num_threads(), "compile": compile, "models": {}}
    for name, policy in make_policies(dev, cache, tuple(models)).items():
        prompts, new_tokens = models[name]
        samples = bench.bench_samples(prompts, True, cache / "bench-maps")
        m = measure(policy, samples, new_tokens=new_tokens, steps=steps, compile=compile)
        out["models"][name] = m
        print(f"{name:20s} ours {m['tokens_per_s']:9.0f} tok/s   generate {m['generate_tokens_per_s']:9.0f} tok/s   "
              f"{m['speedup_vs_generate']:.2f}x   host syncs per token {m['host_syncs_per_token']:.4f} "
              f"+ {m['host_syncs_per_rollout']:.0f} per rollout (generate {m['generate_host_syncs_per_token']:.2f} "
              f"+ {m['generate_host_syncs_per_rollout']:.0f})")
    print(json.dumps(out))
    return out
