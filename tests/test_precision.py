"""precision.py: bf16 updates that do not vanish (fp32 master weights under autocast, or stochastic rounding),
checked on CPU against float32 and against a plain bf16 AdamW, and bf16 runs that train and resume exactly."""
import io
import json

import pytest
import torch
from safetensors.torch import load_file

import model as M
from scaling import precision
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
    # 8-bit: 2 one-byte codes + 2 float32 absmax per 256 values = 2 + 8/256 bytes
    assert precision.bytes_per_param("master", eight_bit_moments=True)["total"] == 12 + 8 / 256
    assert precision.bytes_per_param("stochastic", eight_bit_moments=True) == {
        "weights": 2, "grads": 2, "moments": 2.03125, "reference": 2, "total": 8.03125}


# ------------------------------------------------------------------ 8-bit block-wise moments (Dettmers et al. 2022)

SIGNED_HALF_GAP = 0.9 / 64 / 2  # the widest gap of the signed map is its top decade's: 64 codes over (0.1, 1]
UNSIGNED_HALF_GAP = 0.9 / 128 / 2


def test_dynamic_maps_are_sorted_symmetric_and_reach_1e6_of_the_absmax():
    signed, unsigned = precision.dynamic_map(True), precision.dynamic_map(False)
    assert len(signed) == 255 and len(unsigned) == 256  # 0 +- 127 values (symmetric); 0 + 255 values
    assert bool((signed.diff() > 0).all()) and bool((unsigned.diff() > 0).all())  # strictly increasing
    assert torch.equal(signed, -signed.flip(0)) and signed[127] == 0 and signed[0] == -1 and signed[-1] == 1
    assert unsigned[0] == 0 and unsigned[-1] == 1
    assert signed[128].item() == pytest.approx(1e-6) and unsigned[1].item() == pytest.approx(1e-7)  # smallest
    assert signed.diff().max().item() == pytest.approx(2 * SIGNED_HALF_GAP, rel=1e-5)
    assert unsigned.diff().max().item() == pytest.approx(2 * UNSIGNED_HALF_GAP, rel=1e-5)
    top = signed[signed > 0.1]  # the top decade: 64 evenly spaced codes 0.1 + k * 0.9/64, k = 1..64
    assert torch.allclose(top, 0.1 + torch.arange(1, 65) * 0.9 / 64)


def test_quantize_by_hand():
    # absmax 2: 1.0 -> 0.5, between top-decade codes 0.49375 (k=28) and 0.5078 (k=29): nearer 0.49375;
    # 1e-3 -> 5e-4, between 4.375e-4 and 5.5e-4 (decade (1e-4, 1e-3], 8 codes): nearer 5.5e-4;
    # -0.3 -> -0.15, between -0.1422 and -0.15625: nearer -0.15625
    codes, absmax = precision.quantize_blockwise(torch.tensor([2.0, 1.0, -2.0, 0.0, 1e-3, -0.3]), signed=True)
    assert codes.dtype == torch.uint8 and absmax.dtype == torch.float32 and absmax.tolist() == [2.0]
    back = precision.dequantize_blockwise(codes, absmax, signed=True)
    assert torch.allclose(back, torch.tensor([2.0, 0.9875, -2.0, 0.0, 1.1e-3, -0.3125]), rtol=1e-6, atol=0)


@pytest.mark.parametrize("signed", [True, False])
def test_round_trip_error_is_at_most_half_the_widest_gap_times_each_blocks_absmax(signed):
    g = torch.Generator().manual_seed(0)
    n = 5 * 256 + 100  # a last, shorter block
    scale = 10.0 ** torch.randint(-8, 3, (n // 256 + 1,), generator=g).float()  # each block its own magnitude
    x = torch.randn(n, generator=g) * torch.logspace(-3, 0, n) * scale.repeat_interleave(256)[:n]
    x = x if signed else x.abs()
    codes, absmax = precision.quantize_blockwise(x.view(10, -1), signed)
    assert codes.shape == (n,) and absmax.shape == (6,)
    assert torch.equal(absmax, torch.cat([x[i:i + 256].abs().max()[None] for i in range(0, n, 256)]))
    back = precision.dequantize_blockwise(codes, absmax, signed)
    bound = (SIGNED_HALF_GAP if signed else UNSIGNED_HALF_GAP) * absmax.repeat_interleave(256)[:n]
    assert bool(((back - x).abs() <= bound * (1 + 1e-5)).all())
    assert ((back - x).abs() / bound).max() > 0.5  # the bound is tight, not loose


def test_zeros_stay_zero_and_a_block_of_one_value_is_exact():
    x = torch.zeros(600)
    codes, absmax = precision.quantize_blockwise(x, signed=True)
    assert bool((codes == 127).all()) and torch.equal(precision.dequantize_blockwise(codes, absmax, True), x)
    x[3], x[300], x[599] = -3.7, 1e-20, 123.0  # one nonzero value in each block, of either sign
    for signed, values in ((True, x), (False, x.abs())):
        codes, absmax = precision.quantize_blockwise(values, signed)
        assert torch.equal(precision.dequantize_blockwise(codes, absmax, signed), values)


def test_a_positive_second_moment_never_comes_back_as_zero():
    """sqrt(v) is stored on the unsigned map, where only 0 rounds to 0: 1e-9 of the absmax (nearest code: 0)
    comes back as the smallest code, 1e-7 of it, so the denominator sqrt(v) + eps never collapses to eps."""
    codes, absmax = precision.quantize_blockwise(torch.tensor([1.0, 1e-9, 1e-30, 0.0]), signed=False)
    assert codes.tolist() == [255, 1, 1, 0]
    assert precision.dequantize_blockwise(codes, absmax, False).tolist() == pytest.approx([1.0, 1e-7, 1e-7, 0.0])
    # in the optimizer: gradients 10^6 apart within every block (v: 10^12 apart); AdamW's step is ~lr
    # (at most ~3 lr), and an m / (0 + eps) step would be ~1e4 lr
    g = torch.Generator().manual_seed(0)
    w = torch.nn.Parameter(torch.zeros(16, 256))
    opt = precision.AdamWSR([w], lr=1e-3, weight_decay=0.0, eight_bit_moments=True)
    scale = torch.logspace(-6, 0, 256)[torch.randperm(256, generator=g)]
    biggest = 0.0
    for _ in range(30):
        before = w.detach().clone()
        w.grad = torch.randn(16, 256, generator=g) * scale
        opt.step()
        biggest = max(biggest, (w.detach() - before).abs().max().item())
    assert biggest < 10 * 1e-3


def _adamw_run(make, dtype, shape, steps, lr, fixed_gradients, seed=0):
    """Initial and final weights (as float32) of one `shape` weight after `steps` steps of `make([w], lr)`."""
    torch.manual_seed(seed)
    w = torch.nn.Parameter((torch.randn(shape) * 0.02).to(dtype))
    start = w.detach().float().clone()
    opt = make([w], lr)
    g = torch.Generator().manual_seed(seed + 1)
    fixed = torch.randn(shape, generator=g)
    for _ in range(steps):
        w.grad = (fixed if fixed_gradients else torch.randn(shape, generator=g)).to(dtype)
        opt.step()
    return start, w.detach().float()


def test_8bit_moments_track_torch_adamw_on_float32_weights():
    """50 steps of random gradients at lr 1e-3 (betas 0.9, 0.999, weight decay 1e-2): the distance from torch's
    AdamW weights is 2.0% of torch's total displacement (measured: 0.0205), the moments' quantization error;
    tolerance 4%. Adam's steps are scale-free, so this ratio does not depend on lr (1e-2: also 0.0205)."""
    kw = dict(betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)
    start, ref = _adamw_run(lambda ps, lr: torch.optim.AdamW(ps, lr=lr, **kw), torch.float32, (64, 1024), 50, 1e-3, False)
    _, ours = _adamw_run(lambda ps, lr: precision.AdamWSR(ps, lr=lr, eight_bit_moments=True, **kw), torch.float32,
                         (64, 1024), 50, 1e-3, False)
    assert ((ours - ref).norm() / (ref - start).norm()).item() < 0.04


def test_bf16_sr_with_8bit_moments_moves_weights_as_far_as_float32_adamw_at_lr_1e6():
    """The issue's check: bf16 weights + stochastic rounding + 8-bit moments, 20 steps at lr 1e-6 on fixed
    gradients (every float32 weight moves ~2e-5 one way, 1/6 of a bf16 step at 0.02). The MEAN |displacement|
    over 131k weights equals float32 AdamW's from the same start within 4%: measured 0.997 (0.993-0.999 over
    seeds 0-3; the rounding noise of the mean is ~0.7%, 1 sigma, the 8-bit moments add < 0.1%: float32
    moments give 0.997 too); plain bf16 AdamW moves them 3% as far (updates vanish)."""
    shape = (128, 1024)
    bf16_start, _ = _adamw_run(lambda ps, lr: torch.optim.AdamW(ps, lr=lr), torch.bfloat16, shape, 0, 1e-6, True)
    w = torch.nn.Parameter(bf16_start.clone())  # float32 AdamW from the same (bf16-valued) start
    opt = torch.optim.AdamW([w], lr=1e-6)
    fixed = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    for _ in range(20):
        w.grad = fixed.bfloat16().float()
        opt.step()
    fp32 = (w.detach() - bf16_start).abs().mean().item()
    assert fp32 == pytest.approx(20 * 1e-6, rel=0.01)
    start, ours = _adamw_run(lambda ps, lr: precision.AdamWSR(ps, lr=lr, eight_bit_moments=True), torch.bfloat16,
                             shape, 20, 1e-6, True)
    assert torch.equal(start, bf16_start)
    assert (ours - start).abs().mean().item() == pytest.approx(fp32, rel=0.04)
    _, plain = _adamw_run(lambda ps, lr: torch.optim.AdamW(ps, lr=lr), torch.bfloat16, shape, 20, 1e-6, True)
    assert (plain - start).abs().mean().item() < 0.1 * fp32


def _steps(opt, w, n, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        w.grad = torch.randn(w.shape, generator=g).to(w.dtype)
        opt.step()


def test_8bit_state_is_uint8_and_resumes_bit_exactly():
    shape = (37, 41)  # 1517 values: 6 blocks, the last one shorter
    w = torch.nn.Parameter(torch.randn(shape).bfloat16())
    opt = precision.AdamWSR([w], lr=1e-3, seed=3, eight_bit_moments=True)
    _steps(opt, w, 3, seed=0)
    state = opt.state[w]
    assert {k: (v.dtype, tuple(v.shape)) for k, v in state.items() if torch.is_tensor(v)} == {
        "m_codes": (torch.uint8, shape), "sqrt_v_codes": (torch.uint8, shape),
        "m_absmax": (torch.float32, (6,)), "sqrt_v_absmax": (torch.float32, (6,))}
    assert sum(v.numel() * v.element_size() for v in state.values() if torch.is_tensor(v)) == 2 * 1517 + 2 * 6 * 4
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)  # as a checkpoint: through serialisation
    clone = torch.nn.Parameter(w.detach().clone())
    opt2 = precision.AdamWSR([clone], lr=1e-3, seed=99, eight_bit_moments=True)
    buffer.seek(0)
    opt2.load_state_dict(torch.load(buffer))
    assert all(torch.equal(state[k], opt2.state[clone][k]) and state[k].dtype == opt2.state[clone][k].dtype
               for k in state if torch.is_tensor(state[k]))
    _steps(opt, w, 3, seed=1)
    _steps(opt2, clone, 3, seed=1)
    assert torch.equal(w, clone)
    assert all(torch.equal(opt.state[w][k], opt2.state[clone][k]) for k in state if torch.is_tensor(state[k]))
    with pytest.raises(ValueError, match="8-bit"):  # a state with float32 moments is not silently mixed in
        precision.AdamWSR([clone], lr=1e-3).load_state_dict(opt.state_dict())


@pytest.mark.parametrize("eight_bit", [False, True])
def test_slices_give_the_same_step_as_one_slice(monkeypatch, eight_bit):
    """SLICE bounds the step's temporaries; slices of 512 (2 blocks) give the same weights and state as one
    slice over 41 x 53 = 2173 values (on CPU the rounding noise is drawn in the same order)."""
    results = []
    for size in (1 << 24, 512):
        monkeypatch.setattr(precision, "SLICE", size)
        torch.manual_seed(0)
        w = torch.nn.Parameter(torch.randn(41, 53).bfloat16())
        opt = precision.AdamWSR([w], lr=1e-2, eight_bit_moments=eight_bit)
        _steps(opt, w, 3, seed=0)
        results.append((w.detach().clone(), {k: v for k, v in opt.state[w].items() if torch.is_tensor(v)}))
    (w1, s1), (w2, s2) = results
    assert torch.equal(w1, w2) and all(torch.equal(s1[k], s2[k]) for k in s1)


def test_make_optimizer_gives_stochastic_rounding_8bit_moments():
    layer = torch.nn.Linear(4, 4).bfloat16()
    opt = precision.make_optimizer(layer, lr=1e-6, eight_bit=True, stochastic_rounding=True)
    assert isinstance(opt, precision.AdamWSR) and opt.eight_bit_moments
    assert not precision.make_optimizer(layer, lr=1e-6, stochastic_rounding=True).eight_bit_moments


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
