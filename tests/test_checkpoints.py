"""train.py's checkpoints: --keep-checkpoints pruning, a checkpoint read back through `latest`, and a resume
that loads trainer_state.pt onto the CPU (the optimizer then moves the state to the parameters' device)."""
from pathlib import Path

import pytest
import torch

import train
from conftest import fresh
from plumbing import checkpoints

POSITION = {"stage_index": 0, "step_in_stage": 0, "global_step": 0}


def steps_on_disk(out: Path) -> list[str]:
    return sorted(d.name for d in (out / "checkpoints").glob("step-*"))


def latest_name(out: Path) -> str:
    return (out / "checkpoints" / "latest").read_text().strip()


def trained(policy):
    """A private copy of `policy` and an AdamW that has taken one step on it (so it has moments to save)."""
    policy = fresh(policy)
    optimizer = torch.optim.AdamW(policy.model.parameters(), lr=1e-3)
    ids = torch.tensor([[1, 2, 3, 4]])
    policy.model(input_ids=ids).logits.float().pow(2).mean().backward()
    optimizer.step()
    optimizer.zero_grad()
    return policy, optimizer


@pytest.mark.parametrize("keep", [1, 2])
def test_keep_checkpoints_keeps_the_newest_n(keep, tmp_path, monkeypatch):
    # the model folder's content does not matter here: a stub writes an empty one (fast)
    monkeypatch.setattr(checkpoints.models, "save_policy", lambda policy, folder, **k: Path(folder).mkdir(parents=True))
    out, cfg = tmp_path / "run", train.TrainConfig(keep_checkpoints=keep)
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))])
    for step in range(1, 6):
        checkpoints.save_checkpoint(out, None, optimizer, torch.Generator(), {**POSITION, "global_step": step}, cfg)
        assert latest_name(out) == f"step-{step:06d}"
        assert steps_on_disk(out) == [f"step-{s:06d}" for s in range(max(1, step - keep + 1), step + 1)]
    assert not list((out / "checkpoints").glob(".tmp-*"))


def test_resumed_run_drops_what_a_killed_run_left(tmp_path, monkeypatch):
    """A kill mid-save leaves a .tmp folder, and a kill between renaming a step folder into place and
    repointing `latest` leaves a step folder ahead of `latest`: the next save removes both."""
    monkeypatch.setattr(checkpoints.models, "save_policy", lambda policy, folder, **k: Path(folder).mkdir(parents=True))
    out, cfg = tmp_path / "run", train.TrainConfig(keep_checkpoints=2)
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))])
    for step in (2, 4):
        checkpoints.save_checkpoint(out, None, optimizer, torch.Generator(), {**POSITION, "global_step": step}, cfg)
    (out / "checkpoints" / "step-000006").mkdir()  # renamed into place, `latest` not yet repointed
    (out / "checkpoints" / ".tmp-step-000008").mkdir()  # cut short
    assert latest_name(out) == "step-000004"
    checkpoints.save_checkpoint(out, None, optimizer, torch.Generator(), {**POSITION, "global_step": 5}, cfg)
    assert steps_on_disk(out) == ["step-000004", "step-000005"] and latest_name(out) == "step-000005"
    assert not list((out / "checkpoints").glob(".tmp-*"))


def test_checkpoint_reads_back_through_latest(tiny_lm, tmp_path):
    policy, optimizer = trained(tiny_lm)
    generator = torch.Generator().manual_seed(7)
    position = {"stage_index": 1, "step_in_stage": 2, "global_step": 3}
    cfg = train.TrainConfig(out=str(tmp_path / "run"))
    written = checkpoints.save_checkpoint(tmp_path / "run", policy, optimizer, generator, position, cfg)
    ckpt = checkpoints.latest_checkpoint(tmp_path / "run")
    assert ckpt == written and ckpt.name == "step-000003"
    assert list(ckpt.glob("*.safetensors")) and (ckpt / "config.json").exists()
    state = torch.load(ckpt / "trainer_state.pt", map_location="cpu", weights_only=True)
    assert state["position"] == position and state["config"]["out"] == cfg.out
    assert state["world_size"] == 1 and torch.equal(state["rngs"][0]["generator"], generator.get_state())
    saved, now = state["optimizer"]["state"], optimizer.state_dict()["state"]
    assert saved.keys() == now.keys() and len(saved) > 0
    assert all(torch.equal(saved[k]["exp_avg_sq"], now[k]["exp_avg_sq"]) for k in saved)


def test_resume_loads_the_trainer_state_on_the_cpu(tiny_lm, tmp_path, monkeypatch):
    """A resume through train.train: trainer_state.pt is read with map_location cpu and weights_only True (it holds
    tensors and plain values only), and the optimizer gets the saved moments on its parameters' device."""
    out = tmp_path / "run"
    policy, optimizer = trained(tiny_lm)
    cfg = train.TrainConfig(out=str(out), cache_dir=str(tmp_path / "cache"), kl_coef=0.0)
    done = {**POSITION, "stage_index": len(train.curriculum.stage_names(cfg.curriculum)), "global_step": 4}
    checkpoints.save_checkpoint(out, policy, optimizer, torch.Generator().manual_seed(1), done, cfg)

    loads, made, real_load, real_make = [], [], torch.load, train.precision.make_optimizer
    monkeypatch.setattr(train.torch, "load", lambda *a, **k: loads.append((a, k)) or real_load(*a, **k))
    monkeypatch.setattr(train.precision, "make_optimizer", lambda *a, **k: made.append(real_make(*a, **k)) or made[-1])
    monkeypatch.setattr(train.data, "load_data", lambda *a, **k: ([], []))
    monkeypatch.setattr(train, "selected_stages", lambda cfg, samples: train.curriculum.build_curriculum([]))
    monkeypatch.setattr(train.models, "load_model", lambda *a, **k: fresh(tiny_lm))
    monkeypatch.setattr(checkpoints.models, "save_policy", lambda *a, **k: None)
    train.train(train.TrainConfig(**{**vars(cfg), "resume": True}))

    (args, kwargs), = [(a, k) for a, k in loads if Path(a[0]).name == "trainer_state.pt"]
    assert Path(args[0]).parent.name == "step-000004"
    assert kwargs.get("map_location") in ("cpu", torch.device("cpu")), kwargs
    assert kwargs.get("weights_only") is True, kwargs
    resumed = made[0]
    params = [p for g in resumed.param_groups for p in g["params"]]
    saved = optimizer.state_dict()["state"]
    for index, p in enumerate(params):
        m = resumed.state[p]["exp_avg"]
        assert m.device == p.device and torch.equal(m, saved[index]["exp_avg"])


def test_keep_checkpoints_below_one_is_rejected():
    with pytest.raises(ValueError, match="--keep-checkpoints must be >= 1"):
        train.parse_args(["--keep-checkpoints", "0"])
    assert train.parse_args(["--keep-checkpoints", "3"]).keep_checkpoints == 3
