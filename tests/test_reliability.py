"""Nothing lost, nothing mixed (docs/reliability.md): one writer per run folder, an earlier run kept unless
--overwrite, config.json's provenance, SIGTERM as a clean stop, checkpoint saves that fail and checkpoints that are
damaged, every bad input one clear line with nothing written, checkpoints that are data and not code. The torchrun
halves are in test_distributed.py; the kill -9 soak in test_soak.py."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import eval as evaluation
import train
from plumbing import checkpoints, cli, run_folder, signals
from scaling import distributed
from test_train import ROOT, comparable, rows, small_args

# one stage, 4 steps, a checkpoint after each: the uninterrupted run the interrupted ones are compared with
STEPS = ["--stage", "judgement", "--max-steps-per-stage", "4", "--save-every", "1", "--eval-samples", "2"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def straight(cache):
    """The uninterrupted run (its folder), and its metrics without wall-clock figures."""
    out = cache.parent / "straight"
    train.main(small_args(cache.parent, *STEPS) + ["--cache-dir", str(cache), "--out", str(out)])
    return out, [comparable(r) for r in rows(out / "metrics.jsonl")]


def args(cache: Path, out: Path, *extra: str) -> list[str]:
    return small_args(cache.parent, *STEPS) + ["--cache-dir", str(cache), "--out", str(out), *extra]


def snapshot(folder: Path) -> dict:
    """Every file under `folder` but the lock, with its bytes."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != run_folder.LOCK}


def user_error(argv: list[str], capsys, main=train.main) -> str:
    """The one line a user error prints (exit status 2), checked."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        cli.run(main, argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def script(body: str) -> str:
    """Python source that runs train.main(argv) with `body` (which defines `hook(n)`, called as GRPO step n
    begins) wrapped around grpo.grpo_step."""
    return f"""
import os, signal, sys, time
from pathlib import Path
from scaling import distributed
import train
real, calls = train.grpo.grpo_step, []
{body}
def step(*a, **kw):
    calls.append(1)
    hook(len(calls))
    return real(*a, **kw)
train.grpo.grpo_step = step
train.main(sys.argv[1:])
"""


# ----------------------------------------------------------------------------- 1. one writer per --out

def test_a_held_folder_is_refused_naming_its_holder_and_left_untouched(cache, straight, tmp_path, capsys):
    """A real train.py holds the folder (paused as its 3rd step begins, checkpoint at step 2): a second train.py,
    with or without --resume or --overwrite, stops at once naming its pid and writes nothing; once it is killed
    (kill -9), the lock is free and --resume continues it exactly."""
    out, marker = tmp_path / "run", tmp_path / "paused"
    holder = subprocess.Popen([sys.executable, "-c", script(
        f"def hook(n):\n    if n == 3:\n        Path({str(marker)!r}).touch()\n        time.sleep(600)"),
        *args(cache, out)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while not marker.exists():
            assert holder.poll() is None and time.time() < deadline, "the holder did not reach its 3rd step"
            time.sleep(0.1)
        before = snapshot(out)
        assert "checkpoints/step-000002/manifest.json" in before
        for extra in ([], ["--resume"], ["--overwrite"]):
            started = time.time()
            err = user_error(args(cache, out, *extra), capsys)
            assert f"is in use by train.py (pid {holder.pid} on " in err, err
            assert time.time() - started < 5  # at once: before any data or model is loaded
        assert snapshot(out) == before
    finally:
        holder.kill()
        holder.wait()
    train.main(args(cache, out, "--resume"))
    assert [comparable(r) for r in rows(out / "metrics.jsonl")] == straight[1]
    launches = json.loads((out / "config.json").read_text())["launches"]
    assert [x["resumed_from_step"] for x in launches] == [None, 2]  # the killed launch, then the resumed one


def test_an_earlier_run_is_kept_unless_overwrite_is_given(cache, tmp_path, capsys):
    out = tmp_path / "run"
    one = ["--max-steps-per-stage", "1"]
    train.main(args(cache, out, *one))
    (out / "eval_planning.json").write_text("{}")  # an output of an earlier, longer run
    (out / "notes.txt").write_text("mine")  # not a run's file
    before = snapshot(out)
    err = user_error(args(cache, out, *one), capsys)
    assert f"error: {out} holds an earlier run (" in err and "--resume" in err and "--overwrite" in err, err
    err = user_error(args(cache, out, "--resume", "--overwrite"), capsys)
    assert "give one of them" in err
    assert snapshot(out) == before
    train.main(args(cache, out, "--overwrite", "--max-steps-per-stage", "2"))
    assert [r["global_step"] for r in rows(out / "metrics.jsonl")] == [1, 2]  # started over
    assert not (out / "eval_planning.json").exists() and (out / "notes.txt").read_text() == "mine"
    assert len(json.loads((out / "config.json").read_text())["launches"]) == 1
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-000002"]


def test_a_launch_that_fails_leaves_no_folder_and_frees_the_lock(tmp_path, capsys):
    out = tmp_path / "new" / "run"
    user_error(["--out", str(out), "--data", str(tmp_path / "missing")], capsys)
    assert not out.exists()
    with run_folder.claim(out, resume=False, overwrite=False):  # and nothing holds it
        with pytest.raises(OSError, match=rf"in use by train.py \(pid {os.getpid()} "):
            with run_folder.claim(out, resume=False, overwrite=False):
                pass
    assert not out.exists()  # the claim never began a run: its folder is gone again


def test_an_sft_state_is_an_earlier_run_and_overwrite_deletes_it(cache, tmp_path):
    out = tmp_path / "run"
    train.main(args(cache, out, "--stage", "sft", "--sft", "2"))
    (out / "config.json").unlink()
    assert "sft" in run_folder.earlier_run(out)  # the SFT's state alone is a run to --resume
    run_folder.clear(out)
    assert run_folder.earlier_run(out) == []


# ----------------------------------------------------------------------------- 2. a run folder says how it was made

def test_config_json_records_how_the_run_was_made(straight):
    config = json.loads((straight[0] / "config.json").read_text())
    assert config["stage"] == "judgement" and config["overwrite"] is False
    made, = config["launches"]
    assert made["world_size"] == 1 and made["device"] == "cpu" and made["resumed_from_step"] is None
    assert made["compute_dtype"] == "float32" and made["weights_dtype"] == "float32"
    import transformers

    assert made["torch"] == torch.__version__ and made["transformers"] == transformers.__version__
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    if commit.returncode == 0:
        assert made["project"]["commit"] == commit.stdout.strip() and isinstance(made["project"]["modified"], bool)
    # the exported model says what data it was trained on (eval.py warns on other synthetic data)
    assert train.models.trained_on(str(straight[0] / "model")) == {"data": "", "cities": 3, "seed": 0, "world": "default"}


# ----------------------------------------------------------------------------- 3. SIGTERM

def test_sigterm_finishes_the_step_writes_a_checkpoint_and_resume_is_exact(cache, straight, tmp_path):
    """SIGTERM as step 3 begins (no checkpoint due: --save-every 100): step 3 finishes, its checkpoint is written,
    the run exits with 143 saying so; --resume then logs exactly the uninterrupted run's metrics."""
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", script(
        "def hook(n):\n    if n == 3:\n        os.kill(os.getpid(), signal.SIGTERM)"),
        *args(cache, out, "--save-every", "100")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == signals.STOPPED, proc.stderr[-2000:]
    assert f"stopped by SIGTERM after step 3: checkpoint in {out / 'checkpoints'}" in proc.stderr
    assert len(rows(out / "metrics.jsonl")) == 3
    assert checkpoints.latest_checkpoint(out).name == "step-000003"
    train.main(args(cache, out, "--resume"))
    assert [comparable(r) for r in rows(out / "metrics.jsonl")] == straight[1]


def test_sigterm_handler_only_notes_the_signal_and_a_second_one_stops_at_once():
    with signals.stop_on_sigterm():
        assert not signals.requested()
        os.kill(os.getpid(), signal.SIGTERM)
        assert signals.requested()  # noted, the process goes on
        assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL and not signals.requested()
    second = subprocess.run([sys.executable, "-c", "import os, signal, time\nfrom plumbing import signals\n"
                             "with signals.stop_on_sigterm():\n    os.kill(os.getpid(), signal.SIGTERM)\n"
                             "    os.kill(os.getpid(), signal.SIGTERM)\n    time.sleep(30)\n"],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert second.returncode == -signal.SIGTERM


# ----------------------------------------------------------------------------- 4. faults while saving, damage

def test_a_save_that_fails_keeps_the_previous_checkpoint_and_stops_with_a_clear_error(cache, straight, tmp_path):
    """The 3rd checkpoint's writers fail as on a full disk (files over 4 kB refused: RLIMIT_FSIZE, real EFBIG
    errors from safetensors and torch.save): exit 2 with one line naming it; step 2's checkpoint is intact and
    --resume continues exactly."""
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", f"""
import resource, signal, sys
import train
real, saves = train.checkpoints.save_checkpoint, []
def save(*a, **kw):
    saves.append(1)
    if len(saves) == 3:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))
    return real(*a, **kw)
train.checkpoints.save_checkpoint = save
train.cli.run(train.main, sys.argv[1:])
""", *args(cache, out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    err, = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert err.startswith(f"error: writing checkpoint {out / 'checkpoints' / 'step-000003'} failed (") and \
        f"the previous checkpoint, {out / 'checkpoints' / 'step-000002'}, is untouched" in err, err
    assert checkpoints.latest_checkpoint(out).name == "step-000002"
    assert not list((out / "checkpoints").glob(".tmp-*"))  # the half-written one is gone
    assert checkpoints.damage(out / "checkpoints" / "step-000002") is None
    train.main(args(cache, out, "--resume"))
    assert [comparable(r) for r in rows(out / "metrics.jsonl")] == straight[1]


def cut(cache: Path, out: Path, at: int, monkeypatch, *extra: str) -> None:
    """A run of `args` interrupted as GRPO step `at` begins (in this process)."""
    real = train.grpo.grpo_step
    calls = []

    def dies(*a, **kw):
        calls.append(1)
        if len(calls) == at:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(train.grpo, "grpo_step", dies)
    with pytest.raises(KeyboardInterrupt):
        train.main(args(cache, out, *extra))
    monkeypatch.setattr(train.grpo, "grpo_step", real)


def test_a_damaged_checkpoint_is_refused_naming_the_file_or_the_previous_one_taken(cache, straight, tmp_path,
                                                                                    monkeypatch, capsys):
    # one checkpoint on disk, its trainer state truncated: refused, nothing written
    alone = tmp_path / "alone"
    cut(cache, alone, 4, monkeypatch)
    state = alone / "checkpoints" / "step-000003" / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[:1000])
    before = snapshot(alone)
    err = user_error(args(cache, alone, "--resume"), capsys)
    assert f"checkpoint damaged: {state} has 1000 bytes, not the" in err and "--overwrite" in err, err
    assert snapshot(alone) == before

    # two on disk (--keep-checkpoints 2), the newest one's weights corrupted: the one before it is taken, said so
    two = tmp_path / "two"
    cut(cache, two, 4, monkeypatch, "--keep-checkpoints", "2")
    weights = two / "checkpoints" / "step-000003" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    capsys.readouterr()
    train.main(args(cache, two, "--resume"))
    out = capsys.readouterr().out
    assert f"warning: --resume: {weights} differs from what was written" in out
    assert f"resuming from the checkpoint before it, {two / 'checkpoints' / 'step-000002'}" in out
    assert [comparable(r) for r in rows(two / "metrics.jsonl")] == straight[1]


def test_damage_names_the_file(tiny_lm, tmp_path):
    from test_checkpoints import trained

    policy, optimizer = trained(tiny_lm)
    cfg = train.TrainConfig(out=str(tmp_path))
    ckpt = checkpoints.save_checkpoint(tmp_path, policy, optimizer, torch.Generator(),
                                       {"stage_index": 0, "step_in_stage": 1, "global_step": 1}, cfg)
    assert checkpoints.damage(ckpt) is None
    manifest = json.loads((ckpt / checkpoints.MANIFEST).read_text())["files"]
    assert {"model.safetensors", "trainer_state.pt", "config.json"} <= set(manifest)
    tokenizer = ckpt / "tokenizer.json"
    text = tokenizer.read_bytes()
    tokenizer.write_bytes(text[:-1] + (b"X" if text[-1:] != b"X" else b"Y"))
    assert checkpoints.damage(ckpt) == f"{tokenizer} differs from what was written (CRC-32 " \
        f"{checkpoints._summary(tokenizer)['crc32']}, not {manifest['tokenizer.json']['crc32']}: corrupted)"
    tokenizer.unlink()
    assert checkpoints.damage(ckpt) == f"{tokenizer} is missing"
    (ckpt / checkpoints.MANIFEST).unlink()  # a checkpoint from before manifests: its loaders are the check
    assert checkpoints.damage(ckpt) is None
    (ckpt / "trainer_state.pt").unlink()
    assert checkpoints.damage(ckpt) == f"{ckpt / checkpoints.MANIFEST} is missing (the checkpoint is incomplete)"


# ----------------------------------------------------------------------------- 5. every bad input, one clear line

def _dataset(folder: Path, figure: str | None, qtype: str = "TorF1") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    row = {"type": qtype, "question": "Is A on L?", "answer": "yes", "difficulty_city": "easy",
           "metro": {"L": ["A", "B"]}, "city": "x", **({"figure": figure} if figure else {})}
    for split in ("train", "test"):
        (folder / f"{split}.jsonl").write_text(json.dumps(row) + "\n")
    return folder


def bad_inputs(tmp: Path, straight_out: Path) -> list[tuple[list[str], str]]:
    """(train.py flags, the start of what the error says) for each bad input."""
    notmodel = tmp / "notmodel"
    notmodel.mkdir()
    (notmodel / "weights.bin").write_bytes(b"\0" * 10)
    adapter = tmp / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(tmp / "gone-base")}))
    (tmp / "maps").mkdir()
    (tmp / "maps" / "text.png").write_text("not an image")
    return [
        (["--model", str(notmodel)], f"{notmodel}: not a model folder (no config.json"),
        (["--model", str(tmp / "no-such-model")], f"{tmp / 'no-such-model'}: no such model folder"),
        (["--model", str(adapter)], f"{adapter}: LoRA adapters whose base model cannot be loaded"),
        (["--data", str(tmp / "missing")], f"{tmp / 'missing'}: no such dataset file or folder"),
        (["--data", str(_dataset(tmp / "noimage", "maps/missing.png"))],
         f"{tmp / 'noimage' / 'train.jsonl'}: row 1: field 'figure': image file 'maps/missing.png' not found"),
        (["--data", str(_dataset(tmp / "textimage", str(tmp / "maps" / "text.png")))],
         f"{tmp / 'textimage' / 'train.jsonl'}: row 1: field 'figure': {tmp / 'maps' / 'text.png'} is not an image"),
        (["--data", str(_dataset(tmp / "torfonly", None)), "--stage", "counting"],
         f"--data {tmp / 'torfonly'}: no training questions of stage counting (counting1, counting2, counting3)"),
    ]


def test_every_bad_input_is_one_line_and_writes_nothing(cache, straight, tmp_path, capsys):
    for flags, message in bad_inputs(tmp_path, straight[0]):
        out = tmp_path / "out"
        err = user_error(small_args(cache.parent) + ["--cache-dir", str(cache), "--out", str(out), *flags], capsys)
        assert err.startswith("error: " + message), (flags, err)
        assert not out.exists(), flags
    # a --resume with flags that change what the run computes (the checkpoint's run had another --lr)
    before = snapshot(straight[0])
    err = user_error(args(cache, straight[0], "--resume", "--lr", "0.5"), capsys)
    assert "was written by a run with other settings (--lr 0.0002 -> 0.5)" in err, err
    assert snapshot(straight[0]) == before


def test_eval_warns_when_the_synthetic_data_is_not_the_models(straight, capsys):
    model = str(straight[0] / "model")
    evaluation.warn_if_other_data(model, "", 3, 0)
    assert capsys.readouterr().err == ""  # its own data
    evaluation.warn_if_other_data(model, "", 60, 1)
    err = capsys.readouterr().err
    assert err.startswith(f"warning: {model} was trained on the synthetic data of --cities 3 --seed 0 --world "
                          "default; this evaluates the synthetic data of --cities 60 --seed 1 --world default") \
        and err.count("\n") == 1
    evaluation.warn_if_other_data(model, "", 3, 0, "demo")  # another world of the same size and seed
    assert "--world demo" in capsys.readouterr().err
    evaluation.warn_if_other_data("tiny", "", 60, 1)  # an untrained model has no data of its own
    assert capsys.readouterr().err == ""


# ----------------------------------------------------------------------------- 7. a checkpoint is data, not code

class Payload:
    """What a malicious checkpoint would hold: unpickling it makes a folder (it could as well run a shell)."""

    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return os.mkdir, (self.target,)


def test_a_trainer_state_that_would_run_code_is_refused(cache, straight, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    cut(cache, out, 3, monkeypatch)
    ckpt = checkpoints.latest_checkpoint(out)
    state = torch.load(ckpt / "trainer_state.pt", weights_only=True)
    assert torch.is_tensor(state["rngs"][0]["generator"]) and isinstance(state["rngs"][0]["python_rng"], tuple)
    marker = tmp_path / "code-ran"
    torch.save({**state, "position": Payload(str(marker))}, ckpt / "trainer_state.pt")
    (ckpt / checkpoints.MANIFEST).unlink()  # as a checkpoint from before manifests: only the loader stands guard
    err = user_error(args(cache, out, "--resume"), capsys)
    assert f"{ckpt / 'trainer_state.pt'} cannot be read (UnpicklingError: Weights only load failed" in err, err
    assert not marker.exists()


def test_sharded_checkpoints_refuse_code_in_their_metadata_and_items(tmp_path):
    """torch.distributed.checkpoint pickles its .metadata and non-tensor items; distributed.load_checked builds
    data only (one process: dcp needs no process group)."""
    import pickle

    import torch.distributed.checkpoint as dcp

    marker = tmp_path / "code-ran"
    dcp.save({"w": torch.arange(4.0), "step": 3}, checkpoint_id=str(tmp_path / "good"))
    state = {"w": torch.zeros(4), "step": 0}
    distributed.load_checked(state, tmp_path / "good")
    assert torch.equal(state["w"], torch.arange(4.0)) and state["step"] == 3
    dcp.save({"w": torch.arange(4.0), "item": Payload(str(marker))}, checkpoint_id=str(tmp_path / "item"))
    with pytest.raises(ValueError, match="item 'item' is not plain data"):
        distributed.load_checked({"w": torch.zeros(4), "item": None}, tmp_path / "item")
    (tmp_path / "good" / ".metadata").write_bytes(pickle.dumps(Payload(str(marker))))
    with pytest.raises(ValueError, match=r"\.metadata: refused, it would build posix\.mkdir"):
        distributed.load_checked(state, tmp_path / "good")
    assert not marker.exists()
