"""DAPO's dynamic sampling (variants/dynamic_sampling.py, --dynamic-sampling): the trained batch holds only groups with
reward spread, drawn prompts come from the curriculum's stream in order and are counted, the cap holds, and a
resumed run draws exactly what the uninterrupted one drew."""
import json

import pytest
import torch
from conftest import R, fresh, text_samples
from test_train import comparable, rows, small_args
from test_wiring import record, world  # noqa: F401  (world: the recorder's fixture)

import curriculum
import grpo
import model as M
import train
from variants import dynamic_sampling
from speed import logprobs


class Rewards:
    """Total 1.0 for every response to the prompts in `flat` (zero spread); for any other prompt, 0 and 1 in
    turn, so every one of its groups (G even, scored in row order) has spread."""

    def __init__(self, flat=()):
        self.flat, self.calls = set(flat), 0

    def __call__(self, sample, text):
        if sample.id in self.flat:
            return R(total=1.0, correctness=1.0)
        self.calls += 1
        return R(total=float(self.calls % 2))


def test_has_signal_is_on_the_total_reward():
    total = torch.tensor([1.0, 1, 0, 0, 0, 0.5, -2, -2])  # groups of 2: equal, equal, spread, equal
    assert dynamic_sampling.has_signal(total, 2).tolist() == [False, False, True, False]
    assert dynamic_sampling.max_draws(0, 8) == 24 and dynamic_sampling.max_draws(5, 8) == 5


def test_prompt_stream_takes_in_order_from_a_cursor():
    stream = curriculum.PromptStream([[1, 2, 3], [4, 5], [6]], position=1)
    assert stream.take(2) == [2, 3] and stream.take(0) == [] and stream.left() == 3
    assert stream.take(5) == [4, 5, 6] and stream.take(1) == [] and stream.position == 6


def _step(policy, stream, reward, B=4, G=2, draws=0, spy=None, **cfg):
    """One dynamic-sampling grpo_step on the stream's next B prompts; returns (metrics, responses)."""
    cfg = grpo.GRPOConfig(group_size=G, max_new_tokens=4, kl_coef=0.0, dynamic_sampling=True,
                          dynamic_sampling_max_draws=draws, **cfg)
    return grpo.grpo_step(policy, None, torch.optim.SGD(policy.model.parameters(), lr=0.1), stream.take(B), reward,
                          cfg, generator=torch.Generator().manual_seed(0), more=stream.take)


def _trained(monkeypatch):
    """Records the rollout and advantages the update receives (micro_batches is the update's first call)."""
    seen = {}
    real = grpo.micro_batches

    def spy(rollout, adv, cfg):
        seen.update(rollout=rollout, adv=adv)
        with torch.no_grad():  # the policy before the update: these must be the sampler's log-probs
            seen["logp"] = logprobs.shared_prompt_logprobs(seen["policy"].model, rollout.prompts, rollout.prompt_index,
                                                    rollout.response_ids, rollout.response_mask)
        return real(rollout, adv, cfg)

    monkeypatch.setattr(grpo, "micro_batches", spy)
    return seen


def test_trained_batch_holds_only_groups_with_signal(tiny_lm, monkeypatch):
    policy = fresh(tiny_lm, scale=0.1)
    samples = text_samples(12)
    seen = _trained(monkeypatch)
    seen["policy"] = policy
    stream = curriculum.PromptStream([samples])
    m, texts = _step(policy, stream, Rewards(flat={"0", "2", "5"}))
    # batch 0..3: 1 and 3 have signal, 2 missing at 2 of 4 -> ceil(2 x 4 / 2) = 4 more (4..7): 4, 6, 7 have signal;
    # trained: the first four with signal in draw order (1, 3, 4, 6); dropped: 0, 2, 5 and the surplus 7
    assert (m["sampling/drawn"], m["sampling/dropped"], stream.position) == (4.0, 4.0, 8)
    assert len(texts) == 8 * 2
    trained = seen["rollout"]
    assert trained.texts == [texts[2 * g + j] for g in (1, 3, 4, 6) for j in range(2)]
    kept = M.encode_prompts(policy, [samples[i] for i in (1, 3, 4, 6)])
    assert torch.equal(trained.prompts["input_ids"], kept["input_ids"])
    assert torch.equal(trained.prompt_index, torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]))
    # each response is paired with its own prompt: the training forward gives the sampler's log-probs
    mask = trained.response_mask
    assert torch.allclose(seen["logp"] * mask, trained.logprobs * mask, atol=1e-4)
    assert (seen["adv"].view(-1, 2) != 0).any(1).all()  # every trained group carries a gradient
    assert m["groups/zero_std_frac"] == 0.0 and m["rows_updated"] == 8
    assert m["tokens/completion"] > float(mask.sum())  # every round's tokens, the dropped groups' too


def test_cap_holds_and_zero_signal_groups_fill_the_batch(tiny_lm, monkeypatch):
    policy = fresh(tiny_lm, scale=0.1)
    samples = text_samples(12)
    seen = _trained(monkeypatch)
    seen["policy"] = policy
    stream = curriculum.PromptStream([samples])
    m, texts = _step(policy, stream, Rewards(flat={s.id for s in samples}), draws=5)
    # no signal anywhere: the first round asks for ceil(4 x 4 / 1) = 16, the cap allows 5; then it stops
    assert (m["sampling/drawn"], m["sampling/dropped"], stream.position) == (5.0, 5.0, 9)
    assert seen["rollout"].texts == texts[: 4 * 2]  # the batch is filled with the earliest groups
    assert m["rows_updated"] == 0 and m["groups/zero_std_frac"] == 1.0  # kl 0: nothing to train on


def test_stream_running_dry_ends_the_search(tiny_lm):
    stream = curriculum.PromptStream([text_samples(6)])
    m, texts = _step(fresh(tiny_lm), stream, Rewards(flat={str(i) for i in range(6)}), draws=12)
    assert (m["sampling/drawn"], m["sampling/dropped"], stream.position, len(texts)) == (2.0, 2.0, 6, 12)


def test_all_groups_with_signal_is_the_plain_step(tiny_lm):
    """Nothing to replace: no prompt drawn, and the step is the one without dynamic sampling, bit for bit."""
    out = []
    for dynamic in (False, True):
        policy = fresh(tiny_lm, scale=0.1)
        stream = curriculum.PromptStream([text_samples(8)])
        cfg = grpo.GRPOConfig(group_size=2, max_new_tokens=4, kl_coef=0.0, dynamic_sampling=dynamic)
        m, texts = grpo.grpo_step(policy, None, torch.optim.SGD(policy.model.parameters(), lr=0.1), stream.take(4),
                                  Rewards(), cfg, generator=torch.Generator().manual_seed(0), more=stream.take)
        out.append(({k: v for k, v in m.items() if not k.startswith("time/")}, texts, policy.model.state_dict(),
                    stream.position))
    (m1, t1, s1, p1), (m2, t2, s2, p2) = out
    assert m1 == m2 and t1 == t2 and p1 == p2 == 4 and m2["sampling/drawn"] == 0
    assert all(torch.equal(s1[k], s2[k]) for k in s1)


def test_errors_without_a_source_or_with_several_ranks(tiny_lm, monkeypatch):
    """Without a source of prompts grpo_step refuses; with several processes the run's config does (checked once,
    in train.check_config)."""
    policy = fresh(tiny_lm)
    cfg = grpo.GRPOConfig(group_size=2, max_new_tokens=2, kl_coef=0.0, dynamic_sampling=True)
    opt = torch.optim.SGD(policy.model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="needs `more`"):
        grpo.grpo_step(policy, None, opt, text_samples(2), Rewards(flat={"0", "1"}), cfg)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="--dynamic-sampling is not supported with several processes yet"):
        train.parse_args(["--dynamic-sampling"])
    train.parse_args([])  # two processes without it are fine


# ----------------------------------------------------------------------------- train.py: the stage's stream

def _flat(batches):
    return [i for b in batches for i in b]


def test_one_pass_stage_uses_every_prompt_once(world, tiny_lm, tmp_path, monkeypatch):  # noqa: F811
    """The recorder draws a quarter batch more each step: the steps together read the stage's one pass in order,
    each prompt once, and the stage ends when it is used up (fewer steps than batches)."""
    base = ["--out", str(tmp_path / "run"), "--overwrite", "--stage", "judgement", "--batch-size", "5", "--sft", "0",
            "--replay", "0"]  # --overwrite: each record() is a new run in the same folder
    plain = record(train.parse_args(base), world, tiny_lm, monkeypatch)["batches"]
    dynamic = record(train.parse_args(base + ["--dynamic-sampling"]), world, tiny_lm, monkeypatch)["batches"]
    assert _flat(dynamic) == _flat(plain) and len(dynamic) < len(plain)  # 16 prompts: 5+1, 5+1, 4 vs 5, 5, 5, 1
    assert [len(b) for b in dynamic] == [6, 6, 4]


def test_capped_stage_takes_further_passes(world, tiny_lm, tmp_path, monkeypatch):  # noqa: F811
    base = ["--out", str(tmp_path / "run"), "--overwrite", "--stage", "judgement", "--batch-size", "4", "--sft", "0",
            "--replay", "0"]
    plain = record(train.parse_args(base + ["--max-steps-per-stage", "40"]), world, tiny_lm, monkeypatch)["batches"]
    got = record(train.parse_args(base + ["--max-steps-per-stage", "30", "--dynamic-sampling"]), world, tiny_lm,
                 monkeypatch)
    assert len(got["batches"]) == 30 and _flat(got["batches"]) == _flat(plain)[: 30 * 5]
    # every step of the stage can draw its cap (4 + 12 prompts): the stream is long enough for the worst case
    cfg = train.parse_args(base + ["--max-steps-per-stage", "30", "--dynamic-sampling"])
    stage = [s for s in world[0] if s.qtype in ("torf1", "torf2")]
    assert len(_flat(train.stage_batches(cfg, "judgement", stage, []))) >= 30 * 16


@pytest.mark.slow
def test_resume_draws_what_the_uninterrupted_run_drew(tmp_path, monkeypatch):
    """--dynamic-sampling on the tiny model (most of its groups score alike at first, so steps draw): killed as
    step 3 begins (checkpoint at step 2), resumed; the prompts drawn and the metrics equal the uninterrupted
    run's."""
    args = small_args(tmp_path, "--stage", "judgement", "--max-steps-per-stage", "3", "--save-every", "2",
                      "--eval-samples", "2", "--dynamic-sampling", "--dynamic-sampling-max-draws", "6")
    real = train.grpo.grpo_step

    def recording(log, die_at=None):
        def step(*a, more=None, **kw):
            if len(log) == die_at:
                raise KeyboardInterrupt
            log.append([s.id for s in a[3]])
            return real(*a, more=lambda n: _logged(log[-1], more(n)), **kw)
        return step

    straight = []
    monkeypatch.setattr(train.grpo, "grpo_step", recording(straight))
    train.main(args + ["--out", str(tmp_path / "straight")])
    expected = rows(tmp_path / "straight" / "metrics.jsonl")
    assert len(expected) == 3 and any(r["sampling/drawn"] > 0 for r in expected)
    assert all(r["sampling/drawn"] <= 6 for r in expected)
    assert [len(ids) - 4 for ids in straight] == [r["sampling/drawn"] for r in expected]
    # the steps read the stage's stream in curriculum order, each prompt once
    cfg = train.parse_args(args)
    stage = dict(curriculum.build_curriculum(train.data.load_data("", 3, 0, cfg.cache_dir)[0], "fine", 0))["judgement"]
    assert _flat(straight) == [s.id for s in _flat(train.stage_batches(cfg, "judgement", stage, []))][: len(_flat(straight))]

    cut = []
    monkeypatch.setattr(train.grpo, "grpo_step", recording(cut, die_at=2))
    with pytest.raises(KeyboardInterrupt):
        train.main(args + ["--out", str(tmp_path / "cut")])
    state = torch.load(tmp_path / "cut" / "checkpoints" / "step-000002" / "trainer_state.pt", weights_only=True)
    assert state["position"]["prompts_in_stage"] == len(_flat(straight[:2]))
    resumed = []
    monkeypatch.setattr(train.grpo, "grpo_step", recording(resumed))
    train.main(args + ["--out", str(tmp_path / "cut"), "--resume"])
    assert resumed == straight[2:]
    assert [comparable(r) for r in rows(tmp_path / "cut" / "metrics.jsonl")] == [comparable(r) for r in expected]
    assert json.loads((tmp_path / "cut" / "config.json").read_text())["dynamic_sampling"] is True


def _logged(ids: list, drawn: list) -> list:
    """Append the drawn prompts' ids to a step's log; pass the prompts on."""
    ids.extend(s.id for s in drawn)
    return drawn
