"""train.py's config: flags generated from the dataclass, presets, early errors naming the flag."""
import dataclasses
from pathlib import Path

import pytest

from scaling import lora
import grpo
import rewards
import train
from plumbing import checkpoints, flags


def check_resume(cfg, saved, ckpt):
    checkpoints.check_resume_config(dataclasses.asdict(cfg), saved, ckpt, train.MAY_CHANGE_ON_RESUME)


def test_every_field_is_a_flag_with_help(capsys):
    docs = flags.field_docs(train.TrainConfig)
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    shown = capsys.readouterr().out
    for f in dataclasses.fields(train.TrainConfig):
        assert docs.get(f.name), f"field {f.name} has no help text (a docstring under it)"
        assert flags.flag(f.name) in shown, f"--help lacks {flags.flag(f.name)}"
    cfg = train.parse_args([])
    # defaults of the flags are the dataclass defaults, with the tiny model's own on top (tests/test_coldstart.py)
    assert cfg == dataclasses.replace(train.TrainConfig(), **train.TINY_DEFAULTS)


def test_ablation_flags_parse():
    cfg = train.parse_args(["--stage", "counting", "--no-detail-reward", "--alpha", "0.25", "--no-difficulty-weight",
                            "--gammas", "1", "1.5", "2", "--betas", "0", "0.8", "--detail-variant", "released",
                            "--group-size", "4", "--aggregation", "sequence", "--no-std-scale", "--curriculum", "fine"])
    assert cfg.stage == "counting" and not cfg.detail_reward and not cfg.difficulty_weight and not cfg.std_scale
    assert cfg.alpha == 0.25 and cfg.gammas == (1.0, 1.5, 2.0) and cfg.betas == (0.0, 0.8)
    assert cfg.detail_variant == "released" and cfg.group_size == 4 and cfg.aggregation == "sequence"
    # the run's config is the reward's and the step's: nothing copied between configs
    assert isinstance(cfg, rewards.RewardConfig) and isinstance(cfg, grpo.GRPOConfig)


def test_paper_preset_and_explicit_flags_win():
    cfg = train.parse_args(["--preset", "paper"])
    assert cfg.model == "Qwen/Qwen2.5-VL-7B-Instruct" and cfg.lr == 1e-6 and cfg.kl_coef == 1e-3
    assert (cfg.batch_size, cfg.group_size, cfg.max_new_tokens, cfg.weight_decay) == (16, 8, 2048, 1e-2)
    assert cfg.gradient_checkpointing
    cfg = train.parse_args(["--preset", "paper", "--lr", "3e-6", "--model", "/models/qwen3b"])
    assert cfg.lr == 3e-6 and cfg.model == "/models/qwen3b" and cfg.kl_coef == 1e-3


@pytest.mark.parametrize("argv, message", [
    (["--stage", "perception"], "not a stage of --curriculum fine"),
    (["--aggregation", "mean"], "--aggregation"),
    (["--detail-variant", "v2"], "--detail-variant"),
    (["--group-size", "1"], "--group-size"),
    (["--batch-size", "0"], "--batch-size"),
])
def test_bad_values_name_the_flag(argv, message):
    with pytest.raises(ValueError, match=message):
        train.parse_args(argv)


def test_unknown_preset_is_an_error(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--preset", "huge"])
    assert "unknown --preset" in capsys.readouterr().err


def test_stage_budget_by_stage(tmp_path):
    cfg = train.parse_args([])  # the tiny model: 4 / 48 tokens
    assert train.stage_config(cfg, "judgement").max_new_tokens == 4
    assert train.stage_config(cfg, "planning").max_new_tokens == 48
    explicit = train.parse_args(["--max-new-tokens", "7", "--planning-max-new-tokens", "9"])
    assert (train.stage_config(explicit, "counting").max_new_tokens, train.stage_config(explicit, "all").max_new_tokens) == (7, 9)
    real = train.parse_args(["--model", "/models/Qwen2.5-VL-7B-Instruct"])  # any real model: the paper's 2,048
    assert train.budgets(real) == (2048, 2048)
    (tmp_path / "rewardmap.json").write_text('{"max_new_tokens": 5, "planning_max_new_tokens": 40}')
    assert train.budgets(train.parse_args(["--model", str(tmp_path)])) == (5, 40)  # a folder train.py saved


@pytest.mark.parametrize("argv", [["--kl-coef", "-0.1"], ["--clip-eps", "0"], ["--top-p", "1.5"], ["--temperature", "-1"]])
def test_out_of_range_values_are_rejected(argv):
    with pytest.raises(ValueError, match=argv[0]):
        train.parse_args(argv)


def test_resume_refuses_other_settings(tmp_path):
    saved = dataclasses.asdict(train.parse_args([]))
    check_resume(train.parse_args(["--eval-every", "5"]), saved, tmp_path)  # harmless change
    # a full fine-tuning checkpoint from when --lora-targets defaulted to the projections' list resumes
    check_resume(train.parse_args([]), {**saved, "lora_targets": ",".join(lora.DEFAULT_TARGETS)}, tmp_path)
    with pytest.raises(ValueError, match=r"--gammas \(1.0, 1.2, 1.5\) -> \(1.0, 2.0, 3.0\); --lr 0.0002 -> 0.001"):
        check_resume(train.parse_args(["--lr", "1e-3", "--gammas", "1", "2", "3"]), saved, tmp_path)


def _changed(value):
    """A different value of the same type."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value * 2 + 1
    if isinstance(value, tuple):
        return tuple(v + 1 for v in value)
    return value + "-other"


@pytest.mark.parametrize("field", [f.name for f in dataclasses.fields(train.TrainConfig)])
def test_every_field_is_classified_for_resume(field, tmp_path):
    """A field is either allowed to change on resume (MAY_CHANGE_ON_RESUME) or a change refuses the resume,
    naming the flag: a new flag cannot escape the check."""
    saved = dataclasses.asdict(train.TrainConfig())
    changed = {**saved, field: _changed(saved[field])}
    resume = lambda: checkpoints.check_resume_config(changed, saved, tmp_path, train.MAY_CHANGE_ON_RESUME)  # noqa: E731
    if field in train.MAY_CHANGE_ON_RESUME:
        resume()
    else:
        with pytest.raises(ValueError, match="--" + field.replace("_", "-")):
            resume()


def test_may_change_on_resume_names_real_fields():
    assert set(train.MAY_CHANGE_ON_RESUME) <= {f.name for f in dataclasses.fields(train.TrainConfig)}


def test_truncate_metrics_drops_later_and_cut_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"global_step": 1}\n{"global_step": 2}\n{"global_step": 3}\n{"global_st')
    checkpoints.truncate_metrics(path, 2)
    assert path.read_text() == '{"global_step": 1}\n{"global_step": 2}\n'


def test_docs_flags_table_matches_the_config():
    """docs/flags.md is TrainConfig's fields, defaults and help (so it cannot drift): `python -m tools.flags_table`."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "flags.md").read_text()
    for name, default, help_ in flags.table(train.TrainConfig):
        row = f"| `{name}` | {default} | {help_.replace('|', '/')} |"
        assert row in text, f"docs/flags.md out of date for {name}: expected {row}"


def test_released_preset_is_the_authors_script():
    cfg = train.parse_args(["--preset", "released"])
    assert (cfg.group_size, cfg.kl_coef, cfg.kl_clamp, cfg.aggregation, cfg.entropy_coef) == (4, 1e-2, 10.0, "sequence", 1e-3)
    assert (cfg.format_score, cfg.detail_floor, cfg.drop_last, cfg.detail_variant) == (0.0, False, True, "released")
    assert (cfg.lr, cfg.weight_decay, cfg.batch_size) == (1e-6, 1e-2, 16)
    # the authors' model saw the image processor's default budget (0: the model's own); the loader's batches and cap
    assert (cfg.max_pixels, cfg.continuous_batches, cfg.max_prompt_tokens, cfg.micro_batch_size) == (0, True, 20_000, 1)
    assert train.parse_args(["--preset", "paper"]).max_pixels == 0
    g = train.stage_config(cfg, "planning")
    assert (cfg.format_score, cfg.floor, cfg.detail_variant) == (0.0, None, "released")
    assert (g.entropy_coef, g.kl_clamp, g.aggregation, g.group_size, g.kl_coef) == (1e-3, 10.0, "sequence", 4, 1e-2)
    default = train.stage_config(train.parse_args([]), "judgement")
    assert (default.entropy_coef, default.kl_clamp) == (0.0, 0.0)
    assert train.parse_args([]).floor == -10.0
    assert train.parse_args([]).parsing == "released"
    assert train.parse_args(["--lenient-parsing"]).parsing == "lenient"


FORMS = {  # each form argparse accepts for `--lr 3e-6` and `--max-steps-per-stage 7`
    "separate": ["--lr", "3e-6", "--max-steps-per-stage", "7"],
    "equals": ["--lr=3e-6", "--max-steps-per-stage=7"],
    "abbreviated": ["--lr", "3e-6", "--max-steps", "7"],
    "abbreviated equals": ["--lr=3e-6", "--max-steps=7"],
}


@pytest.mark.parametrize("preset", ["", "paper", "released"])
@pytest.mark.parametrize("form", FORMS)
def test_every_flag_form_wins_over_presets_and_tiny_defaults(preset, form):
    """`--lr=3e-6` once lost to the preset's and the tiny model's lr (only bare `--flag` tokens counted as given)."""
    cfg = train.parse_args((["--preset", preset] if preset else []) + FORMS[form])
    assert (cfg.lr, cfg.max_steps_per_stage) == (3e-6, 7)
    if preset:  # the rest of the preset still applies
        assert cfg.model == train.PRESETS[preset]["model"]
    else:  # the rest of the tiny defaults still apply
        assert cfg.sft == train.TINY_DEFAULTS["sft"]
    for argv in ("--replay=0", "--repl=0", "--replay 0", "--repl 0"):  # a tiny default, in every form
        assert train.parse_args(argv.split(" ")).replay == 0


def test_sft_rl_preset_is_the_authors_sft_then_rl():
    """scripts/sft.yaml (LoRA rank 8, lr 1e-5, their Plus-only bare-answer data), then the released RL
    (train_sft_rl.sh), whose shuffled loader has no curriculum."""
    cfg = train.parse_args(["--preset", "sft-rl"])
    assert (cfg.sft, cfg.sft_lr, cfg.sft_lora_rank, cfg.sft_data) == (169, 1e-5, 8, "released")
    assert cfg.curriculum == "none" and (cfg.group_size, cfg.kl_coef, cfg.lr) == (4, 1e-2, 1e-6)
    assert {k: getattr(cfg, k) for k in train.PRESETS["released"]} == train.PRESETS["released"]
