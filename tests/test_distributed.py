"""Data-parallel GRPO (distributed.py): the helpers in one process, and real 2-process torchrun runs on the CPU
(gloo): one update equals the one-process update, and train.py resumes after a kill -9 of a rank."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from scaling import distributed
import train
from test_train import comparable, kill_script, rows, small_args

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def torchrun(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    done = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    if check and done.returncode != 0:
        raise AssertionError(f"torchrun failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return done


# ----------------------------------------------------------------------------- one process: the no-op case

def test_one_process_helpers_are_the_identity():
    assert distributed.world() == 1 and distributed.rank() == 0 and distributed.is_main()
    assert distributed.all_sum(1.5, 2.0) == [1.5, 2.0] and distributed.all_min(3.0) == 3.0
    assert distributed.everyone(True) and not distributed.everyone(False)
    assert distributed.gather({"a": 1}) == [{"a": 1}]
    assert distributed.my_share([1, 2, 3]) == [1, 2, 3] and distributed.even_share([4, 5]) == [4, 5]
    assert distributed.trim_batches([[1, 2, 3], [4]]) == ([[1, 2, 3], [4]], 0)
    assert distributed.rank_seed(7) == 7  # one process samples exactly as before


def test_shares_split_evenly_and_disjointly(monkeypatch):
    monkeypatch.setattr(distributed, "world", lambda: 2)
    batch = list(range(8))
    shares = []
    for r in (0, 1):
        monkeypatch.setattr(distributed, "rank", lambda r=r: r)
        shares.append(distributed.my_share(batch))
    assert shares == [[0, 1, 2, 3], [4, 5, 6, 7]]  # contiguous: a prompt's group stays on one rank
    with pytest.raises(ValueError, match="7 prompts cannot be split evenly over 2 ranks"):
        distributed.my_share(list(range(7)))
    # evaluation: strided, padded with repeats to an equal count
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    assert distributed.even_share([10, 11, 12]) == [11, 12]
    monkeypatch.setattr(distributed, "rank", lambda: 0)
    assert distributed.even_share([10, 11, 12]) == [10, 12]
    # a stage's last partial batch is cut to a multiple of the world size, and the cut is counted
    assert distributed.trim_batches([[1, 2, 3, 4], [5, 6, 7], [8]]) == ([[1, 2, 3, 4], [5, 6]], 2)
    assert distributed.rank_seed(7) == 7 and len({distributed.rank_seed(s) for s in range(50)}) == 50


def test_batch_size_must_divide_over_the_torchrun_processes(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ValueError, match="--batch-size 8 must be a multiple of the 3 torchrun processes"):
        train.parse_args([])
    with pytest.raises(ValueError, match="--bf16-update master without --eight-bit-adam"):
        train.parse_args(["--batch-size", "6", "--bf16-update", "stochastic"])
    train.parse_args(["--batch-size", "6"])


# ----------------------------------------------------------------------------- two processes (gloo)

def test_sharded_update_equals_the_one_process_update(tmp_path, tiny_cache):
    """tests/distributed_update.py: two PPO epochs with a KL term on a fixed rollout of 4 prompts, SGD (linear
    in the gradient, so equal weights mean equal summed gradients), once plain and once over 2 ranks."""
    plain = subprocess.run([sys.executable, "tests/distributed_update.py", str(tmp_path / "one"), str(tiny_cache)],
                           cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert plain.returncode == 0, plain.stderr[-3000:]
    torchrun("tests/distributed_update.py", str(tmp_path / "two"), str(tiny_cache))
    one, two = load_file(tmp_path / "one.safetensors"), load_file(tmp_path / "two.safetensors")
    assert one.keys() == two.keys() and len(one) > 40
    for k in one:
        assert torch.allclose(one[k], two[k], atol=1e-5, rtol=0), k
    m1, m2 = json.loads((tmp_path / "one.json").read_text()), json.loads((tmp_path / "two.json").read_text())
    assert m1["rows_updated"] == m2["rows_updated"] == 8 and m1["clip_frac"] > 0 and m1["kl"] > 0
    for k in ("loss", "loss/policy", "kl", "clip_frac", "approx_kl", "grad_norm"):
        assert m2[k] == pytest.approx(m1[k], rel=1e-4, abs=1e-6), k


# rank 1 SIGKILLs itself as its 5th GRPO step begins (the first of the planning stage, after the checkpoint
# at the end of counting, step 4); torchrun then stops rank 0 too
KILL_RANK_1 = kill_script(5, rank=1)


def test_torchrun_training_resumes_after_a_rank_is_killed(tmp_path):
    # all three stages, 2 steps each: stage changes and per-stage evaluation. The tiny model's few-token answers
    # are rarely rewarded in 6 steps (zero advantages), so weight decay moves the policy away from the reference
    # after step 1: from step 2 the KL term gives every rank real gradients to sum
    args = small_args(tmp_path, "--stage", "all", "--max-steps-per-stage", "2", "--save-every", "2",
                      "--eval-samples", "3", "--weight-decay", "0.5")
    straight = tmp_path / "straight"
    torchrun("train.py", *args, "--out", str(straight))
    expected = [comparable(r) for r in rows(straight / "metrics.jsonl")]
    assert [r["global_step"] for r in expected] == [1, 2, 3, 4, 5, 6]
    assert json.loads((straight / "eval_planning.json").read_text())["n"] == 3  # gathered from both ranks
    assert all(r["grad_norm"] > 0 and r["kl"] > 0 for r in expected[1:])

    script = tmp_path / "kill.py"
    script.write_text(KILL_RANK_1)
    killed = tmp_path / "killed"
    done = torchrun(str(script), *args, "--out", str(killed), check=False)
    assert done.returncode != 0 and "Signal 9" in done.stderr + done.stdout
    assert (killed / "checkpoints" / "latest").read_text().strip() == "step-000004"
    assert (killed / "checkpoints" / "step-000004" / "sharded").is_dir()  # torch.distributed.checkpoint files
    assert len(rows(killed / "metrics.jsonl")) == 4

    torchrun("train.py", *args, "--out", str(killed), "--resume")
    assert [comparable(r) for r in rows(killed / "metrics.jsonl")] == expected

    # the exported model/ is a full HuggingFace folder: plain transformers loads it, and the resumed run's
    # weights are the uninterrupted run's
    from transformers import AutoModelForImageTextToText

    a = AutoModelForImageTextToText.from_pretrained(straight / "model").state_dict()
    b = AutoModelForImageTextToText.from_pretrained(killed / "model").state_dict()
    initial = AutoModelForImageTextToText.from_pretrained(next((tmp_path / "cache").glob("tiny-model/*/"))).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], initial[k]) for k in initial)  # and they were trained


# ----------------------------------------------------------------------------- reliability under torchrun
# (docs/reliability.md; the one-process halves are in test_reliability.py)

def test_torchrun_launch_on_a_held_folder_is_refused_naming_the_holder(tmp_path):
    """This process holds --out (as a running train.py does): a 2-process torchrun launch on it stops with the
    error naming this process, and writes nothing there."""
    from plumbing import run_folder

    out = tmp_path / "run"
    with run_folder.claim(out, resume=False, overwrite=False):
        done = torchrun("train.py", *small_args(tmp_path), "--out", str(out), check=False)
        assert sorted(p.name for p in out.iterdir()) == [run_folder.LOCK]
    assert done.returncode != 0
    assert f"error: {out} is in use by train.py (pid {os.getpid()} on " in done.stderr, done.stderr[-3000:]


# rank 1 sends SIGTERM to its parent, the torchrun launcher, as its 2nd GRPO step begins, then takes 3 s more over
# that step: torchrun passes SIGTERM on to both ranks while they are in step 2
SIGTERM_TORCHRUN = """
import os, signal, sys, time
from scaling import distributed
import train
real, calls = train.grpo.grpo_step, []
def step(*a, **kw):
    calls.append(1)
    if len(calls) == 2 and distributed.rank() == 1:
        os.kill(os.getppid(), signal.SIGTERM)
        time.sleep(3)
    return real(*a, **kw)
train.grpo.grpo_step = step
train.main(sys.argv[1:])
"""


def test_torchrun_sigterm_stops_every_rank_after_the_step_with_a_checkpoint(tmp_path):
    """SIGTERM to the torchrun launcher (what a scheduler sends): every rank finishes step 2, they write its
    checkpoint together and exit non-zero saying so; --resume then logs exactly the uninterrupted run's metrics."""
    args = small_args(tmp_path, "--stage", "judgement", "--max-steps-per-stage", "3", "--save-every", "100",
                      "--eval-samples", "2")
    straight = tmp_path / "straight"
    torchrun("train.py", *args, "--out", str(straight))
    expected = [comparable(r) for r in rows(straight / "metrics.jsonl")]
    assert len(expected) == 3
    launch, = json.loads((straight / "config.json").read_text())["launches"]
    assert launch["world_size"] == 2 and launch["device"] == "cpu"

    script = tmp_path / "sigterm.py"
    script.write_text(SIGTERM_TORCHRUN)
    stopped = tmp_path / "stopped"
    done = torchrun(str(script), *args, "--out", str(stopped), check=False)
    assert done.returncode != 0
    assert f"stopped by SIGTERM after step 2: checkpoint in {stopped / 'checkpoints'}" in done.stderr, \
        done.stderr[-3000:]
    assert (stopped / "checkpoints" / "latest").read_text().strip() == "step-000002"
    assert (stopped / "checkpoints" / "step-000002" / "sharded").is_dir() and len(rows(stopped / "metrics.jsonl")) == 2
    torchrun("train.py", *args, "--out", str(stopped), "--resume")
    assert [comparable(r) for r in rows(stopped / "metrics.jsonl")] == expected


def test_a_sharded_rollout_gathers_each_layer_once(tmp_path, tiny_cache):
    """tests/distributed_rollout.py: sample_groups on a model sharded over 2 ranks all-gathers each FSDP unit once
    for the whole rollout (distributed.gathered), not once per token; the same responses; sharded again after."""
    torchrun("tests/distributed_rollout.py", str(tmp_path / "r"), str(tiny_cache))
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["units"] >= 2 and r["same_texts"] and r["resharded"]
    assert r["gathered"] <= r["units"] + 1  # each decoder layer once, and the root
    assert r["per_token"] >= r["units"] * r["tokens"]  # what FSDP did before: every layer for every token
