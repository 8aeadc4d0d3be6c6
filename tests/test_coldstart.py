"""coldstart.py: the supervised cold start before GRPO (train.py --cold-start): it learns the boxed answers, is the
same on every run of a config, runs before the reference is copied, and a resumed run redoes it exactly."""
import signal
import subprocess
import sys

import pytest
import torch
from conftest import colour_samples, fresh, plus_sample
from test_train import ROOT, comparable, kill_script, rows, small_args

import coldstart
import train


def test_cold_start_learns_the_answers_and_is_reproducible(tiny_vlm, tmp_path):
    samples = colour_samples(tmp_path, ["red", "blue", "blue", "red"])
    planning = plus_sample("planning", "Route Name: Line 1")
    assert coldstart.answer_target(samples[0]) == "\\boxed{red}"
    a, b = fresh(tiny_vlm), fresh(tiny_vlm)
    nll = coldstart.cold_start(a, samples + [planning], steps=30, lr=2e-3, batch_size=4, seed=3)
    assert len(nll) == 30 and nll[-1] < 0.5 * nll[0], nll  # a random model's ~log(vocab) per token, then learnt
    assert a.model.training == tiny_vlm.model.training  # left as it was
    assert coldstart.cold_start(b, samples + [planning], steps=30, lr=2e-3, batch_size=4, seed=3) == nll
    assert all(torch.equal(p, q) for p, q in zip(a.model.parameters(), b.model.parameters()))
    with pytest.raises(ValueError, match="no judgement or counting questions"):
        coldstart.cold_start(fresh(tiny_vlm), [planning], steps=1, lr=1e-3)


def test_train_cold_starts_the_reference_too_and_resumes_exactly(tmp_path, capsys):
    args = small_args(tmp_path, "--stage", "judgement", "--max-steps-per-stage", "4", "--save-every", "2",
                      "--eval-samples", "2", "--cold-start", "5")
    straight = tmp_path / "straight"
    train.main(args + ["--out", str(straight)])
    assert "cold start: 5 steps, answer NLL" in capsys.readouterr().out
    log = rows(straight / "metrics.jsonl")
    assert len(log) == 4 and log[0]["kl"] == 0.0  # the reference is the cold-started policy, not the random one
    killed = tmp_path / "killed"
    proc = subprocess.run([sys.executable, "-c", kill_script(3), *args, "--out", str(killed)], cwd=ROOT,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert proc.returncode == -signal.SIGKILL
    train.main(args + ["--out", str(killed), "--resume"])  # redoes the cold start for the reference
    assert [comparable(r) for r in rows(killed / "metrics.jsonl")] == [comparable(r) for r in log]


def test_cold_start_refusals():
    with pytest.raises(ValueError, match="--cold-start must be >= 0"):
        train.parse_args(["--cold-start", "-1"])
    with pytest.raises(ValueError, match="--cold-start is for one process and full fine-tuning"):
        train.parse_args(["--cold-start", "5", "--lora-rank", "4"])
