"""The multi-stage curriculum (docs/rewardmap.md §5): global order by question type, local randomness inside a stage.

fine (RewardMap, the default):
    1. judgement  torf1 + torf2, shuffled together
    2. counting   counting2 + counting3 shuffled together, then counting1 (the released code's order)
    3. planning
coarse (ablation): all ReasonMap-Plus types shuffled together ("perception"), then planning.
none (ablation):   everything shuffled together in one stage ("all").

Each stage is shuffled with its own RNG seeded by (run seed, stage name), so running one stage alone
(`--stage counting`) sees exactly the order it has inside `--stage all`.
"""
from __future__ import annotations

import random
from typing import Sequence, TypeVar

from transit.metro import PLUS_QTYPES, QTYPES

T = TypeVar("T")  # anything with a `.qtype` attribute (a data.Sample)

VARIANTS = ("fine", "coarse", "none")

# variant -> ordered stages; each stage is a list of groups, each group shuffled on its own and the
# groups concatenated in order.
STAGES: dict[str, list[tuple[str, list[tuple[str, ...]]]]] = {
    "fine": [
        ("judgement", [("torf1", "torf2")]),
        ("counting", [("counting2", "counting3"), ("counting1",)]),
        ("planning", [("planning",)]),
    ],
    "coarse": [
        ("perception", [PLUS_QTYPES]),
        ("planning", [("planning",)]),
    ],
    "none": [
        ("all", [QTYPES]),
    ],
}


def stage_names(variant: str = "fine") -> list[str]:
    """The stage names of a curriculum variant, in training order."""
    if variant not in STAGES:
        raise ValueError(f"unknown curriculum variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    return [name for name, _ in STAGES[variant]]


def build_curriculum(samples: Sequence[T], variant: str = "fine", seed: int = 0) -> list[tuple[str, list[T]]]:
    """Order `samples` into `[(stage name, samples of that stage in training order), ...]`.

    Stages with no samples are kept (with an empty list) so the caller can report them.
    Samples of a qtype that no stage of the variant takes raise, rather than being dropped silently.
    """
    names = stage_names(variant)
    taken = {q for _, groups in STAGES[variant] for group in groups for q in group}
    unknown = sorted({s.qtype for s in samples} - taken)
    if unknown:
        raise ValueError(f"curriculum {variant!r} has no stage for qtype(s) {unknown}")
    stages = []
    for name, groups in STAGES[variant]:
        rng = random.Random(f"{seed}:{variant}:{name}")  # str seeds are hashed deterministically
        ordered: list[T] = []
        for group in groups:
            part = [s for s in samples if s.qtype in group]
            rng.shuffle(part)
            ordered += part
        stages.append((name, ordered))
    assert [n for n, _ in stages] == names
    return stages


def stage_qtypes(variant: str, stage: str) -> set[str]:
    """The question types a stage of a curriculum variant trains on."""
    return {q for name, groups in STAGES[variant] if name == stage for group in groups for q in group}


def group_of(variant: str, stage: str):
    """`qtype -> index of its shuffle group` within a stage (counting: 0 for counting2/3, 1 for counting1)."""
    groups = dict(STAGES[variant])[stage]
    return lambda sample: next(k for k, group in enumerate(groups) if sample.qtype in group)


def batches(stage_samples: Sequence[T], batch_size: int, max_steps: int | None = None, seed: int = 0,
            group=None, drop_last: bool = False) -> list[list[T]]:
    """Cut one stage into prompt batches, one per GRPO step.

    One pass over the stage's samples is the paper's setting (`total_episodes: 1`). When `max_steps`
    asks for more steps than one pass gives, further passes follow, each reshuffled with its own seed
    inside each run of samples with the same `group(sample)` (`group_of`), so a stage's sub-order
    (counting2/3 before counting1) holds in every pass; when it asks for fewer, the stage stops early.
    A last partial batch is kept, unless `drop_last` (the released code's data loader drops it).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not stage_samples:
        return []
    if drop_last and len(stage_samples) < batch_size:
        return []
    one_pass = len(stage_samples) // batch_size if drop_last else -(-len(stage_samples) // batch_size)
    steps = one_pass if max_steps is None else max_steps
    runs: list[list[T]] = []  # consecutive samples of one shuffle group
    for s in stage_samples:
        if runs and (group is None or group(s) == group(runs[-1][0])):
            runs[-1].append(s)
        else:
            runs.append([s])
    out: list[list[T]] = []
    order = list(stage_samples)
    epoch = 0
    while len(out) < steps:
        if epoch > 0:
            rng = random.Random(f"{seed}:pass:{epoch}")
            for run in runs:
                rng.shuffle(run)
            order = [s for run in runs for s in run]
        out += [order[i : i + batch_size] for i in range(0, len(order), batch_size)
                if not drop_last or i + batch_size <= len(order)]
        epoch += 1
    return out[:steps]


def with_replay(steps: list[list[T]], earlier: Sequence[T], fraction: float, seed: int = 0, stage: str = "") -> list[list[T]]:
    """Add round(`fraction` x batch size) questions of earlier stages to every batch of a stage, against forgetting
    (not in the paper; off by default, `--replay`; the tiny default uses 0.5, docs/results.md says why).

    The earlier questions come in a seeded shuffled order, cycling, so each comes back about equally often; the
    stage's own questions are all kept (one pass, as before). `fraction` 0 or no earlier stage: unchanged."""
    if not steps or not earlier or fraction <= 0:
        return steps
    pool = list(earlier)
    random.Random(f"{seed}:replay:{stage}").shuffle(pool)
    out, k = [], 0
    for batch in steps:
        n = round(fraction * len(batch))
        out.append(list(batch) + [pool[(k + j) % len(pool)] for j in range(n)])
        k += n
    return out


def continuous_batches(stages: Sequence[tuple[str, Sequence[T]]], batch_size: int) -> dict[str, list[list[T]]]:
    """The released data loader's batches: the stages' samples, in order, as one stream cut into batches of
    `batch_size` that cross stage boundaries; each batch runs in the stage where it starts. Only full batches
    (drop_last), and the last full one is dropped too: the released trainer counts len(loader) training steps
    but stops when its step counter reaches that count, before running the last (ray_trainer.py,
    `global_steps >= training_steps`). Returns {stage name: its batches}, every stage present."""
    stream = [(name, s) for name, part in stages for s in part]
    out: dict[str, list[list[T]]] = {name: [] for name, _ in stages}
    for k in range(len(stream) // batch_size - 1):
        chunk = stream[k * batch_size : (k + 1) * batch_size]
        out[chunk[0][0]].append([s for _, s in chunk])
    return out


class PromptStream:
    """A stage's batches read as one stream of prompts from a cursor. With dynamic sampling (DAPO) a step takes
    a batch's worth and then draws more, so steps no longer line up with the batches; `position` (prompts
    consumed so far) is what a checkpoint stores so that a resumed run draws exactly the same prompts."""

    def __init__(self, batches: Sequence[Sequence[T]], position: int = 0):
        self.prompts = [s for batch in batches for s in batch]
        self.position = position

    def take(self, n: int) -> list:
        """The next `n` prompts (fewer at the end of the stream), consumed."""
        out = self.prompts[self.position : self.position + max(n, 0)]
        self.position += len(out)
        return out

    def left(self) -> int:
        """Prompts not taken yet."""
        return len(self.prompts) - self.position
