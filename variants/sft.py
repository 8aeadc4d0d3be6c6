"""Supervised fine-tuning before GRPO (`train.py --sft N`): the cold start the paper compares RL with.

The paper's central claim is that its multi-stage RL is a better cold start than supervised fine-tuning. The
authors' SFT recipe (their scripts/sft.yaml, LLaMA-Factory): LoRA rank 8 on every linear layer of the language
model, lr 1e-5 with a cosine schedule after 10% warmup, 3,000 samples, one epoch; then RL from the SFT model
(train_sft_rl.sh). Here, `sft` runs `steps` AdamW steps of next-token training on the training questions' reference
answers, written as a response gives them (`answer_target`), before GRPO, so that GRPO starts from the SFT model
and takes it as its frozen KL reference:

- batches of `batch_size` questions, the question type drawn uniformly first, then a question of that type, so a
  rare type (counting3: one question per map) is learnt as often as a common one; batch k is drawn from (seed, k)
  alone;
- full fine-tuning, or LoRA adapters of `lora_rank` merged into the weights at the end (`--sft-lora-rank`);
- the learning rate warms up linearly over the first 10% of the steps, then follows a cosine down to 0 (`lr_at`);
  gradients clipped at norm 1 (LLaMA-Factory's default);
- resumable: every `save_every` steps and at the end, the trained weights (the adapters with LoRA), the optimizer's
  moments, the step and the losses so far go to `folder` (written atomically); `sft(..., folder=...)` continues
  from there, batch for batch, or loads the finished SFT's weights without redoing it.

`data="released"` trains on what the authors' SFT data holds (utils/prepare_data_for_sft.py): the five
ReasonMap-Plus types only, the bare answer (`yes`, `B`, `3`, no box). The default, "all", teaches every type in the
answer format the reward reads (boxed; planning: the route block).
"""
from __future__ import annotations

import hashlib
import json
import math
import random
import shutil
from pathlib import Path

import torch
from tqdm import tqdm

from model import Policy, encode_prompts, join_prompt_response, metro_as_text, station_row
from scaling import lora
from speed.logprobs import response_logprobs
from transit.metro import PLUS_QTYPES, station_lines

STATE = "sft.pt"  # in `folder`: {"step", "weights", "optimizer", "losses", "config"}
VERSION = 7  # bump when what `sft` computes changes (part of the key of a cached SFT)
WARMUP = 0.1  # the authors' warmup_ratio
MAX_GRAD_NORM = 1.0
DATA = ("all", "released", "working")


def answer_target(sample, data: str = "all") -> str:
    """The response a question should get: a judgement / counting answer boxed, a planning question's reference
    route as it stands (ReasonMap's `Route Name: ... -- ...` blocks, what the planning reward parses); with
    `data="released"` the bare answer, as the authors' SFT data has it; with `data="working"` the boxed answer after
    its `working`."""
    if sample.qtype == "planning" or data == "released":
        return sample.answer
    return f"{working(sample) if data == 'working' else ''}\\boxed{{{sample.answer}}}"


def working(sample) -> str:
    """The demo's working before a torf1, torf2 or counting2 answer (empty for the other types): for each station
    the question names, its row of the map read by station (model.station_row: ` Alder AC`), copied out, each on
    its own line; torf2 then copies the asked line (` Line A`) on a line of its own. Each is a copy from the prompt,
    what the demo model's induction circuit does (tiny_model.set_induction_circuit): a row found by its name, the
    letter found after ` Line`. The answer is then a short step from tokens just written: is the asked letter in
    the line set, do the two line sets share a letter, how many letters. Without the asked line torf2 has to find
    the letter in the question, and stayed nearer its prior (docs/demo.md, rows 37-38)."""
    if sample.qtype not in ("torf1", "torf2", "counting2") or not sample.metro:
        return ""
    lines = station_lines(sample.metro)
    asked = [sample.station_1] + ([sample.station_2] if sample.qtype == "torf1" else [])
    rows = "".join(f"{station_row(station, lines[station])}\n" for station in asked)
    return rows + (f" {sample.line}\n" if sample.qtype == "torf2" else "")


def lr_at(step: int, steps: int, lr: float, warmup: float = WARMUP) -> float:
    """The learning rate of step `step` (0-based) of `steps`: linear warmup over the first `warmup` share of the
    steps, then a cosine from `lr` down to 0 (transformers' get_cosine_schedule_with_warmup, LLaMA-Factory's)."""
    ramp = math.ceil(warmup * steps)
    if step < ramp:
        return lr * (step + 1) / ramp
    progress = (step - ramp) / max(1, steps - ramp)
    return lr * 0.5 * (1 + math.cos(math.pi * progress))


WORKING_TORF_WEIGHT = 3.0
"""With `--sft-data working` (the demo's), torf1 and torf2 are drawn this many times as often as each other type:
their yes/no token is the step the demo's model learns last (a batch of 16 has ~170 answer tokens and ~5 of
them), and with equal draws one seed of two never learned it (docs/demo.md, rows 42-44)."""


def batch_at(by_type: dict[str, list], step: int, batch_size: int, seed: int,
             weights: dict[str, float] | None = None) -> list:
    """Batch `step`: `batch_size` questions, each of a type drawn uniformly (or in proportion to `weights`, a
    weight per type), from (seed, step) alone."""
    rng = random.Random(f"{seed}:sft:{step}")
    types = sorted(by_type)
    if weights:
        per_type = [weights.get(t, 1.0) for t in types]
        return [rng.choice(by_type[rng.choices(types, per_type)[0]]) for _ in range(batch_size)]
    return [rng.choice(by_type[rng.choice(types)]) for _ in range(batch_size)]


def targets_of(policy: Policy, batch: list, data: str = "all") -> list[list[int]]:
    """The token ids each question of `batch` should be answered with: its answer target, then end-of-turn."""
    return [policy.tokenizer.encode(answer_target(s, data), add_special_tokens=False) + [policy.eos_id] for s in batch]


def nll(policy: Policy, batch: list, targets: list[list[int]]):
    """Summed negative log-likelihood of the `targets` (token ids) as responses to `batch`'s questions."""
    width = max(map(len, targets))
    ids = torch.tensor([t + [policy.pad_id] * (width - len(t)) for t in targets], device=policy.device)
    mask = torch.tensor([[1.0] * len(t) + [0.0] * (width - len(t)) for t in targets], device=policy.device)
    rows = torch.arange(len(batch), device=policy.device)
    logp = response_logprobs(policy.model, join_prompt_response(encode_prompts(policy, batch), rows, ids, mask))
    return -(logp * mask).sum()


def sft(policy: Policy, samples, steps: int, lr: float, batch_size: int = 16, seed: int = 0, lora_rank: int = 0,
        lora_targets=lora.DEFAULT_TARGETS, make_optimizer=None, folder: Path | None = None, save_every: int = 0,
        config: dict | None = None, data: str = "all", progress: bool = False, micro_batch_size: int = 0,
        drill: int = 0) -> list[float]:
    """SFT of `policy` in place (module docstring); returns every step's loss, the mean negative log-likelihood per
    answer token. Each batch goes through forward/backward `micro_batch_size` questions at a time (0: all at once),
    its gradients accumulated and divided by the whole batch's token count. `make_optimizer(model)` builds the
    optimizer over the model's trainable parameters (default: torch AdamW at `lr`, no weight decay). `drill`: that
    many steps of the reading drill first (`drill_pairs`; their losses come first in the list, each part on its own
    warmup and cosine). `data` "working" draws torf1 and torf2 `WORKING_TORF_WEIGHT` times as often as each other
    type (`batch_at`). With `folder`, a state saved there is resumed (its `config` must equal this run's) and the
    state is saved every `save_every` steps and at the end."""
    if data not in DATA:
        raise ValueError(f"--sft-data must be one of {', '.join(DATA)}, got {data!r}")
    by_type: dict[str, list] = {}
    for s in samples:
        if data != "released" or s.qtype in PLUS_QTYPES:
            by_type.setdefault(s.qtype, []).append(s)
    if steps and not by_type:
        raise ValueError("--sft: the training data has no questions to learn answers from")
    maps = list({s.city: s.metro for s in samples if s.metro}.values())
    if drill and not maps:
        raise ValueError("--sft-drill reads maps as text: the training data has no metro to read")
    weights = {"torf1": WORKING_TORF_WEIGHT, "torf2": WORKING_TORF_WEIGHT} if data == "working" else None
    trainable = {name: p.requires_grad for name, p in policy.model.named_parameters()}
    if lora_rank:
        lora.add_lora(policy.model, lora_rank, 2.0 * lora_rank, lora_targets, seed=seed)
    trained = _trained_state(policy.model, lora_rank)
    optimizer = (make_optimizer or (lambda m: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad],
                                                                lr=lr, weight_decay=0.0)))(policy.model)
    start, losses = _resume(policy.model, optimizer, folder, lora_rank, config)
    was_training = policy.model.training
    policy.model.train()
    bar = tqdm(total=drill + steps, initial=start, desc="sft", dynamic_ncols=True, disable=not progress)
    for step in range(start, drill + steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, drill, lr) if step < drill else lr_at(step - drill, steps, lr)
        optimizer.zero_grad(set_to_none=True)
        if step < drill:
            summed, count = drill_nll(policy, drill_pairs(maps, step, batch_size, seed))
            (summed / count).backward()
            total = summed.item()
        else:
            batch = batch_at(by_type, step - drill, batch_size, seed, weights)
            targets = targets_of(policy, batch, data)
            count, total, micro = sum(map(len, targets)), 0.0, micro_batch_size or len(batch)
            for k in range(0, len(batch), micro):
                summed = nll(policy, batch[k : k + micro], targets[k : k + micro])
                (summed / count).backward()
                total += summed.item()
        torch.nn.utils.clip_grad_norm_([p for p in policy.model.parameters() if p.requires_grad], MAX_GRAD_NORM)
        optimizer.step()
        losses.append(total / count)
        bar.update()
        bar.set_postfix(nll=f"{losses[-1]:.3f}", refresh=False)
        if folder is not None and (step + 1 == drill + steps or (save_every and (step + 1) % save_every == 0)):
            _save(folder, step + 1, trained(), optimizer, losses, config)
    bar.close()
    policy.model.train(was_training)
    optimizer.zero_grad(set_to_none=True)
    if lora_rank:  # GRPO starts from (and is anchored to) the SFT model: the adapters folded into its weights
        lora.merge_lora(policy.model)
        for name, p in policy.model.named_parameters():  # what trained before trains again
            p.requires_grad_(trainable.get(name, True))  # (a tied head untied by the merge is new)
    return losses


DRILL_ROWS = 12
"""The most rows of a map one drill sequence shows: the demo world's maps have up to ~20 rows, and on maps of up to 20
rows the lookup forms far slower than on 2 to 12 (tools/lookup_drill.py: 0.24-0.77 by size after 800 steps, against
0.93-0.98 at 2-12 rows after 600)."""


def drill_pairs(maps: list, step: int, batch_size: int, seed: int) -> list[tuple[str, str]]:
    """Step `step` of the reading drill, from (seed, step) alone: `batch_size` maps, each read by station
    (model.station_row) as a random share of its rows (2 to DRILL_ROWS) in a random order, then a blank line, then the
    same rows in another order. The drill learns the second part (`drill_nll`), where each row's line set can only be
    found by looking its station up in the first: the lookup the demo's questions need, many times per map instead
    of once per question, before the SFT teaches the questions (docs/demo.md)."""
    rng = random.Random(f"{seed}:drill:{step}")
    pairs = []
    for metro in (rng.choice(maps) for _ in range(batch_size)):
        rows = metro_as_text(metro, "station").split("\n")
        rows = rng.sample(rows, rng.randint(min(2, len(rows)), min(DRILL_ROWS, len(rows))))
        pairs.append(("\n".join(rows) + "\n\n", "\n".join(rng.sample(rows, len(rows)))))
    return pairs


def drill_nll(policy: Policy, pairs: list[tuple[str, str]]) -> tuple[torch.Tensor, int]:
    """Summed negative log-likelihood of each pair's second text after its first (plain text, no chat template),
    and the number of tokens it sums over."""
    encoded = [[policy.tokenizer.encode(text, add_special_tokens=False) for text in pair] for pair in pairs]
    width = max(len(first) + len(second) for first, second in encoded)
    ids = torch.full((len(pairs), width), policy.pad_id)
    labels = torch.full((len(pairs), width), -100)
    mask = torch.zeros((len(pairs), width), dtype=torch.long)
    for row, (first, second) in enumerate(encoded):
        ids[row, : len(first) + len(second)] = torch.tensor(first + second)
        labels[row, len(first) : len(first) + len(second)] = torch.tensor(second)
        mask[row, : len(first) + len(second)] = 1
    device = policy.device
    logits = policy.model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits[:, :-1]
    summed = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels[:, 1:].flatten().to(device),
                                               reduction="sum")
    return summed, int((labels != -100).sum())


def _trained_state(model, lora_rank: int):
    """What SFT changes, to save: the adapters with LoRA, else every weight."""
    return (lambda: lora.adapter_state_dict(model)) if lora_rank else model.state_dict


def _save(folder: Path, step: int, weights: dict, optimizer, losses: list[float], config: dict | None) -> None:
    """Write the SFT state atomically: a kill leaves the previous state or this one, never half of one."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / (STATE + ".tmp")
    torch.save({"step": step, "weights": {k: v.detach().cpu() for k, v in weights.items()},
                "optimizer": optimizer.state_dict(), "losses": list(losses), "config": config or {}}, tmp)
    tmp.replace(folder / STATE)


def _resume(model, optimizer, folder: Path | None, lora_rank: int, config: dict | None) -> tuple[int, list[float]]:
    """(first step, losses so far): from `folder`'s saved state when there is one, else (0, [])."""
    path = folder / STATE if folder is not None else None
    if path is None or not path.is_file():
        return 0, []
    state = torch.load(path, map_location="cpu", weights_only=True)
    if config is not None and state["config"] != config:
        differ = sorted(k for k in set(config) | set(state["config"]) if config.get(k) != state["config"].get(k))
        raise ValueError(f"--resume: {path} was written by an SFT with other settings ({', '.join(differ)})")
    if lora_rank:
        lora.load_adapter_state_dict(model, state["weights"], str(path))
    else:
        model.load_state_dict(state["weights"])
    optimizer.load_state_dict(state["optimizer"])
    return state["step"], state["losses"]


SETTINGS = ("model", "data", "world", "cities", "seed", "sft", "sft_drill", "sft_lora_rank", "sft_batch_size",
            "sft_data", "dtype", "bf16_update", "max_pixels")
"""What an SFT's result depends on (with its learning rate): the SFT state records them, and a resumed or cached
SFT must match them."""


def stage(cfg, policy: Policy, samples, folder: Path, make_optimizer, main: bool = True) -> list[float]:
    """The SFT stage of a training run (`cfg`: train.TrainConfig) into `folder`: resumed from its saved state (a
    finished SFT is loaded, not redone). The tiny model's finished SFT is also kept in --cache-dir/sft/, keyed by
    everything it depends on (`SETTINGS`, its lr, `VERSION`), so that only the first run of a setting pays for it.
    `main`: this process prints (rank 0)."""
    lr = cfg.sft_lr or cfg.lr
    settings = {**{k: getattr(cfg, k) for k in SETTINGS}, "lr": lr, "version": VERSION}
    state = folder / STATE
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    cached = Path(cfg.cache_dir) / "sft" / f"{key}.pt"
    if cfg.model == "tiny" and cached.is_file() and not state.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(cached, state)  # the finished SFT of these settings: loaded below, not redone
        if main:
            print(f"sft: the {cfg.sft} steps of these settings were done before, loaded from {cached}")
    losses = sft(policy, samples, cfg.sft, lr, cfg.sft_batch_size, cfg.seed, cfg.sft_lora_rank,
                 lora.default_targets(cfg.model), make_optimizer, folder, cfg.save_every, settings, cfg.sft_data,
                 progress=main, micro_batch_size=cfg.micro_batch_size, drill=cfg.sft_drill)
    if cfg.model == "tiny" and not cached.is_file() and state.is_file() and main:
        cached.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(state, cached.with_suffix(".tmp"))
        cached.with_suffix(".tmp").replace(cached)
    if main:
        drilled = f"{cfg.sft_drill} drill steps, map NLL {losses[0]:.3f} -> {losses[cfg.sft_drill - 1]:.3f}; " \
            if cfg.sft_drill else ""
        print(f"sft: {drilled}{cfg.sft} steps, answer NLL {losses[cfg.sft_drill]:.3f} -> {losses[-1]:.3f} "
              f"(state in {folder})")
    return losses
