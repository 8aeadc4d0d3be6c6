"""lora.py: which layers get adapters (counted by hand), the reference policy as the adapters switched off,
training moves adapters only, peft loads what we save (and we load what peft saves), merging, QLoRA's checks."""
import sys

import pytest
import torch
from conftest import colour_samples, fresh
from torch import nn

from scaling import lora
import model as M
from speed import logprobs

RANK, ALPHA = 4, 8.0
# the tiny VLM (model.build_tiny_policy defaults): 2 language layers, hidden 64, MLP 256, 4 heads of 16 of
# which 2 for keys / values (k, v: 64 -> 32); one vision block 32 wide (qkv 32 -> 96, MLP 32 -> 64) and a
# merger 128 -> 128 -> 64
LAYER = {"q_proj": (64, 64), "k_proj": (64, 32), "v_proj": (64, 32), "o_proj": (64, 64), "gate_proj": (64, 256),
         "up_proj": (64, 256), "down_proj": (256, 64)}
VISION = {"attn.qkv": (32, 96), "attn.proj": (32, 32), "mlp.gate_proj": (32, 64), "mlp.up_proj": (32, 64),
          "mlp.down_proj": (64, 32)}
MERGER = {"merger.mlp.0": (128, 128), "merger.mlp.2": (128, 64)}


def adapter_params(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def batch_of(policy, tmp_path):
    """Two image prompts, two responses each (some padding): the inputs of a GRPO micro-batch."""
    prompts = M.encode_prompts(policy, colour_samples(tmp_path, ["red", "blue"]))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, len(policy.tokenizer), (4, 5), generator=g)
    mask = torch.ones(4, 5)
    mask[1, 3:] = 0
    return prompts, torch.tensor([0, 0, 1, 1]), ids, mask


def logits(model, inputs):
    prompts, index, ids, mask = inputs
    with torch.no_grad():
        return M.forward_logits(model, M.join_prompt_response(prompts, index, ids, mask)).logits


def perturb_b(model, seed=1):
    """Random nonzero B matrices (as after training), so that the adapters change the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora.lora_layers(model).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.2)


def test_default_targets_are_the_language_model_projections(tiny_vlm, tiny_lm):
    model = fresh(tiny_vlm).model
    originals = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    names = lora.add_lora(model, RANK, ALPHA)
    expected = {f"model.language_model.layers.{i}.{'self_attn' if k[0] in 'qkvo' else 'mlp'}.{k}"
                for i in range(2) for k in LAYER}
    assert len(names) == 2 * 7 and set(names) == expected
    assert not any("visual" in n for n in names)
    # trainable: r (in + out) per layer = 4 * 2 * (128 + 96 + 96 + 128 + 320 + 320 + 320) = 11264
    assert adapter_params(model) == RANK * 2 * sum(i + o for i, o in LAYER.values()) == 11264
    assert all(("lora_A" in n or "lora_B" in n) == p.requires_grad for n, p in model.named_parameters())
    layers = lora.lora_layers(model)
    assert all(layers[n].base_layer is originals[n] for n in names)  # the base layer itself, not a copy
    assert all(layers[n].scaling == ALPHA / RANK for n in names)
    # asked for, the vision tower too: one named layer, or all of it (blocks and merger)
    one = lora.add_lora(fresh(tiny_vlm).model, RANK, ALPHA, [*lora.DEFAULT_TARGETS, "visual.qkv"])
    assert set(one) - expected == {"model.visual.blocks.0.attn.qkv"}
    model = fresh(tiny_vlm).model
    every = lora.add_lora(model, RANK, ALPHA, "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj,visual")
    assert len(every) == 14 + 5 + 2
    vision = {**VISION, **MERGER}
    assert adapter_params(model) == 11264 + RANK * sum(i + o for i, o in vision.values()) == 11264 + 4 * 928
    # the text-only tiny model (Qwen2: 128 wide, k / v 128 -> 64, MLP 512), no vision tower
    names = lora.add_lora(fresh(tiny_lm).model, RANK, ALPHA)
    assert len(names) == 14 and all(n.startswith("model.layers.") for n in names)


def test_zero_b_is_the_base_and_disabled_adapters_are_the_base(tiny_vlm, tmp_path):
    policy = fresh(tiny_vlm)
    inputs = batch_of(policy, tmp_path)
    base = logits(policy.model, inputs)
    lora.add_lora(policy.model, RANK, ALPHA)
    assert torch.equal(logits(policy.model, inputs), base)  # B = 0: exactly the base
    with lora.adapters_disabled(policy.model):
        assert torch.equal(logits(policy.model, inputs), base)
    perturb_b(policy.model)
    adapted = logits(policy.model, inputs)
    assert (adapted - base).abs().max() > 1e-3
    with torch.no_grad(), lora.adapters_disabled(policy.model):
        assert torch.equal(logits(policy.model, inputs), base)
    assert torch.equal(logits(policy.model, inputs), adapted)  # switched back on
    # autograd afterwards is untouched: gradients reach the adapters and only them
    logp = logprobs.shared_prompt_logprobs(policy.model, *inputs)
    logp.sum().backward()
    assert all((p.grad is not None) == p.requires_grad for p in policy.model.parameters())
    assert all(p.grad.abs().sum() > 0 for p in policy.model.parameters() if p.requires_grad)


def test_training_moves_only_the_adapters(tiny_vlm, tmp_path):
    policy = fresh(tiny_vlm)
    inputs = batch_of(policy, tmp_path)
    lora.add_lora(policy.model, RANK, ALPHA)
    frozen = {n: p.detach().clone() for n, p in policy.model.named_parameters() if not p.requires_grad}
    adapters = {n: p.detach().clone() for n, p in policy.model.named_parameters() if p.requires_grad}
    with torch.no_grad(), lora.adapters_disabled(policy.model):
        ref = logprobs.shared_prompt_logprobs(policy.model, *inputs)
    trainable = [p for p in policy.model.parameters() if p.requires_grad]  # as the trainer's optimizer takes them
    assert sum(p.numel() for p in trainable) == 11264
    optimizer = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=1e-2)
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5])
    for _ in range(3):  # a GRPO-like surrogate: -A log p over the response tokens
        logp = logprobs.shared_prompt_logprobs(policy.model, *inputs)
        loss = -(advantages[:, None] * logp * inputs[3]).sum() / inputs[3].sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = dict(policy.model.named_parameters())
    assert all(torch.equal(after[n], v) for n, v in frozen.items())  # bit-identical base
    assert all(not torch.equal(after[n], v) for n, v in adapters.items())  # every A and B moved
    with torch.no_grad():
        assert not torch.allclose(logprobs.shared_prompt_logprobs(policy.model, *inputs), ref)
        with lora.adapters_disabled(policy.model):  # the reference policy is still the initial one
            assert torch.equal(logprobs.shared_prompt_logprobs(policy.model, *inputs), ref)
    # adapter-only state: what a checkpoint keeps, and it restores the trained adapters into a fresh wrap
    state = lora.adapter_state_dict(policy.model)
    assert len(state) == 28 and sum(v.numel() for v in state.values()) == 11264
    other = fresh(tiny_vlm).model
    lora.add_lora(other, RANK, ALPHA)
    lora.load_adapter_state_dict(other, state)
    assert torch.equal(logits(other, inputs), logits(policy.model, inputs))


def test_saved_adapter_loads_in_peft_and_back(tiny_vlm, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file

    policy = fresh(tiny_vlm)
    inputs = batch_of(policy, tmp_path)
    lora.add_lora(policy.model, RANK, ALPHA)
    perturb_b(policy.model)
    ours = logits(policy.model, inputs)
    lora.save_adapter(policy.model, tmp_path / "adapter", policy.model.config.name_or_path)
    saved = load_file(tmp_path / "adapter" / lora.WEIGHTS_FILE)
    assert "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight" in saved
    # peft: exactly the keys it would save itself, the same tensors, the same logits
    peft_model = PeftModel.from_pretrained(fresh(tiny_vlm).model, tmp_path / "adapter")
    theirs = get_peft_model_state_dict(peft_model, save_embedding_layers=False)
    assert set(theirs) == set(saved) and all(torch.equal(theirs[k], saved[k]) for k in saved)
    assert peft_model.peft_config["default"].r == RANK and peft_model.peft_config["default"].lora_alpha == ALPHA
    assert torch.allclose(logits(peft_model.get_base_model(), inputs), ours, atol=1e-5)
    # ours, back: identical
    again = fresh(tiny_vlm).model
    assert sorted(lora.load_adapter(again, tmp_path / "adapter")) == sorted(lora.lora_layers(policy.model))
    assert torch.equal(logits(again, inputs), ours)
    # an adapter peft made (a regex target, its own init) loads here and gives peft's logits
    made = get_peft_model(fresh(tiny_vlm).model, LoraConfig(r=2, lora_alpha=6, target_modules=r".*layers\.1\..*_proj"))
    with torch.no_grad():  # peft's B starts at zero too: give it a value
        for n, p in made.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    made.save_pretrained(tmp_path / "peft")
    mine = fresh(tiny_vlm).model
    assert len(lora.load_adapter(mine, tmp_path / "peft")) == 7
    assert torch.allclose(logits(mine, inputs), logits(made.get_base_model(), inputs), atol=1e-5)


def test_load_adapter_errors_name_folder_and_key(tiny_vlm, tmp_path):
    from safetensors.torch import load_file, save_file

    model = fresh(tiny_vlm).model
    lora.add_lora(model, RANK, ALPHA, ["q_proj"])
    lora.save_adapter(model, tmp_path / "a")
    weights = load_file(tmp_path / "a" / lora.WEIGHTS_FILE)
    key = "base_model.model.model.language_model.layers.1.self_attn.q_proj.lora_B.weight"
    save_file({k: v for k, v in weights.items() if k != key}, tmp_path / "a" / lora.WEIGHTS_FILE)
    with pytest.raises(ValueError, match=r"a/adapter_model.safetensors: adapter key '.*layers\.1\.self_attn\.q_proj"
                                         r"\.lora_B\.weight' is missing"):
        lora.load_adapter(fresh(tiny_vlm).model, tmp_path / "a")
    lora.add_lora(other := fresh(tiny_vlm).model, 2 * RANK, 2 * ALPHA, ["q_proj"])
    lora.save_adapter(other, tmp_path / "b")  # rank 8 into a rank-4 wrap
    with pytest.raises(ValueError, match=r"b: r=8.*has r=4"):
        lora.load_adapter(model, tmp_path / "b")


def test_merge_gives_the_adapted_model_as_a_plain_one(tiny_vlm, tmp_path):
    from transformers import AutoModelForImageTextToText

    policy = fresh(tiny_vlm)
    inputs = batch_of(policy, tmp_path)
    keys = set(policy.model.state_dict())
    lora.add_lora(policy.model, RANK, ALPHA)
    perturb_b(policy.model)
    adapted = logits(policy.model, inputs)
    assert lora.merge_lora(policy.model) is policy.model
    assert not lora.lora_layers(policy.model) and set(policy.model.state_dict()) == keys
    assert type(policy.model.get_submodule("model.language_model.layers.0.self_attn.q_proj")) is nn.Linear
    assert torch.allclose(logits(policy.model, inputs), adapted, atol=1e-5)
    M.save_policy(policy, tmp_path / "merged")
    plain = AutoModelForImageTextToText.from_pretrained(tmp_path / "merged")
    assert torch.allclose(logits(plain, inputs), adapted, atol=1e-5)
    # a bf16 base: the update is summed in float32 and rounded once
    model = fresh(tiny_vlm).model.to(torch.bfloat16)
    lora.add_lora(model, RANK, ALPHA)
    perturb_b(model)
    layer = model.get_submodule("model.language_model.layers.0.mlp.down_proj")
    w, a, b = layer.base_layer.weight.clone(), layer.lora_A.weight, layer.lora_B.weight
    expected = (w.float() + ALPHA / RANK * (b @ a)).to(torch.bfloat16)
    lora.merge_lora(model)
    merged = model.get_submodule("model.language_model.layers.0.mlp.down_proj").weight
    assert merged.dtype == torch.bfloat16 and torch.equal(merged, expected)


def test_an_adapter_on_the_tied_lm_head(tiny_vlm, tmp_path):
    """The LM head as a target (the tiny model's default, lora.default_targets): the fused log-prob pass and the
    model's forward agree; peft loads it; merging unties the head from the input embedding, which stays as it was."""
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    policy = fresh(tiny_vlm)
    inputs = batch_of(policy, tmp_path)
    embedding = policy.model.get_input_embeddings().weight.detach().clone()
    assert policy.model.lm_head.weight is policy.model.get_input_embeddings().weight  # tied
    names = lora.add_lora(policy.model, RANK, ALPHA, lora.DEFAULT_TARGETS + ("lm_head",))
    assert "lm_head" in names and isinstance(policy.model.get_output_embeddings(), lora.LoraLinear)
    perturb_b(policy.model)
    adapted = logits(policy.model, inputs)
    prompts, index, ids, mask = inputs
    batch = M.join_prompt_response(prompts, index, ids, mask)
    fused = logprobs.response_logprobs(policy.model, batch)
    plain = adapted[:, -ids.shape[1] - 1:-1].log_softmax(-1).gather(-1, ids[..., None]).squeeze(-1)
    assert torch.allclose(fused, plain, atol=1e-5)
    with lora.adapters_disabled(policy.model):  # the reference: base head too
        base = logprobs.response_logprobs(policy.model, batch)
    assert torch.allclose(base, logprobs.response_logprobs(fresh(tiny_vlm).model, batch), atol=1e-6)
    lora.save_adapter(policy.model, tmp_path / "adapter")
    peft_model = PeftModel.from_pretrained(fresh(tiny_vlm).model, tmp_path / "adapter")
    assert torch.allclose(logits(peft_model.get_base_model(), inputs), adapted, atol=1e-5)
    lora.merge_lora(policy.model)
    assert torch.equal(policy.model.get_input_embeddings().weight, embedding)
    assert not torch.equal(policy.model.lm_head.weight, embedding) and not policy.model.config.tie_word_embeddings
    M.save_policy(policy, tmp_path / "merged")
    merged = AutoModelForImageTextToText.from_pretrained(tmp_path / "merged")
    assert torch.equal(merged.get_input_embeddings().weight, embedding)
    assert torch.allclose(logits(merged, inputs), adapted, atol=1e-5)


def test_qlora_needs_cuda_and_bitsandbytes(monkeypatch):
    with pytest.raises(ValueError, match="--qlora needs a CUDA GPU and bitsandbytes.*cpu"):
        lora.check_qlora("cpu")
    with pytest.raises(ValueError, match="--qlora needs a CUDA GPU"):
        lora.qlora_from_pretrained_kwargs("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # named "cuda", but none there
    with pytest.raises(ValueError, match="--qlora needs a CUDA GPU"):
        lora.check_qlora("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU, but no bitsandbytes
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(ImportError, match="--qlora needs the optional package bitsandbytes"):
        lora.check_qlora("cuda")
    # a 4-bit base cannot take the merged update: a clear error, not a silent cast
    model = nn.Sequential(nn.Linear(8, 8))
    lora.add_lora(model, 2, 4, ["0"])
    model[0].base_layer.weight = nn.Parameter(torch.zeros(32, 1, dtype=torch.uint8), requires_grad=False)
    with pytest.raises(ValueError, match="0 has a Linear base of dtype torch.uint8.*QLoRA"):
        lora.merge_lora(model)


def test_bad_specs_are_named(tiny_vlm, tmp_path):
    model = fresh(tiny_vlm).model
    with pytest.raises(ValueError, match=r"LoRA target 'qproj' matches no linear layer.*q_proj"):
        lora.add_lora(model, RANK, ALPHA, ["q_proj", "qproj"])
    with pytest.raises(ValueError, match="LoRA target 'visual.fc1' matches no"):
        lora.add_lora(model, RANK, ALPHA, ["visual.fc1"])
    for rank in (0, -2, 1.5):
        with pytest.raises(ValueError, match=f"rank must be a positive integer, got {rank}"):
            lora.add_lora(model, rank, ALPHA)
    with pytest.raises(ValueError, match="alpha must be positive, got 0"):
        lora.add_lora(model, RANK, 0)
    with pytest.raises(ValueError, match=r"targets must be non-empty module names, got \['q_proj', ''\]"):
        lora.add_lora(model, RANK, ALPHA, "q_proj,")
    assert not lora.lora_layers(model) and all(p.requires_grad for p in model.parameters())  # nothing half-done
    with pytest.raises(ValueError, match="no LoRA adapters"):
        lora.save_adapter(model, tmp_path / "none")
    lora.add_lora(model, RANK, ALPHA)
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        lora.add_lora(model, RANK, ALPHA)
    lora.save_adapter(model, tmp_path / "dora")
    config = (tmp_path / "dora" / lora.CONFIG_FILE)
    config.write_text(config.read_text().replace('"use_dora": false', '"use_dora": true'))
    with pytest.raises(ValueError, match=r"dora: only plain LoRA adapters.*'use_dora': True"):
        lora.load_adapter(fresh(tiny_vlm).model, tmp_path / "dora")


def test_an_adapter_folder_brings_its_own_image_budget(tiny_vlm, tmp_path):
    """A LoRA run saves the adapters with the image processor it trained with; loading the folder uses that
    processor (its budget), not the base checkpoint's; an explicit max_pixels still wins."""
    policy = fresh(tiny_vlm)
    lora.add_lora(policy.model, RANK, ALPHA)
    policy.image_processor = M.image_processor(policy.model.config.name_or_path, max_pixels=56 * 56)
    M.save_policy(policy, tmp_path / "adapter")
    loaded = M.load_policy(str(tmp_path / "adapter"))
    assert loaded.image_processor.size["longest_edge"] == loaded.max_pixels == 56 * 56 != tiny_vlm.max_pixels
    assert lora.lora_layers(loaded.model)
    assert M.load_policy(str(tmp_path / "adapter"), max_pixels=84 * 84).max_pixels == 84 * 84
