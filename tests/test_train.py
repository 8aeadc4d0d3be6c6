"""End to end on the CPU: train.py's stages on the tiny model, outputs, checkpoints, resume after a kill."""
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train

ROOT = Path(__file__).resolve().parents[1]
# a run small enough for the test suite: 3 cities, 4 prompts x 2 responses, a few steps per stage
SMALL = ["--sft", "0", "--replay", "0", "--cities", "3", "--batch-size", "4", "--group-size", "2", "--max-new-tokens", "6",
         "--planning-max-new-tokens", "12", "--eval-samples", "8"]


def small_args(tmp_path: Path, *extra: str) -> list[str]:
    return SMALL + ["--cache-dir", str(tmp_path / "cache"), *extra]


def rows(path: Path) -> list[dict]:
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip()]


def comparable(row: dict) -> dict:
    """A metrics row without the wall-clock figures, which no two runs share."""
    return {k: v for k, v in row.items() if not k.startswith("time/") and k != "wall_time"}


@pytest.mark.parametrize("stage", ["judgement", "counting", "planning"])
def test_each_stage_runs_and_logs(tmp_path, stage):
    out = tmp_path / "run"
    summaries = train.main(small_args(tmp_path, "--stage", stage, "--max-steps-per-stage", "2", "--out", str(out)))
    assert list(summaries) == [stage] and summaries[stage]["n"] == 8  # --eval-samples 8
    log = rows(out / "metrics.jsonl")
    assert [r["step"] for r in log] == [0, 1] and {r["stage"] for r in log} == {stage}
    for key in ("reward/total", "reward/format", "reward/correctness", "reward/detail", "reward/accuracy",
                "groups/zero_std_frac", "kl", "clip_frac", "entropy", "response_len", "grad_norm", "time/rollout"):
        assert key in log[0], key
    assert json.loads((out / "config.json").read_text())["stage"] == stage
    assert (out / "curves.png").stat().st_size > 1000
    assert json.loads((out / f"eval_{stage}.json").read_text())["n"] == 8
    assert (out / "model" / "config.json").exists()


def test_all_stages_in_order_and_checkpoint_loads_in_transformers(tmp_path, monkeypatch):
    out = tmp_path / "run"
    saved = {}  # folder -> the policy train.py saved there (checkpoints and, at the end, out/model)
    real_save = train.models.save_policy
    monkeypatch.setattr(train.models, "save_policy", lambda policy, folder, *a, **kw: (
        saved.__setitem__(Path(folder), policy), real_save(policy, folder, *a, **kw)))
    initial = {}  # the weights training starts from
    real_load = train.models.load_model

    def load(*a, **kw):
        policy = real_load(*a, **kw)
        initial.update({k: v.detach().clone() for k, v in policy.model.state_dict().items()})
        return policy

    monkeypatch.setattr(train.models, "load_model", load)
    train.main(small_args(tmp_path, "--stage", "all", "--max-steps-per-stage", "2", "--out", str(out)))
    log = rows(out / "metrics.jsonl")
    assert [r["stage"] for r in log] == ["judgement"] * 2 + ["counting"] * 2 + ["planning"] * 2
    assert [r["global_step"] for r in log] == list(range(1, 7))
    ckpt = out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()
    assert list(ckpt.glob("*.safetensors")) and (ckpt / "trainer_state.pt").exists()
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText

    loaded = AutoModelForImageTextToText.from_pretrained(out / "model")  # plain transformers, no project code
    trained = saved[out / "model"].model
    assert type(loaded) is type(trained)
    assert sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in trained.parameters())
    # the very weights train.py ended with, in transformers' own names (and what model.safetensors holds)
    want, got = trained.state_dict(), loaded.state_dict()
    assert set(got) == set(want)
    assert all(torch.equal(got[k].float(), want[k].detach().float()) for k in want), \
        [k for k in want if not torch.equal(got[k].float(), want[k].detach().float())][:5]
    files = {k: v for f in (out / "model").glob("*.safetensors") for k, v in load_file(f).items()}

    def loaded_name(k):  # the file keeps Qwen2.5-VL's checkpoint names (model.layers..., visual...)
        return next(n for n in (k, "model." + k, "model.language_model." + k.removeprefix("model.")) if n in got)

    assert len(files) >= len(got) - 1  # all but a tied lm_head
    assert all(torch.equal(v.float(), got[loaded_name(k)].float()) for k, v in files.items())
    # and they are the trained weights, not the ones training started from
    assert set(initial) == set(want) and any(not torch.equal(initial[k], want[k]) for k in want)


def kill_script(step: int, rank: int = 0) -> str:
    """Python source that runs train.py (its argv) and SIGKILLs the process of `rank` as its `step`-th GRPO step
    begins: a deterministic kill -9 (the metric lines and the latest checkpoint before it are known)."""
    return f"""
import os, signal, sys
from scaling import distributed
import train
real, calls = train.grpo.grpo_step, []
def step(*a, **kw):
    calls.append(1)
    if len(calls) == {step} and distributed.rank() == {rank}:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*a, **kw)
train.grpo.grpo_step = step
train.main(sys.argv[1:])
"""


# The killed run: train.py in a child process that SIGKILLs itself as its 6th GRPO step begins, so exactly
# 5 metric lines are written and the latest checkpoint is step 4 (--save-every 2).
KILL_AT_STEP_6 = kill_script(6)


def test_resume_after_kill_reproduces_the_uninterrupted_run(tmp_path):
    args = small_args(tmp_path, "--stage", "all", "--max-steps-per-stage", "3", "--save-every", "2", "--eval-samples", "2")
    straight = tmp_path / "straight"
    train.main(args + ["--out", str(straight)])
    expected = [comparable(r) for r in rows(straight / "metrics.jsonl")]
    assert len(expected) == 9

    killed = tmp_path / "killed"
    proc = subprocess.run([sys.executable, "-c", KILL_AT_STEP_6, *args, "--out", str(killed)], cwd=ROOT,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert proc.returncode == -signal.SIGKILL
    assert len(rows(killed / "metrics.jsonl")) == 5  # mid-way through the counting stage
    assert (killed / "checkpoints" / "latest").read_text().strip() == "step-000004"  # what the resume starts from

    train.main(args + ["--out", str(killed), "--resume"])
    got = [comparable(r) for r in rows(killed / "metrics.jsonl")]
    assert [r["global_step"] for r in got] == list(range(1, 10))
    assert got == expected


def test_resume_without_checkpoint_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train.main(small_args(tmp_path, "--out", str(tmp_path / "empty"), "--resume"))


def test_nonfinite_run_is_reported_and_stopped(tmp_path, monkeypatch):
    real = train.grpo.grpo_step

    def broken(*a, **kw):
        metrics, responses = real(*a, **kw)
        return {**metrics, "skipped_nonfinite": 1.0}, responses

    monkeypatch.setattr(train.grpo, "grpo_step", broken)
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match="diverged: 2 consecutive non-finite"):
        train.main(small_args(tmp_path, "--stage", "judgement", "--max-nonfinite", "2", "--out", str(out)))
    assert (out / "checkpoints" / "latest").exists()  # what there is, is saved for inspection
