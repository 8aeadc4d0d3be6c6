"""Checkpoints of a training run, written so that a kill at any moment leaves a usable one, and read back exactly.

    out/checkpoints/step-000042/    the policy (HuggingFace format, or its shards under torchrun) + trainer_state.pt
                                    + manifest.json (every file's size and CRC-32, written last)
    out/checkpoints/latest          the name of the newest complete checkpoint
A resumed run (`train.py --resume`) checks the checkpoint against its manifest (falling back on an earlier one
that is intact), loads the weights, the optimizer state, every RNG state and the position in the curriculum, drops
the metrics lines logged after the checkpoint, and continues as if never stopped. A save that fails (a full disk)
leaves the previous checkpoint as it was and stops the run with an error.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import shutil
import zlib
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
    """Write checkpoints/step-N (HF model + trainer state + MANIFEST) to a temporary name, rename it into place,
    then atomically repoint checkpoints/latest; a kill at any moment leaves the previous one usable.
    Afterwards only the newest --keep-checkpoints step folders remain (never the one `latest` names).
    [multi-GPU] Every rank writes its shards of the weights and optimizer state (`sharded/`, torch.distributed.
    checkpoint) instead of the HF model; rank 0 writes the rest, with every rank's RNG states.
    A write that fails (a full disk: OSError, or the error safetensors / torch.save / dcp make of it) removes the
    temporary folder and raises OSError saying so: the previous checkpoint is untouched."""
    root = out / "checkpoints"
    final = root / f"step-{position['global_step']:06d}"
    tmp = root / f".tmp-{final.name}"
    rngs = distributed.gather({"generator": generator.get_state(), "torch_rng": torch.get_rng_state(),
                               "python_rng": random.getstate()})
    if distributed.is_main():
        for stale in root.glob(".tmp-step-*"):  # a save cut short by a kill (at 7B, ~100 GB each)
            shutil.rmtree(stale, ignore_errors=True)
    distributed.barrier()
    try:
        _write(tmp, policy, optimizer, {"rngs": rngs, "world_size": distributed.world(), "position": position,
                                        "config": dataclasses.asdict(cfg)}, cfg)
    except (Exception, *distributed.checkpoint_errors()) as e:  # dcp's CheckpointException is a BaseException
        if distributed.is_main():
            shutil.rmtree(tmp, ignore_errors=True)
        why = (str(e).strip().splitlines() or [""])[0]
        raise OSError(f"writing checkpoint {final} failed ({type(e).__name__}: {why}); the previous checkpoint, "
                      f"{latest_checkpoint(out) or 'none'}, is untouched: free space (a full disk?) and continue "
                      "with --resume") from e
    if not distributed.is_main():
        distributed.barrier()  # until rank 0 has renamed the folder into place
        return final
    shutil.rmtree(final, ignore_errors=True)  # a folder of this step left by a killed run
    os.replace(tmp, final)
    pointer = root / ".latest.tmp"
    pointer.write_text(final.name)
    os.replace(pointer, root / "latest")
    _fsync_dir(root)
    prune(out, final, cfg.keep_checkpoints)
    distributed.barrier()
    return final


def _write(tmp: Path, policy, optimizer, state: dict, cfg) -> None:
    """A checkpoint's files into `tmp`: the weights (every rank its shards under torchrun), trainer_state.pt
    (rank 0: the optimizer's state in one process, RNG states, position, config), then MANIFEST (every rank
    checks its share of the files: sizes and CRC-32s, each file flushed to disk)."""
    if distributed.world() > 1:
        distributed.save_sharded(tmp / "sharded", policy.model, optimizer)
        distributed.barrier()
    else:
        models.save_policy(policy, tmp, budgets=models.token_budgets(cfg.model, cfg.max_new_tokens,
                                                                     cfg.planning_max_new_tokens),
                           trained_on={"data": cfg.data, "cities": cfg.cities, "seed": cfg.seed})
    if distributed.is_main():
        optimizer_state = optimizer.state_dict() if distributed.world() == 1 else None
        torch.save({"optimizer": optimizer_state, **state}, tmp / "trainer_state.pt")
    distributed.barrier()
    files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
    sums = {}
    for part in distributed.gather({name: _summary(tmp / name) for name in files[distributed.rank()::distributed.world()]}):
        sums.update(part)
    if distributed.is_main():
        (tmp / MANIFEST).write_text(json.dumps({"files": dict(sorted(sums.items()))}, indent=1) + "\n")
        _fsync(tmp / MANIFEST)
        _fsync_dir(tmp)


def prune(out: Path, final: Path, keep: int) -> None:
    """Keep the newest `keep` checkpoints up to `final` (and the one `latest` names)."""
    root = out / "checkpoints"
    current = latest_checkpoint(out)
    # the newest keep_checkpoints - 1 before this one stay; folders numbered after it are left by a killed run
    # that got ahead of the checkpoint this run resumed from (or are damaged), and are dropped like the older ones
    older = sorted((d for d in root.glob("step-*") if d.is_dir() and d.name[5:].isdigit() and d != final),
                   key=_step_of, reverse=True)
    kept = [d for d in older if _step_of(d) < _step_of(final)][: max(keep - 1, 0)]
    for old in older:
        if old not in kept and old != current:
            shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------- integrity

MANIFEST = "manifest.json"
"""In each checkpoint, written last: every other file's size in bytes and CRC-32, so that a truncated or corrupted
file is found before anything is loaded (`damage`)."""


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # a directory cannot be fsynced on some file systems
        _fsync(path)


def _summary(path: Path) -> dict:
    """A file's size and CRC-32 (read back in 16 MiB chunks), once it is flushed to disk."""
    crc, size = 0, 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            crc, size = zlib.crc32(chunk, crc), size + len(chunk)
        os.fsync(f.fileno())
    return {"bytes": size, "crc32": f"{crc:08x}"}


def damage(ckpt: Path) -> str | None:
    """What is wrong with checkpoint folder `ckpt`, naming the file (None: nothing). Every file of its MANIFEST must be
    there with its size and CRC-32 (under torchrun each rank checks a share; every rank must call it). A folder from
    before manifests (no MANIFEST, a trainer_state.pt) is taken as it is: its loaders' errors are the check."""
    manifest = ckpt / MANIFEST
    if not ckpt.is_dir():
        return f"{ckpt} is missing"
    if not manifest.is_file():
        return None if (ckpt / "trainer_state.pt").is_file() else f"{manifest} is missing (the checkpoint is incomplete)"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, TypeError, OSError) as e:
        return f"{manifest} cannot be read ({e})"
    problems = []
    for name in sorted(files)[distributed.rank()::distributed.world()]:
        path, want = ckpt / name, files[name]
        if not path.is_file():
            problems.append(f"{path} is missing")
            continue
        got = _summary(path)
        if got["bytes"] != want["bytes"]:
            problems.append(f"{path} has {got['bytes']} bytes, not the {want['bytes']} it was written with (truncated?)")
        elif got["crc32"] != want["crc32"]:
            problems.append(f"{path} differs from what was written (CRC-32 {got['crc32']}, not {want['crc32']}: corrupted)")
    problems = [p for part in distributed.gather(problems) for p in part]
    return problems[0] if problems else None


def resume_point(out: Path) -> tuple[Path, dict]:
    """The checkpoint a --resume continues from, and its trainer state: the one `latest` names, checked (`damage`)
    and loaded; if it is damaged, the newest earlier one that is intact (kept with --keep-checkpoints > 1), said
    in the log. A damaged checkpoint with none intact before it is an error naming the file."""
    root = out / "checkpoints"
    latest = latest_checkpoint(out)
    steps = sorted((d for d in root.glob("step-*") if d.is_dir() and d.name[5:].isdigit()), key=_step_of, reverse=True)
    candidates = ([latest] if latest is not None else []) + \
        [d for d in steps if latest is None or (d.name[5:].isdigit() and _step_of(d) < _step_of(latest))]
    if not candidates:
        raise FileNotFoundError(f"--resume: no checkpoint in {root}")
    problems = []
    for ckpt in candidates:
        problem = damage(ckpt)
        if problem is None:
            try:
                state = load_state(ckpt)
            except Exception as e:  # what torch.load makes of a damaged file: RuntimeError, UnpicklingError, ...
                problem = f"{ckpt / 'trainer_state.pt'} cannot be read ({type(e).__name__}: {str(e).splitlines()[0]})"
        if problem is None:
            if problems and distributed.is_main():
                print(f"warning: --resume: {problems[0]}; resuming from the checkpoint before it, {ckpt}")
            return ckpt, state
        problems.append(problem)
    more = "" if len(candidates) > 1 else " (--keep-checkpoints 2 or more keeps an earlier one to fall back on)"
    raise ValueError(f"--resume: checkpoint damaged: {problems[0]}; no earlier intact checkpoint{more}: start over "
                     "with --overwrite")


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
    load_state_dict moves each moment to its parameter's device, so a GPU never holds a second copy. Read with
    `weights_only=True`: the file holds tensors and plain values only (dicts, lists, tuples, numbers, strings), so
    a checkpoint someone hands you cannot run code when resumed, as with its safetensors."""
    return torch.load(ckpt / "trainer_state.pt", map_location="cpu", weights_only=True)
