"""End to end on the CPU: train.py's stages on the tiny model, outputs, checkpoints, resume after a kill."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import train

ROOT = Path(__file__).resolve().parents[1]
# a run small enough for the test suite: 3 cities, 4 prompts x 2 responses, a few steps per stage
SMALL = ["--cities", "3", "--batch-size", "4", "--group-size", "2", "--max-new-tokens", "6",
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


def test_all_stages_in_order_and_checkpoint_loads_in_transformers(tmp_path):
    out = tmp_path / "run"
    train.main(small_args(tmp_path, "--stage", "all", "--max-steps-per-stage", "2", "--out", str(out)))
    log = rows(out / "metrics.jsonl")
    assert [r["stage"] for r in log] == ["judgement"] * 2 + ["counting"] * 2 + ["planning"] * 2
    assert [r["global_step"] for r in log] == list(range(1, 7))
    ckpt = out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()
    assert list(ckpt.glob("*.safetensors")) and (ckpt / "trainer_state.pt").exists()
    from transformers import AutoModelForImageTextToText

    loaded = AutoModelForImageTextToText.from_pretrained(out / "model")  # plain transformers, no project code
    assert sum(p.numel() for p in loaded.parameters()) > 0


def test_resume_after_kill_reproduces_the_uninterrupted_run(tmp_path):
    args = small_args(tmp_path, "--stage", "all", "--max-steps-per-stage", "4", "--save-every", "3")
    straight = tmp_path / "straight"
    train.main(args + ["--out", str(straight)])
    expected = [comparable(r) for r in rows(straight / "metrics.jsonl")]
    assert len(expected) == 12

    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "train.py", *args, "--out", str(killed)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = killed / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(rows(metrics)) >= 8:  # mid-way through the counting stage
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    logged = len(rows(metrics))
    assert 8 <= logged < 12

    train.main(args + ["--out", str(killed), "--resume"])
    got = [comparable(r) for r in rows(metrics)]
    assert [r["global_step"] for r in got] == list(range(1, 13))
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
