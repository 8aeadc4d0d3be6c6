"""precision.py: bf16 updates that do not vanish (fp32 master weights under autocast, or stochastic rounding),
checked on CPU against float32 and against a plain bf16 AdamW, and bf16 runs that train and resume exactly."""
import json

import pytest
import torch
from safetensors.torch import load_file

import model as M
import precision
import train
from test_train import comparable, rows, small_args


def test_stochastic_rounding_is_unbiased_and_exact_on_bf16_values():
    g = torch.Generator().manual_seed(0)
    x = torch.full((40_000,), 1 + 2**-10)  # 1/8 of the way from 1 to the next bf16 value, 1 + 2^-7
    out = precision.stochastic_round_(torch.empty(x.shape, dtype=torch.bfloat16), x, g).float()
    assert set(out.unique().tolist()) == {1.0, 1 + 2**-7}
    assert (out == 1 + 2**-7).float().mean().item() == pytest.approx(1 / 8, abs=0.01)  # P(up) = 1/8
    assert out.mean().item() == pytest.approx(1 + 2**-10, abs=3e-5)
    neg = precision.stochastic_round_(torch.empty(x.shape, dtype=torch.bfloat16), -x, g).float()
    assert neg.mean().item() == pytest.approx(-(1 + 2**-10), abs=3e-5)
    exact = torch.tensor([0.0, 1.0, -2.5, 2**-7, 3e38]).bfloat16().float()  # already bf16: never moved
    assert torch.equal(precision.stochastic_round_(torch.empty(5, dtype=torch.bfloat16), exact, g).float(), exact)


def _linear(dtype, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Linear(64, 64).to(dtype)


def _run(opt_fn, dtype, steps=5, lr=1e-6):
    """Weights of a 64x64 linear layer before and after `steps` AdamW steps on fixed random gradients."""
    layer = _linear(dtype)
    before = [p.detach().float().clone() for p in layer.parameters()]
    opt = opt_fn(layer.parameters(), lr)
    g = torch.Generator().manual_seed(1)
    grads = [torch.randn(p.shape, generator=g) for p in layer.parameters()]
    for _ in range(steps):
        for p, gr in zip(layer.parameters(), grads):
            p.grad = gr.to(dtype)
        opt.step()
    return before, [p.detach().float() for p in layer.parameters()]


def test_adamw_sr_equals_torch_adamw_on_float32_weights():
    kw = dict(betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    _, ours = _run(lambda ps, lr: precision.AdamWSR(ps, lr=1e-2, **kw), torch.float32)
    _, ref = _run(lambda ps, lr: torch.optim.AdamW(ps, lr=1e-2, **kw), torch.float32)
    for a, b in zip(ours, ref):
        assert torch.allclose(a, b, atol=1e-7, rtol=0)


def _changed_and_displacement(before, after):
    changed = sum(int((a != b).sum()) for a, b in zip(before, after)) / sum(a.numel() for a in before)
    displacement = sum(float((a - b).abs().sum()) for a, b in zip(before, after)) / sum(a.numel() for a in before)
    return changed, displacement


def test_bf16_updates_at_lr_1e6_vanish_without_a_scheme_and_survive_with_one():
    """5 AdamW steps at lr 1e-6 on fixed gradients: float32 moves every weight by ~5e-6; plain bf16 AdamW
    leaves almost every weight unchanged; stochastic rounding changes few weights but moves them by the same
    mean distance as float32 (it is unbiased), and float32 master weights are float32."""
    _, fp32_disp = _changed_and_displacement(*_run(lambda ps, lr: torch.optim.AdamW(ps, lr=lr), torch.float32))
    plain_changed, plain_disp = _changed_and_displacement(*_run(lambda ps, lr: torch.optim.AdamW(ps, lr=lr), torch.bfloat16))
    sr_changed, sr_disp = _changed_and_displacement(*_run(lambda ps, lr: precision.AdamWSR(ps, lr=lr), torch.bfloat16))
    assert fp32_disp == pytest.approx(5e-6, rel=0.05)  # Adam's first steps move each weight by ~lr
    assert plain_changed < 0.05 and plain_disp < 0.1 * fp32_disp
    assert sr_changed < 0.5 and sr_disp == pytest.approx(fp32_disp, rel=0.15)


def test_adamw_sr_resumes_exactly_with_float32_moments():
    layer = _linear(torch.bfloat16)
    opt = precision.AdamWSR(layer.parameters(), lr=1e-3, seed=3)
    for _ in range(2):
        for p in layer.parameters():
            p.grad = torch.ones_like(p)
        opt.step()
    state = opt.state_dict()
    clone = _linear(torch.bfloat16)
    clone.load_state_dict(layer.state_dict())
    opt2 = precision.AdamWSR(clone.parameters(), lr=1e-3, seed=99)
    opt2.load_state_dict(state)
    assert all(s["exp_avg"].dtype == torch.float32 for s in opt2.state.values())
    for o, l in ((opt, layer), (opt2, clone)):
        for p in l.parameters():
            p.grad = torch.full_like(p, 0.5)
        o.step()
    assert all(torch.equal(a, b) for a, b in zip(layer.parameters(), clone.parameters()))


def test_bytes_per_param():
    assert precision.bytes_per_param("master") == {"weights": 4, "grads": 4, "moments": 8, "reference": 2, "total": 18}
    assert precision.bytes_per_param("stochastic")["total"] == 14
    assert precision.bytes_per_param("master", eight_bit_moments=True)["total"] == 12


def test_master_weights_are_float32_and_compute_is_bf16(tiny_cache):
    policy = M.build_tiny_policy(seed=0, cache_dir=tiny_cache, dtype=torch.bfloat16, master_weights=True)
    assert all(p.dtype == torch.float32 for p in policy.model.parameters())
    batch = {"input_ids": torch.tensor([[5, 6, 7]]), "attention_mask": torch.ones(1, 3, dtype=torch.long),
             "position_ids": torch.arange(3)[None].expand(3, 1, 3)}
    assert M.forward_logits(policy.model, batch).logits.dtype == torch.bfloat16
    ref = M.reference_model(policy)
    assert all(p.dtype == torch.bfloat16 for p in ref.parameters())  # the frozen copy at half the bytes


def test_attention_chooser_never_gives_flash_attention_to_float32():
    assert M.default_attn_implementation(torch.device("cpu"), torch.bfloat16) == "sdpa"
    assert M.default_attn_implementation(torch.device("cuda"), torch.float32) == "sdpa"


BF16 = ["--stage", "judgement", "--dtype", "bfloat16", "--lr", "1e-6", "--max-steps-per-stage", "3"]


def test_bf16_run_moves_nearly_all_weights(tmp_path):
    """`--dtype bfloat16 --lr 1e-6`, 3 steps: the checkpoint's (float32 master) weights differ from the initial
    ones almost everywhere; three plain bf16 AdamW steps at the same lr on the same model (Adam's step is ~lr
    whatever the gradient's scale) change almost none of them."""
    out = tmp_path / "run"
    train.main(small_args(tmp_path, *BF16, "--out", str(out)))
    ckpt = out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()
    initial = load_file(next((tmp_path / "cache" / "tiny-model").glob("*/model.safetensors")))
    trained = load_file(ckpt / "model.safetensors")
    assert all(v.dtype == torch.float32 for v in trained.values())  # full training precision in the checkpoint
    changed = sum(int((trained[k] != v).sum()) for k, v in initial.items()) / sum(v.numel() for v in initial.values())
    assert changed > 0.9
    exported = load_file(out / "model" / "model.safetensors")
    assert all(v.dtype == torch.bfloat16 for v in exported.values())  # the export may be bf16

    # three updates with bf16 weights and torch's AdamW: almost nothing moves
    policy = M.load_policy(str(next((tmp_path / "cache" / "tiny-model").glob("*"))), dtype=torch.bfloat16)
    before = {k: v.detach().float().clone() for k, v in policy.model.state_dict().items()}
    opt = torch.optim.AdamW([p for p in policy.model.parameters()], lr=1e-6, weight_decay=0.0)
    for _ in range(3):
        for p in policy.model.parameters():
            p.grad = torch.randn_like(p)
        opt.step()
    naive = sum(int((v.float() != before[k]).sum()) for k, v in policy.model.state_dict().items())
    assert naive / sum(v.numel() for v in before.values()) < 0.1
    log = rows(out / "metrics.jsonl")
    assert len(log) == 3 and all(json.dumps(r) for r in log)


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    """One synthetic dataset and tiny model for the resume runs below (built by the first)."""
    return tmp_path_factory.mktemp("shared")


@pytest.mark.parametrize("scheme", ["master", "stochastic"])
def test_bf16_resume_is_exact(tmp_path, shared_cache, monkeypatch, scheme):
    """Interrupted after step 3 (checkpoint at step 2), resumed: the metrics equal an uninterrupted run's."""
    args = small_args(shared_cache, *BF16[:-1], "4", "--save-every", "2", "--bf16-update", scheme, "--eval-samples", "2")
    train.main(args + ["--out", str(tmp_path / "straight")])
    expected = [comparable(r) for r in rows(tmp_path / "straight" / "metrics.jsonl")]
    real, calls = train.grpo.grpo_step, []

    def dies_after_three(*a, **kw):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(train.grpo, "grpo_step", dies_after_three)
    with pytest.raises(KeyboardInterrupt):
        train.main(args + ["--out", str(tmp_path / "cut")])
    monkeypatch.setattr(train.grpo, "grpo_step", real)
    assert len(rows(tmp_path / "cut" / "metrics.jsonl")) == 3
    assert (tmp_path / "cut" / "checkpoints" / "latest").read_text().strip() == "step-000002"
    train.main(args + ["--out", str(tmp_path / "cut"), "--resume"])
    assert [comparable(r) for r in rows(tmp_path / "cut" / "metrics.jsonl")] == expected
