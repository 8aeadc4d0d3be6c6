"""The commands' shared behaviour (cli.py): a user error is one line `error: ...` and exit status 2 (the
traceback only with --debug); results are strict JSON; the CUDA allocator gets expandable segments."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from plumbing import cli
import data
import eval as evaluation
from offline import synthetic
import train

ROOT = Path(__file__).resolve().parents[1]


def test_dumps_writes_strict_json():
    text = cli.dumps({"acc": float("nan"), "inf": [float("inf"), -float("inf")], "ok": 0.5, "t": (1, 2)})
    assert json.loads(text) == {"acc": None, "inf": [None, None], "ok": 0.5, "t": [1, 2]}
    assert "NaN" not in text and "Infinity" not in text


@pytest.mark.parametrize("main, argv, message", [
    (train.main, ["--lr", "-1"], "error: --lr must be > 0, got -1.0"),
    (train.main, ["--stage", "perception"], "error: --stage 'perception' is not a stage of --curriculum fine"),
    (train.main, ["--data", "/nonexistent/reasonmap"], "error: /nonexistent/reasonmap: no such dataset file or folder"),
    (evaluation.main, ["--data", "/nonexistent/reasonmap"], "error: /nonexistent/reasonmap: no such dataset file or folder"),
])
def test_user_errors_are_one_line_and_exit_2(main, argv, message, capsys, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exc:
        cli.run(main, argv + ["--out", str(out)])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == message or (err.startswith(message) and "\n" not in err), err
    assert not out.exists()  # nothing written


def test_bad_dataset_row_names_file_row_and_field(tmp_path, capsys):
    folder = tmp_path / "ds"
    folder.mkdir()
    row = {"type": "TorF1", "question": "q", "answer": "maybe", "difficulty_city": "easy", "metro": {"L": ["A", "B"]}}
    (folder / "train.jsonl").write_text(json.dumps(row) + "\n")
    (folder / "test.jsonl").write_text("")
    with pytest.raises(SystemExit) as exc:
        cli.run(lambda argv: data.load_data(str(folder)), [])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {folder / 'train.jsonl'}: row 1: field 'answer'") and err.count("\n") == 1


def test_debug_shows_the_traceback():
    with pytest.raises(ValueError, match="--lr must be > 0"):
        cli.run(train.main, ["--lr", "-1", "--debug"])


def test_a_bug_keeps_its_traceback():
    def buggy(argv):
        raise KeyError("not a user error")

    with pytest.raises(KeyError):
        cli.run(buggy, [])


def test_scripts_exit_2_with_one_line():
    """The real command line: `python train.py --top-p 2` prints one line on stderr and exits with 2."""
    proc = subprocess.run([sys.executable, "train.py", "--top-p", "2"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr == "error: --top-p must be in (0, 1], got 2.0\n"


def test_eval_json_is_strict_when_a_split_is_empty(tmp_path):
    """A torf-only evaluation has no Count accuracy: eval.json holds null there, and loads as strict JSON."""
    samples = [s for s in synthetic.synthetic_dataset(3, 1, tmp_path, questions_per_type=2, progress=False)
               if s.qtype == "torf1"]
    summary = evaluation.metrics_for(samples, ["\\boxed{yes}"] * len(samples))
    assert math.isnan(summary["plus"]["count"])
    assert json.loads(cli.dumps(summary), parse_constant=lambda c: pytest.fail(f"non-strict {c}"))["plus"]["count"] is None


def test_commands_turn_on_expandable_segments_unless_configured(monkeypatch):
    for name in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):
        monkeypatch.delenv(name, raising=False)
    assert cli.run(lambda argv: os.environ.get("PYTORCH_CUDA_ALLOC_CONF"), []) == "expandable_segments:True"
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:256")  # the user's setting stays
    assert cli.run(lambda argv: os.environ["PYTORCH_CUDA_ALLOC_CONF"], []) == "max_split_size_mb:256"
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF")
    monkeypatch.setenv("PYTORCH_ALLOC_CONF", "backend:native")  # the newer name counts too
    assert cli.run(lambda argv: os.environ.get("PYTORCH_CUDA_ALLOC_CONF"), []) is None
