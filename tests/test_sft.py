"""variants/sft.py: supervised fine-tuning before GRPO (train.py --sft): it learns the answers (full or LoRA, VLM or
text model), is the same on every run of a config, runs before the reference is copied (KL 0 at GRPO's first step),
and a run killed at any step of it or of GRPO resumes exactly."""
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from conftest import colour_samples, fresh, plus_sample, text_samples
from test_train import ROOT, comparable, kill_script, rows, small_args

import train
from scaling import lora
from variants import sft


def test_answer_targets():
    route = "Route Name: Line 1\nDeparture Stop: A\nArrival Stop: B"
    assert sft.answer_target(plus_sample("torf1", "yes")) == "\\boxed{yes}"
    assert sft.answer_target(plus_sample("planning", route)) == route  # a route is not boxed
    assert sft.answer_target(plus_sample("counting1", "B"), data="released") == "B"  # the authors' SFT data: bare


def test_working_copies_each_asked_stations_row_of_the_map_by_station():
    """variants/sft.working, the demo's: the asked stations' rows exactly as model.metro_as_text(..., "station")
    writes them (a space, the name, a space, the lines' letters), torf2's asked line, then the boxed answer;
    other types get none."""
    import model
    from transit.metro import Sample

    metro = {"Line A": ["Alder", "Birch", "Cedar"], "Line B": ["Dove", "Birch", "Elm"]}
    ask = lambda qtype, answer, **kw: Sample(id="x", qtype=qtype, question="?", answer=answer, image=None,  # noqa: E731
                                             metro=metro, **kw)
    by_station = model.metro_as_text(metro, "station").splitlines()
    assert by_station == [" Alder A", " Birch AB", " Cedar A", " Dove B", " Elm B"]
    assert sft.answer_target(ask("torf2", "no", station_1="Alder", line="Line B"), "working") == \
        " Alder A\n Line B\n\\boxed{no}"
    assert sft.answer_target(ask("counting2", "2", station_1="Birch"), "working") == " Birch AB\n\\boxed{2}"
    assert sft.answer_target(ask("torf1", "no", station_1="Alder", station_2="Elm"), "working") == \
        " Alder A\n Elm B\n\\boxed{no}"
    assert sft.answer_target(ask("counting3", "2"), "working") == "\\boxed{2}"
    assert sft.working(ask("counting1", "A", station_1="Alder", station_2="Cedar")) == ""
    assert all(line in by_station for line in sft.working(ask("counting2", "2", station_1="Birch")).splitlines())
    assert model.station_row("Alder", ["Line 1", "Line 3"]) == " Alder 13"  # numbered lines: their numbers


def test_reading_drill_asks_each_row_of_a_map_again_and_learns_only_that(tmp_path):
    """sft.drill_pairs: a share of a map's rows (>= 2), a blank line, the same rows in another order; drill_nll sums
    over the second part's tokens only (checked against a hand-built forward pass)."""
    import model

    metros = [{"Line A": ["Alder", "Birch", "Cedar"], "Line B": ["Dove", "Birch", "Elm"]},
              {"Line A": ["Fir", "Gorse"], "Line B": ["Gorse", "Holly"]}]
    pairs = sft.drill_pairs(metros, step=3, batch_size=6, seed=0)
    assert pairs == sft.drill_pairs(metros, step=3, batch_size=6, seed=0) != sft.drill_pairs(metros, 4, 6, 0)
    for first, second in pairs:
        assert first.endswith("\n\n") and sorted(first.strip("\n").split("\n")) == sorted(second.split("\n"))
        rows = second.split("\n")
        assert len(rows) >= 2 and any(set(rows) <= set(model.metro_as_text(m, "station").split("\n")) for m in metros)
    policy = model.build_tiny_policy(seed=0, corpus=[p for pair in pairs for p in pair], text_only=True,
                                     cache_dir=str(tmp_path), hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1)
    summed, count = sft.drill_nll(policy, pairs[:2])
    by_hand, tokens = 0.0, 0
    for first, second in pairs[:2]:
        a, b = (policy.tokenizer.encode(t, add_special_tokens=False) for t in (first, second))
        logp = torch.log_softmax(policy.model(input_ids=torch.tensor([a + b])).logits[0].float(), -1)
        by_hand -= sum(logp[len(a) - 1 + k, token].item() for k, token in enumerate(b))
        tokens += len(b)
    assert count == tokens and abs(summed.item() - by_hand) < 1e-3 * tokens


def test_learning_rate_warms_up_then_follows_a_cosine():
    """10 steps at peak 1.0: warmup over ceil(0.1 x 10) = 1 step, then 0.5 (1 + cos(pi k / 9)) for k = 0..8."""
    assert sft.lr_at(0, 10, 1.0) == 1.0  # the one warmup step reaches the peak
    assert sft.lr_at(1, 10, 1.0) == 1.0 and sft.lr_at(10, 10, 1.0) < 1e-9
    assert sft.lr_at(5, 10, 2.0) == pytest.approx(2.0 * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * 4 / 9)).item()))
    assert [sft.lr_at(k, 20, 1.0) for k in (0, 1)] == [0.5, 1.0]  # 2 warmup steps: 0.5, then 1.0


@pytest.mark.parametrize("kind, rank", [("vlm", 0), ("vlm", 4), ("lm", 0)])
def test_sft_learns_the_answers_and_is_reproducible(kind, rank, tiny_vlm, tiny_lm, tmp_path):
    base = tiny_vlm if kind == "vlm" else tiny_lm
    samples = colour_samples(tmp_path, ["red", "blue", "blue", "red"]) if kind == "vlm" else text_samples(4)
    run = lambda policy: sft.sft(policy, samples, steps=30, lr=1e-2 if rank else 5e-3, batch_size=4, seed=3,  # noqa: E731
                                 lora_rank=rank, lora_targets=lora.default_targets("tiny"))
    a, b = fresh(base), fresh(base)
    nll = run(a)
    assert len(nll) == 30 and nll[-1] < 0.5 * nll[0], nll  # a random model's ~log(vocab) per token, then learnt
    assert a.model.training == base.model.training and not lora.lora_layers(a.model)  # LoRA merged away
    assert run(b) == nll
    assert all(torch.equal(p, q) for p, q in zip(a.model.parameters(), b.model.parameters()))
    with pytest.raises(ValueError, match="no questions to learn answers from"):
        sft.sft(fresh(base), [], steps=1, lr=1e-3)


def test_sft_draws_question_types_evenly_and_released_data_is_plus_only(tiny_vlm, tmp_path, monkeypatch):
    samples = colour_samples(tmp_path, ["red"] * 9 + ["blue"])
    samples[-1].qtype = "rare"  # 1 question in 10, like counting3 among the counting questions
    seen, encode = [], sft.encode_prompts
    monkeypatch.setattr(sft, "encode_prompts", lambda policy, batch: seen.extend(s.qtype for s in batch)
                        or encode(policy, batch))
    sft.sft(fresh(tiny_vlm), samples, steps=20, lr=1e-3, batch_size=8, seed=0)
    assert len(seen) == 160 and 0.35 < seen.count("rare") / 160 < 0.65, seen.count("rare")  # in proportion: 0.1
    for s, q in zip(samples, ["torf1"] * 5 + ["planning"] * 5):
        s.qtype = q
    seen.clear()
    sft.sft(fresh(tiny_vlm), samples, steps=5, lr=1e-3, batch_size=4, seed=0, data="released")
    assert set(seen) == {"torf1"}  # the authors' SFT data has no planning questions
    seen.clear()
    sft.sft(fresh(tiny_vlm), samples, steps=20, lr=1e-3, batch_size=8, seed=0, data="working")
    assert set(seen) == {"torf1", "planning"}  # the demo's: every type, as "all", torf drawn more often
    share = sft.WORKING_TORF_WEIGHT / (sft.WORKING_TORF_WEIGHT + 1)
    assert abs(seen.count("torf1") / 160 - share) < 0.12, seen.count("torf1")


@pytest.mark.parametrize("lora_rank", ["0", "4"])
def test_a_run_killed_in_its_sft_resumes_with_the_same_losses_and_grpo(lora_rank, tmp_path, capsys, monkeypatch):
    """Killed at SFT step 4 of 6 (state saved every 2): the resumed run redoes steps 3-4 from the step-2 state with
    the uninterrupted run's losses, then GRPO gives the same metrics; GRPO's first KL is 0 (the reference is the SFT
    model); a run resumed after its SFT loads the finished state instead of redoing it."""
    args = small_args(tmp_path, "--stage", "judgement", "--max-steps-per-stage", "2", "--save-every", "2",
                      "--eval-samples", "2", "--sft", "6", "--sft-batch-size", "4", "--sft-lora-rank", lora_rank)
    straight = tmp_path / "straight"
    train.main(args + ["--out", str(straight)])
    assert "sft: 6 steps, answer NLL" in capsys.readouterr().out
    losses = torch.load(straight / "sft" / sft.STATE, weights_only=True)["losses"]
    log = rows(straight / "metrics.jsonl")
    assert len(losses) == 6 and len(log) == 2 and log[0]["kl"] == 0.0
    shutil.rmtree(tmp_path / "cache" / "sft")  # the straight run's cached SFT would spare the killed run its SFT
    killed = tmp_path / "killed"
    script = kill_script(4).replace("train.grpo.grpo_step", "train.sft.nll").replace("real(*a, **kw)", "real(*a, **kw)")
    proc = subprocess.run([sys.executable, "-c", script, *args, "--out", str(killed)], cwd=ROOT,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert proc.returncode == -signal.SIGKILL
    assert torch.load(killed / "sft" / sft.STATE, weights_only=True)["step"] == 2
    train.main(args + ["--out", str(killed), "--resume"])
    assert torch.load(killed / "sft" / sft.STATE, weights_only=True)["losses"] == losses
    assert [comparable(r) for r in rows(killed / "metrics.jsonl")] == [comparable(r) for r in log]
    calls = []
    monkeypatch.setattr(train.sft, "nll", lambda *a, **k: calls.append(1))
    train.main(args + ["--out", str(killed), "--resume"])  # finished: loaded, not redone
    assert not calls


def test_train_sfts_the_reference_too_and_grpo_resumes_exactly(tmp_path, capsys):
    args = small_args(tmp_path, "--stage", "judgement", "--max-steps-per-stage", "4", "--save-every", "2",
                      "--eval-samples", "2", "--sft", "5")
    straight = tmp_path / "straight"
    train.main(args + ["--out", str(straight)])
    log = rows(straight / "metrics.jsonl")
    assert len(log) == 4 and log[0]["kl"] == 0.0  # the reference is the SFT model, not the random one
    killed = tmp_path / "killed"
    proc = subprocess.run([sys.executable, "-c", kill_script(3), *args, "--out", str(killed)], cwd=ROOT,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert proc.returncode == -signal.SIGKILL
    train.main(args + ["--out", str(killed), "--resume"])  # the saved SFT state rebuilds the reference
    assert [comparable(r) for r in rows(killed / "metrics.jsonl")] == [comparable(r) for r in log]


def test_sft_stage_alone_and_sft_lora_before_grpo_lora(tmp_path):
    """`--stage sft` trains and exports the SFT model alone; `--sft 20 --sft-lora-rank 8` before GRPO (the issue's
    command, here also with GRPO's own LoRA on top of the merged SFT model)."""
    out = tmp_path / "sft-only"
    assert train.main(small_args(tmp_path, "--stage", "sft", "--sft", "3", "--out", str(out))) == {}
    assert (out / "model" / "config.json").exists() and not (out / "metrics.jsonl").exists()
    for extra in ([], ["--lora-rank", "4"]):
        out = tmp_path / f"sft-lora{len(extra)}"
        train.main(small_args(tmp_path, "--stage", "judgement", "--max-steps-per-stage", "2", "--sft", "20",
                              "--sft-lora-rank", "8", "--out", str(out), *extra))
        assert rows(out / "metrics.jsonl")[0]["kl"] == 0.0


def test_sft_refusals():
    for flag in ("--sft", "--sft-lr", "--sft-lora-rank"):
        with pytest.raises(ValueError, match=f"{flag} must be >= 0"):
            train.parse_args([flag, "-1"])
    with pytest.raises(ValueError, match="--stage sft runs the SFT alone"):
        train.parse_args(["--stage", "sft", "--sft", "0"])
    with pytest.raises(ValueError, match="--sft-data must be one of"):
        sft.sft(None, [], 0, 1e-3, data="mine")


def test_tiny_defaults_and_the_sft_lr(tmp_path, monkeypatch):
    cfg = train.parse_args([])  # --model tiny, no preset, one process, full fine-tuning
    assert (cfg.sft, cfg.sft_lr, cfg.lr, cfg.replay) == (train.TINY_DEFAULTS["sft"], 2e-3, 2e-4, 0.5)
    mine = train.parse_args(["--lr", "1e-3", "--sft", "0"])  # the command line wins, flag by flag
    assert (mine.sft, mine.sft_lr, mine.lr, mine.replay) == (0, 2e-3, 1e-3, 0.5)
    for argv in (["--preset", "paper"], ["--lora-rank", "4"], ["--model", "/models/x"]):
        other = train.parse_args(argv)
        assert (other.sft, other.sft_lr, other.replay) == (0, 0.0, 0.0), argv
    assert train.parse_args(["--lora-rank", "4"]).lr == 2e-3
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert train.parse_args([]).sft == 0  # torchrun: the flags' own defaults
    with pytest.raises(ValueError, match="--sft runs in one process"):
        train.parse_args(["--sft", "5"])
    monkeypatch.delenv("WORLD_SIZE")
    seen = []
    monkeypatch.setattr(train.sft, "sft", lambda policy, samples, steps, lr, *a, **k: seen.append((steps, lr)) or [1.0])
    args = small_args(tmp_path, "--stage", "judgement", "--max-steps-per-stage", "1", "--sft", "3", "--lr", "1e-3")
    train.main(args + ["--sft-lr", "5e-3", "--out", str(tmp_path / "a")])
    train.main(args + ["--sft-lr", "0", "--out", str(tmp_path / "b")])  # 0: the SFT runs at --lr
    train.main(args + ["--out", str(tmp_path / "c")])  # the tiny default
    assert seen == [(3, 5e-3), (3, 1e-3), (3, 2e-3)]


def test_micro_batches_give_the_whole_batchs_update(tiny_lm):
    """Gradient accumulation over micro-batches, divided by the whole batch's token count: the same losses and
    weights as one pass (float rounding aside)."""
    samples = text_samples(5)
    whole, parts = fresh(tiny_lm), fresh(tiny_lm)
    # plain SGD: the update is linear in the gradient (Adam's sign-like steps on near-zero gradients, e.g. the text
    # model's zeroed previous-token head weights, would turn rounding into whole steps)
    sgd = lambda model: torch.optim.SGD(model.parameters(), lr=0.5)  # noqa: E731
    a = sft.sft(whole, samples, steps=3, lr=0.5, batch_size=5, seed=1, make_optimizer=sgd)
    b = sft.sft(parts, samples, steps=3, lr=0.5, batch_size=5, seed=1, micro_batch_size=2, make_optimizer=sgd)
    assert a == pytest.approx(b, rel=1e-5) and a[-1] < a[0] - 0.1  # it learns, and the same way
    for p, q in zip(whole.model.parameters(), parts.model.parameters()):
        assert torch.allclose(p, q, atol=1e-5)


def test_the_tiny_models_sft_is_cached_for_later_runs(tmp_path, capsys, monkeypatch):
    """A second run with the same SFT settings (another --out, other GRPO flags) loads the finished SFT from
    --cache-dir instead of redoing it, and gets the same SFT model (KL 0 at step 1, the same first step); another
    SFT setting is not served from the cache."""
    args = small_args(tmp_path, "--stage", "judgement", "--max-steps-per-stage", "1", "--eval-samples", "2", "--sft", "4")
    train.main(args + ["--out", str(tmp_path / "a")])
    first = rows(tmp_path / "a" / "metrics.jsonl")[0]
    calls = []
    real = train.sft.nll
    monkeypatch.setattr(train.sft, "nll", lambda *a, **k: calls.append(1) or real(*a, **k))
    capsys.readouterr()
    train.main(args + ["--out", str(tmp_path / "b")])
    assert not calls and "were done before, loaded from" in capsys.readouterr().out
    assert comparable(rows(tmp_path / "b" / "metrics.jsonl")[0]) == comparable(first)
    train.main(args + ["--out", str(tmp_path / "c"), "--sft-batch-size", "8"])
    assert len(calls) == 4  # another setting: trained


def test_batches_draw_types_uniformly_or_by_weight_and_the_working_weighs_torf():
    """sft.batch_at: each question's type drawn uniformly, or in proportion to a weight per type (missing: 1); a batch
    depends on (seed, step) alone. The demo's working data draws torf1 and torf2 WORKING_TORF_WEIGHT times as often."""
    import collections

    by_type = {t: [f"{t}-{k}" for k in range(5)] for t in ("counting1", "counting2", "planning", "torf1")}
    uniform = collections.Counter(q.split("-")[0] for step in range(400) for q in sft.batch_at(by_type, step, 16, 0))
    weighted = collections.Counter(q.split("-")[0] for step in range(400)
                                   for q in sft.batch_at(by_type, step, 16, 0, {"torf1": 4.0}))
    n = 400 * 16
    assert all(abs(uniform[t] / n - 0.25) < 0.02 for t in by_type)
    assert abs(weighted["torf1"] / n - 4 / 7) < 0.02 and abs(weighted["planning"] / n - 1 / 7) < 0.02
    assert sft.batch_at(by_type, 7, 16, 3, {"torf1": 4.0}) == sft.batch_at(by_type, 7, 16, 3, {"torf1": 4.0})
    assert sft.WORKING_TORF_WEIGHT > 1
