"""One writer per run folder, and a run folder that says how it was made (docs/reliability.md).

    with run_folder.claim(out, resume, overwrite) as folder:   # the lock, held until the run ends or dies
        ...                                                  # read the checkpoint, load the data and the model
        folder.begin(config, facts)                          # only now: --overwrite clears, config.json is written

- The lock: `--out/.lock`, an exclusive `fcntl.flock` that rank 0 takes for the run's whole life (the other ranks
  wait on it at a barrier: they write only inside checkpoint saves, which need rank 0). The kernel releases it when
  the process ends, however it ends, so a killed run leaves a free lock. The file holds its holder (pid, host, start
  time), which a second launch names in its error.
- An earlier run's files in `--out` are never replaced by a launch without `--resume`: it stops with an error that
  says `--resume` or `--overwrite`; only `--overwrite` deletes them (`OUTPUTS`), and only once the new run's data and
  model have loaded.
- A launch that fails before `begin` (a bad flag value, dataset or model) leaves `--out` as it found it; a folder it
  created is removed again.
- config.json: the run's settings plus `launches`, one entry per launch (the first, then each --resume): the world
  size, device, dtypes, and the versions of torch, transformers, Python and the project (its git commit).
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

from plumbing import cli
from scaling import distributed

LOCK = ".lock"
OUTPUTS = ("config.json", "metrics.jsonl", "checkpoints", "sft", "curves.png", "eval_*.json", "model",
           "model-merged", "tensorboard", "wandb")
"""What a run writes into --out (train.py; its SFT state in sft/, variants/sft.py; plumbing/report.py's dashboards):
an earlier run's, if any of them is there; what --overwrite deletes (other files in the folder are left alone)."""
ROOT = Path(__file__).resolve().parents[1]


def earlier_run(out: Path) -> list[str]:
    """The names of an earlier run's files in `out` (empty: no earlier run)."""
    return sorted({p.name for pattern in OUTPUTS for p in out.glob(pattern)}) if out.is_dir() else []


def check_start(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to start over on an earlier run without --overwrite (or to combine --resume with --overwrite)."""
    if resume and overwrite:
        raise ValueError("--resume continues the run in --out, --overwrite deletes it: give one of them")
    found = earlier_run(out)
    if found and not resume and not overwrite:
        has = "checkpoints" in found
        raise ValueError(f"{out} holds an earlier run ({', '.join(found)}): continue it with --resume"
                         f"{'' if has else ' (it has no checkpoint yet)'}, start over with --overwrite (which deletes "
                         "those files), or use another --out")


@dataclasses.dataclass
class Folder:
    """A claimed run folder: `out`, its lock's file descriptor (rank 0; None elsewhere), what `begin` did."""

    out: Path
    fd: int | None
    overwrite: bool
    created: bool  # the folder did not exist before this launch
    begun: bool = False

    def begin(self, config: dict, facts: dict) -> None:
        """The run starts writing: with --overwrite the earlier run's files go, then config.json is written with
        this launch's `facts` appended to the earlier launches' (a resumed run's config.json keeps them)."""
        self.begun = True
        if not distributed.is_main():
            return
        if self.overwrite:
            clear(self.out)
        path = self.out / "config.json"
        launches = []
        if path.exists() and config.get("resume"):
            with contextlib.suppress(ValueError, OSError, AttributeError):
                launches = list(json.loads(path.read_text()).get("launches", []))
        tmp = path.with_suffix(".tmp")
        tmp.write_text(cli.dumps({**config, "launches": [*launches, facts]}, indent=2) + "\n")
        os.replace(tmp, path)


def clear(out: Path) -> None:
    """Delete an earlier run's files (`OUTPUTS`) from `out`."""
    import shutil

    for pattern in OUTPUTS:
        for p in out.glob(pattern):
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()


def _lock(out: Path) -> int:
    """Take `out/.lock` (created if need be) without waiting; OSError naming its holder when another process has
    it. Returns the open descriptor, which holds the lock until it is closed or the process ends."""
    path = out / LOCK
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 1000, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise OSError(f"{out} is in use by {holder} ({path}): one run writes a folder at a time; wait for it "
                          "to end, stop it, or use another --out") from None
        except OSError as e:  # ENOLCK, ENOSYS, EOPNOTSUPP: e.g. Lustre mounted without -o flock
            os.close(fd)
            raise OSError(f"cannot lock {path} ({e.strerror}): this file system does not support flock; put --out "
                          "on one that does (local disks and NFS do; Lustre with -o flock)") from None
        with contextlib.suppress(FileNotFoundError):
            if os.fstat(fd).st_ino == os.stat(path).st_ino:  # not a file that a failed launch removed meanwhile
                break
        os.close(fd)
    world = distributed.world()
    who = f"train.py (pid {os.getpid()} on {socket.gethostname()}" + \
          (f", rank 0 of {world} torchrun processes" if world > 1 else "") + f", since {time.strftime('%Y-%m-%d %H:%M:%S')})"
    os.ftruncate(fd, 0)
    os.pwrite(fd, (who + "\n").encode(), 0)
    return fd


@contextlib.contextmanager
def claim(out: Path, resume: bool, overwrite: bool):
    """Hold `out` for the block: rank 0 takes the lock and refuses an earlier run's folder without --resume or
    --overwrite, the others wait at a barrier (a refusal ends rank 0 and torchrun stops them). On leaving, the lock
    is released; a launch that never reached `begin` removes the folder if it created it."""
    created = not out.exists()
    fd = None
    if distributed.is_main():
        out.mkdir(parents=True, exist_ok=True)
        fd = _lock(out)
        try:
            check_start(out, resume, overwrite)
        except BaseException:
            _release(out, fd, created)
            raise
    distributed.barrier()
    folder = Folder(out, fd, overwrite, created)
    try:
        yield folder
    finally:
        if fd is not None:
            _release(out, fd, created and not folder.begun)


def _release(out: Path, fd: int, remove: bool) -> None:
    """Unlock; with `remove`, first delete the lock file and the folder (when nothing else is in it)."""
    if remove:
        with contextlib.suppress(OSError):
            (out / LOCK).unlink()
            out.rmdir()
    os.close(fd)  # closing the descriptor releases the lock


# ----------------------------------------------------------------------------- how the run was made


def project_version() -> dict:
    """The project's git commit (and whether the working tree differs from it), where it is a git checkout."""
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {"commit": None}
    return {"commit": commit, "modified": bool(git("status", "--porcelain", "--untracked-files=no"))}


def launch_facts(device, compute_dtype, weights_dtype, resumed_from: int | None) -> dict:
    """What config.json records of this launch: when, on what, with which versions (`launches`)."""
    import torch
    import transformers

    device = str(device)
    name = torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else platform.processor()
    return {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "resumed_from_step": resumed_from,
            "world_size": distributed.world(), "device": device, "device_name": name or platform.machine(),
            "compute_dtype": str(compute_dtype).removeprefix("torch."),
            "weights_dtype": str(weights_dtype).removeprefix("torch."),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "project": project_version(), "command": sys.argv}
