"""Every flag reaches the code it configures: for each TrainConfig field, changing the flag changes what a
component receives (the data loader, the model loader, the optimizer, the reward config, the curriculum's
batches, the GRPO config of each step, the evaluations, the checkpoints), not only what parses.

train.train runs for real with its heavy parts replaced by recorders (no decoding, no disk writes of
models), so a whole run takes milliseconds and the table can cover every field."""
import dataclasses
import random
import shutil

import pytest
import torch

import grpo
from offline import maps
import train
from offline.synthetic import make_questions

# The flags whose effect is checked by a behaviour test elsewhere instead of the recorder below.
ELSEWHERE = {
    "max_nonfinite": "tests/test_train.py::test_nonfinite_run_is_reported_and_stopped (stops after exactly N)",
    "debug": "tests/test_cli.py::test_debug_shows_the_traceback",
    "keep_checkpoints": "tests/test_checkpoints.py::test_keep_checkpoints_keeps_the_newest_n (the newest N stay)",
    "overwrite": "tests/test_reliability.py::test_an_earlier_run_is_kept_unless_overwrite_is_given (what it deletes)",
}

# one changed value per flag (argv), and the components that must then receive something else
REWARD, GRPO = {"reward"}, {"grpo"}
CHANGES = {
    "stage": (["--stage", "counting"], {"batches"}), "curriculum": (["--curriculum", "coarse"], {"batches"}),
    "world": (["--world", "demo"], {"load_data", "load_model"}),
    "model": (["--model", "/models/x"], {"load_model"}), "data": (["--data", "/data/x"], {"load_data"}),
    "cities": (["--cities", "7"], {"load_data"}),
    "preset": (["--preset", "released"], {"load_model", "reward", "grpo", "optimizer", "batches"}),
    "detail_reward": (["--no-detail-reward"], REWARD), "alpha": (["--alpha", "0.25"], REWARD),
    "difficulty_weight": (["--no-difficulty-weight"], REWARD), "correct_score": (["--correct-score", "5"], REWARD), "gammas": (["--gammas", "1", "2", "3"], REWARD),
    "betas": (["--betas", "0", "0.9"], REWARD), "detail_variant": (["--detail-variant", "released"], REWARD),
    "format_score": (["--format-score", "0"], REWARD), "detail_floor": (["--no-detail-floor"], REWARD),
    "lenient_parsing": (["--lenient-parsing"], REWARD), "group_size": (["--group-size", "4"], GRPO),
    "batch_size": (["--batch-size", "3"], {"batches"}), "micro_batch_size": (["--micro-batch-size", "16"], GRPO),
    "lr": (["--lr", "1e-3"], {"optimizer"}), "weight_decay": (["--weight-decay", "0.1"], {"optimizer"}),
    "kl_coef": (["--kl-coef", "0"], {"grpo", "reference"}), "clip_eps": (["--clip-eps", "0.3"], GRPO),
    "ppo_epochs": (["--ppo-epochs", "2"], GRPO), "aggregation": (["--aggregation", "sequence"], GRPO),
    "std_scale": (["--no-std-scale"], GRPO), "advantage": (["--advantage", "rloo"], GRPO),
    "dynamic_sampling": (["--dynamic-sampling"], {"grpo", "batches"}),
    "dynamic_sampling_max_draws": (["--dynamic-sampling-max-draws", "5"], GRPO), "max_new_tokens": (["--max-new-tokens", "9"], {"grpo", "evals"}),
    "planning_max_new_tokens": (["--planning-max-new-tokens", "30"], {"grpo", "evals"}),
    "temperature": (["--temperature", "0.7"], GRPO), "top_p": (["--top-p", "0.9"], GRPO),
    "max_grad_norm": (["--max-grad-norm", "0.5"], GRPO), "entropy_coef": (["--entropy-coef", "0.001"], GRPO),
    "kl_clamp": (["--kl-clamp", "10"], GRPO), "drop_last": (["--drop-last"], {"batches"}),
    "continuous_batches": (["--continuous-batches"], {"batches"}),
    "sft": (["--sft", "3"], {"sft"}), "sft_lr": (["--sft-lr", "0.01"], {"sft"}, ["--sft", "3"]),
    "sft_lora_rank": (["--sft-lora-rank", "2"], {"sft"}, ["--sft", "3"]),
    "sft_batch_size": (["--sft-batch-size", "3"], {"sft"}, ["--sft", "3"]),
    "sft_data": (["--sft-data", "released"], {"sft"}, ["--sft", "3"]),
    "sft_drill": (["--sft-drill", "2"], {"sft"}, ["--sft", "3"]),
    "max_prompt_tokens": (["--max-prompt-tokens", "600"], {"batches"}),  # drops some prompts of every stage
    "decode_chunk": (["--decode-chunk", "2"], GRPO), "compile_decode": (["--compile-decode", "off"], GRPO),
    "replay": (["--replay", "0.5"], {"batches"}),
    "max_steps_per_stage": (["--max-steps-per-stage", "3"], {"batches"}),
    "max_pixels": (["--max-pixels", "50000"], {"load_model"}), "dtype": (["--dtype", "bfloat16"], {"load_model"}),
    "bf16_update": (["--bf16-update", "stochastic"], {"load_model"}),
    "gradient_checkpointing": (["--gradient-checkpointing"], {"load_model"}),
    "eight_bit_adam": (["--eight-bit-adam"], {"optimizer"}),
    "seed": (["--seed", "1"], {"load_data", "load_model", "batches", "sampling", "optimizer"}),
    "out": (None, {"checkpoints", "export"}), "cache_dir": (["--cache-dir", "/tmp/other-cache"], {"load_data", "load_model"}),
    "resume": (["--resume"], {"error"}), "save_every": (["--save-every", "2"], {"checkpoints"}),
    "eval_every": (["--eval-every", "2"], {"evals"}), "eval_samples": (["--eval-samples", "3"], {"evals"}),
    # a third entry: flags both runs get (the changed flag only acts with them)
    "lora_rank": (["--lora-rank", "4"], {"lora", "load_model", "reference"}),
    "lora_alpha": (["--lora-alpha", "3"], {"lora"}, ["--lora-rank", "4"]),
    "lora_targets": (["--lora-targets", "q_proj"], {"lora"}, ["--lora-rank", "4"]),
    "qlora": (["--qlora"], {"qlora"}, ["--lora-rank", "4"]),
    "merge_lora": (["--merge-lora"], {"merged", "export"}, ["--lora-rank", "4"]),
    "report_to": (["--report-to", "tensorboard"], {"report"}),
    "report_samples_every": (["--report-samples-every", "2"], {"samples"}, ["--report-to", "tensorboard"]),
}


SCORE_FN = train.score_fn  # the real one (record() replaces it with a recorder that calls this)


def part(cfg, cls) -> dict:
    """The settings of `cfg` that belong to `cls` (the reward's, or a GRPO step's)."""
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls)}


@pytest.fixture(scope="module")
def world():
    """A small in-memory question set over three synthetic cities (no maps drawn): train and test."""
    samples = []
    for i, difficulty in enumerate(("easy", "middle", "hard")):
        metro = maps.generate_metro(i, difficulty)
        samples += make_questions(metro, random.Random(i), 4, city=f"c{i}", map_difficulty=difficulty)
    return samples[: len(samples) * 2 // 3], samples[len(samples) * 2 // 3:]


def record(cfg, world, policy, monkeypatch) -> dict:
    """Run train.train(cfg) with recorders in place of data / model loading, GRPO steps, evaluation and
    checkpoint writing; return everything the components received."""
    got: dict = {"batches": [], "grpo": [], "sampling": [], "evals": [], "checkpoints": []}
    m = monkeypatch
    m.setattr(train.data, "load_data", lambda *a, **k: got.__setitem__("load_data", (a, k)) or world)
    m.setattr(train.models, "load_model", lambda name, samples, *a, **k: got.update(
        load_model=(name, *a, k.get("world")), qlora=k.get("qlora")) or policy)
    m.setattr(train.sft, "sft", lambda policy, samples, steps, lr, batch, seed, rank, targets, make, folder, every,
              settings, data, **k: got.__setitem__("sft", (steps, lr, batch, rank, data, k.get("drill"))) or [1.0] * 9)
    m.setattr(train.lora, "add_lora", lambda model, *a, **k: got.__setitem__("lora", (a, k)))
    m.setattr(train.lora, "merge_lora", lambda model: got.__setitem__("merged", True))
    m.setattr(train.models, "load_policy", lambda *a, **k: policy)
    m.setattr(train.report, "open_reporter", lambda kind, *a, **k: got.__setitem__("report", kind) or "reporter")
    m.setattr(train.report, "log_samples", lambda rep, step, records: got.setdefault("samples", []).append(step))
    m.setattr(train.report, "log_step", lambda *a: None)
    m.setattr(train.report, "close", lambda rep: None)
    m.setattr(train.models, "reference_model", lambda p: got.__setitem__("reference", True) or object())
    m.setattr(train.precision, "make_optimizer", lambda *a, **k: got.__setitem__("optimizer", (a[1:], k)) or object())
    m.setattr(train, "score_fn", lambda c: got.__setitem__("reward", part(c, train.rewards.RewardConfig)) or SCORE_FN(c))

    def step(policy, reference, optimizer, samples, reward_fn, gcfg, generator=None, more=None):
        if gcfg.dynamic_sampling:  # as variants/dynamic_sampling.py does when a quarter of the groups lack signal
            samples = samples + more(len(samples) // 4)
        got["batches"].append([s.id for s in samples])
        got["grpo"].append(part(gcfg, grpo.GRPOConfig))
        got["sampling"].append(torch.rand(1, generator=generator).item())  # the rollouts' random stream
        return {k: 0.0 for k in grpo.METRICS}, [""]

    m.setattr(train.grpo, "grpo_step", step)
    m.setattr(train.evaluation, "evaluate", lambda policy, probe, rc, *budgets, **k: got["evals"].append(
        (len(got["batches"]), [s.id for s in probe], budgets)) or {"n": len(probe)})
    m.setattr(train.checkpoints, "save_checkpoint", lambda out, *a: got["checkpoints"].append((str(out), dict(a[3]))))
    m.setattr(train.models, "save_policy", lambda *a, **k: got.__setitem__("export", (str(a[1]), k)))
    m.setattr(train.report, "plot_curves", lambda *a: None)
    try:
        train.train(cfg)
    except (OSError, ValueError) as e:  # e.g. --resume with no checkpoint: what the user gets is the result
        got["error"] = f"{type(e).__name__}: {e}"
    return got


@pytest.mark.parametrize("field", [f.name for f in dataclasses.fields(train.TrainConfig) if f.name not in ELSEWHERE])
def test_every_flag_reaches_its_component(field, world, tiny_lm, tmp_path, monkeypatch):
    base = ["--out", str(tmp_path / "run"), "--max-steps-per-stage", "5", "--sft", "0", "--replay", "0"]
    argv, components, *both = CHANGES[field]
    base += both[0] if both else []
    argv = argv if field != "out" else ["--out", str(tmp_path / "elsewhere")]
    if field == "max_steps_per_stage":
        base = base[:2] + base[4:]
    assert train.parse_args(base + argv) != train.parse_args(base)
    default = record(train.parse_args(base), world, tiny_lm, monkeypatch)
    shutil.rmtree(tmp_path / "run")  # the second run is another run, not a --resume or --overwrite of the first
    changed = record(train.parse_args(base + argv), world, tiny_lm, monkeypatch)
    assert "error" not in default and ("error" not in changed or "error" in components), changed.get("error")
    for key in components:
        assert changed.get(key) != default.get(key), f"--{field.replace('_', '-')} did not reach {key}"


def test_the_table_covers_every_field():
    fields = {f.name for f in dataclasses.fields(train.TrainConfig)}
    assert set(CHANGES) | set(ELSEWHERE) == fields
