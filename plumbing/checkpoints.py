"""Checkpoints of a training run, written so that a kill at any moment leaves a usable one, and read back exactly.

    out/checkpoints/step-000042/    the policy (HuggingFace format, or its shards under torchrun) + trainer_state.pt
    out/checkpoints/latest          the name of the newest complete checkpoint
A resumed run (`train.py --resume`) loads the weights, the optimizer state, every RNG state and the position in
the curriculum, drops the metrics lines logged after the checkpoint, and continues as if never stopped.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
from pathlib import Path

import torch

import model as models
from scaling import distributed, lora


def check_resume_config(now: dict, saved: dict, ckpt: Path, may_change=()) -> None:
    """Refuse to resume with settings (`now`, a run's config as a dict) that differ from the checkpoint's run
    (`saved`), naming them; the fields `may_change` may differ."""
    if not saved.get("lora_rank") and saved.get("lora_targets") == ",".join(lora.DEFAULT_TARGETS):
        saved = {**saved, "lora_targets": ""}  # full fine-tuning saved before the flag's default became empty
    same = lambda a, b: list(a) == list(b) if isinstance(b, (tuple, list)) else a == b  # noqa: E731
    differ = [f"--{k.replace('_', '-')} {saved[k]!r} -> {now[k]!r}" for k in now
              if k not in may_change and k in saved and not same(saved[k], now[k])]
    if differ:
        raise ValueError(f"--resume: {ckpt} was written by a run with other settings ({'; '.join(differ)}); "
                         "resume with the same flags, or start a new --out")


def _step_of(folder: Path) -> int:
    """The global step in a checkpoint folder's name (step-000042 -> 42)."""
    return int(folder.name.split("-", 1)[1])


def save_checkpoint(out: Path, policy, optimizer, generator: torch.Generator, position: dict, cfg) -> Path:
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
        models.save_policy(policy, tmp, budgets=models.token_budgets(cfg.model, cfg.max_new_tokens,
                                                                     cfg.planning_max_new_tokens))
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


def load_state(ckpt: Path) -> dict:
    """A checkpoint's trainer state (optimizer, RNG states, position, config), on the CPU: the optimizer's
    load_state_dict moves each moment to its parameter's device, so a GPU never holds a second copy."""
    return torch.load(ckpt / "trainer_state.pt", map_location="cpu", weights_only=False)


def clear(out: Path) -> None:
    """Remove an earlier run's metrics, checkpoints and SFT state from `out`."""
    (out / "metrics.jsonl").unlink(missing_ok=True)
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    shutil.rmtree(out / "sft", ignore_errors=True)
