"""coldstart.py: the supervised cold start before GRPO (train.py --cold-start): it learns the boxed answers, is the
same on every run of a config, runs before the reference is copied, and a resumed run redoes it exactly."""
import signal
import subprocess
import sys

import pytest
import torch
from conftest import colour_samples, fresh, plus_sample
from test_train import ROOT, comparable, kill_script, rows, small_args

from variants import coldstart
import train


def test_cold_start_learns_the_answers_and_is_reproducible(tiny_vlm, tmp_path):
    samples = colour_samples(tmp_path, ["red", "blue", "blue", "red"])
    assert coldstart.answer_target(samples[0]) == "\\boxed{red}"
    route = "Route Name: Line 1\nDeparture Stop: A\nArrival Stop: B"
    assert coldstart.answer_target(plus_sample("planning", route)) == route  # a route is not boxed
    a, b = fresh(tiny_vlm), fresh(tiny_vlm)
    nll = coldstart.cold_start(a, samples, steps=30, lr=2e-3, batch_size=4, seed=3)
    assert len(nll) == 30 and nll[-1] < 0.5 * nll[0], nll  # a random model's ~log(vocab) per token, then learnt
    assert a.model.training == tiny_vlm.model.training  # left as it was
    assert coldstart.cold_start(b, samples, steps=30, lr=2e-3, batch_size=4, seed=3) == nll
    assert all(torch.equal(p, q) for p, q in zip(a.model.parameters(), b.model.parameters()))
    with pytest.raises(ValueError, match="no questions to learn answers from"):
        coldstart.cold_start(fresh(tiny_vlm), [], steps=1, lr=1e-3)


def test_cold_start_draws_question_types_evenly(tiny_vlm, tmp_path, monkeypatch):
    samples = colour_samples(tmp_path, ["red"] * 9 + ["blue"])
    samples[-1].qtype = "rare"  # 1 question in 10, like counting3 among the counting questions
    seen, encode = [], coldstart.encode_prompts
    monkeypatch.setattr(coldstart, "encode_prompts", lambda policy, batch: seen.extend(s.qtype for s in batch)
                        or encode(policy, batch))
    coldstart.cold_start(fresh(tiny_vlm), samples, steps=20, lr=1e-3, batch_size=8, seed=0)
    assert len(seen) == 160 and 0.35 < seen.count("rare") / 160 < 0.65, seen.count("rare")  # in proportion: 0.1


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
    assert (killed / coldstart.SAVED).is_file() and not (killed / "cold-start.tmp").exists()
    capsys.readouterr()
    train.main(args + ["--out", str(killed), "--resume"])  # the saved cold start rebuilds the reference
    assert "cold start: the 5 steps' weights loaded from" in capsys.readouterr().out
    assert [comparable(r) for r in rows(killed / "metrics.jsonl")] == [comparable(r) for r in log]
    (killed / coldstart.SAVED).unlink()  # without it a resumed run redoes the steps (seeded: the same weights)
    train.main(args + ["--out", str(killed), "--resume"])
    assert "cold start: 5 steps, answer NLL" in capsys.readouterr().out


def test_cold_start_refusals():
    for flag in ("--cold-start", "--cold-start-lr"):
        with pytest.raises(ValueError, match=f"{flag} must be >= 0"):
            train.parse_args([flag, "-1"])
    with pytest.raises(ValueError, match="--cold-start is for one process and full fine-tuning"):
        train.parse_args(["--cold-start", "5", "--lora-rank", "4"])


def test_tiny_defaults_and_the_cold_start_lr(tmp_path, monkeypatch):
    cfg = train.parse_args([])  # --model tiny, no preset, one process, full fine-tuning
    assert (cfg.cold_start, cfg.cold_start_lr, cfg.lr, cfg.replay) == (800, 2e-3, 2e-4, 0.5)
    mine = train.parse_args(["--lr", "1e-3", "--cold-start", "0"])  # the command line wins, flag by flag
    assert (mine.cold_start, mine.cold_start_lr, mine.lr, mine.replay) == (0, 2e-3, 1e-3, 0.5)
    for argv in (["--preset", "paper"], ["--lora-rank", "4"], ["--model", "/models/x"]):
        other = train.parse_args(argv)
        assert (other.cold_start, other.cold_start_lr, other.replay) == (0, 0.0, 0.0), argv
    assert train.parse_args(["--lora-rank", "4"]).lr == 2e-3
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert train.parse_args([]).cold_start == 0  # torchrun: the flags' own defaults
    monkeypatch.delenv("WORLD_SIZE")
    seen = []
    monkeypatch.setattr(train.coldstart, "cold_start", lambda policy, samples, steps, lr, **k: seen.append((steps, lr)) or [1.0])
    args = small_args(tmp_path, "--stage", "judgement", "--max-steps-per-stage", "1", "--cold-start", "3", "--lr", "1e-3")
    train.main(args + ["--cold-start-lr", "5e-3", "--out", str(tmp_path / "a")])
    train.main(args + ["--cold-start-lr", "0", "--out", str(tmp_path / "b")])  # 0: the cold start runs at --lr
    train.main(args + ["--out", str(tmp_path / "c")])  # the tiny default
    assert seen == [(3, 5e-3), (3, 1e-3), (3, 2e-3)]
