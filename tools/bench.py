"""bench.py: time one GRPO step of the project on a fixed, seeded workload (and TRL's, side by side).

    python -m tools.bench                                  # tiny-text, 10 timed steps after 1 warm-up
    python -m tools.bench --vs-trl                         # + TRL's GRPOTrainer on the same workload, interleaved
    python -m tools.bench --workload tiny-vlm              # tiny Qwen2.5-VL, rendered map images
    python -m tools.bench --workload qwen2.5-vl-7b-shape   # CUDA: real architecture, random bf16 weights
    python -m tools.bench --workload qwen2.5-vl-7b-shape --count-params   # any machine: meta device, no memory
    python -m tools.bench --bf16-check                     # do bf16 updates at lr 1e-6 survive? (precision.py)
    python -m tools.bench --decode                         # the rollout's decode vs generate (tools/decode_bench.py)
    python -m tools.bench --gpu-check [--dry-run]          # the whole CUDA path in 8 minutes (tools/gpu_check.py)

Prints one table and one JSON line: seconds per step split into rollout / scoring / log-probs (reference
pass) / update, completion tokens per second, peak memory (process RSS on CPU, max_memory_allocated on
CUDA), each as the median and the [min, max] spread over the timed steps. On CUDA also: decode tokens/s
against the memory-bandwidth bound (`--hbm-gbps`) and the update's model FLOPs utilisation (`--peak-tflops`).

Workloads (all seeded; the prompts are the same every step, so every step does the same work):
  tiny-text            build_tiny_policy(text_only=True): Qwen2 LM, ~0.6M parameters, 1k vocab. 4 prompts
                       (one synthetic city's questions with its map as text, ~350 tokens) x G=8 x 64 new
                       tokens. The CPU workload compared with TRL (TRL's VLM path needs torchvision).
  tiny-text-short      the same without the map text: the question alone (~60 tokens), so decoding
                       dominates the step; the regime of a ~0.55 s/step TRL baseline.
  tiny-vlm             build_tiny_policy(): tiny Qwen2.5-VL (~0.24M), the same questions with rendered map
                       images (max 112x112 pixels), 4 x 8 x 64. The step train.py runs on CPU.
  qwen2.5-vl-3b-shape  Qwen2.5-VL-3B-Instruct's published config (36 layers, 2048 wide, 16/2 heads, MLP
                       11008, vocab 151936, 32-layer vision tower) with random bf16 weights (nothing can be
                       downloaded), the project's small tokenizer. 4 x 8 x 1024, checkpointing, 8-bit AdamW.
  qwen2.5-vl-7b-shape  Qwen2.5-VL-7B-Instruct's config (28 layers, 3584 wide, 28/4 heads, MLP 18944, vocab
                       152064, untied head). The paper's step on one GPU: 2 prompts x G=8 x 2048 new tokens,
                       full-parameter update, gradient checkpointing, 8-bit AdamW, frozen bf16 reference.

By default end-of-turn is suppressed so every response is exactly max_new_tokens long on both sides (random
models stop at random lengths; this makes "the same work" exact); `--natural-eos` lets them stop.
Both sides: same model files, prompts, G, prompts per step, max new tokens, temperature 1.0, beta (KL
coefficient, so TRL also runs its reference model), lr, weight decay 0, grad clip 1.0, thread count,
no gradient checkpointing on CPU (TRL's default is on; off is the faster choice for TRL on a tiny model).
TRL gets a constant reward; ours runs the project's real reward
(its cost is the "scoring" row, counted against us). TRL's steps are timed by a Trainer callback
(step begin -> end) and our steps run inside that callback between TRL steps, so both see the same noise.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch

from plumbing import cli
from scaling import precision
from scaling.shapes import QWEN25_VL, count_shape_params, shape_config  # noqa: F401
from tools.workloads import (WORKLOADS, Workload, bench_samples, force_full_length, make_policy,  # noqa: F401
                             shape_policy)

GPU_DEFAULTS = {"h100": (3350.0, 989.0), "h200": (4800.0, 989.0)}  # HBM GB/s, dense bf16 TFLOP/s (SXM)


# ----------------------------------------------------------------------------- measuring

def peak_memory_mb(device: torch.device) -> float:
    """Peak memory so far: max_memory_allocated on CUDA, the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def stats(xs: list[float]) -> dict:
    """Median, min and max."""
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)} if xs else {}


class OurRunner:
    """The project's grpo_step on the workload; `step()` runs and records one timed step."""

    def __init__(self, w: Workload, args, device: torch.device):
        import grpo
        import model as M
        import rewards

        self.w, self.device = w, device
        policy = make_policy(w, device, Path(args.cache_dir))
        self.policy = policy if args.natural_eos else force_full_length(policy)
        self.samples = bench_samples(w.prompts, self.policy.is_vlm, Path(args.cache_dir) / "bench-maps")
        if not w.map_text:  # short prompts: the question alone, so decoding dominates the step
            self.samples = [dataclasses.replace(s, metro={}) for s in self.samples]
        self.reference = M.reference_model(self.policy) if args.beta != 0 else None
        self.optimizer = precision.make_optimizer(self.policy.model, lr=args.lr, weight_decay=0.0, eight_bit=w.eight_bit)
        self.cfg = grpo.GRPOConfig(group_size=w.group_size, max_new_tokens=w.max_new_tokens, temperature=1.0,
                                   kl_coef=args.beta, micro_batch_size=w.micro_batch_size)
        self.generator = torch.Generator(device=device).manual_seed(args.seed)
        self.reward = lambda sample, text: rewards.reward(sample, text)
        self.records: list[dict] = []
        enc = M.encode_prompts(self.policy, self.samples)
        self.prompt_tokens = enc["attention_mask"].sum(1).float().mean().item()

    def step(self, record: bool = True) -> dict:
        import grpo

        if self.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        m, _ = grpo.grpo_step(self.policy, self.reference, self.optimizer, self.samples, self.reward, self.cfg,
                              generator=self.generator)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        m["time/step"] = time.perf_counter() - t0
        m["completion_tokens_per_sec"] = m["tokens/completion"] / m["time/step"]
        if record:
            self.records.append(m)
        return m


def run_trl(ours: OurRunner, args, steps: int, between) -> dict:
    """TRL's GRPOTrainer on the same model files and prompts; `between()` runs after each TRL step but the last."""
    import model as M
    from datasets import Dataset
    from transformers import TrainerCallback
    from transformers.utils import logging as hf_logging
    from trl import GRPOConfig, GRPOTrainer

    hf_logging.set_verbosity_error()
    tmp = Path(tempfile.mkdtemp(prefix="bench-trl-"))
    M.save_policy(ours.policy, tmp / "model")  # the same weights our run started from
    w, tok = ours.w, ours.policy.tokenizer
    prompts = [f"{M.metro_as_text(s.metro)}\n\n{s.question}" if s.metro else s.question
               for s in ours.samples]  # what encode_prompts builds
    ds = Dataset.from_dict({"prompt": [[{"role": "user", "content": p}] for p in prompts]})
    times, lengths = [], []

    class Clock(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t)
            if len(times) <= steps:  # TRL warm-up, ours 1, TRL 1, ours 2, ..., ours n, TRL n
                between()

        def on_log(self, a, state, control, logs=None, **kw):
            if logs and "completions/mean_length" in logs:
                lengths.append(float(logs["completions/mean_length"]))

    cuda = torch.cuda.is_available()
    cfg = GRPOConfig(output_dir=str(tmp / "out"), per_device_train_batch_size=w.prompts * w.group_size,
                     num_generations=w.group_size, max_completion_length=w.max_new_tokens, learning_rate=args.lr,
                     beta=args.beta, logging_steps=1, max_steps=steps + 1, report_to=[], use_cpu=not cuda,
                     bf16=cuda, save_strategy="no", temperature=1.0, weight_decay=0.0, max_grad_norm=1.0,
                     gradient_checkpointing=w.gradient_checkpointing, disable_tqdm=True, seed=args.seed,
                     generation_kwargs={"suppress_tokens": ours.policy.suppress_ids.tolist()})
    trainer = GRPOTrainer(model=str(tmp / "model"), processing_class=tok,
                          reward_funcs=lambda completions, **kw: [1.0] * len(completions), args=cfg,
                          train_dataset=ds, callbacks=[Clock()])
    from transformers.trainer_callback import PrinterCallback
    trainer.remove_callback(PrinterCallback)  # keep stdout to our table + one JSON line
    trainer.train()
    steady, lens = times[1:], lengths[1:]
    sec = statistics.median(steady)
    mean_len = statistics.mean(lens) if lens else float("nan")
    tps = [w.prompts * w.group_size * n / t for n, t in zip(lens, steady)]
    return {"sec_per_step": stats(steady), "completion_tokens_per_sec": stats(tps), "mean_completion_len": mean_len,
            "steps": len(steady), "median_sec": sec}


def gpu_figures(ours: OurRunner, args) -> dict:
    """Decode tokens/s vs the HBM bound, the update's MFU, for CUDA runs."""
    model, w = ours.policy.model, ours.w
    name = torch.cuda.get_device_name().lower()
    default = GPU_DEFAULTS["h200"] if "h200" in name else GPU_DEFAULTS["h100"]
    hbm = args.hbm_gbps or default[0]
    peak = args.peak_tflops or default[1]
    visual = getattr(getattr(model, "model", model), "visual", None)
    n_vision = sum(p.numel() for p in visual.parameters()) if visual is not None else 0
    n_all = sum(p.numel() for p in model.parameters())
    n_lm = n_all - n_vision
    embed = model.get_input_embeddings().weight.numel()
    # each decode step reads every LM weight once (the input embedding only by row, unless tied to the head)
    read = (n_lm - (0 if model.config.get_text_config().tie_word_embeddings else embed)) * 2  # bf16 bytes
    rows = w.prompts * w.group_size
    bound = rows * hbm * 1e9 / read  # tokens/s if decode were purely weight-bandwidth bound (KV reads ignored)
    r = ours.records
    decode = statistics.median(m["tokens/completion"] / m["time/rollout"] for m in r)
    seq = ours.prompt_tokens + statistics.median(m["response_len"] for m in r)
    upd = statistics.median(m["time/update"] for m in r)
    lp = statistics.median(m["time/logprobs"] for m in r)
    flops_update = 6 * n_lm * rows * seq  # forward + backward (activation recompute not counted, as usual)
    return {"gpu": torch.cuda.get_device_name(), "hbm_gbps": hbm, "peak_tflops": peak, "params": n_all,
            "lm_params": n_lm, "decode_tokens_per_sec": decode, "decode_bound_tokens_per_sec": bound,
            "decode_frac_of_bound": decode / bound, "update_mfu": flops_update / upd / (peak * 1e12),
            "ref_logprobs_mfu": 2 * n_lm * rows * seq / lp / (peak * 1e12)}


def bf16_check(steps: int = 10, lr: float = 1e-6, cities: int = 3, cache_dir: str = ".cache") -> dict:
    """Do bf16 updates at the paper's lr survive? The tiny model, `steps` GRPO steps of the judgement stage
    at `lr`, once per precision scheme (float32; bf16 with float32 master weights; bf16 with stochastic
    rounding; plain bf16 AdamW, for contrast): the share of weights that moved and their mean displacement,
    each against the initial weights as that scheme stores them."""
    import curriculum
    import data
    import grpo
    import model as M
    import rewards

    train, _ = data.load_data("", cities, 0, cache_dir)
    stage = dict(curriculum.build_curriculum(train, "fine", 0))["judgement"]
    batches = curriculum.batches(stage, 8, steps)
    cfg = grpo.GRPOConfig(group_size=8, max_new_tokens=M.TINY_MAX_NEW_TOKENS, kl_coef=1e-2, micro_batch_size=64)
    schemes = {"float32": (torch.float32, False, False), "bf16 master": (torch.bfloat16, True, False),
               "bf16 stochastic": (torch.bfloat16, False, True), "bf16 plain AdamW": (torch.bfloat16, False, False)}
    out = {}
    for name, (dtype, master, sr) in schemes.items():
        policy = M.load_model("tiny", train, 0, cache_dir, dtype=dtype, master_weights=master)
        reference = M.reference_model(policy)
        optimizer = precision.make_optimizer(policy.model, lr, 0.0, stochastic_rounding=sr)
        before = [p.detach().clone() for p in policy.model.parameters()]
        generator = torch.Generator().manual_seed(0)
        for batch in batches:
            grpo.grpo_step(policy, reference, optimizer, batch, rewards.reward, cfg, generator)
        after, n = [p.detach() for p in policy.model.parameters()], sum(b.numel() for b in before)
        moved = sum(int((a != b).sum()) for a, b in zip(after, before)) / n
        shift = sum(float((a.float() - b.float()).abs().sum()) for a, b in zip(after, before)) / n
        out[name] = {"weights_changed": moved, "mean_abs_displacement": shift}
        print(f"{name:18s} weights changed {100 * moved:6.2f}%   mean |displacement| {shift:.2e}")
    print(json.dumps({"bf16_check": out, "steps": steps, "lr": lr}))
    return out


# ----------------------------------------------------------------------------- report

def report(ours: OurRunner, trl: dict | None, gpu: dict | None, args, peak_mb: float) -> dict:
    """Print the table and the JSON line; return the figures."""
    r = ours.records
    rows = {"rollout s": "time/rollout", "scoring s": "time/scoring", "log-probs s": "time/logprobs",
            "update s": "time/update", "step s": "time/step", "completion tok/s": "completion_tokens_per_sec",
            "completion len": "response_len"}
    table = {k: stats([m[key] for m in r]) for k, key in rows.items()}
    w = ours.w
    print(f"\nworkload {w.name}: {w.prompts} prompts x G={w.group_size} x {w.max_new_tokens} new tokens, "
          f"prompt ~{ours.prompt_tokens:.0f} tokens, device {ours.device.type}, threads {torch.get_num_threads()}, "
          f"{len(r)} timed steps after {args.warmup} warm-up, beta {args.beta}, lr {args.lr}")
    print(f"{'':18s}{'median':>10s}{'min':>10s}{'max':>10s}")
    for k, s in table.items():
        print(f"{k:18s}{s['median']:10.4f}{s['min']:10.4f}{s['max']:10.4f}")
    mem = "max_memory_allocated" if ours.device.type == "cuda" else "peak RSS"
    print(f"{'peak memory MB':18s}{peak_mb:10.1f}   ({mem})")
    out = {"workload": w.name, "device": ours.device.type, "threads": torch.get_num_threads(), "steps": len(r),
           "prompts": w.prompts, "group_size": w.group_size, "max_new_tokens": w.max_new_tokens,
           "prompt_tokens": ours.prompt_tokens,
           **{k.replace(" ", "_"): v for k, v in table.items()}, "peak_memory_mb": peak_mb}
    if trl is not None:
        ratio = trl["median_sec"] / table["step s"]["median"]
        tps_ratio = table["completion tok/s"]["median"] / trl["completion_tokens_per_sec"]["median"]
        s = trl["sec_per_step"]
        print(f"{'TRL step s':18s}{s['median']:10.4f}{s['min']:10.4f}{s['max']:10.4f}")
        t = trl["completion_tokens_per_sec"]
        print(f"{'TRL completion tok/s':18s}{t['median']:8.1f}{t['min']:10.1f}{t['max']:10.1f}")
        print(f"TRL mean completion len {trl['mean_completion_len']:.1f}; speedup (TRL s/step / ours) "
              f"{ratio:.2f}x, completion tok/s ratio {tps_ratio:.2f}x")
        out["trl"] = {k: v for k, v in trl.items() if k != "median_sec"}
        out["speedup_vs_trl"] = ratio
        out["tokens_per_sec_ratio_vs_trl"] = tps_ratio
    if gpu is not None:
        print(f"decode {gpu['decode_tokens_per_sec']:.0f} tok/s (incl. prefill) vs bandwidth bound "
              f"{gpu['decode_bound_tokens_per_sec']:.0f} tok/s at {gpu['hbm_gbps']:.0f} GB/s: "
              f"{100 * gpu['decode_frac_of_bound']:.1f}%; update MFU {100 * gpu['update_mfu']:.1f}%, "
              f"reference pass MFU {100 * gpu['ref_logprobs_mfu']:.1f}% (peak {gpu['peak_tflops']:.0f} TFLOP/s)")
        out["gpu"] = gpu
    print(json.dumps(out))
    return out


def main(argv=None) -> dict:
    """The command line: build the workload, warm up, time the steps (and TRL's), report."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", default="tiny-text", choices=sorted(WORKLOADS))
    ap.add_argument("--steps", type=int, default=0, help="timed steps (after --warmup; 0: 10, with --decode 3)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--vs-trl", action="store_true", help="also run TRL's GRPOTrainer, interleaved, and print the ratio")
    ap.add_argument("--prompts", type=int, help="override the workload's prompts per step")
    ap.add_argument("--group-size", type=int)
    ap.add_argument("--max-new-tokens", type=int)
    ap.add_argument("--micro-batch-size", type=int)
    ap.add_argument("--beta", type=float, default=1e-3, help="KL coefficient (nonzero: reference model runs)")
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, i.e. the cores)")
    ap.add_argument("--natural-eos", action="store_true", help="let responses stop at end-of-turn")
    ap.add_argument("--device", default=None)
    ap.add_argument("--cache-dir", default=".cache")
    ap.add_argument("--hbm-gbps", type=float, default=None, help="HBM bandwidth (default: H100 3350, H200 4800)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak (default 989)")
    ap.add_argument("--count-params", action="store_true", help="shape workloads: count on the meta device, exit")
    ap.add_argument("--bf16-check", action="store_true", help="do bf16 updates at lr 1e-6 survive? (tiny model, CPU)")
    ap.add_argument("--memory-plan", action="store_true",
                    help="print the modelled peak GPU memory of a paper-preset step (memory.py: 3B/7B, schemes, 1-8 GPUs), exit")
    ap.add_argument("--max-pixels", type=int, default=12_845_056, help="with --memory-plan: the image budget (default: "
                    "the image processor's, what the presets use; the one-GPU recipes: 1003520, 1,280 visual tokens)")
    ap.add_argument("--self-check", action="store_true", help="with --memory-plan: also check the model against "
                    "real grpo_steps at 7B widths (2 layers) on CPU, full fine-tuning (~17 GiB RAM) and rank-64 LoRA")
    ap.add_argument("--decode", action="store_true", help="the rollout's decode vs transformers' generate: tokens/s "
                    "and host syncs per token, tiny VLM and 2 layers at Qwen2.5-VL-3B's widths (tools/decode_bench.py)")
    ap.add_argument("--compile-decode", default="off", help="with --decode: how the one-token step runs "
                    "(speed.decode.COMPILE_MODES; default off: eager)")
    ap.add_argument("--gpu-check", action="store_true", help="check the whole CUDA path on one GPU in under 8 minutes "
                    "(tools/gpu_check.py: random-init 3B / 7B shapes); writes --out, prints a table")
    ap.add_argument("--dry-run", action="store_true", help="with --gpu-check: the same checks on the CPU, tiny shapes")
    ap.add_argument("--out", default="gpu_check.json", help="with --gpu-check: the JSON file to write")
    ap.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    args = ap.parse_args(argv)
    if args.gpu_check:
        from tools import gpu_check

        return gpu_check.run_checks(dry=args.dry_run, out=args.out, cache_dir=args.cache_dir)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.decode:
        from tools import decode_bench

        return decode_bench.run(args.cache_dir, steps=args.steps or 3, compile=args.compile_decode, device=args.device)
    args.steps = args.steps or 10
    if args.memory_plan:
        from scaling import memory
        from tools import memory_check

        out = {"memory_plan": memory.table(max_pixels=args.max_pixels),
               "sft_rl": memory.sft_rl_rows(max_pixels=args.max_pixels)}
        memory.print_table(out["memory_plan"])
        print("The paper's SFT comparison (--preset sft-rl), peak GiB per GPU: " + "; ".join(
            f"{r['arch']} {r['phase']} {r['scheme']} on {r['gpus']} GPU(s): {r['peak_gib']}" for r in out["sft_rl"]))
        if args.self_check:
            out["self_check"] = memory_check.self_check()
            out["self_check_lora"] = memory_check.self_check(lora_rank=memory.LORA_RANK)
        return out
    if args.bf16_check:
        return bf16_check(cache_dir=args.cache_dir)

    w = WORKLOADS[args.workload]
    w = dataclasses.replace(w, **{k: v for k, v in dict(prompts=args.prompts, group_size=args.group_size,
                                                           max_new_tokens=args.max_new_tokens,
                                                           micro_batch_size=args.micro_batch_size).items() if v})
    if args.count_params:
        if w.kind != "shape":
            raise ValueError("--count-params is for the *-shape workloads")
        c = count_shape_params(w.arch)
        print(json.dumps({"workload": w.name, **c}))
        return c
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if w.kind == "shape" and device.type != "cuda":
        raise ValueError(f"--workload {w.name} needs a CUDA GPU (try --count-params)")
    torch.manual_seed(args.seed)
    ours = OurRunner(w, args, device)
    for _ in range(args.warmup):
        ours.step(record=False)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trl = None
    if args.vs_trl:
        if w.kind != "text":
            raise ValueError("--vs-trl runs the text-only workloads (TRL's VLM path needs torchvision)")
        peak_mb = peak_memory_mb(device)  # ours, before TRL is loaded into this process
        trl = run_trl(ours, args, args.steps, lambda: ours.step())
    else:
        for _ in range(args.steps):
            ours.step()
        peak_mb = peak_memory_mb(device)
    gpu = gpu_figures(ours, args) if device.type == "cuda" else None
    return report(ours, trl, gpu, args, peak_mb)


if __name__ == "__main__":
    cli.run(main)
