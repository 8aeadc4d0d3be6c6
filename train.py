"""RewardMap training: GRPO with the detail reward over the multi-stage curriculum.

    python train.py --stage all                         # tiny offline model + synthetic maps, CPU, minutes
    python train.py --stage judgement --no-detail-reward   # one stage, an ablation
    python train.py --preset paper --model Qwen/Qwen2.5-VL-7B-Instruct --data /data/reasonmap   # GPU
    python train.py --out runs/x --resume               # continue a killed run exactly where it stopped

Read `TrainConfig` (every flag, with its help: `python train.py --help`), then `train`, the loop: set up the run,
then for each stage of the curriculum its GRPO steps (grpo.grpo_step), then export the model. Outputs in --out:
config.json, metrics.jsonl (one line per GRPO step), evals.jsonl (one line per held-out evaluation), checkpoints/
(plumbing/checkpoints.py), model/ (the final policy), curves.png, eval_<stage>.json (end-of-stage evaluation). The
method is written down in docs/rewardmap.md.
"""
from __future__ import annotations

import dataclasses
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

import curriculum
import data
import eval as evaluation
import grpo
import model as models
import rewards
from data import CACHE_DIR, SYNTHETIC_CITIES
from offline.synthetic import DEMO_CITIES, WORLDS
from plumbing import checkpoints, cli, flags, report, run_folder, signals
from scaling import distributed, lora, precision
from variants import sft
from variants.dynamic_sampling import max_draws


@dataclass(frozen=True)
class TrainConfig(grpo.GRPOConfig, rewards.RewardConfig):
    """A training run's settings: the reward's (rewards.RewardConfig), one GRPO step's (grpo.GRPOConfig) and the
    run's own, below. Each field is a flag `--field-name` whose help is the docstring under it; a run is one of
    these, so it goes to grpo_step and rewards.reward as it is. Checked once, at construction."""

    # ---- what to train on
    stage: str = "all"
    """stage(s) to run: judgement | counting | planning | all (coarse: perception | planning; none: all) | sft (the SFT alone, no GRPO)"""
    curriculum: str = "fine"
    """curriculum variant: fine (RewardMap) | coarse (all Plus types, then planning) | none (all shuffled)"""
    model: str = "tiny"
    """policy: 'tiny' (the embedded offline Qwen2.5-VL) or a local path / hub id of a Qwen2(.5)-VL or causal LM"""
    data: str = ""
    """dataset folder(s), comma-separated (our export, or ReasonMap-Plus,ReasonMap-Train copies); empty: synthetic maps"""
    cities: int = SYNTHETIC_CITIES
    """synthetic dataset: number of cities (generated once into --cache-dir, reused afterwards)"""
    world: str = field(default="default", metadata={"choices": WORLDS})
    """synthetic dataset: default (cities drawn as map images) | demo (many small cities, no images: the tiny model is then a text model that reads each map as text; --preset demo, docs/demo.md)"""
    preset: str = ""
    """'demo': the learning demo (a text-only tiny model on the demo world, into runs/demo; docs/demo.md) | 'paper': the paper's hyperparameters (Qwen2.5-VL-7B-Instruct, lr 1e-6, 16x8, 2048 tokens, bf16) | 'released': the authors' training script | 'sft-rl': the authors' SFT, then RL (no curriculum: their loader shuffles)"""
    # ---- optimisation
    batch_size: int = 8
    """prompts per GRPO step"""
    lr: float = 2e-3
    """AdamW learning rate of GRPO (--model tiny: 2e-4, see TINY_DEFAULTS; the paper: 1e-6 for a 7B model)"""
    weight_decay: float = 0.0
    """AdamW weight decay (the paper: 1e-2)"""
    planning_max_new_tokens: int = 0
    """response token budget for planning questions (0: 48 for the tiny model; 2048 otherwise)"""
    drop_last: bool = False
    """drop each stage's last partial batch (the released code's data loader)"""
    continuous_batches: bool = False
    """the released loader's batches: one stream over the ordered stages cut into batches that cross stage boundaries (each runs in the stage it starts in); the final partial batch and, by the released off-by-one, the last full one are dropped (curriculum.continuous_batches)"""
    max_prompt_tokens: int = 0
    """drop training questions whose prompt (text + image tokens) is longer than this, counted and reported (the released cap: 20000; 0: none)"""
    replay: float = 0.0
    """share of each batch added from earlier stages' questions, against forgetting (0: none; --model tiny: 0.5)"""
    sft: int = 0
    """supervised fine-tuning steps on the training questions' reference answers before GRPO, which then starts from the SFT model and takes it as its KL reference (variants/sft.py; 0: none; --model tiny: 800)"""
    sft_lr: float = 0.0
    """peak learning rate of the SFT, after 10% warmup, cosine to 0 (0: --lr; --model tiny: 2e-3; the authors' SFT: 1e-5)"""
    sft_lora_rank: int = 0
    """SFT with LoRA adapters of this rank on the language model's linear layers, merged into the weights before GRPO (the authors': 8; 0: full fine-tuning)"""
    sft_batch_size: int = 16
    """questions per SFT step, each of a uniformly drawn type"""
    sft_data: str = "all"
    """what SFT learns: all (every type; boxed answers, planning's route block) | released (the authors' SFT data: the five Plus types, bare answers) | working (all, with working before torf and counting2 answers: the asked stations' rows of the map read by station, and torf2's asked line, variants/sft.working; torf questions drawn 3x as often; the demo's)"""
    sft_drill: int = 0
    """steps of the reading drill before the SFT's (variants/sft.drill_pairs: maps read by station, then their rows again in another order, the second half learned: the lookup the demo's questions need; the demo's: 600)"""
    max_steps_per_stage: int = 0
    """cap on GRPO steps per stage (0: one pass over the stage's data)"""
    # ---- model, precision, LoRA (scaling/)
    max_pixels: int = 0
    """image budget in pixels for the vision encoder (0: the model's default)"""
    dtype: str = ""
    """compute dtype: float32 | bfloat16 (empty: bfloat16 on CUDA, float32 on CPU)"""
    bf16_update: str = "master"
    """with bfloat16: 'master' (float32 weights, bf16 autocast) | 'stochastic' (bf16 weights, stochastically rounded AdamW)"""
    gradient_checkpointing: bool = False
    """recompute activations in backward (large models)"""
    eight_bit_adam: bool = False
    """8-bit AdamW moments: bitsandbytes under --bf16-update master (GPU); precision.AdamWSR's own under stochastic"""
    lora_rank: int = 0
    """LoRA: train low-rank adapters of this rank instead of every weight (0: full fine-tuning)"""
    lora_alpha: float = 0.0
    """LoRA scale numerator: the update is (alpha / rank) B A (0: 2 x rank)"""
    lora_targets: str = ""
    """LoRA: comma-separated layer names to adapt (empty: the language model's attention and MLP projections, plus lm_head for the tiny model; add 'visual' for the vision tower)"""
    qlora: bool = False
    """QLoRA: the frozen base in 4-bit NF4 (bitsandbytes, CUDA only; with --lora-rank)"""
    merge_lora: bool = False
    """with --lora-rank: also write the adapters merged into a full model, --out/model-merged"""
    # ---- the run
    seed: int = 0
    """seed for data, curriculum shuffle, sampling and model init"""
    out: str = "runs/default"
    """output folder"""
    cache_dir: str = CACHE_DIR
    """where the synthetic dataset and the tiny model are cached"""
    resume: bool = False
    """continue from the latest checkpoint in --out"""
    overwrite: bool = False
    """start over in an --out that holds an earlier run, deleting its files (without it, such a folder is refused: continue it with --resume)"""
    save_every: int = 50
    """write a checkpoint every N steps (and at the end of each stage)"""
    keep_checkpoints: int = 1
    """full checkpoints kept on disk (the newest N; one more exists while the next is being written)"""
    eval_every: int = 0
    """evaluate on held-out samples of the current stage every N steps (0: only at stage ends)"""
    eval_samples: int = 200
    """held-out samples per evaluation (0: the whole test split)"""
    max_nonfinite: int = 5
    """stop the run after this many consecutive steps with a non-finite loss"""
    report_to: str = field(default="none", metadata={"choices": report.KINDS})
    """live dashboard of the metrics.jsonl numbers: none | tensorboard (event files in --out/tensorboard; pip install tensorboard) | wandb (project rewardmap; pip install wandb; WANDB_MODE=offline needs no account)"""
    report_samples_every: int = 10
    """with --report-to: a table of a few sampled responses and their reward parts every N steps (0: never)"""
    debug: bool = False
    """show the full traceback of an error (otherwise a user error prints one line)"""

    def __post_init__(self):
        grpo.GRPOConfig.__post_init__(self)
        rewards.RewardConfig.__post_init__(self)
        check_config(self)


TINY_DEFAULTS = dict(sft=800, sft_lr=2e-3, lr=2e-4, replay=0.5)
"""What `--model tiny` trains with when no --preset is given, in one process without LoRA (a flag given wins):
supervised fine-tuning first (variants/sft.py: what an instruct model brings), then GRPO at a tenth of its learning
rate with half a batch of earlier stages' questions replayed in each later batch (docs/results.md)."""

# Image budget: both presets keep the image processor's default (12,845,056 pixels, at most 16,384 visual tokens
# per map), what the authors' model saw: their yaml's max_pixels (128,450,560) only feeds a PIL pre-resize that
# almost never fires, and the paper states none. One-GPU recipes lower --max-pixels (docs/scaling.md). Micro-batch:
# memory only (the update is the same): 2 fits 8 x 80 GB at this budget (tools.bench --memory-plan); the released
# script uses 1 per GPU.
PRESETS = {
    "paper": dict(model="Qwen/Qwen2.5-VL-7B-Instruct", lr=1e-6, kl_coef=1e-3, batch_size=16, group_size=8,
                  max_new_tokens=2048, planning_max_new_tokens=2048, weight_decay=1e-2, max_grad_norm=1.0,
                  gradient_checkpointing=True, micro_batch_size=2, eval_every=0),
    # the authors' released training script (scripts/reward_map.sh + reward_map.yaml + verl defaults)
    "released": dict(model="Qwen/Qwen2.5-VL-7B-Instruct", lr=1e-6, weight_decay=1e-2, kl_coef=1e-2, kl_clamp=10.0,
                     batch_size=16, group_size=4, aggregation="sequence", entropy_coef=1e-3, format_score=0.0,
                     detail_floor=False, detail_variant="released", drop_last=True, max_new_tokens=2048,
                     planning_max_new_tokens=2048, max_grad_norm=1.0, gradient_checkpointing=True, micro_batch_size=1,
                     continuous_batches=True, max_prompt_tokens=20_000),
}
# the authors' SFT, then RL from the SFT model (scripts/sft.yaml, then train_sft_rl.sh / .yaml): SFT with LoRA rank 8,
# lr 1e-5, cosine after 10% warmup, on their SFT data (the Plus questions' bare answers; 3,000 samples less a 10%
# validation split = 2,700, here 169 batches of 16); then the released RL, whose shuffled loader (`shuffle: true`)
# undoes the curriculum: --curriculum none
PRESETS["sft-rl"] = dict(PRESETS["released"], sft=169, sft_lr=1e-5, sft_lora_rank=8, sft_batch_size=16,
                         sft_data="released", curriculum="none")
# the learning demo (docs/demo.md): the demo world's small cities read as text by a text-only tiny model, the reading
# drill and an SFT cold start with working, then GRPO over the curriculum; ~4.5 min on a 2-core CPU from an empty cache
PRESETS["demo"] = dict(world="demo", cities=DEMO_CITIES, out="runs/demo", sft=1500, sft_drill=600, sft_lr=1e-3,
                       sft_batch_size=16, sft_data="working", lr=1e-4, replay=0.5, batch_size=8, group_size=8,
                       max_new_tokens=32, planning_max_new_tokens=64, max_steps_per_stage=40, eval_every=10)
SECTIONS = {rewards.RewardConfig: "the reward (rewards.RewardConfig, docs/rewardmap.md §3)",
            grpo.GRPOConfig: "one GRPO step (grpo.GRPOConfig, docs/rewardmap.md §4)"}


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """The flags (plumbing/flags.py), laid over the defaults: the fields' own, then the tiny model's (TINY_DEFAULTS),
    then the preset's; a flag the command line gives wins, in any form argparse accepts (`--lr=3e-6`, `--lr 3e-6`)."""
    ap = flags.parser(TrainConfig, __doc__.split("\n")[0], {TrainConfig: "the run (train.TrainConfig)", **SECTIONS})
    given = flags.given(ap, argv)
    preset = given.get("preset", "")
    if preset and preset not in PRESETS:
        ap.error(f"unknown --preset {preset!r}; choose one of {', '.join(PRESETS)}")
    settings = dict(PRESETS.get(preset, {}))
    settings.update(given)
    if settings.get("model", "tiny") == "tiny" and not preset and not settings.get("lora_rank") \
            and distributed.launched_ranks() == 1:
        settings = {**TINY_DEFAULTS, **settings}
    if settings.get("advantage") == "dr-grpo" and "aggregation" not in given:
        settings["aggregation"] = "constant"  # Dr. GRPO is both fixes; --aggregation token ablates the loss's one
    return TrainConfig(**settings)


def check_config(cfg: TrainConfig) -> None:
    """The run's own checks, naming the flag (a GRPO step's and the reward's check themselves)."""
    stages = curriculum.stage_names(cfg.curriculum)
    if cfg.stage not in ("all", "sft") and cfg.stage not in stages:
        raise ValueError(f"--stage {cfg.stage!r} is not a stage of --curriculum {cfg.curriculum} ({', '.join(stages)}, "
                         "all, or sft)")
    if cfg.stage == "sft" and not cfg.sft:
        raise ValueError("--stage sft runs the SFT alone: give its steps with --sft N")
    if cfg.sft_drill and not cfg.sft:
        raise ValueError("--sft-drill runs at the start of the SFT: give the SFT's steps with --sft N too")
    models.compute_dtype(cfg.dtype)  # raises on an unknown --dtype
    if cfg.bf16_update not in precision.SCHEMES:
        raise ValueError(f"--bf16-update must be one of {', '.join(precision.SCHEMES)}, got {cfg.bf16_update!r}")
    flags.check(cfg, *((name, getattr(cfg, name) >= 1, ">= 1") for name in ("batch_size", "keep_checkpoints")),
                *((name, getattr(cfg, name) >= 0, ">= 0") for name in (
                    "planning_max_new_tokens", "sft", "sft_drill", "sft_lr", "sft_lora_rank", "lora_rank", "lora_alpha",
                    "report_samples_every", "max_prompt_tokens")),
                ("lr", cfg.lr > 0, "> 0"), ("replay", 0 <= cfg.replay <= 1, "in [0, 1]"),
                ("sft_batch_size", cfg.sft_batch_size >= 1, ">= 1"))
    ranks = distributed.launched_ranks()
    if cfg.batch_size % ranks:
        raise ValueError(f"--batch-size {cfg.batch_size} must be a multiple of the {ranks} torchrun processes: "
                         "each takes an equal share of every step's prompts")
    if ranks > 1 and cfg.dynamic_sampling:  # ranks would draw different numbers of prompts: FSDP needs lock-step
        raise ValueError("--dynamic-sampling is not supported with several processes yet")
    if ranks > 1 and (cfg.eight_bit_adam or cfg.bf16_update == "stochastic"):
        raise ValueError("with several processes the weights are sharded float32 masters (FSDP2): use --bf16-update "
                         "master without --eight-bit-adam (those two are the one-GPU schemes)")
    lora_only = [flag for flag, on in (("--qlora", cfg.qlora), ("--merge-lora", cfg.merge_lora),
                                       ("--lora-targets", bool(cfg.lora_targets))) if on]
    if lora_only and not cfg.lora_rank:
        raise ValueError(f"{', '.join(lora_only)} need --lora-rank (LoRA adapters)")
    if ranks > 1 and cfg.lora_rank:
        raise ValueError("--lora-rank is not supported with several processes yet (LoRA is the one-small-GPU recipe)")
    if cfg.continuous_batches and (cfg.replay or cfg.dynamic_sampling):
        raise ValueError("--continuous-batches (the released loader's batches) cannot be combined with --replay or "
                         "--dynamic-sampling, which work on each stage's own batches")
    if cfg.sft and ranks > 1:
        raise ValueError("--sft runs in one process: run it alone (python train.py --stage sft --sft N), then torchrun "
                         "GRPO from its model (--model OUT/model), which is then GRPO's start and KL reference")
    if cfg.sft_lora_rank and cfg.qlora:
        raise ValueError("--sft-lora-rank merges the SFT adapters into the weights, which a 4-bit --qlora base cannot take")


MAY_CHANGE_ON_RESUME = ("resume", "overwrite", "out", "cache_dir", "save_every", "keep_checkpoints", "eval_every",
                        "eval_samples", "max_nonfinite", "gradient_checkpointing", "decode_chunk", "compile_decode", "debug",
                        "merge_lora", "report_to", "report_samples_every")
"""The settings a resumed run may change: where things are written and how often, what is only logged, and
recomputation that leaves the update's value unchanged. Every other TrainConfig field changes what the run
computes, so a resumed run must keep the killed run's value, or its steps would not continue that run's."""


def budgets(cfg: TrainConfig) -> tuple[int, int]:
    """The run's (judgement / counting, planning) response-token budgets (`model.token_budgets`)."""
    return models.token_budgets(cfg.model, cfg.max_new_tokens, cfg.planning_max_new_tokens)


def trained_on(cfg: TrainConfig) -> dict:
    """What a saved policy records of its training data (model.trained_on; eval.py warns on other synthetic data)."""
    return {"data": cfg.data, "cities": cfg.cities, "seed": cfg.seed, "world": cfg.world}


def stage_config(cfg: TrainConfig, stage: str) -> TrainConfig:
    """The run's settings for one stage's GRPO steps: planning stages get the planning token budget."""
    plus, planning = budgets(cfg)
    return dataclasses.replace(cfg, max_new_tokens=planning if stage in ("planning", "all") else plus)


# ============================================================================ ALGO LOGIC: the training loop

@dataclass
class Run:
    """What a run carries from step to step: the policy being trained, its frozen reference and optimizer, the
    sampling generator, where it stands in the curriculum, and where it writes."""

    cfg: TrainConfig
    out: Path
    policy: models.Policy
    reference: object  # the frozen pi_ref (None without a KL term; with LoRA the policy's own model, adapters off)
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    stages: list  # [(stage name, its training samples in curriculum order)]
    earlier: dict  # stage name -> the samples of the stages before it (for --replay)
    test: list  # the held-out samples
    continuous: dict  # with --continuous-batches: stage name -> its batches of the released loader's stream
    position: dict = field(default_factory=lambda: {"stage_index": 0, "step_in_stage": 0, "global_step": 0})
    reporter: object = None
    nonfinite: int = 0  # consecutive steps with a non-finite loss
    saved_step: int = -1  # the global step of the newest checkpoint (written or resumed from)
    started: float = field(default_factory=time.time)

    @property
    def main(self) -> bool:
        return distributed.is_main()


def train(cfg: TrainConfig) -> dict:
    """Run the curriculum; returns {stage: end-of-stage eval summary}. Under torchrun, every rank runs this
    (scaling/distributed.py): each takes its share of every batch; rank 0 alone writes files and prints.
    [safety] One run at a time writes --out (its lock, plumbing/run_folder.py), and during GRPO a SIGTERM stops it
    cleanly after the step in progress, with a checkpoint (plumbing/signals.py)."""
    distributed.setup()
    with run_folder.claim(Path(cfg.out), cfg.resume, cfg.overwrite) as folder:
        run = start_run(cfg, folder)
        summaries = {}
        with signals.stop_on_sigterm():
            for stage_index, (name, stage_samples) in enumerate(run.stages):
                if stage_index < run.position["stage_index"]:
                    continue  # done before the checkpoint this run resumed from
                summary = train_stage(run, stage_index, name, stage_samples)
                if summary is not None:
                    summaries[name] = summary
        export(run)
    return summaries


def train_stage(run: Run, stage_index: int, name: str, stage_samples: list) -> dict | None:
    """One stage of the curriculum: its GRPO steps, then a held-out evaluation and a checkpoint."""
    cfg = run.cfg
    steps = run.continuous[name] if cfg.continuous_batches else stage_batches(cfg, name, stage_samples, run.earlier[name])
    steps, left_out = distributed.trim_batches(steps)  # [multi-GPU] equal shares; one process: unchanged
    if left_out and run.main:
        print(f"stage {name}: {left_out} prompts of its last batch left out (not divisible by {distributed.world()} ranks)")
    if not steps:
        print(f"stage {name}: not one whole batch of its prompts (--drop-last, or {distributed.world()} ranks), skipped")
        return None
    step_cfg = stage_config(cfg, name)
    probe = held_out(run.test, curriculum.stage_qtypes(cfg.curriculum, name), cfg.eval_samples, cfg.seed)
    first = run.position["step_in_stage"] if stage_index == run.position["stage_index"] else 0
    n_steps = min(len(steps), cfg.max_steps_per_stage or len(steps))
    # [variant] with dynamic sampling a step takes a batch's worth of the stage's prompts, then draws more; the
    # stream's position goes into the checkpoint, so a resumed run draws the same prompts
    stream = curriculum.PromptStream(steps, run.position.get("prompts_in_stage", 0) if first else 0) \
        if cfg.dynamic_sampling else None
    with tqdm(total=n_steps, initial=first, desc=f"stage {stage_index + 1}/{len(run.stages)} {name}",
              dynamic_ncols=True, disable=not run.main) as bar:  # closed on an error too
        for step in range(first, n_steps):
            if stream is not None and not stream.left():
                break  # the stage's prompts are used up (one pass: fewer steps than batches)
            if signals.requested():  # [safety] SIGTERM: a checkpoint of the steps done, then exit
                stop(run)
            batch = steps[step] if stream is None else stream.take(len(steps[0]))
            mine = distributed.my_share(batch)  # [multi-GPU] this rank's prompts; one process: all
            metrics, responses = grpo.grpo_step(run.policy, run.reference, run.optimizer, mine, score_fn(cfg),
                                                step_cfg, generator=run.generator,
                                                more=stream.take if stream is not None else None)
            run.position = {"stage_index": stage_index, "step_in_stage": step + 1,
                            "global_step": run.position["global_step"] + 1}
            if stream is not None:
                run.position["prompts_in_stage"] = stream.position
            log_step(run, name, step, metrics, responses, mine)
            bar.set_postfix(reward=f"{metrics['reward/total']:.2f}", acc=f"{metrics['reward/accuracy']:.2f}",
                            kl=f"{metrics['kl']:.4f}")
            bar.update(1)
            stop_if_diverged(run, metrics)
            last = step + 1 == n_steps or (stream is not None and not stream.left())  # the stage's end saves anyway
            if cfg.eval_every and run.position["global_step"] % cfg.eval_every == 0 and probe and not last:
                evaluate(run, probe, name, end=False)  # (the stage's end evaluates anyway)
            if cfg.save_every and run.position["global_step"] % cfg.save_every == 0 and not last:
                save(run)
    if run.main:
        report.plot_curves(run.out / "metrics.jsonl", run.out / "curves.png")
    summary = evaluate(run, probe, name) if probe else None  # before the checkpoint: a kill replays the stage's end
    run.position = {"stage_index": stage_index + 1, "step_in_stage": 0, "global_step": run.position["global_step"]}
    save(run)
    return summary


def stage_batches(cfg: TrainConfig, name: str, stage_samples: list, earlier: list) -> list[list]:
    """The stage's prompt batches in curriculum order, one per GRPO step (`curriculum.batches`), with replayed
    earlier questions (`curriculum.with_replay`). [variant] With dynamic sampling and --max-steps-per-stage, steps
    draw more prompts than their batch: enough further batches (passes) come after, so each of the stage's steps
    can draw its most (batch + max draws); each longer list starts with the shorter one."""
    def make(n: int | None) -> list[list]:
        steps = curriculum.batches(stage_samples, cfg.batch_size, n, seed=cfg.seed,
                                   group=curriculum.group_of(cfg.curriculum, name), drop_last=cfg.drop_last)
        return curriculum.with_replay(steps, earlier, cfg.replay, cfg.seed, name)

    steps = make(cfg.max_steps_per_stage or None)
    if cfg.dynamic_sampling and cfg.max_steps_per_stage and steps:
        per_step = len(steps[0]) + max_draws(cfg.dynamic_sampling_max_draws, len(steps[0]))
        n = len(steps)
        while sum(map(len, steps)) < cfg.max_steps_per_stage * per_step:
            n *= 2
            steps = make(n)
    return steps


def score_fn(cfg: rewards.RewardConfig):
    """The reward of a response, as grpo_step calls it: `score(sample, response) -> rewards.Reward`."""
    return lambda sample, response: rewards.reward(sample, response, cfg)


# ============================================================================ setting up, logging, exporting

def start_run(cfg: TrainConfig, folder: run_folder.Folder) -> Run:
    """Everything a run starts from: the checkpoint it resumes, the data, the policy (after the SFT, with LoRA
    adapters), the frozen reference, the curriculum, the optimizer, and, when resuming, every state the checkpoint
    holds. Nothing is written into --out until the data and the model have loaded (`folder.begin`)."""
    out = folder.out
    ckpt, state = open_run_folder(cfg, out)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    with distributed.main_first():  # rank 0 fills the cache (synthetic maps, tiny model); the others read it
        train_samples, test_samples = data.load_data(cfg.data, cfg.cities, cfg.seed, cfg.cache_dir, world=cfg.world)
        stages = selected_stages(cfg, train_samples)  # a stage without questions: an error before the model loads
        policy = models.load_model(cfg.model, train_samples, cfg.seed, cfg.cache_dir, cfg.max_pixels,
                                   cfg.gradient_checkpointing, *precision_of(cfg), qlora=cfg.qlora, world=cfg.world)
    if cfg.max_prompt_tokens:  # the released cap: longer prompts are dropped, and said so
        train_samples = models.drop_long_prompts(policy, train_samples, cfg.max_prompt_tokens, distributed.is_main())
        stages = selected_stages(cfg, train_samples, f" left by --max-prompt-tokens {cfg.max_prompt_tokens}")
    folder.begin(dataclasses.asdict(cfg), run_folder.launch_facts(
        policy.device, precision_of(cfg)[0], next(policy.model.parameters()).dtype,
        state["position"]["global_step"] if state else None))
    if cfg.sft:  # before the reference is copied: GRPO starts from the SFT model and is anchored to it
        run_sft(cfg, policy, train_samples, out)
    if cfg.lora_rank:  # LoRA (scaling/lora.py): only the adapters train; pi_ref is the base, i.e. adapters disabled
        lora.add_lora(policy.model, cfg.lora_rank, cfg.lora_alpha or 2 * cfg.lora_rank,
                      cfg.lora_targets or lora.default_targets(cfg.model), seed=cfg.seed)
    earlier = {name: [s for _, part in stages[:k] for s in part] for k, (name, _) in enumerate(stages)}
    # the initial policy, frozen; with LoRA the policy's own model (grpo runs it with the adapters disabled)
    reference = (policy.model if cfg.lora_rank else models.reference_model(policy)) if cfg.kl_coef > 0 else None
    if distributed.world() > 1:  # [multi-GPU] 1/N of each model per rank; bf16 compute over float32 master weights
        distributed.shard(policy.model, getattr(policy.model, "autocast_dtype", None))
        if reference is not None:
            distributed.shard(reference)
    if ckpt is not None and not cfg.lora_rank and distributed.world() == 1:  # the checkpoint's weights
        device, pixels, map_text = policy.device, dict(max_pixels=policy.max_pixels, min_pixels=policy.min_pixels), \
            policy.map_text
        del policy  # the reference keeps the initial weights; never hold three models at once
        dtype, master = precision_of(cfg)
        policy = models.load_policy(str(ckpt), device=device, dtype=dtype, master_weights=master,
                                    gradient_checkpointing=cfg.gradient_checkpointing, **pixels)
        policy.map_text = map_text
    dtype, master = precision_of(cfg)
    optimizer = precision.make_optimizer(policy.model, cfg.lr, cfg.weight_decay, eight_bit=cfg.eight_bit_adam,
                                         stochastic_rounding=dtype != torch.float32 and not master and not cfg.lora_rank,
                                         seed=cfg.seed)
    run = Run(cfg, out, policy, reference, optimizer,
              torch.Generator(device=policy.device).manual_seed(distributed.rank_seed(cfg.seed)),
              [(n, p) for n, p in stages if cfg.stage in ("all", n)], earlier, test_samples,
              curriculum.continuous_batches(stages, cfg.batch_size) if cfg.continuous_batches else {})
    if ckpt is not None:
        restore(run, ckpt, state)
        run.saved_step = run.position["global_step"]
    if run.main:
        run.reporter = report.open_reporter(cfg.report_to, out, dataclasses.asdict(cfg), out.resolve().name,
                                            resume_step=run.position["global_step"] if ckpt is not None else None)
    return run


def run_sft(cfg: TrainConfig, policy: models.Policy, samples: list, out: Path) -> None:
    """The SFT stage (variants/sft.py, `sft.stage`) in --out/sft, with the run's precision scheme for its optimizer."""
    dtype, master = precision_of(cfg)
    stochastic = dtype != torch.float32 and not master and not cfg.sft_lora_rank
    sft.stage(cfg, policy, samples, out / "sft", lambda model: precision.make_optimizer(
        model, cfg.sft_lr or cfg.lr, 0.0, stochastic_rounding=stochastic, seed=cfg.seed), distributed.is_main())


def precision_of(cfg: TrainConfig) -> tuple[torch.dtype, bool]:
    """(compute dtype, float32 master weights?): with LoRA the base is frozen, so no master copy (the adapters
    are float32 themselves)."""
    return models.compute_dtype(cfg.dtype), cfg.bf16_update == "master" and not cfg.lora_rank


def open_run_folder(cfg: TrainConfig, out: Path) -> tuple[Path | None, dict | None]:
    """With --resume, the checkpoint to continue and its trainer state (checked against its manifest, with an
    earlier intact one to fall back on: checkpoints.resume_point), checked against this run's settings and process
    count; (None, None) for a new run, or for a run killed in its SFT (run_sft resumes that). Reads only."""
    if not cfg.resume:
        return None, None
    try:
        ckpt, state = checkpoints.resume_point(out)
    except FileNotFoundError:
        if (out / "sft" / sft.STATE).is_file():
            return None, None
        raise
    checkpoints.check_resume_config(dataclasses.asdict(cfg), state.get("config", {}), ckpt, MAY_CHANGE_ON_RESUME)
    if state.get("world_size", 1) != distributed.world():
        raise ValueError(f"--resume: {ckpt} was written by {state.get('world_size', 1)} processes; resume it "
                         f"with as many (now {distributed.world()})")
    return ckpt, state


def selected_stages(cfg: TrainConfig, train_samples: list, left: str = "") -> list[tuple[str, list]]:
    """The curriculum's stages (curriculum.build_curriculum); a stage the run trains that has no questions in the
    data (or none `left` by a filter) is an error naming it."""
    stages = curriculum.build_curriculum(train_samples, cfg.curriculum, cfg.seed)
    empty = [name for name, part in stages if cfg.stage in ("all", name) and not part]
    if empty:
        kinds = ", ".join(sorted(set().union(*(curriculum.stage_qtypes(cfg.curriculum, n) for n in empty))))
        raise ValueError(f"--data {cfg.data or '(synthetic)'}: no training questions{left} of stage "
                         f"{', '.join(empty)} ({kinds}); train the other stages with --stage, or add data that has them")
    return stages


def restore(run: Run, ckpt: Path, state: dict) -> None:
    """A resumed run's states from its checkpoint: LoRA adapters or sharded weights (full weights were loaded with
    the policy), the optimizer's moments, every RNG, the position in the curriculum; later metrics lines dropped."""
    if run.cfg.lora_rank:
        lora.load_adapter(run.policy.model, ckpt)  # the same base, the checkpoint's adapters
    if distributed.world() > 1:
        distributed.load_sharded(ckpt / "sharded", run.policy.model, run.optimizer)
    else:
        run.optimizer.load_state_dict(state.pop("optimizer"))  # and the host copy goes once loaded
    rng = state["rngs"][distributed.rank()]
    run.generator.set_state(rng["generator"])
    torch.set_rng_state(rng["torch_rng"])
    random.setstate(rng["python_rng"])
    run.position = state["position"]
    if run.main:
        for log in ("metrics.jsonl", "evals.jsonl"):
            checkpoints.truncate_metrics(run.out / log, run.position["global_step"])
        print(f"resumed from {ckpt} at stage {run.position['stage_index']} step {run.position['step_in_stage']}")


def log_step(run: Run, stage: str, step: int, metrics: dict, responses: list[str], batch: list) -> None:
    """One metrics.jsonl line (and the dashboard's numbers, a few sampled responses every so often)."""
    if not run.main:
        return
    global_step = run.position["global_step"]
    row = {"stage": stage, "step": step, "global_step": global_step, **metrics,
           "wall_time": round(time.time() - run.started, 3), "example": responses[0][:200] if responses else ""}
    with open(run.out / "metrics.jsonl", "a") as f:
        f.write(cli.dumps(row) + "\n")
    report.log_step(run.reporter, row, global_step)
    every = run.cfg.report_samples_every
    if run.reporter is not None and every and global_step % every == 0:
        records = report.sample_records(batch, responses, score_fn(run.cfg), run.cfg.group_size)
        report.log_samples(run.reporter, global_step, records)


def stop_if_diverged(run: Run, metrics: dict) -> None:
    """[safety] Count consecutive steps whose update was skipped for a non-finite loss; stop after
    --max-nonfinite of them, with a checkpoint to resume from."""
    run.nonfinite = run.nonfinite + 1 if metrics.get("skipped_nonfinite") else 0
    step = run.position["global_step"]
    if run.nonfinite and run.main:
        tqdm.write(f"warning: step {step}: non-finite loss or gradient, update skipped ({run.nonfinite} in a row)")
    if run.nonfinite >= run.cfg.max_nonfinite:
        save(run)
        raise SystemExit(f"diverged: {run.nonfinite} consecutive non-finite steps at step {step}; "
                         f"lower --lr or raise --max-grad-norm and --resume from {run.out}")


def held_out(test: list, qtypes: set[str], n: int, seed: int) -> list:
    """A fixed, seeded subset of the test split for the given question types (n = 0: all of them)."""
    pool = [s for s in test if s.qtype in qtypes]
    return pool if n <= 0 or n >= len(pool) else random.Random(f"{seed}:eval").sample(pool, n)


def evaluate(run: Run, probe: list, stage: str, end: bool = True) -> dict:
    """Greedy evaluation on the held-out `probe` (eval.py's metrics) during `stage`; at the stage's `end` also
    written to eval_<stage>.json. Every evaluation (stage ends and --eval-every's) adds a line to evals.jsonl (the
    summary without its records), so that a stage's held-out curve can be read afterwards."""
    summary = evaluation.evaluate(run.policy, probe, run.cfg, *budgets(run.cfg), progress=end and run.main)
    if run.main:
        scores = {k: v for k, v in summary.items() if k != "records"}
        with open(run.out / "evals.jsonl", "a") as f:
            f.write(cli.dumps({"global_step": run.position["global_step"], "stage": stage, "stage_end": end,
                               **scores}) + "\n")
        if end:
            (run.out / f"eval_{stage}.json").write_text(cli.dumps(summary, indent=2) + "\n")
        (print if end else tqdm.write)(
            f"{'end of stage ' + stage if end else 'step ' + str(run.position['global_step']) + ' eval'}: "
            f"{evaluation.one_line(summary)}")
        report.log_step(run.reporter, {"eval": scores}, run.position["global_step"])
    return summary


def save(run: Run) -> None:
    checkpoints.save_checkpoint(run.out, run.policy, run.optimizer, run.generator, run.position, run.cfg)
    run.saved_step = run.position["global_step"]


def stop(run: Run) -> None:
    """[safety] After SIGTERM (plumbing/signals.py): a checkpoint of the steps done (unless there is one), every
    rank leaves the group, and the run exits with status signals.STOPPED, saying how to continue."""
    if run.saved_step != run.position["global_step"]:
        save(run)
    distributed.teardown()
    if run.main:
        print(f"stopped by SIGTERM after step {run.position['global_step']}: checkpoint in {run.out / 'checkpoints'}; "
              f"continue with the same command and --resume", file=sys.stderr, flush=True)
    raise SystemExit(signals.STOPPED)


def export(run: Run) -> None:
    """The final policy into --out/model (LoRA: the adapters; with --merge-lora also a merged full model)."""
    weights = distributed.full_state_dict(run.policy.model) if distributed.world() > 1 else None  # every rank sends
    if not run.main:
        return
    report.close(run.reporter)
    out, cfg, dtype = run.out, run.cfg, precision_of(run.cfg)[0]
    # checkpoints keep the training precision; the exported model/ has the compute dtype (LoRA: the adapters)
    models.save_policy(run.policy, out / "model", dtype=dtype, budgets=budgets(cfg), state_dict=weights,
                       trained_on=trained_on(cfg))
    if cfg.merge_lora:  # a full model: the base reloaded unquantized on the CPU, the adapters folded into it
        merged = models.load_policy(str(out / "model"), device="cpu", dtype=dtype)
        lora.merge_lora(merged.model)
        models.save_policy(merged, out / "model-merged", budgets=budgets(cfg), trained_on=trained_on(cfg))
    metrics = out / "metrics.jsonl"
    if metrics.exists() and not (out / "curves.png").exists():  # each stage's end already drew the curves
        report.plot_curves(metrics, out / "curves.png")
    print(f"done ({time.time() - run.started:.0f} s of GRPO): model in {out / 'model'}, metrics in {metrics}, "
          f"curves in {out / 'curves.png'}")


def main(argv: list[str] | None = None) -> dict:
    """The command line: flags -> TrainConfig -> train (under torchrun: then every rank leaves the group together;
    on an error the rank exits and torchrun stops the others)."""
    summaries = train(parse_args(argv))
    distributed.teardown()
    return summaries


if __name__ == "__main__":
    cli.run(main)
