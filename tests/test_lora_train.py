"""LoRA through train.py on the tiny model (lora.py, --lora-rank): only the adapters train, the reference is the
base (KL exactly 0 before the first update), the exported adapter loads in peft with the same outputs, a run
killed with kill -9 resumes exactly, --merge-lora writes a full model, --qlora refuses a CPU."""
import json
import signal
import subprocess
import sys

import pytest
import torch
from test_train import ROOT, comparable, kill_script, rows, small_args

from scaling import lora
import model as M
import train

# planning's detail reward gives the tiny model non-zero advantages within a few steps (its few-token Plus
# answers are rarely rewarded), so the adapters move
LORA = ["--stage", "planning", "--max-steps-per-stage", "4", "--save-every", "2", "--eval-samples", "2",
        "--lora-rank", "4", "--kl-coef", "0.1"]

KILL_AT_STEP_3 = kill_script(3)


def test_lora_run_trains_only_the_adapters_and_resumes_exactly(tmp_path):
    args = small_args(tmp_path, *LORA)
    straight = tmp_path / "straight"
    train.main(args + ["--out", str(straight), "--merge-lora"])
    log = rows(straight / "metrics.jsonl")
    assert len(log) == 4 and log[0]["kl"] == 0.0  # the reference is the base: adapters start at B = 0
    assert any(r["grad_norm"] > 0 for r in log) and log[-1]["kl"] > 0  # they trained, and moved away from it

    # model/ is a peft-format adapter over the untouched base
    exported = straight / "model"
    assert (exported / lora.CONFIG_FILE).exists() and not (exported / "model.safetensors").exists()
    base_path = json.loads((exported / lora.CONFIG_FILE).read_text())["base_model_name_or_path"]
    base = M.load_policy(base_path)
    trained = M.load_policy(str(exported))  # base + adapters (what eval.py --model runs/x/model loads)
    layers = lora.lora_layers(trained.model)
    assert len(layers) == 2 * 7 + 1 and "lm_head" in layers  # the tiny model's default adds its head (lora.default_targets)
    base_weights = base.model.state_dict()
    for name, p in trained.model.named_parameters():
        plain = name.replace(".base_layer", "")
        if "lora_" not in name:
            assert torch.equal(p, base_weights[plain]), name  # the base is bit-identical
    assert any(l.lora_B.weight.abs().sum() > 0 for l in layers.values())  # B left zero: nothing trained

    # peft reads the adapter and computes what training computed
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    ids = torch.tensor([[5, 17, 42, 99, 7, 3, 250, 11]])
    with torch.no_grad():
        ours = trained.model(input_ids=ids).logits
        peft_model = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(base_path), str(exported))
        theirs = peft_model(input_ids=ids).logits
        merged = AutoModelForImageTextToText.from_pretrained(straight / "model-merged")(input_ids=ids).logits
        plain = base.model(input_ids=ids).logits
    assert torch.allclose(ours, theirs, atol=1e-5) and torch.allclose(ours, merged, atol=1e-5)
    assert not torch.allclose(ours, plain, atol=1e-6)

    # kill -9 as the 3rd step begins (checkpoint at step 2), resume: the uninterrupted run's metrics and adapters
    killed = tmp_path / "killed"
    proc = subprocess.run([sys.executable, "-c", KILL_AT_STEP_3, *args, "--out", str(killed)], cwd=ROOT,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert proc.returncode == -signal.SIGKILL
    assert (killed / "checkpoints" / "latest").read_text().strip() == "step-000002"
    train.main(args + ["--out", str(killed), "--resume"])
    assert [comparable(r) for r in rows(killed / "metrics.jsonl")] == [comparable(r) for r in log]
    resumed = lora.lora_layers(M.load_policy(str(killed / "model")).model)
    assert all(torch.equal(resumed[k].lora_B.weight, layers[k].lora_B.weight) and
               torch.equal(resumed[k].lora_A.weight, layers[k].lora_A.weight) for k in layers)


def test_qlora_on_cpu_and_lora_only_flags_without_a_rank_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="--qlora needs a CUDA GPU and bitsandbytes"):
        train.main(small_args(tmp_path, "--lora-rank", "4", "--qlora", "--out", str(tmp_path / "q")))
    with pytest.raises(ValueError, match="--merge-lora need --lora-rank"):
        train.parse_args(["--merge-lora"])


def test_lora_with_gradient_checkpointing_gives_the_same_run(tmp_path):
    """Checkpointing recomputes activations in backward: with adapters over a frozen base (whose inputs need no
    gradient) the adapters must still get their gradients, the same ones."""
    args = small_args(tmp_path, "--stage", "planning", "--max-steps-per-stage", "3", "--eval-samples", "1",
                      "--lora-rank", "4", "--kl-coef", "0.1")
    train.main(args + ["--out", str(tmp_path / "plain")])
    train.main(args + ["--out", str(tmp_path / "gc"), "--gradient-checkpointing"])
    plain, gc = rows(tmp_path / "plain" / "metrics.jsonl"), rows(tmp_path / "gc" / "metrics.jsonl")
    assert any(r["grad_norm"] > 0 for r in plain)
    for a, b in zip(plain, gc):
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5) and a["kl"] == pytest.approx(b["kl"], rel=1e-5, abs=1e-9)
