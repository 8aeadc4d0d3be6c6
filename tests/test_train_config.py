"""train.py's config: flags generated from the dataclass, presets, early errors naming the flag."""
import dataclasses
from pathlib import Path

import pytest

import lora
import train


def test_every_field_is_a_flag_with_help():
    ap_help = []
    for f in dataclasses.fields(train.TrainConfig):
        assert f.metadata.get("help"), f"field {f.name} has no help text"
        ap_help.append("--" + f.name.replace("_", "-"))
    cfg = train.parse_args([])
    # defaults of the flags are the dataclass defaults, with the tiny model's own on top (tests/test_coldstart.py)
    assert cfg == dataclasses.replace(train.TrainConfig(), **train.TINY_DEFAULTS)


def test_ablation_flags_parse():
    cfg = train.parse_args(["--stage", "counting", "--no-detail-reward", "--alpha", "0.25", "--no-difficulty-weight",
                            "--gammas", "1", "1.5", "2", "--betas", "0", "0.8", "--detail-variant", "released",
                            "--group-size", "4", "--aggregation", "sequence", "--no-std-scale", "--curriculum", "fine"])
    assert cfg.stage == "counting" and cfg.no_detail_reward and cfg.no_difficulty_weight and cfg.no_std_scale
    assert cfg.alpha == 0.25 and cfg.gammas == (1.0, 1.5, 2.0) and cfg.betas == (0.0, 0.8)
    assert cfg.detail_variant == "released" and cfg.group_size == 4 and cfg.aggregation == "sequence"
    r = train.reward_config(cfg)
    assert (r.use_detail, r.use_difficulty, r.alpha, r.detail_variant) == (False, False, 0.25, "released")
    assert tuple(r.gammas) == (1.0, 1.5, 2.0) and tuple(r.betas) == (0.0, 0.8)


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
    assert train.grpo_config(cfg, "judgement").max_new_tokens == 4
    assert train.grpo_config(cfg, "planning").max_new_tokens == 48
    explicit = train.parse_args(["--max-new-tokens", "7", "--planning-max-new-tokens", "9"])
    assert (train.grpo_config(explicit, "counting").max_new_tokens, train.grpo_config(explicit, "all").max_new_tokens) == (7, 9)
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
    train.check_resume_config(train.parse_args(["--eval-every", "5"]), saved, tmp_path)  # harmless change
    # a full fine-tuning checkpoint from when --lora-targets defaulted to the projections' list resumes
    train.check_resume_config(train.parse_args([]), {**saved, "lora_targets": ",".join(lora.DEFAULT_TARGETS)}, tmp_path)
    with pytest.raises(ValueError, match=r"--gammas \(1.0, 1.2, 1.5\) -> \(1.0, 2.0, 3.0\); --lr 0.0002 -> 0.001"):
        train.check_resume_config(train.parse_args(["--lr", "1e-3", "--gammas", "1", "2", "3"]), saved, tmp_path)


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
    base = train.TrainConfig()
    saved = dataclasses.asdict(base)
    changed = dataclasses.replace(base, **{field: _changed(getattr(base, field))})
    if field in train.MAY_CHANGE_ON_RESUME:
        train.check_resume_config(changed, saved, tmp_path)
    else:
        with pytest.raises(ValueError, match="--" + field.replace("_", "-")):
            train.check_resume_config(changed, saved, tmp_path)


def test_may_change_on_resume_names_real_fields():
    assert set(train.MAY_CHANGE_ON_RESUME) <= {f.name for f in dataclasses.fields(train.TrainConfig)}


def test_truncate_metrics_drops_later_and_cut_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"global_step": 1}\n{"global_step": 2}\n{"global_step": 3}\n{"global_st')
    train.truncate_metrics(path, 2)
    assert path.read_text() == '{"global_step": 1}\n{"global_step": 2}\n'


def test_readme_flags_table_matches_the_config():
    """The README's flags table is TrainConfig's fields, defaults and help (so it cannot drift)."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for f in dataclasses.fields(train.TrainConfig):
        d = f.default
        d = ("on" if d else "off") if isinstance(d, bool) else " ".join(map(str, d)) if isinstance(d, tuple) \
            else "(empty)" if d == "" else d
        row = f"| `--{f.name.replace('_', '-')}` | {d} | {f.metadata['help'].replace('|', '/')} |"
        assert row in readme, f"README flags table out of date for --{f.name}: expected {row}"


def test_released_preset_is_the_authors_script():
    cfg = train.parse_args(["--preset", "released"])
    assert (cfg.group_size, cfg.kl_coef, cfg.kl_clamp, cfg.aggregation, cfg.entropy_coef) == (4, 1e-2, 10.0, "sequence", 1e-3)
    assert (cfg.format_score, cfg.no_detail_floor, cfg.drop_last, cfg.detail_variant) == (0.0, True, True, "released")
    assert (cfg.lr, cfg.weight_decay, cfg.batch_size) == (1e-6, 1e-2, 16)
    r, g = train.reward_config(cfg), train.grpo_config(cfg, "planning")
    assert (r.format_score, r.detail_floor, r.detail_variant) == (0.0, None, "released")
    assert (g.entropy_coef, g.kl_clamp, g.aggregation, g.group_size, g.kl_coef) == (1e-3, 10.0, "sequence", 4, 1e-2)
    default = train.grpo_config(train.parse_args([]), "judgement")
    assert (default.entropy_coef, default.kl_clamp) == (0.0, None)
    assert train.reward_config(train.parse_args([])).detail_floor == -10.0
    assert train.reward_config(train.parse_args([])).parsing == "released"
    assert train.reward_config(train.parse_args(["--lenient-parsing"])).parsing == "lenient"
