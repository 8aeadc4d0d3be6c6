"""RewardMap training: GRPO with the detail reward over the multi-stage curriculum.

    python train.py --stage all                         # tiny offline model + synthetic maps, CPU, minutes
    python train.py --stage judgement --no-detail-reward   # one stage, an ablation
    python train.py --preset paper --model Qwen/Qwen2.5-VL-7B-Instruct --data /data/reasonmap   # GPU
    python train.py --out runs/x --resume               # continue a killed run exactly where it stopped

Every flag is a field of `TrainConfig` below (argparse is generated from it, so flags and defaults
cannot drift); `python train.py --help` lists them. Outputs in `--out`: config.json, metrics.jsonl
(one line per GRPO step), checkpoints/ (HuggingFace format + trainer state, written atomically),
model/ (the final policy), curves.png, eval_<stage>.json (end-of-stage evaluation). The method is written
down in docs/rewardmap.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

import cli
import coldstart
import curriculum
import data
import distributed
import eval as evaluation
import grpo
import model as models
import precision
import lora
import report
import rewards
from data import CACHE_DIR, SYNTHETIC_CITIES


def _f(default, help, **kw):
    """A config field with its --help text."""
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    """Everything a training run depends on; each field is a command-line flag (`--field-name`)."""

    # what to train on
    stage: str = _f("all", "stage(s) to run: judgement | counting | planning | all (coarse: perception | planning; none: all)")
    curriculum: str = _f("fine", "curriculum variant: fine (RewardMap) | coarse (all Plus types, then planning) | none (all shuffled)")
    model: str = _f("tiny", "policy: 'tiny' (the embedded offline Qwen2.5-VL) or a local path / hub id of a Qwen2(.5)-VL or causal LM")
    data: str = _f("", "dataset folder(s), comma-separated (our export, or ReasonMap-Plus,ReasonMap-Train copies); empty: synthetic maps")
    cities: int = _f(SYNTHETIC_CITIES, "synthetic dataset: number of cities (generated once into --cache-dir, reused afterwards)")
    preset: str = _f("", "'paper': the paper's hyperparameters (Qwen2.5-VL-7B-Instruct, lr 1e-6, 16x8, 2048 tokens, bf16) | 'released': the authors' training script")
    # reward (docs/rewardmap.md §3)
    no_detail_reward: bool = _f(False, "ablation: drop the detail reward (R = W * (format + correctness))")
    alpha: float = _f(0.5, "weight of the detail reward")
    no_difficulty_weight: bool = _f(False, "ablation: difficulty weight W = 1 for every sample")
    gammas: tuple = _f((1.0, 1.2, 1.5), "map-difficulty weights for easy / middle / hard maps", nargs=3, type=float)
    betas: tuple = _f((0.0, 0.5), "question weights for planning with 0 / >= 1 transfers", nargs=2, type=float)
    detail_variant: str = _f("paper", "detail reward: 'paper' (Algorithm 1 as written) | 'released' (the authors' code)")
    format_score: float = _f(1.0, "reward for an answer in the required format (the released code has no format term: 0)")
    no_detail_floor: bool = _f(False, "let the detail reward go below -10 (Algorithm 1 and the released code have no floor)")
    lenient_parsing: bool = _f(False, "judge correctness by this project's lenient reading of answers, not the released reward code's")
    # GRPO (docs/rewardmap.md §4)
    group_size: int = _f(8, "G: responses sampled per prompt")
    batch_size: int = _f(8, "prompts per GRPO step")
    micro_batch_size: int = _f(64, "responses per forward/backward pass (gradient accumulation over the rest)")
    lr: float = _f(2e-3, "AdamW learning rate of GRPO (--model tiny: 2e-4, see TINY_DEFAULTS; the paper: 1e-6 for a 7B model)")
    weight_decay: float = _f(0.0, "AdamW weight decay (the paper: 1e-2)")
    kl_coef: float = _f(1e-2, "coefficient of the k3 KL penalty to the frozen reference (0 skips it; paper 1e-3, released script 1e-2)")
    clip_eps: float = _f(0.2, "PPO clip range epsilon")
    ppo_epochs: int = _f(1, "optimisation passes over each rollout batch")
    aggregation: str = _f("token", "loss averaging: 'token' (over all response tokens) | 'sequence' (per response first) | 'constant' (token sum / (token budget x responses): Dr. GRPO)")
    no_std_scale: bool = _f(False, "advantage = r - mean(group) only (the paper's text), not divided by the group std")
    advantage: str = _f("grpo", "advantage estimator: grpo | dr-grpo (also sets --aggregation constant unless given) | rloo | reinforce++ | reinforce++-baseline")
    max_new_tokens: int = _f(0, "response token budget for judgement / counting questions (0: 4 for the tiny model, whose boxed answers are one token; 2048 otherwise)")
    planning_max_new_tokens: int = _f(0, "response token budget for planning questions (0: 48 for the tiny model; 2048 otherwise)")
    temperature: float = _f(1.0, "sampling temperature for rollouts")
    top_p: float = _f(1.0, "nucleus sampling threshold for rollouts")
    max_grad_norm: float = _f(1.0, "gradient-norm clip")
    entropy_coef: float = _f(0.0, "weight of an entropy bonus in the loss (released code: 1e-3)")
    kl_clamp: float = _f(0.0, "clamp each token's KL term at this value (released code: 10; 0: no clamp)")
    drop_last: bool = _f(False, "drop each stage's last partial batch (the released code's data loader)")
    replay: float = _f(0.0, "share of each batch added from earlier stages' questions, against forgetting (0: none; --model tiny: 0.5)")
    cold_start: int = _f(0, "supervised steps on the training answers (\\boxed{answer}, planning: the route) before GRPO (0: none; --model tiny: 800; coldstart.py)")
    cold_start_lr: float = _f(0.0, "AdamW learning rate of the cold start (0: --lr; --model tiny: 2e-3)")
    dynamic_sampling: bool = _f(False, "DAPO dynamic sampling: groups whose total rewards are all equal are replaced by groups of the stage's next prompts")
    dynamic_sampling_max_draws: int = _f(0, "dynamic sampling: extra prompts drawn per step at most (0: 3 x the batch)")
    decode_chunk: int = _f(0, "prompts decoded at a time, whole groups (0: as many as fit half the free GPU memory; all on CPU)")
    max_steps_per_stage: int = _f(0, "cap on GRPO steps per stage (0: one pass over the stage's data)")
    # model
    max_pixels: int = _f(0, "image budget in pixels for the vision encoder (0: the model's default)")
    dtype: str = _f("", "compute dtype: float32 | bfloat16 (empty: bfloat16 on CUDA, float32 on CPU)")
    bf16_update: str = _f("master", "with bfloat16: 'master' (float32 weights, bf16 autocast) | 'stochastic' (bf16 weights, stochastically rounded AdamW)")
    gradient_checkpointing: bool = _f(False, "recompute activations in backward (large models)")
    eight_bit_adam: bool = _f(False, "8-bit AdamW moments: bitsandbytes under --bf16-update master (GPU); precision.AdamWSR's own under stochastic")
    lora_rank: int = _f(0, "LoRA: train low-rank adapters of this rank instead of every weight (0: full fine-tuning)")
    lora_alpha: float = _f(0.0, "LoRA scale numerator: the update is (alpha / rank) B A (0: 2 x rank)")
    lora_targets: str = _f("", "LoRA: comma-separated layer names to adapt (empty: the language model's attention and MLP projections, plus lm_head for the tiny model; add 'visual' for the vision tower)")
    qlora: bool = _f(False, "QLoRA: the frozen base in 4-bit NF4 (bitsandbytes, CUDA only; with --lora-rank)")
    merge_lora: bool = _f(False, "with --lora-rank: also write the adapters merged into a full model, --out/model-merged")
    # run
    seed: int = _f(0, "seed for data, curriculum shuffle, sampling and model init")
    out: str = _f("runs/default", "output folder")
    cache_dir: str = _f(CACHE_DIR, "where the synthetic dataset and the tiny model are cached")
    resume: bool = _f(False, "continue from the latest checkpoint in --out")
    save_every: int = _f(50, "write a checkpoint every N steps (and at the end of each stage)")
    keep_checkpoints: int = _f(1, "full checkpoints kept on disk (the newest N; one more exists while the next is being written)")
    eval_every: int = _f(0, "evaluate on held-out samples of the current stage every N steps (0: only at stage ends)")
    eval_samples: int = _f(200, "held-out samples per evaluation (0: the whole test split)")
    max_nonfinite: int = _f(5, "stop the run after this many consecutive steps with a non-finite loss")
    report_to: str = _f("none", "live dashboard of the metrics.jsonl numbers: none | tensorboard (event files in --out/tensorboard; "
                        "pip install tensorboard) | wandb (project rewardmap; pip install wandb; WANDB_MODE=offline needs no account)",
                        choices=report.KINDS)
    report_samples_every: int = _f(10, "with --report-to: a table of a few sampled responses and their reward parts every N steps (0: never)")
    debug: bool = _f(False, "show the full traceback of an error (otherwise a user error prints one line)")


TINY_DEFAULTS = dict(cold_start=800, cold_start_lr=2e-3, lr=2e-4, replay=0.5)
"""What `--model tiny` trains with when no --preset is given, in one process without LoRA (a flag given wins): a
supervised cold start (coldstart.py: what an instruct model brings), then GRPO at a tenth of its learning rate with
half a batch of earlier stages' questions replayed in each later batch. Plain GRPO from the random tiny model (the
flags' own defaults) ends the curriculum giving one string to every question (0% on every type); at lr 2e-3 after a
cold start, the counting2 answer overwrites counting1's and the entropy collapses (docs/rewardmap.md §5)."""

# Image budgets: the paper gives none; the released config sets max_pixels 128,450,560 (10x the checkpoint's
# 12.8 M, i.e. full resolution: a 5,839 x 5,449 map becomes ~40k image tokens, for 8 GPUs). `paper` takes
# 1280 x 28 x 28 pixels (1,280 image tokens per map), which keeps one 80 GB GPU's prefill and KV cache small.
PRESETS = {
    "paper": dict(model="Qwen/Qwen2.5-VL-7B-Instruct", lr=1e-6, kl_coef=1e-3, batch_size=16, group_size=8,
                  max_new_tokens=2048, planning_max_new_tokens=2048, weight_decay=1e-2, max_grad_norm=1.0,
                  gradient_checkpointing=True, micro_batch_size=8, max_pixels=1280 * 28 * 28, eval_every=0),
    # the authors' released training script (scripts/reward_map.sh + reward_map.yaml + verl defaults)
    "released": dict(model="Qwen/Qwen2.5-VL-7B-Instruct", lr=1e-6, weight_decay=1e-2, kl_coef=1e-2, kl_clamp=10.0,
                     batch_size=16, group_size=4, aggregation="sequence", entropy_coef=1e-3, format_score=0.0,
                     no_detail_floor=True, detail_variant="released", drop_last=True, max_new_tokens=2048,
                     planning_max_new_tokens=2048, max_grad_norm=1.0, gradient_checkpointing=True, micro_batch_size=8,
                     max_pixels=128_450_560),
}


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """argparse generated from TrainConfig: `--field-name`, bools as switches, help from the field."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        meta = dict(f.metadata)
        if f.type in ("bool", bool):
            ap.add_argument(flag, action="store_true", help=meta["help"])
        else:
            kind = meta.pop("type", None) or type(f.default)
            ap.add_argument(flag, type=kind, default=f.default, help=meta.pop("help"), **meta)
    args = vars(ap.parse_args(argv))
    explicit = {a.lstrip("-").replace("-", "_") for a in (argv if argv is not None else sys.argv[1:]) if a.startswith("--")}
    if args["preset"]:
        if args["preset"] not in PRESETS:
            ap.error(f"unknown --preset {args['preset']!r}; choose one of {', '.join(PRESETS)}")
        for k, v in PRESETS[args["preset"]].items():
            if k not in explicit:  # flags given on the command line win over the preset
                args[k] = v
    if args["model"] == "tiny" and not args["preset"] and not args["lora_rank"] and distributed.launched_ranks() == 1:
        for k, v in TINY_DEFAULTS.items():
            if k not in explicit:
                args[k] = v
    if args["advantage"] == "dr-grpo" and "aggregation" not in explicit:
        args["aggregation"] = "constant"  # Dr. GRPO is both fixes; --aggregation token ablates the loss's one
    args["gammas"], args["betas"] = tuple(args["gammas"]), tuple(args["betas"])
    cfg = TrainConfig(**args)
    check_config(cfg)
    return cfg


def check_config(cfg: TrainConfig) -> None:
    """Fail early, naming the flag, on values that would only break later."""
    stages = curriculum.stage_names(cfg.curriculum)
    if cfg.stage != "all" and cfg.stage not in stages:
        raise ValueError(f"--stage {cfg.stage!r} is not a stage of --curriculum {cfg.curriculum} ({', '.join(stages)}, or all)")
    if cfg.aggregation not in ("token", "sequence", "constant"):
        raise ValueError(f"--aggregation must be token, sequence or constant, got {cfg.aggregation!r}")
    if cfg.advantage not in grpo.ESTIMATORS:
        raise ValueError(f"--advantage must be one of {', '.join(grpo.ESTIMATORS)}, got {cfg.advantage!r}")
    if cfg.no_std_scale and cfg.advantage != "grpo":
        raise ValueError(f"--no-std-scale only applies to --advantage grpo ({cfg.advantage} sets its own scale; "
                         "dr-grpo is GRPO without the std)")
    models.compute_dtype(cfg.dtype)  # raises on an unknown --dtype
    if cfg.bf16_update not in precision.SCHEMES:
        raise ValueError(f"--bf16-update must be one of {', '.join(precision.SCHEMES)}, got {cfg.bf16_update!r}")
    if cfg.detail_variant not in ("paper", "released"):
        raise ValueError(f"--detail-variant must be paper or released, got {cfg.detail_variant!r}")
    for name in ("group_size", "batch_size", "micro_batch_size", "ppo_epochs", "keep_checkpoints"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    for name, ok, rule in (("kl_coef", cfg.kl_coef >= 0, ">= 0"), ("clip_eps", cfg.clip_eps > 0, "> 0"),
                           ("temperature", cfg.temperature >= 0, ">= 0"), ("top_p", 0 < cfg.top_p <= 1, "in (0, 1]"),
                           ("lr", cfg.lr > 0, "> 0"), ("alpha", cfg.alpha >= 0, ">= 0"),
                           ("entropy_coef", cfg.entropy_coef >= 0, ">= 0"), ("replay", 0 <= cfg.replay <= 1, "in [0, 1]"), ("kl_clamp", cfg.kl_clamp >= 0, ">= 0"),
                           ("max_new_tokens", cfg.max_new_tokens >= 0, ">= 0"), ("decode_chunk", cfg.decode_chunk >= 0, ">= 0"),
                           ("planning_max_new_tokens", cfg.planning_max_new_tokens >= 0, ">= 0"),
                           ("dynamic_sampling_max_draws", cfg.dynamic_sampling_max_draws >= 0, ">= 0")):
        if not ok:
            raise ValueError(f"--{name.replace('_', '-')} must be {rule}, got {getattr(cfg, name)}")
    ranks = distributed.launched_ranks()
    if cfg.batch_size % ranks:
        raise ValueError(f"--batch-size {cfg.batch_size} must be a multiple of the {ranks} torchrun processes: "
                         "each takes an equal share of every step's prompts")
    if ranks > 1 and cfg.dynamic_sampling:  # ranks would draw different numbers of prompts: FSDP needs lock-step
        raise ValueError("--dynamic-sampling is not supported with several processes yet")
    if ranks > 1 and (cfg.eight_bit_adam or cfg.bf16_update == "stochastic"):
        raise ValueError("with several processes the weights are sharded float32 masters (FSDP2): use --bf16-update "
                         "master without --eight-bit-adam (those two are the one-GPU schemes)")
    if cfg.group_size < 2:
        raise ValueError("--group-size must be >= 2: GRPO's advantage compares responses within a group")
    if cfg.lora_rank < 0 or cfg.lora_alpha < 0 or cfg.report_samples_every < 0:
        raise ValueError("--lora-rank, --lora-alpha and --report-samples-every must be >= 0")
    lora_only = [flag for flag, on in (("--qlora", cfg.qlora), ("--merge-lora", cfg.merge_lora),
                                       ("--lora-targets", bool(cfg.lora_targets))) if on]
    if lora_only and not cfg.lora_rank:
        raise ValueError(f"{', '.join(lora_only)} need --lora-rank (LoRA adapters)")
    if ranks > 1 and cfg.lora_rank:
        raise ValueError("--lora-rank is not supported with several processes yet (LoRA is the one-small-GPU recipe)")
    if cfg.cold_start < 0 or cfg.cold_start_lr < 0:
        raise ValueError("--cold-start and --cold-start-lr must be >= 0")
    if cfg.cold_start and (cfg.lora_rank or ranks > 1):  # LoRA's reference is the base: it would skip the cold start
        raise ValueError("--cold-start is for one process and full fine-tuning (not with --lora-rank or torchrun)")


# ------------------------------------------------------------------------------ the components' configs

def reward_config(cfg: TrainConfig) -> rewards.RewardConfig:
    """The reward settings of the run (docs/rewardmap.md §3)."""
    return rewards.RewardConfig(alpha=cfg.alpha, use_detail=not cfg.no_detail_reward,
                                use_difficulty=not cfg.no_difficulty_weight, gammas=tuple(cfg.gammas),
                                betas=tuple(cfg.betas), detail_variant=cfg.detail_variant,
                                format_score=cfg.format_score, detail_floor=None if cfg.no_detail_floor else -10.0,
                                parsing="lenient" if cfg.lenient_parsing else "released")


def budgets(cfg: TrainConfig) -> tuple[int, int]:
    """The run's (judgement / counting, planning) response-token budgets (`model.token_budgets`)."""
    return models.token_budgets(cfg.model, cfg.max_new_tokens, cfg.planning_max_new_tokens)


def grpo_config(cfg: TrainConfig, stage: str) -> grpo.GRPOConfig:
    """The GRPO settings of one stage (docs/rewardmap.md §4); planning stages get the planning token budget."""
    plus, planning = budgets(cfg)
    tokens = planning if stage in ("planning", "all") else plus
    return grpo.GRPOConfig(group_size=cfg.group_size, temperature=cfg.temperature, top_p=cfg.top_p,
                           max_new_tokens=tokens, clip_eps=cfg.clip_eps, kl_coef=cfg.kl_coef,
                           ppo_epochs=cfg.ppo_epochs, micro_batch_size=cfg.micro_batch_size,
                           aggregation=cfg.aggregation, std_scale=not cfg.no_std_scale,
                           max_grad_norm=cfg.max_grad_norm, entropy_coef=cfg.entropy_coef,
                           kl_clamp=cfg.kl_clamp or None, decode_chunk=cfg.decode_chunk, advantage=cfg.advantage,
                           dynamic_sampling=cfg.dynamic_sampling,
                           dynamic_sampling_max_draws=cfg.dynamic_sampling_max_draws)


# -------------------------------------------------------------------------------------- checkpoints

MAY_CHANGE_ON_RESUME = ("resume", "out", "cache_dir", "save_every", "keep_checkpoints", "eval_every", "eval_samples",
                        "max_nonfinite", "gradient_checkpointing", "decode_chunk", "debug", "merge_lora", "report_to",
                        "report_samples_every")
"""The settings a resumed run may change: where things are written and how often, what is only logged, and
recomputation that leaves the update's value unchanged. Every other TrainConfig field changes what the run
computes, so a resumed run must keep the killed run's value, or its steps would not continue that run's."""


def check_resume_config(cfg: TrainConfig, saved: dict, ckpt: Path) -> None:
    """Refuse to resume with settings that differ from the checkpoint's run, naming them."""
    now = dataclasses.asdict(cfg)
    if not saved.get("lora_rank") and saved.get("lora_targets") == ",".join(lora.DEFAULT_TARGETS):
        saved = {**saved, "lora_targets": ""}  # full fine-tuning saved before the flag's default became empty
    same = lambda a, b: list(a) == list(b) if isinstance(b, (tuple, list)) else a == b  # noqa: E731
    differ = [f"--{k.replace('_', '-')} {saved[k]!r} -> {now[k]!r}" for k in now
              if k not in MAY_CHANGE_ON_RESUME and k in saved and not same(saved[k], now[k])]
    if differ:
        raise ValueError(f"--resume: {ckpt} was written by a run with other settings ({'; '.join(differ)}); "
                         "resume with the same flags, or start a new --out")


def _step_of(folder: Path) -> int:
    """The global step in a checkpoint folder's name (step-000042 -> 42)."""
    return int(folder.name.split("-", 1)[1])


def save_checkpoint(out: Path, policy, optimizer, generator: torch.Generator, position: dict,
                    cfg: TrainConfig) -> Path:
    """Write checkpoints/step-N (HF model + trainer state) to a temporary name, rename it into place,
    then atomically repoint checkpoints/latest; a kill at any moment leaves the previous one usable.
    Afterwards only the newest --keep-checkpoints step folders remain (never the one `latest` names).
    [multi-GPU] Every rank writes its shards of the weights and optimizer state (`sharded/`, torch.distributed.
    checkpoint) instead of the HF model; rank 0 writes the rest, with every rank's RNG states."""
    root = out / "checkpoints"
    final = root / f"step-{position['global_step']:06d}"
    tmp = root / f".tmp-{final.name}"
    rngs = distributed.gather({"generator": generator.get_state(), "torch_rng": torch.get_rng_state(),
                               "python_rng": random.getstate()})
    if distributed.is_main():
        for stale in root.glob(".tmp-step-*"):  # a save cut short by a kill (at 7B, ~100 GB each)
            shutil.rmtree(stale, ignore_errors=True)
    distributed.barrier()
    if distributed.world() > 1:
        distributed.save_sharded(tmp / "sharded", policy.model, optimizer)
        distributed.barrier()
    else:
        models.save_policy(policy, tmp, budgets=budgets(cfg))
    if not distributed.is_main():
        distributed.barrier()  # until rank 0 has renamed the folder into place
        return final
    torch.save({"optimizer": optimizer.state_dict() if distributed.world() == 1 else None, "rngs": rngs,
                "world_size": distributed.world(), "position": position, "config": dataclasses.asdict(cfg)},
               tmp / "trainer_state.pt")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    pointer = root / ".latest.tmp"
    pointer.write_text(final.name)
    os.replace(pointer, root / "latest")
    current = latest_checkpoint(out)
    # the newest keep_checkpoints - 1 before this one stay; folders numbered after it are left by a killed run
    # that got ahead of the checkpoint this run resumed from, and are dropped like the older ones
    older = sorted((d for d in root.glob("step-*") if d.is_dir() and d.name[5:].isdigit() and d != final),
                   key=_step_of, reverse=True)
    keep = [d for d in older if _step_of(d) < _step_of(final)][: max(cfg.keep_checkpoints - 1, 0)]
    for old in older:
        if old not in keep and old != current:
            shutil.rmtree(old, ignore_errors=True)
    distributed.barrier()
    return final


def latest_checkpoint(out: Path) -> Path | None:
    """The checkpoint `checkpoints/latest` points to, or None."""
    pointer = out / "checkpoints" / "latest"
    return out / "checkpoints" / pointer.read_text().strip() if pointer.exists() else None


def truncate_metrics(path: Path, global_step: int) -> None:
    """Drop metric lines logged after the checkpoint we resume from (a killed run may have run ahead)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["global_step"] <= global_step:
                keep.append(line)
        except (json.JSONDecodeError, KeyError):  # a line cut short by the kill: it is after the checkpoint
            continue
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(l + "\n" for l in keep))
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------- curves

def plot_curves(metrics_path: Path, png: Path) -> None:
    """Reward components, accuracy and KL per step, with dotted lines at stage boundaries."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(l) for l in metrics_path.read_text().splitlines() if l.strip()]
    if not rows:
        return
    x = [r["global_step"] for r in rows]
    panels = [("reward", ["reward/total", "reward/format", "reward/correctness", "reward/detail"]),
              ("accuracy", ["reward/accuracy", "groups/zero_std_frac"]), ("KL to reference", ["kl"])]
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 8), sharex=True)
    for ax, (title, keys) in zip(axes, panels):
        for k in keys:
            if k in rows[0]:
                ax.plot(x, [r.get(k, math.nan) for r in rows], label=k, lw=1)
        ax.set_title(title, fontsize=10, loc="right")
        ax.legend(fontsize=7, loc="upper left")
        for prev, cur in zip(rows, rows[1:]):
            if cur["stage"] != prev["stage"]:
                ax.axvline(cur["global_step"] - 0.5, color="grey", ls=":")
    for prev, cur in [(None, rows[0])] + list(zip(rows, rows[1:])):
        if prev is None or cur["stage"] != prev["stage"]:
            axes[0].annotate(cur["stage"], (cur["global_step"], 1.0), xycoords=("data", "axes fraction"), fontsize=8, va="bottom")
    axes[-1].set_xlabel("GRPO step")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------- loop

def stage_batches(cfg: TrainConfig, name: str, stage_samples: list, earlier: list) -> list[list]:
    """The stage's prompt batches in curriculum order, one per GRPO step (`curriculum.batches`), with replayed
    earlier questions (`curriculum.with_replay`). [dynamic sampling] With --max-steps-per-stage, steps draw
    more prompts than their batch: enough further batches (passes) come after, so each of the stage's steps
    can draw its most (batch + max draws); each longer list starts with the shorter one."""
    def make(n: int | None) -> list[list]:
        steps = curriculum.batches(stage_samples, cfg.batch_size, n, seed=cfg.seed,
                                   group=curriculum.group_of(cfg.curriculum, name), drop_last=cfg.drop_last)
        return curriculum.with_replay(steps, earlier, cfg.replay, cfg.seed, name)

    steps = make(cfg.max_steps_per_stage or None)
    if cfg.dynamic_sampling and cfg.max_steps_per_stage and steps:
        per_step = len(steps[0]) + grpo.max_draws(cfg.dynamic_sampling_max_draws, len(steps[0]))
        n = len(steps)
        while sum(map(len, steps)) < cfg.max_steps_per_stage * per_step:
            n *= 2
            steps = make(n)
    return steps


def held_out(test: list, qtypes: set[str], n: int, seed: int) -> list:
    """A fixed, seeded subset of the test split for the given question types (n = 0: all of them)."""
    pool = [s for s in test if s.qtype in qtypes]
    return pool if n <= 0 or n >= len(pool) else random.Random(f"{seed}:eval").sample(pool, n)


def train(cfg: TrainConfig) -> dict:
    """Run the curriculum; returns {stage: end-of-stage eval summary}. Under torchrun, every rank runs this
    (distributed.py): each takes its share of every batch; rank 0 alone writes files and prints."""
    distributed.setup()
    main = distributed.is_main()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    metrics_path = out / "metrics.jsonl"
    ckpt = latest_checkpoint(out) if cfg.resume else None
    if cfg.resume and ckpt is None:
        raise FileNotFoundError(f"--resume: no checkpoint in {out / 'checkpoints'}")
    # on the CPU: optimizer.load_state_dict moves each moment to its parameter's device, so a GPU never holds
    # a second copy of the optimizer state; weights_only=False: the state holds RNG states and python objects
    state = torch.load(ckpt / "trainer_state.pt", map_location="cpu", weights_only=False) if ckpt is not None else None
    if state is not None:
        check_resume_config(cfg, state.get("config", {}), ckpt)
        if state.get("world_size", 1) != distributed.world():
            raise ValueError(f"--resume: {ckpt} was written by {state.get('world_size', 1)} processes; resume it "
                             f"with as many (now {distributed.world()})")
    if main and not cfg.resume and metrics_path.exists():
        print(f"warning: {out} holds an earlier run; starting over (its metrics.jsonl and checkpoints are replaced)")
        metrics_path.unlink()
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
    if main:
        (out / "config.json").write_text(cli.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
    reporter = report.open_reporter(cfg.report_to, out, dataclasses.asdict(cfg), out.resolve().name,
                                    resume_step=state["position"]["global_step"] if state is not None else None) if main else None

    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    with distributed.main_first():  # rank 0 fills the cache (synthetic maps, tiny model); the others read it
        train_samples, test_samples = data.load_data(cfg.data, cfg.cities, cfg.seed, cfg.cache_dir)
        # with LoRA the base is frozen: no float32 master copy (the adapters are float32 themselves)
        dtype, master = models.compute_dtype(cfg.dtype), cfg.bf16_update == "master" and not cfg.lora_rank
        policy = models.load_model(cfg.model, train_samples, cfg.seed, cfg.cache_dir, cfg.max_pixels,
                                   cfg.gradient_checkpointing, dtype, master, qlora=cfg.qlora)
    if cfg.cold_start:  # coldstart.py: before the reference is copied; --resume loads the weights it saved in --out
        coldstart.cold_start_once(policy, train_samples, cfg.cold_start, cfg.cold_start_lr or cfg.lr, cfg.seed,
                                  out / coldstart.SAVED, resume=ckpt is not None)
    if cfg.lora_rank:  # LoRA (lora.py): only the adapters train; pi_ref is the base, i.e. adapters disabled
        lora.add_lora(policy.model, cfg.lora_rank, cfg.lora_alpha or 2 * cfg.lora_rank,
                      cfg.lora_targets or lora.default_targets(cfg.model), seed=cfg.seed)
    stages = curriculum.build_curriculum(train_samples, cfg.curriculum, cfg.seed)
    earlier = {name: [s for _, part in stages[:k] for s in part] for k, (name, _) in enumerate(stages)}
    if cfg.stage != "all":
        stages = [(name, part) for name, part in stages if name == cfg.stage]
    # the initial policy, frozen; with LoRA the policy's own model (grpo runs it with the adapters disabled)
    reference = (policy.model if cfg.lora_rank else models.reference_model(policy)) if cfg.kl_coef > 0 else None
    generator = torch.Generator(device=policy.device).manual_seed(distributed.rank_seed(cfg.seed))
    position = {"stage_index": 0, "step_in_stage": 0, "global_step": 0}
    if distributed.world() > 1:  # [multi-GPU] 1/N of each model per rank; bf16 compute over float32 master weights
        distributed.shard(policy.model, getattr(policy.model, "autocast_dtype", None))
        if reference is not None:
            distributed.shard(reference)
    if ckpt is not None:  # the weights (a sharded run's come below, with the optimizer state), then the RNG states
        if cfg.lora_rank:
            lora.load_adapter(policy.model, ckpt)  # the same base, the checkpoint's adapters
        elif distributed.world() == 1:
            device, pixels = policy.device, dict(max_pixels=policy.max_pixels, min_pixels=policy.min_pixels)
            del policy  # the reference keeps the initial weights; never hold three models at once
            policy = models.load_policy(str(ckpt), device=device, dtype=dtype, master_weights=master,
                                        gradient_checkpointing=cfg.gradient_checkpointing, **pixels)
        rng = state["rngs"][distributed.rank()]
        generator.set_state(rng["generator"])
        torch.set_rng_state(rng["torch_rng"])
        random.setstate(rng["python_rng"])
        position = state["position"]
    optimizer = precision.make_optimizer(policy.model, cfg.lr, cfg.weight_decay, eight_bit=cfg.eight_bit_adam,
                                         stochastic_rounding=dtype != torch.float32 and not master and not cfg.lora_rank,
                                         seed=cfg.seed)
    if ckpt is not None:
        if distributed.world() > 1:
            distributed.load_sharded(ckpt / "sharded", policy.model, optimizer)
        else:
            optimizer.load_state_dict(state.pop("optimizer"))  # and the host copy goes once loaded
        if main:
            truncate_metrics(metrics_path, position["global_step"])
            print(f"resumed from {ckpt} at stage {position['stage_index']} step {position['step_in_stage']}")

    reward_cfg = reward_config(cfg)
    score = lambda sample, response: rewards.reward(sample, response, reward_cfg)
    summaries: dict = {}
    nonfinite_run = 0
    t0 = time.time()
    for stage_index, (name, stage_samples) in enumerate(stages):
        if stage_index < position["stage_index"]:
            continue
        steps = stage_batches(cfg, name, stage_samples, earlier[name])
        steps, left_out = distributed.trim_batches(steps)  # [multi-GPU] equal shares; one process: unchanged
        if left_out and main:
            print(f"stage {name}: {left_out} prompts of its last batch left out (not divisible by {distributed.world()} ranks)")
        if not steps:
            print(f"stage {name}: no training samples in this dataset, skipped")
            continue
        gcfg = grpo_config(cfg, name)
        probe = held_out(test_samples, curriculum.stage_qtypes(cfg.curriculum, name), cfg.eval_samples, cfg.seed)
        first = position["step_in_stage"] if stage_index == position["stage_index"] else 0
        n_steps = min(len(steps), cfg.max_steps_per_stage or len(steps))
        # [dynamic sampling] the stage is one stream of prompts: a step takes a batch's worth, then what it draws
        # more; the stream's position goes into the checkpoint, so a resumed run draws the same prompts
        stream = curriculum.PromptStream(steps, position.get("prompts_in_stage", 0) if first else 0) \
            if cfg.dynamic_sampling else None
        bar = tqdm(total=n_steps, initial=first, desc=f"stage {stage_index + 1}/{len(stages)} {name}", dynamic_ncols=True,
                   disable=not main)
        for step in range(first, n_steps):
            if stream is not None and not stream.left():
                break  # [dynamic sampling] the stage's prompts are used up (one pass: fewer steps than batches)
            batch = steps[step] if stream is None else stream.take(len(steps[0]))
            mine = distributed.my_share(batch)  # [multi-GPU] this rank's prompts; one process: all
            metrics, responses = grpo.grpo_step(policy, reference, optimizer, mine, score, gcfg, generator=generator,
                                                more=stream.take if stream is not None else None)
            position = {"stage_index": stage_index, "step_in_stage": step + 1, "global_step": position["global_step"] + 1}
            if stream is not None:
                position["prompts_in_stage"] = stream.position
            row = {"stage": name, "step": step, "global_step": position["global_step"], **metrics,
                   "wall_time": round(time.time() - t0, 3), "example": responses[0][:200] if responses else ""}
            if main:
                with open(metrics_path, "a") as f:
                    f.write(cli.dumps(row) + "\n")
                report.log_step(reporter, row, position["global_step"])
                if reporter is not None and cfg.report_samples_every and position["global_step"] % cfg.report_samples_every == 0:
                    report.log_samples(reporter, position["global_step"], report.sample_records(mine, responses, score, cfg.group_size))
            bar.set_postfix(reward=f"{metrics['reward/total']:.2f}", acc=f"{metrics['reward/accuracy']:.2f}", kl=f"{metrics['kl']:.4f}")
            bar.update(1)
            nonfinite_run = nonfinite_run + 1 if metrics.get("skipped_nonfinite") else 0
            if nonfinite_run and main:
                tqdm.write(f"warning: step {position['global_step']}: non-finite loss or gradient, update skipped ({nonfinite_run} in a row)")
            if nonfinite_run >= cfg.max_nonfinite:
                save_checkpoint(out, policy, optimizer, generator, position, cfg)
                raise SystemExit(f"diverged: {nonfinite_run} consecutive non-finite steps at step {position['global_step']}; "
                                 f"lower --lr or raise --max-grad-norm and --resume from {out}")
            if cfg.eval_every and position["global_step"] % cfg.eval_every == 0 and probe:
                quick = evaluation.evaluate(policy, probe, reward_cfg, *budgets(cfg), progress=False)
                if main:
                    tqdm.write(f"step {position['global_step']} eval: {evaluation.one_line(quick)}")
                    report.log_step(reporter, {"eval": {k: v for k, v in quick.items() if k != "records"}}, position["global_step"])
            last = step + 1 == n_steps or (stream is not None and not stream.left())  # the stage's end saves anyway
            if cfg.save_every and position["global_step"] % cfg.save_every == 0 and not last:
                save_checkpoint(out, policy, optimizer, generator, position, cfg)
        bar.close()
        if main:
            plot_curves(metrics_path, out / "curves.png")
        if probe:  # before the end-of-stage checkpoint, so a kill during it replays the stage's end
            summary = evaluation.evaluate(policy, probe, reward_cfg, *budgets(cfg), progress=main)
            summaries[name] = summary
            if main:
                (out / f"eval_{name}.json").write_text(cli.dumps(summary, indent=2) + "\n")
                print(f"end of stage {name}: {evaluation.one_line(summary)}")
                report.log_step(reporter, {"eval": {k: v for k, v in summary.items() if k != "records"}}, position["global_step"])
        position = {"stage_index": stage_index + 1, "step_in_stage": 0, "global_step": position["global_step"]}
        save_checkpoint(out, policy, optimizer, generator, position, cfg)
    weights = distributed.full_state_dict(policy.model) if distributed.world() > 1 else None  # every rank sends its shards
    if not main:
        return summaries
    report.close(reporter)
    # checkpoints keep the training precision; the exported model/ has the compute dtype (LoRA: the adapters)
    models.save_policy(policy, out / "model", dtype=dtype, budgets=budgets(cfg), state_dict=weights)
    if cfg.merge_lora:  # a full model: the base reloaded unquantized on the CPU, the adapters folded into it
        merged = models.load_policy(str(out / "model"), device="cpu", dtype=dtype)
        lora.merge_lora(merged.model)
        models.save_policy(merged, out / "model-merged", budgets=budgets(cfg))
    if metrics_path.exists() and not (out / "curves.png").exists():  # each stage's end already drew the curves
        plot_curves(metrics_path, out / "curves.png")
    print(f"done in {time.time() - t0:.0f} s: model in {out / 'model'}, metrics in {metrics_path}, curves in {out / 'curves.png'}")
    return summaries


def main(argv: list[str] | None = None) -> dict:
    """The command line: flags -> TrainConfig -> train (under torchrun: then every rank leaves the group together;
    on an error the rank exits and torchrun stops the others)."""
    summaries = train(parse_args(argv))
    distributed.teardown()
    return summaries


if __name__ == "__main__":
    cli.run(main)
