"""--report-to (report.py): tensorboard writes event files that read back as the logged numbers and sample
tables; wandb gets the same through its API (a fake module here: wandb is not a test dependency); 'none'
does nothing; a bad kind or a missing package is a one-line user error."""
import importlib
import sys
import types
import warnings
from types import SimpleNamespace

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.util import tensor_util

from plumbing import report

ROW = {"stage": "judgement", "step": 0, "global_step": 3, "reward/total": 1.5, "reward/accuracy": 0.25, "kl": 0.0,
       "loss": float("nan"), "grad_norm": None, "skipped_nonfinite": 0.0, "example": "\\boxed{yes}",
       "eval": {"plus": {"weighted_acc": 0.5}, "records": [{"x": 1}]}}
LOGGED = {"step": 0.0, "global_step": 3.0, "reward/total": 1.5, "reward/accuracy": 0.25, "kl": 0.0,
          "skipped_nonfinite": 0.0, "eval/plus/weighted_acc": 0.5}  # no strings, None, NaN or lists
RECORDS = [{"question": "Is A | B on line 1?", "answer": "yes", "response": "Line 1:\nA | B\n\\boxed{yes}",
            "total": 11.0, "format": 1.0, "correctness": 10.0, "detail": 0.0},
           {"question": "How many stops?", "answer": "3", "response": "a\\|b", "total": -2.5, "format": 0.0,
            "correctness": 0.0, "detail": -3.14159265}]


def markdown_to_safe_html(markdown: str) -> str:
    """What TensorBoard's text tab shows for a text summary."""
    with warnings.catch_warnings():  # tensorboard's vendored html5lib warns, on import, that it is deprecated
        warnings.simplefilter("ignore", DeprecationWarning)
        from tensorboard.plugin_util import markdown_to_safe_html
    return markdown_to_safe_html(markdown)


def events(out):
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    return acc


def text(acc, tag):
    return [(e.step, tensor_util.make_ndarray(e.tensor_proto).item().decode()) for e in acc.Tensors(f"{tag}/text_summary")]


def test_none_reports_nothing(tmp_path):
    assert report.open_reporter("none", tmp_path, {"lr": 1.0}, "run") is None
    report.log_step(None, ROW, 1)
    report.log_samples(None, 1, RECORDS)
    report.close(None)
    assert list(tmp_path.iterdir()) == []


def test_unknown_kind_names_the_flag_and_the_choices(tmp_path):
    with pytest.raises(ValueError, match=r"--report-to must be one of none, tensorboard, wandb, got 'tb'"):
        report.open_reporter("tb", tmp_path, {}, "run")


@pytest.mark.parametrize("package, hidden", [("tensorboard", ("tensorboard", "torch.utils.tensorboard")),
                                             ("wandb", ("wandb",))])
def test_missing_package_is_an_import_error_naming_it(package, hidden, tmp_path, monkeypatch):
    for name in hidden:
        monkeypatch.setitem(sys.modules, name, None)  # `import name` now raises ModuleNotFoundError
    with pytest.raises(ImportError, match=rf"^--report-to {package} needs the package {package} .*: pip install {package}$"):
        report.open_reporter(package, tmp_path, {}, "run")


def test_importing_report_needs_neither_package(monkeypatch):
    for name in ("tensorboard", "torch.utils.tensorboard", "wandb"):
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.delitem(sys.modules, "plumbing.report")  # restored afterwards
    fresh = importlib.import_module("plumbing.report")
    assert fresh.open_reporter("none", None, {}, "run") is None


def test_tensorboard_reads_back_the_scalars_at_their_steps_and_the_tables(tmp_path):
    rep = report.open_reporter("tensorboard", tmp_path, {"lr": 0.002, "gammas": (1.0, 1.2, 1.5)}, "run")
    report.log_step(rep, ROW, 3)
    report.log_step(rep, {**ROW, "reward/total": 2.0, "loss": 0.5}, 4)
    report.log_samples(rep, 4, RECORDS)
    report.close(rep)
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    acc = events(tmp_path)
    assert sorted(acc.Tags()["scalars"]) == sorted([*LOGGED, "loss"])
    for tag, value in LOGGED.items():
        later = 2.0 if tag == "reward/total" else value
        assert [(e.step, e.value) for e in acc.Scalars(tag)] == [(3, pytest.approx(value)), (4, pytest.approx(later))]
    assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(4, 0.5)]  # the NaN of step 3 left out
    [(step, table)] = text(acc, "samples")
    assert step == 4
    html = markdown_to_safe_html(table)  # what TensorBoard's text tab shows: one row per record, 7 cells each
    assert html.count("<tr>") == 3 and html.count("<td>") == 14
    assert "<td>Line 1:<br>A | B<br>\\boxed{yes}</td>" in html and "<td>a\\|b</td>" in html
    assert "<td>-3.142</td>" in html  # floats: 4 significant digits
    [(config_step, config)] = text(acc, "config")
    assert config_step == 0
    assert "| gammas | (1.0, 1.2, 1.5) |" in config.splitlines()


def test_tensorboard_resume_hides_what_a_killed_run_logged_past_its_checkpoint(tmp_path):
    rep = report.open_reporter("tensorboard", tmp_path, {}, "run")
    for step in range(1, 6):
        report.log_step(rep, {"reward/total": step}, step)
    report.close(rep)
    rep = report.open_reporter("tensorboard", tmp_path, {}, "run", resume_step=3)  # checkpoint at step 3
    for step in (3, 4):
        report.log_step(rep, {"reward/total": 10 * step}, step)
    report.close(rep)
    assert [(e.step, e.value) for e in events(tmp_path).Scalars("reward/total")] == [(1, 1), (2, 2), (3, 30), (4, 40)]


def test_tensorboard_flushes_each_step_so_a_killed_run_keeps_its_curves(tmp_path):
    rep = report.open_reporter("tensorboard", tmp_path, {}, "run")
    report.log_step(rep, {"kl": 0.5}, 1)  # no close: the process could die here
    assert [(e.step, e.value) for e in events(tmp_path).Scalars("kl")] == [(1, 0.5)]
    report.close(rep)


def fake_wandb(calls, init_error=None):
    """A stand-in `wandb` module recording what report.py asks of it."""
    module = types.ModuleType("wandb")

    def init(**kwargs):
        if init_error:
            raise init_error
        calls.append(("init", kwargs))
        return SimpleNamespace(log=lambda data, step: calls.append(("log", data, step)), finish=lambda: calls.append(("finish",)))

    module.init = init
    module.Table = lambda columns, data: SimpleNamespace(columns=columns, data=data)
    return module


def test_wandb_gets_the_run_the_scalars_and_a_table(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setitem(sys.modules, "wandb", fake_wandb(calls))
    rep = report.open_reporter("wandb", tmp_path, {"lr": 0.002}, "my-run")
    report.log_step(rep, ROW, 3)
    report.log_samples(rep, 3, RECORDS)
    report.close(rep)
    (_, init), (_, logged, step), (_, samples, sample_step), finish = calls
    assert init == {"project": "rewardmap", "dir": str(tmp_path), "config": {"lr": 0.002}, "name": "my-run"}  # mode: WANDB_MODE
    assert (logged, step) == (LOGGED, 3)
    table = samples["samples"]
    assert sample_step == 3 and list(samples) == ["samples"]
    assert table.columns == ["question", "answer", "response", "total", "format", "correctness", "detail"]
    assert table.data[0] == [RECORDS[0][c] for c in table.columns] and len(table.data) == 2
    assert finish == ("finish",)


def test_wandb_init_failure_is_a_one_line_user_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", fake_wandb([], init_error=RuntimeError("api_key not configured (no-tty)")))
    with pytest.raises(ValueError, match=r"--report-to wandb: wandb.init failed \(api_key not configured.*WANDB_MODE=offline"):
        report.open_reporter("wandb", tmp_path, {}, "run")


def test_sample_records_pair_each_prompt_with_its_own_response():
    samples = [SimpleNamespace(qtype="torf1", question=f"q{i}", answer=f"a{i}") for i in range(3)]
    responses = [f"r{i}.{j}" for i in range(3) for j in range(2)]  # group_size 2: row n answers samples[n // 2]
    score = lambda s, text: SimpleNamespace(total=float(text.startswith("r" + s.question[1])), format=1.0, correctness=0.0, detail=-1.0)
    records = report.sample_records(samples, responses, score, group_size=2, n=2)
    assert [(r["question"], r["response"], r["total"]) for r in records] == [("q0", "r0.0", 1.0), ("q1", "r1.0", 1.0)]
    assert records[0] == {"qtype": "torf1", "question": "q0", "answer": "a0", "response": "r0.0", "total": 1.0,
                          "format": 1.0, "correctness": 0.0, "detail": -1.0}
