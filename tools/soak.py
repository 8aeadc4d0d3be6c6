"""A soak of train.py's resume: a small run killed with SIGKILL at seeded random moments (some while it writes a
checkpoint) and resumed each time; in the end its metrics.jsonl and model/ must equal an uninterrupted run's.

    python -m tools.soak                                   # 20 kills; exit status 1 on any difference
    python -m tools.soak --kills 50 --seed 3 --spawn       # real `python train.py` processes (slower start-up)

Each launch is train.py with the flags `RUN` and `--out OUT/killed`, plus `--resume` once that folder has a
checkpoint (`--overwrite` before: the folder holds the earlier launch's files), as a user would relaunch it. A
launch is a fork of this process that runs train.main (the imports are paid once; SIGKILL ends it as it ends any
process) or, with --spawn, a new `python train.py`. Where each kill lands is drawn (seeded) from:
- save: while the launch writes its 1st or 2nd checkpoint (a new .tmp-step-* folder), 0 to SAVE_WINDOW s in;
- step: once the launch has written a checkpoint, 0 to 1 step's time later (at once if it begins another);
- any:  0 to 3 s after the launch (start-up: the lock, resuming, loading), or at once when it logs a new step.
The report says how many kills hit a checkpoint being written (its temporary folder was there when the kill came).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch
from safetensors.torch import load_file

import train
from plumbing import checkpoints

ROOT = Path(__file__).resolve().parents[1]
RUN = ["--stage", "all", "--max-steps-per-stage", "8", "--save-every", "1", "--sft", "0", "--replay", "0",
       "--cities", "3", "--batch-size", "2", "--group-size", "2", "--max-new-tokens", "4",
       "--planning-max-new-tokens", "8", "--eval-samples", "2"]
"""The soaked run: the tiny model on 3 synthetic cities, 8 GRPO steps per stage (24 in all), a checkpoint after every
step (and at each stage's end, after its evaluation), so that most moments of a run are near a checkpoint write. No
launch gets more than one checkpoint further (see `kill_once`), so 20 kills leave it unfinished."""
SAVE_WINDOW = 0.05  # seconds after a checkpoint write begins in which a "save" kill lands (a tiny save takes ~0.1 s)


class Launch:
    """One train.py process: a fork running train.main(argv), or (spawn) `python train.py argv`; output to `log`."""

    def __init__(self, argv: list[str], log: Path, spawn: bool):
        self.started = time.time()
        if spawn:
            with open(log, "w") as f:
                self.proc = subprocess.Popen([sys.executable, "train.py", *argv], cwd=ROOT, stdout=f,
                                             stderr=subprocess.STDOUT)
            self.pid = self.proc.pid
            return
        self.proc = None
        sys.stdout.flush()
        sys.stderr.flush()
        self.pid = os.fork()
        if self.pid == 0:  # the child: train.main, then out without running the parent's exit handlers
            code = 1
            try:
                fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                train.main(argv)
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)

    def poll(self) -> int | None:
        """The exit status once the process has ended (negative: the signal that ended it), else None."""
        if self.proc is not None:
            return self.proc.poll()
        pid, status = os.waitpid(self.pid, os.WNOHANG)
        if pid == 0:
            return None
        self.proc = _Ended(os.waitstatus_to_exitcode(status))
        return self.proc.code

    def kill(self) -> None:
        os.kill(self.pid, signal.SIGKILL)
        while self.poll() is None:
            time.sleep(0.001)

    def wait(self) -> int:
        while (code := self.poll()) is None:
            time.sleep(0.01)
        return code


class _Ended:
    def __init__(self, code: int):
        self.code = code

    def poll(self) -> int:
        return self.code


def warm_imports() -> None:
    """What train.main imports lazily (transformers' Qwen2.5-VL model, tokenizer and image processor classes), once
    here, so that a forked launch does not import it again (~8 s on 2 busy cores; a launch then starts in ~1 s)."""
    import transformers.models.qwen2.modeling_qwen2  # noqa: F401
    import transformers.models.qwen2_5_vl.modeling_qwen2_5_vl  # noqa: F401
    import transformers.models.qwen2_vl.image_processing_pil_qwen2_vl  # noqa: F401
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer  # noqa: F401


def lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def writes(out: Path) -> set:
    """The checkpoint writes in progress: each temporary folder (name, inode, mtime)."""
    found = set()
    for d in (out / "checkpoints").glob(".tmp-step-*"):
        try:
            st = d.stat()
        except FileNotFoundError:
            continue
        found.add((d.name, st.st_ino, st.st_mtime_ns))
    return found


def kill_once(argv: list[str], out: Path, log: Path, rng: random.Random, spawn: bool, step_time: float) -> dict:
    """Launch, wait for the drawn moment, SIGKILL; what happened. No launch gets more than one checkpoint past the
    one it resumed from (a step's metrics line is written before its checkpoint)."""
    latest = checkpoints.latest_checkpoint(out)
    at_launch = int(latest.name[5:]) if latest is not None else 0
    mode = rng.choices(["save", "step", "any"], weights=[2, 2, 1])[0]
    nth = rng.randint(1, 2) if mode == "save" else 1  # the launch's nth checkpoint write
    delay = {"save": rng.uniform(0, SAVE_WINDOW), "step": rng.uniform(0, step_time), "any": rng.uniform(0, 3.0)}[mode]
    stale, seen = writes(out), set()
    launch = Launch(argv, log, spawn)
    metrics = out / "metrics.jsonl"

    def logged() -> int:  # new steps in this launch's metrics.jsonl (a resume first rewrites it)
        fresh = metrics.exists() and metrics.stat().st_mtime >= launch.started
        return lines(metrics) - at_launch if fresh else 0

    moment, written = None, 0  # when to kill, once known; checkpoint writes seen by then
    while launch.poll() is None:
        seen |= writes(out) - stale
        now = time.time()
        if moment is None:
            if mode == "any":
                moment = launch.started + delay
            elif (mode == "save" and len({w[:2] for w in seen}) >= nth) or (
                    mode == "step" and checkpoints.latest_checkpoint(out) not in (latest, None)):
                moment, written = now + delay, len({w[:2] for w in seen})
        if moment is not None and (now >= moment or (mode == "any" and logged() >= 1) or (
                mode == "step" and len({w[:2] for w in seen}) > written)):
            break
        time.sleep(0.001)
    else:
        raise SystemExit(f"the run ended (status {launch.poll()}) before its kill: see {log}; the run is too short "
                         "for this many kills")
    during_save = any(w in writes(out) for w in seen) or bool(writes(out) - stale)
    launch.kill()
    return {"mode": mode, "nth": nth, "delay": round(delay, 3), "during_save": during_save, "from_step": at_launch,
            "steps_logged": lines(metrics), "seconds": round(time.time() - launch.started, 2)}


def comparable(out: Path) -> list[dict]:
    """metrics.jsonl without its wall-clock figures."""
    return [{k: v for k, v in json.loads(line).items() if not k.startswith("time/") and k != "wall_time"}
            for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def weights(folder: Path) -> dict:
    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description="Kill a small train.py run with SIGKILL at random moments, resume it "
                                             "each time, and compare it with an uninterrupted run.")
    ap.add_argument("--kills", type=int, default=20, help="SIGKILLs before the run is let finish")
    ap.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    ap.add_argument("--out", default="runs/soak", help="work folder (replaced): straight/, killed/, logs/, soak.json")
    ap.add_argument("--cache-dir", default="", help="synthetic data and tiny model cache (default: OUT/cache)")
    ap.add_argument("--spawn", action="store_true", help="start each launch as `python train.py` (not a fork)")
    a = ap.parse_args(argv)
    t0 = time.time()
    out = Path(a.out)
    for sub in ("straight", "killed", "logs"):
        shutil.rmtree(out / sub, ignore_errors=True)
    (out / "logs").mkdir(parents=True)
    run = RUN + ["--cache-dir", a.cache_dir or str(out / "cache")]
    rng = random.Random(a.seed)
    if not a.spawn:
        warm_imports()

    straight = Launch(run + ["--out", str(out / "straight")], out / "logs" / "straight.txt", a.spawn)
    if straight.wait() != 0:
        raise SystemExit(f"the uninterrupted run failed: see {out / 'logs' / 'straight.txt'}")
    expected = comparable(out / "straight")
    walls = [json.loads(line)["wall_time"] for line in (out / "straight" / "metrics.jsonl").read_text().splitlines()]
    step_time = sorted(b - a for a, b in zip(walls, walls[1:]))[len(walls) // 2]  # the median step, its save included
    killed, kills = out / "killed", []
    for i in range(a.kills):
        again = ["--resume"] if checkpoints.latest_checkpoint(killed) is not None else ["--overwrite"]
        kills.append(kill_once(run + ["--out", str(killed), *again], killed, out / "logs" / f"launch-{i:02d}.txt",
                               rng, a.spawn, step_time))
        print(f"kill {i + 1:2d}/{a.kills}: {kills[-1]}", flush=True)
    final = Launch(run + ["--out", str(killed), "--resume"], out / "logs" / "final.txt", a.spawn)
    status = final.wait()
    got = comparable(killed) if status == 0 else []
    same_metrics = got == expected
    want_w, got_w = weights(out / "straight" / "model"), weights(killed / "model") if status == 0 else {}
    same_weights = want_w.keys() == got_w.keys() and all(torch.equal(want_w[k], got_w[k]) for k in want_w)
    report = {"kills": a.kills, "seed": a.seed, "during_save": sum(k["during_save"] for k in kills),
              "modes": {m: sum(k["mode"] == m for k in kills) for m in ("save", "step", "any")},
              "steps": len(expected), "final_status": status, "same_metrics": same_metrics,
              "same_weights": same_weights, "seconds": round(time.time() - t0, 1), "launches": kills}
    (out / "soak.json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"{a.kills} kills ({report['during_save']} while a checkpoint was being written), then resumed to the end: "
          f"metrics {'equal' if same_metrics else 'DIFFER'}, weights {'equal' if same_weights else 'DIFFER'} "
          f"(uninterrupted run: {len(expected)} steps); {report['seconds']} s; {out / 'soak.json'}")
    if not (same_metrics and same_weights):
        raise SystemExit(1)
    return report


if __name__ == "__main__":
    main()
