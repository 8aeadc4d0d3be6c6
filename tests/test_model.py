"""model.py: the tiny offline kit, loading/saving, prompts, and log-probs against naive computations."""
import os
from types import SimpleNamespace

import copy

import pytest
import torch
from PIL import Image
from conftest import colour_samples, fresh, text_samples

import grpo
from scaling import lora
import model as M
from offline import tiny_model
from scaling import precision
from speed import logprobs


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def test_tiny_vlm_is_small_and_deterministic(tiny_vlm, tiny_cache, tmp_path):
    n = n_params(tiny_vlm.model)
    print(f"tiny Qwen2.5-VL parameters: {n:,}")
    assert type(tiny_vlm.model).__name__ == "Qwen2_5_VLForConditionalGeneration" and tiny_vlm.is_vlm
    assert n < 10_000_000
    again = M.build_tiny_policy(seed=0, cache_dir=tmp_path)  # fresh build elsewhere: identical
    assert again.tokenizer.get_vocab() == tiny_vlm.tokenizer.get_vocab()
    for a, b in zip(tiny_vlm.model.state_dict().values(), again.model.state_dict().values()):
        assert torch.equal(a, b)
    other = M.build_tiny_policy(seed=1, cache_dir=tmp_path)
    assert not torch.equal(other.model.lm_head.weight, again.model.lm_head.weight)
    M.build_tiny_policy(seed=0, cache_dir=tmp_path)  # cache hit: no new directory
    assert len([p for p in tmp_path.iterdir() if not p.name.startswith(".")]) == 2
    extra = M.build_tiny_policy(seed=0, cache_dir=tmp_path, corpus=["zebra zebra crossing"])
    assert len(extra.tokenizer) != len(again.tokenizer) or extra.tokenizer.get_vocab() != again.tokenizer.get_vocab()


def test_tiny_text_lm_loads_in_plain_transformers(tiny_lm, tiny_cache):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    n = n_params(tiny_lm.model)
    print(f"tiny Qwen2 LM parameters: {n:,}")
    assert type(tiny_lm.model).__name__ == "Qwen2ForCausalLM" and not tiny_lm.is_vlm
    assert 400_000 < n < 800_000
    path = next(p for p in tiny_cache.iterdir() if p.name.startswith("qwen2-"))
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    assert torch.allclose(model(ids).logits, tiny_lm.model(ids).logits)


def test_tokenizer_special_tokens_and_template(tiny_vlm):
    tok = tiny_vlm.tokenizer
    for t in tiny_model.SPECIAL_TOKENS:
        assert len(tok(t, add_special_tokens=False)["input_ids"]) == 1
    text = tok.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q?"}]}],
                                   tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Q?<|im_end|>\n<|im_start|>assistant\n"
    s = 'Route Name: Line 3\nDeparture Stop: Oak Station \\boxed{yes} 日本'
    assert tok.decode(tok(s)["input_ids"]) == s
    assert tiny_vlm.eos_id == tok.convert_tokens_to_ids("<|im_end|>")
    specials = {tok.convert_tokens_to_ids(t) for t in tiny_model.SPECIAL_TOKENS} - {tiny_vlm.eos_id}
    assert specials <= set(tiny_vlm.suppress_ids.tolist()) and tiny_vlm.eos_id not in tiny_vlm.suppress_ids


def test_pixel_budget_and_image_tokens(tiny_vlm, tmp_path):
    samples = colour_samples(tmp_path, ["red", "blue"], sizes=[(400, 300), (50, 40)])
    enc = M.encode_prompts(tiny_vlm, samples)
    grid = enc["image_grid_thw"]
    assert (grid[:, 1:].prod(-1) * 14 * 14 <= tiny_vlm.max_pixels).all()
    assert (grid[:, 1:].prod(-1) * 14 * 14 >= tiny_vlm.min_pixels).all()
    n_pad = (enc["input_ids"] == tiny_vlm.model.config.image_token_id).sum(1)
    assert n_pad.tolist() == (grid.prod(-1) // 4).tolist()
    small = tiny_model.make_image_processor(max_pixels=56 * 56, min_pixels=28 * 28)
    out = small(images=[Image.open(samples[0].image)], return_tensors="pt")
    assert int(out["image_grid_thw"][0, 1:].prod()) * 14 * 14 <= 56 * 56
    mask = enc["attention_mask"]
    assert mask.sum(1).min() < mask.shape[1] and (mask[:, -1] == 1).all()  # different lengths, left-padded


def test_text_only_prompt_has_map_as_text(tiny_lm):
    enc = M.encode_prompts(tiny_lm, text_samples(2))
    text = tiny_lm.tokenizer.decode(enc["input_ids"][1], skip_special_tokens=True)
    assert "Line 1: Alder Station, Birch Station, Cedar Station\nLine 2: Birch Station, Dove Station" in text
    assert enc["attention_mask"][0, 0] == 0 and (enc["input_ids"][0, 0] == tiny_lm.pad_id)  # left-padded
    assert "pixel_values" not in enc


def _naive_logprobs(policy, samples, rollout):
    """Each row alone, unpadded, positions computed by transformers itself; full log_softmax.
    Returns (log-probs of the sampled tokens, entropy of the distribution at each position)."""
    out, entropy = torch.zeros_like(rollout.logprobs), torch.zeros_like(rollout.logprobs)
    cfg = policy.model.config
    for n in range(rollout.response_ids.shape[0]):
        enc = M.encode_prompts(policy, [samples[int(rollout.prompt_index[n])]])
        L = int(rollout.response_mask[n].sum())
        ids = torch.cat([enc["input_ids"], rollout.response_ids[n : n + 1, :L]], 1)
        kw = {}
        if policy.is_vlm:
            kw = dict(pixel_values=enc["pixel_values"], image_grid_thw=enc["image_grid_thw"],
                      mm_token_type_ids=(ids == cfg.image_token_id).int())
        logits = policy.model(input_ids=ids, **kw).logits[0, -L - 1 : -1]
        logp = torch.log_softmax(logits.double(), -1)
        out[n, :L] = logp.gather(-1, ids[0, -L:, None]).squeeze(-1).float()
        entropy[n, :L] = -(logp.exp() * logp).sum(-1).float()
    return out, entropy


@pytest.mark.parametrize("kind", ["vlm", "lm"])
def test_response_logprobs_match_naive_on_padded_batches(kind, tiny_vlm, tiny_lm, tmp_path):
    base = tiny_vlm if kind == "vlm" else tiny_lm
    policy = fresh(base, scale=0.1)  # larger random weights: positions and caching visibly matter
    samples = colour_samples(tmp_path, ["red", "blue", "red"]) if kind == "vlm" else text_samples(3)
    g = torch.Generator().manual_seed(0)
    ro = grpo.sample_groups(policy, samples, group_size=2, max_new_tokens=7, generator=g)
    batch = M.join_prompt_response(ro.prompts, ro.prompt_index, ro.response_ids, ro.response_mask)
    lp = logprobs.response_logprobs(policy.model, batch, chunk=5)
    naive, ent = _naive_logprobs(policy, samples, ro)
    m = ro.response_mask
    assert torch.allclose(lp * m, naive * m, atol=1e-4), (lp * m - naive * m).abs().max()
    assert torch.allclose(ro.logprobs * m, naive * m, atol=1e-4)  # the decode loop's own log-probs
    assert torch.allclose(ro.entropy * m, ent * m, atol=1e-4)


def test_fused_head_logprobs_value_and_grad():
    """The LM head fused with the log-softmax (chunked, logits recomputed in backward) equals the plain
    `log_softmax(h @ W.T)` in value and in the gradients of h and W, with and without the entropy output."""
    g = torch.Generator().manual_seed(2)
    head = torch.nn.Linear(6, 13, bias=False).double()
    model = SimpleNamespace(get_output_embeddings=lambda: head)
    hidden = torch.randn(2, 7, 6, generator=g, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(0, 13, (2, 7), generator=g)
    w1, w2 = torch.randn(2, 7, generator=g, dtype=torch.float64), torch.randn(2, 7, generator=g, dtype=torch.float64)
    logp, ent = logprobs.head_logprobs(model, hidden, tokens, chunk=3, with_entropy=True)  # 14 rows: a partial chunk
    lsm = torch.log_softmax(hidden @ head.weight.T, -1)
    ref_logp, ref_ent = lsm.gather(-1, tokens[..., None]).squeeze(-1), -(lsm.exp() * lsm).sum(-1)
    assert torch.allclose(logp.double(), ref_logp, atol=1e-6) and torch.allclose(ent.double(), ref_ent, atol=1e-6)
    for ours, ref in ((logp.double() * w1, ref_logp * w1), (logp.double() * w1 + ent.double() * w2, ref_logp * w1 + ref_ent * w2)):
        g1 = torch.autograd.grad(ours.sum(), (hidden, head.weight), retain_graph=True)
        g2 = torch.autograd.grad(ref.sum(), (hidden, head.weight), retain_graph=True)
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g1, g2))
    assert torch.equal(logprobs.head_logprobs(model, hidden, tokens, chunk=3), logp)  # alone, without the entropy


def test_fused_head_logprobs_with_a_lora_adapter_on_the_head():
    """With a LoRA adapter on the LM head, the fused pass equals the plain log_softmax(h W^T + s (h A^T) B^T) in
    value and in the gradients of h, A, B (and W, were it trained); a disabled adapter gives the base."""
    g = torch.Generator().manual_seed(3)
    head = lora.LoraLinear(torch.nn.Linear(6, 13, bias=False).double(), rank=2, alpha=6.0)
    head.lora_A.double(), head.lora_B.double()
    with torch.no_grad():
        head.lora_B.weight.copy_(torch.randn(13, 2, generator=g, dtype=torch.float64))
    model = SimpleNamespace(get_output_embeddings=lambda: head)
    hidden = torch.randn(2, 5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(0, 13, (2, 5), generator=g)
    w1, w2 = torch.randn(2, 5, generator=g, dtype=torch.float64), torch.randn(2, 5, generator=g, dtype=torch.float64)
    logp, ent = logprobs.head_logprobs(model, hidden, tokens, chunk=4, with_entropy=True)
    lsm = torch.log_softmax(head(hidden), -1)  # the LoraLinear's own forward: W h + 3 B A h
    ref_logp, ref_ent = lsm.gather(-1, tokens[..., None]).squeeze(-1), -(lsm.exp() * lsm).sum(-1)
    assert torch.allclose(logp.double(), ref_logp, atol=1e-6) and torch.allclose(ent.double(), ref_ent, atol=1e-6)
    params = (hidden, head.lora_A.weight, head.lora_B.weight, head.base_layer.weight)
    g1 = torch.autograd.grad((logp * w1 + ent * w2).sum(), params, retain_graph=True)
    g2 = torch.autograd.grad((ref_logp * w1 + ref_ent * w2).sum(), params)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g1, g2)) and g1[1].abs().sum() > 0
    with lora.adapters_disabled(head):  # the reference policy: the base head alone
        base = logprobs.head_logprobs(model, hidden, tokens, chunk=4)
    plain = torch.log_softmax(hidden @ head.base_layer.weight.T, -1).gather(-1, tokens[..., None]).squeeze(-1)
    assert torch.allclose(base.double(), plain, atol=1e-6) and not torch.allclose(base.double(), ref_logp, atol=1e-3)


def test_save_and_reload(tiny_vlm, tmp_path):
    from transformers import AutoModelForImageTextToText

    M.save_policy(tiny_vlm, tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "model.safetensors").exists()
    back = M.load_policy(str(tmp_path / "ckpt"), gradient_checkpointing=True, max_pixels=56 * 56)
    assert back.is_vlm and back.max_pixels == 56 * 56 and back.eos_id == tiny_vlm.eos_id
    assert back.model.is_activation_checkpointing
    plain = AutoModelForImageTextToText.from_pretrained(tmp_path / "ckpt")
    for a, b in zip(tiny_vlm.model.state_dict().values(), plain.state_dict().values()):
        assert torch.equal(a, b)
    back.model.train()
    ro = grpo.sample_groups(back, colour_samples(tmp_path, ["red"]), 2, 3)  # gradient checkpointing + decode
    assert ro.response_ids.shape[0] == 2 and back.model.training


def test_reference_model_is_frozen_copy(tiny_vlm):
    ref = M.reference_model(tiny_vlm)
    assert not ref.training and all(not p.requires_grad for p in ref.parameters())
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(ref.parameters(), tiny_vlm.model.parameters()))


def test_make_optimizer(tiny_lm):
    opt = precision.make_optimizer(tiny_lm.model, lr=1e-3, weight_decay=0.01)
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["weight_decay"] == 0.01
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="bitsandbytes"):  # a user error: one line from the commands
            precision.make_optimizer(tiny_lm.model, lr=1e-3, eight_bit=True)
    assert isinstance(precision.make_optimizer(tiny_lm.model, lr=1e-3, stochastic_rounding=True), precision.AdamWSR)
    opt = precision.make_optimizer(tiny_lm.model, lr=1e-3, eight_bit=True, stochastic_rounding=True)
    assert isinstance(opt, precision.AdamWSR) and opt.eight_bit_moments  # our own 8-bit moments, not bitsandbytes


# Qwen2.5-VL's chat template, as its checkpoints ship it (written out here: nothing can be downloaded): a default
# system prompt when the conversation has none, the image as <|vision_start|><|image_pad|><|vision_end|>.
QWEN25_VL_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_prompt_is_the_released_datasets_user_turn(tiny_vlm, tmp_path):
    """The released RL dataset builds the user turn as "<image>\\n" + question.strip() under the default system
    prompt; with Qwen2.5-VL's template our prompt is that string, token for token (one image pad per merged patch)."""
    import dataclasses

    tok = copy.deepcopy(tiny_vlm.tokenizer)
    tok.chat_template = QWEN25_VL_TEMPLATE
    policy = dataclasses.replace(tiny_vlm, tokenizer=tok)
    sample = colour_samples(tmp_path, ["red"])[0]
    sample = dataclasses.replace(sample, question="  Is Alder Station on Line 2?\n")
    enc = M.encode_prompts(policy, [sample])
    pads = int(enc["image_grid_thw"][0].prod()) // 4
    expected = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|vision_start|>"
                + "<|image_pad|>" * pads + "<|vision_end|>\nIs Alder Station on Line 2?<|im_end|>\n"
                "<|im_start|>assistant\n")
    assert enc["input_ids"][0].tolist() == tok(expected, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("kind", ["lm", "vlm"])
def test_prompt_length_is_the_encoded_length(kind, tiny_lm, tiny_vlm, tmp_path):
    """prompt_length (from the image's size alone) is the length encode_prompts gives each prompt."""
    policy = tiny_lm if kind == "lm" else tiny_vlm
    samples = text_samples(3) if kind == "lm" else colour_samples(tmp_path, ["red", "blue", "red"],
                                                                  sizes=[(150, 60), (60, 60), (500, 320)])
    for s in samples:
        assert M.prompt_length(policy, s) == M.encode_prompts(policy, [s])["input_ids"].shape[1]


def test_long_prompts_are_dropped_counted_and_reported(tiny_lm, capsys):
    samples = text_samples(6)  # questions of two lengths (every other one repeated twice)
    lengths = [M.prompt_length(tiny_lm, s) for s in samples]
    limit = min(lengths)
    kept = M.drop_long_prompts(tiny_lm, samples, limit)
    assert kept == [s for s, n in zip(samples, lengths) if n <= limit] and 0 < len(kept) < len(samples)
    assert f"dropped {len(samples) - len(kept)} of 6 training questions" in capsys.readouterr().out


def test_map_images_are_preprocessed_once_per_file_and_budget(tiny_vlm, tmp_path, monkeypatch):
    """encode_prompts gives what one batched call of the image processor gives, but each map is decoded, resized and
    normalised once per (file, budget): a step that asks again reads the cache; a new budget or a rewritten file is
    processed again; past IMAGE_CACHE_BYTES the least recently used map goes."""
    policy = fresh(tiny_vlm)
    policy.images.clear()
    samples = colour_samples(tmp_path, ["red", "blue", "red"], sizes=[(150, 60), (60, 60), (90, 120)])
    with_images = [Image.open(s.image).convert("RGB") for s in samples]
    batched = policy.image_processor(images=with_images, return_tensors="pt")
    calls = []
    real = type(policy.image_processor).__call__
    monkeypatch.setattr(type(policy.image_processor), "__call__", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    first = M.encode_prompts(policy, samples)
    assert torch.equal(first["pixel_values"], batched["pixel_values"]) and torch.equal(first["image_grid_thw"], batched["image_grid_thw"])
    assert len(calls) == 3
    again = M.encode_prompts(policy, samples + samples[:1])  # four prompts, three maps, all cached
    assert len(calls) == 3 and torch.equal(again["pixel_values"][: len(first["pixel_values"])], first["pixel_values"])
    policy.image_processor.size["longest_edge"] = 56 * 56  # another budget: processed anew, fewer patches
    try:
        small = M.encode_prompts(policy, samples[:1])
    finally:
        policy.image_processor.size["longest_edge"] = tiny_vlm.max_pixels
    assert len(calls) == 4 and len(small["pixel_values"]) < len(M.encode_prompts(policy, samples[:1])["pixel_values"])
    red = first["pixel_values"][: int(first["image_grid_thw"][0].prod())]
    assert torch.equal(M.encode_prompts(policy, samples[:1])["pixel_values"], red)
    Image.new("RGB", (150, 60), (30, 220, 30)).save(samples[0].image)  # the file rewritten (same size): processed anew
    os.utime(samples[0].image, ns=(1, 1))
    green = M.encode_prompts(policy, samples[:1])["pixel_values"]
    assert len(calls) == 5 and green.shape == red.shape and not torch.equal(green, red)
    # bounded: room for about one map, so each new one pushes the oldest out
    one = max(v[0].nbytes for v in policy.images.values())
    monkeypatch.setattr(M, "IMAGE_CACHE_BYTES", one)
    policy.images.clear()
    M.encode_prompts(policy, samples)
    assert len(policy.images) == 1 and next(iter(policy.images))[0].endswith(os.path.basename(samples[2].image))


def test_fused_head_runs_in_the_autocast_dtype_under_master_weights():
    """Under float32 master weights with bf16 autocast, the fused head's GEMMs are bf16 (as autocast would run the
    head), not float32: the log-probs are those of bf16 logits (computed in float32 from there), and the gradients
    agree with float32's to bf16 precision."""
    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(64, 300, bias=False)
    model = SimpleNamespace(get_output_embeddings=lambda: head, autocast_dtype=torch.bfloat16)
    plain = SimpleNamespace(get_output_embeddings=lambda: head)
    hidden = torch.randn(3, 5, 64, generator=g, requires_grad=True)
    tokens = torch.randint(0, 300, (3, 5), generator=g)
    logp = logprobs.head_logprobs(model, hidden, tokens, chunk=4)
    bf16 = (hidden.bfloat16() @ head.weight.bfloat16().T).float().log_softmax(-1).gather(-1, tokens[..., None]).squeeze(-1)
    fp32 = logprobs.head_logprobs(plain, hidden, tokens, chunk=4)
    assert torch.allclose(logp, bf16, atol=1e-6) and not torch.allclose(logp, fp32, atol=1e-6)
    assert logp.dtype == torch.float32
    ours = torch.autograd.grad(logp.sum(), (hidden, head.weight))
    ref = torch.autograd.grad(fp32.sum(), (hidden, head.weight))
    assert all(a.dtype == torch.float32 and torch.allclose(a, b, atol=2e-2, rtol=2e-2) for a, b in zip(ours, ref))


def test_tf32_is_allowed_for_cuda_models_only():
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        M.allow_tf32(torch.device("cpu"))
        assert torch.get_float32_matmul_precision() == "highest"  # a CPU run keeps full float32
        M.allow_tf32(torch.device("cuda", 0))  # only sets flags: no GPU needed
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(before)
