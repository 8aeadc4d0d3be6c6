"""memory.py: the plan against hand-computed numbers, and against a real grpo_step's RSS on CPU."""
import pytest

from offline import tiny_model
from scaling import memory, shapes
from tools import memory_check

SEVEN_B_PARAMS = 8_292_166_656


@pytest.fixture(scope="module")
def seven_b():
    return memory.shape_of("7b")


def test_7b_shape_counts_match_the_published_model(seven_b):
    assert seven_b["params"] == SEVEN_B_PARAMS
    assert memory.lm_params(seven_b) == shapes.count_shape_params("7b")["lm_params"]  # the formula == the meta count


def test_static_parts_by_hand(seven_b):
    p = memory.plan(seven_b, "master", False, 1, decode_chunk=1, **memory.PAPER)
    assert p["weights"] == 4 * SEVEN_B_PARAMS and p["gradients"] == 4 * SEVEN_B_PARAMS
    assert p["optimizer"] == 8 * SEVEN_B_PARAMS and p["reference"] == 2 * SEVEN_B_PARAMS
    # 8-bit moments: 2 one-byte codes + 2 float32 absmax per block of 256 values
    assert memory.plan(seven_b, "master", True, 1, decode_chunk=1, **memory.PAPER)["optimizer"] == 2.03125 * SEVEN_B_PARAMS
    s = memory.plan(seven_b, "stochastic", False, 8, decode_chunk=1, **memory.PAPER)
    assert s["weights"] == 2 * SEVEN_B_PARAMS / 8 and s["optimizer"] == 8 * SEVEN_B_PARAMS / 8  # sharded


def test_rollout_kv_cache_by_hand(seven_b):
    p = memory.plan(seven_b, "master", False, 1, decode_chunk=1, **memory.PAPER)
    expanded = 2 * 28 * 4 * 128 * (1300 + 2048) * 8 * 2  # 2 x layers x kv heads x head dim x seq x rows x bf16
    assert expanded == 1_535_901_696
    prefill_cache = 2 * 28 * 4 * 128 * 1300 * 1 * 2
    sampling = 5 * 8 * 152064 * 4
    assert p["rollout_kv"] == expanded + prefill_cache + sampling
    assert memory.plan(seven_b, "master", False, 1, decode_chunk=4, **memory.PAPER)["rollout_kv"] > 3.9 * expanded


def test_logprob_terms_and_peak(seven_b):
    on = memory.plan(seven_b, "master", False, 1, decode_chunk=1, **memory.PAPER)
    off = memory.plan(seven_b, "master", False, 1, decode_chunk=1, gradient_checkpointing=False, **memory.PAPER)
    boundaries = 29 * 8 * 3348 * 3584 * 4  # (layers + 1) x [rows, T, hidden] float32 residual stream
    assert on["logprob"] > boundaries + 4 * 152064 * 3584  # + the fused head's float32 weight gradient
    assert off["logprob"] > on["logprob"] + 20 * (on["logprob"] - boundaries) / 2
    static = on["weights"] + on["gradients"] + on["optimizer"] + on["reference"]
    phases = ("rollout_kv", "prefill", "reference_pass", "logprob", "optimizer_step")
    assert on["peak"] == static + max(on[k] for k in phases)


def test_table_rows(seven_b):
    rows = memory.table(max_pixels=memory.REDUCED_PIXELS, archs=("7b",), gpu_counts=(1, 8), cards=())  # full fine-tuning rows only
    paper = [r for r in rows if not r["recommended"]]
    assert all(r["micro_batch"] == memory.PAPER["micro_batch"] for r in paper)
    assert sorted((r["scheme"], r["gpus"]) for r in paper) == sorted((s, g) for s, _ in memory.SCHEMES for g in (1, 8))
    by = {(r["scheme"], r["gpus"]): r for r in paper}
    assert not by["master", 1]["fits"]  # 18 bytes x 8.3 B params alone is 139 GiB
    assert by["master", 8]["peak_gib"] < by["master", 1]["peak_gib"]


def test_self_check_small_shape_agrees_within_20_percent():
    # hidden 1024, vocab 32000, 2 layers (~88 M params, ~1 GiB); smaller shapes drown in ~80 MB of fixed
    # CPU-runtime overhead (allocator arenas, oneDNN, threads) that the GPU model rightly leaves out
    out = memory_check.self_check(memory_check.SMALL, verbose=False)
    assert 0.8 <= out["ratio"] <= 1.2, out


def test_self_check_lora_agrees_within_20_percent():
    """LoRA (rank 8, the reference = adapters disabled) against plan's LoRA terms, on a shape whose frozen base
    (~0.65 GiB in bf16) outweighs the CPU runtime's fixed overhead. It would fail if the frozen LM head got a
    float32 weight-gradient (+0.49 GiB here: plan counts none) or if a second copy of the model were made."""
    out = memory_check.self_check(dict(memory_check.SMALL, hidden=2048, intermediate=5632, vocab=64000), lora_rank=8, verbose=False)
    assert 0.8 <= out["ratio"] <= 1.2, out


def test_stochastic_8bit_states_and_step_by_hand(seven_b):
    """bf16 weights + bf16 gradients + 8-bit moments (2 bytes + 2 float32 absmax per 256) + bf16 reference:
    8 + 8/256 bytes per parameter; AdamWSR's step temporaries: one slice of 2^24 elements x 32 bytes (the
    7B's largest tensor, the 545 M-element embedding, is 32 slices), not a multiple of the embedding."""
    p = memory.plan(seven_b, "stochastic", True, 1, decode_chunk=1, **memory.PAPER)
    assert (p["weights"], p["gradients"], p["reference"]) == (2 * SEVEN_B_PARAMS,) * 3
    assert p["optimizer"] == 2 * SEVEN_B_PARAMS + 8 * SEVEN_B_PARAMS / 256
    assert p["weights"] + p["gradients"] + p["optimizer"] + p["reference"] == 8.03125 * SEVEN_B_PARAMS  # 62.0 GiB
    assert p["optimizer_step"] == 32 * 2**24 == 2**29  # 0.5 GiB
    assert memory.plan(seven_b, "stochastic", False, 1, decode_chunk=1, **memory.PAPER)["optimizer_step"] == 20 * 2**24


def test_7b_fits_one_gpu_with_stochastic_rounding_8bit_moments_and_micro_batch_4(seven_b):
    """Issue 13: the recommended row (micro-batch 4) fits one 80 GB GPU with ~6 GiB to spare; at the paper's
    micro-batch of 8 the log-prob pass pushes it over; no other scheme fits 7B on one GPU."""
    rows = [r for r in memory.table(max_pixels=memory.REDUCED_PIXELS, archs=("7b",), gpu_counts=(1,), cards=()) if r["fits"]]  # no LoRA rows
    assert [(r["scheme"], r["micro_batch"], r["recommended"]) for r in rows] == [("stochastic+8bit", 4, True)]
    assert rows[0]["peak_gib"] == 72.1 and memory.USABLE_GIB - rows[0]["peak_gib"] > 5
    assert rows[0]["parts_gib"]["logprob"] == max(v for k, v in rows[0]["parts_gib"].items()
                                                   if k in ("rollout_kv", "prefill", "reference_pass", "logprob",
                                                            "optimizer_step"))
    paper = memory.plan(seven_b, "stochastic", True, 1, decode_chunk=rows[0]["decode_chunk"], **memory.PAPER)
    assert paper["peak"] / memory.GiB > memory.USABLE_GIB  # 79.4 GiB at micro-batch 8


# ----------------------------------------------------------------------------- LoRA / QLoRA (issue 15)

SEVEN_B_ADAPTERS_R64 = 161_480_704  # 28 layers x 64 x (9 x 3584 + 2 x 512 + 3 x 18944)
SEVEN_B_QUANTIZED = 7_199_817_728  # 28 x (2 h^2 + 2 h kv + 3 h i) = 6,525,288,448 + the vision tower's 674,529,280
_BATCH = {k: v for k, v in memory.PAPER.items() if k != "micro_batch"}


def test_adapter_params_by_hand_and_as_lora_adds_them(seven_b):
    """r (in + out) for each of q (h->h), k, v (h->kv), o (h->h), gate, up (h->i), down (i->h): r (9h + 2kv + 3i)."""
    assert 28 * 64 * (9 * 3584 + 2 * 512 + 3 * 18944) == SEVEN_B_ADAPTERS_R64
    assert memory.lora_params(seven_b, 64) == SEVEN_B_ADAPTERS_R64
    assert memory.lora_params(seven_b, 16) == SEVEN_B_ADAPTERS_R64 // 4
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from scaling import lora

    small = dict(layers=2, hidden=64, intermediate=160, heads=4, kv_heads=2, vocab=128)
    net = Qwen2ForCausalLM(Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2))
    lora.add_lora(net, 4, 8.0)
    trained = sum(p.numel() for p in net.parameters() if p.requires_grad)
    assert trained == memory.lora_params(small, 4) == 2 * 4 * (9 * 64 + 2 * 32 + 3 * 160)


def test_qlora_bytes_per_quantized_weight_and_what_is_quantized(seven_b):
    """NF4 + double quantisation: 4 bits + an 8-bit absmax per 64 weights + a float32 per 256 absmax; the
    quantized weights are exactly the nn.Linear weights bitsandbytes replaces (all but the LM head)."""
    assert memory.NF4_BYTES == 0.5 + 1 / 64 + 1 / 4096 == 0.515869140625
    assert memory.quantized_params(seven_b) == SEVEN_B_QUANTIZED
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    with torch.device("meta"):
        m = Qwen2_5_VLForConditionalGeneration(shapes.shape_config("7b", tiny_model.build_tokenizer(tiny_model.builtin_corpus())))
    head = m.get_output_embeddings()
    linears = [mod for mod in m.modules() if isinstance(mod, torch.nn.Linear) and mod is not head]
    assert sum(mod.weight.numel() for mod in linears) == SEVEN_B_QUANTIZED
    assert 2 * max(mod.weight.numel() for mod in linears) == 2 * 3584 * 18944  # the largest dequantized weight
    # what stays bf16: the embedding and the LM head, plus 2.35 M of norms, biases and the vision patch embedding
    assert SEVEN_B_PARAMS - SEVEN_B_QUANTIZED - 2 * 152064 * 3584 == 2_354_176


def test_lora_plan_static_parts_by_hand(seven_b):
    """LoRA: the whole base (vision tower included) in bf16, no base gradients or moments, no reference copy;
    float32 adapters with float32 gradients and AdamW moments. QLoRA: only the weights change."""
    A = SEVEN_B_ADAPTERS_R64
    lo = memory.plan(seven_b, "plain", False, 1, decode_chunk=1, lora_rank=64, **memory.PAPER)
    assert lo["weights"] == 2 * SEVEN_B_PARAMS
    assert (lo["adapters"], lo["gradients"], lo["optimizer"]) == (4 * A, 4 * A, 8 * A)
    assert lo["reference"] == 0 and lo["dequant"] == 0 and lo["gathered"] == 0
    assert lo["optimizer_step"] == 4 * A  # foreach AdamW: one float32 sqrt of the adapters' second moments
    full = memory.plan(seven_b, "plain", False, 1, decode_chunk=1, **memory.PAPER)  # bf16 full fine-tuning
    assert full["gradients"] == 2 * SEVEN_B_PARAMS and full["reference"] == 2 * SEVEN_B_PARAMS
    q = memory.plan(seven_b, "plain", False, 1, decode_chunk=1, lora_rank=64, qlora=True, **memory.PAPER)
    assert q["weights"] == SEVEN_B_QUANTIZED * 0.515869140625 + (SEVEN_B_PARAMS - SEVEN_B_QUANTIZED) * 2  # 5.49 GiB
    assert q["dequant"] == 2 * 3584 * 18944  # one gate / up / down weight in bf16
    assert {k: v for k, v in q.items() if k not in ("weights", "dequant", "peak")} == \
           {k: v for k, v in lo.items() if k not in ("weights", "dequant", "peak")}
    for p in (lo, q):
        assert p["peak"] == sum(p[k] for k in memory.STATIC) + max(p[k] for k in memory.PHASES)
    for bad in (dict(scheme="master", gpus=1, lora_rank=64), dict(scheme="plain", gpus=2, lora_rank=64),
                dict(scheme="plain", gpus=1, lora_rank=0, qlora=True)):
        with pytest.raises(ValueError):
            memory.plan(seven_b, bad.pop("scheme"), False, bad.pop("gpus"), decode_chunk=1, **bad, **memory.PAPER)


def test_lora_activations_by_hand(seven_b):
    """Backward still runs through the frozen base: full fine-tuning's log-prob terms less the frozen head's
    float32 [vocab, hidden] weight-gradient, plus the adapters' float32 input copies (6 of width hidden, 1 of
    width intermediate), A's outputs (7 x rank) and the widest B output + its scaled copy (2 x 4 x intermediate)."""
    full = memory.plan(seven_b, "plain", False, 1, decode_chunk=1, **memory.PAPER)
    lo = memory.plan(seven_b, "plain", False, 1, decode_chunk=1, lora_rank=64, **memory.PAPER)
    tokens = 8 * (1300 + 2048)
    per_token = 8 * 18944 + 4 * (6 * 3584 + 18944) + 7 * 4 * 64
    assert per_token == 315_136
    assert lo["logprob"] == full["logprob"] - 4 * 152064 * 3584 + tokens * per_token
    assert lo["prefill"] == full["prefill"] + 1 * 1300 * 8 * 18944  # the rollout runs the adapters (no grad)
    # the reference pass runs with the adapters disabled; the rollout's KV cache is the base's
    assert (lo["reference_pass"], lo["rollout_kv"]) == (full["reference_pass"], full["rollout_kv"])


def test_fit_micro_batch_takes_the_largest_that_fits(seven_b):
    kw = dict(lora_rank=64, qlora=True, **_BATCH)
    assert memory.fit_micro_batch(seven_b, 500.0, **kw)[0::2] == (8, True)
    mb, p, fits = memory.fit_micro_batch(seven_b, 22.0, **kw)  # a 24 GB card
    assert (mb, fits) == (4, True) and p["peak"] <= 22 * memory.GiB
    bigger = memory.plan(seven_b, "plain", False, 1, micro_batch=8, decode_chunk=p["decode_chunk"], **kw)
    assert bigger["peak"] > 22 * memory.GiB  # 8 does not fit, with the same decode chunk
    assert memory.fit_micro_batch(seven_b, 22.0, micro_batches=(2, 4), **kw)[0] == 2  # the order given: largest first
    mb, p, fits = memory.fit_micro_batch(seven_b, 5.0, **kw)  # the 8 GiB of states alone do not fit
    assert (mb, fits) == (1, False) and p["peak"] > 5 * memory.GiB


def test_lora_rows_use_the_cards_usable_memory(seven_b):
    """usable = the card's GiB less 2 for the CUDA context (80 GB: the table's 78); the decode chunk comes from
    that card's free memory as speed.decode.auto_decode_chunk takes it: half of (usable - states) over one prompt's
    G rows (KV cache over prompt + response rounded up to 256 positions, 16 bytes x vocab of sampler logits), at
    most 16 prompts, split into even chunks."""
    assert (memory.card_usable_gib(24), memory.card_usable_gib(48), memory.USABLE_GIB) == (22.0, 46.0, 78.0)
    rows = {(r["scheme"], r["card_gb"]): r for r in memory.table(max_pixels=memory.REDUCED_PIXELS, archs=("7b",), gpu_counts=())}
    assert sorted(rows) == sorted((s, c) for s in ("lora", "qlora") for c in (24, 48, 80))
    per_prompt = 8 * (2 * 28 * 4 * 128 * 3584 * 2 + 16 * 152064)  # 1300 + 2048 = 3348 -> 3584 positions
    q = memory.plan(seven_b, "plain", False, 1, decode_chunk=1, lora_rank=64, qlora=True, **memory.PAPER)
    states = q["weights"] + q["adapters"] + q["gradients"] + q["optimizer"] + q["dequant"]
    for card, fit, chunk in ((24, 4, 4), (48, 12, 8), (80, 16, 16)):  # 12 of 16 fit: 2 chunks of 8
        assert min(16, int(0.5 * ((card - 2) * memory.GiB - states) // per_prompt)) == fit
        assert rows["qlora", card]["decode_chunk"] == -(-16 // -(-16 // fit)) == chunk
        assert rows["qlora", card]["usable_gib"] == card - 2


def test_7b_qlora_fits_24_and_48_gb_lora_24_only_at_micro_batch_1():
    """The honest plan (not measured on a GPU): 7B QLoRA fits a 48 GB card at the paper's micro-batch of 8 and a
    24 GB one at 4; plain LoRA (bf16 base, 15.4 GiB) squeezes into 24 GB only at micro-batch 1, 0.6 GiB spare;
    every row keeps the JSON fields, and 3B fits everywhere."""
    rows = memory.table(max_pixels=memory.REDUCED_PIXELS, archs=("3b", "7b"), gpu_counts=())
    by = {(r["arch"], r["scheme"], r["card_gb"]): r for r in rows}
    assert {k: (r["micro_batch"], r["fits"]) for k, r in by.items() if k[0] == "7b"} == {
        ("7b", "lora", 24): (1, True), ("7b", "lora", 48): (8, True), ("7b", "lora", 80): (8, True),
        ("7b", "qlora", 24): (4, True), ("7b", "qlora", 48): (8, True), ("7b", "qlora", 80): (8, True)}
    assert by["7b", "qlora", 48]["peak_gib"] == 31.2 and by["7b", "qlora", 24]["peak_gib"] == 20.0
    assert by["7b", "lora", 24]["peak_gib"] == 21.4
    assert all(r["fits"] for r in rows if r["arch"] == "3b") and by["3b", "lora", 24]["micro_batch"] == 4
    assert all({"card_gb", "micro_batch", "peak_gib", "fits", "lora_rank"} <= set(r) for r in rows)
    two = memory.plan(memory.shape_of("7b"), "plain", False, 1, micro_batch=2, lora_rank=64,
                      decode_chunk=by["7b", "lora", 24]["decode_chunk"], **_BATCH)
    assert two["peak"] > 22 * memory.GiB  # micro-batch 2 does not fit 24 GB with a bf16 base


def test_image_budget_sets_the_prompt_and_what_fits():
    """The plan takes the image budget: a map gets at most max_pixels / 28^2 visual tokens (the image processor's
    resize, checked on sizes by hand). At the processor's default (16,384 visual tokens per map) the paper's
    micro-batch of 8 fits nowhere; the row after each shows the largest micro-batch that fits."""
    assert memory.visual_tokens(5839, 5449, memory.DEFAULT_PIXELS) == 16236  # 133 x 122 after the resize
    assert memory.visual_tokens(5839, 5449, memory.REDUCED_PIXELS) == 34 * 37
    assert memory.visual_tokens(900, 900, memory.DEFAULT_PIXELS) == 32 * 32  # small maps are not enlarged
    assert memory.paper_batch(memory.DEFAULT_PIXELS)["prompt_len"] == 16384 + memory.PROMPT_TEXT_TOKENS
    assert memory.PAPER == memory.paper_batch(memory.REDUCED_PIXELS)
    full = {(r["scheme"], r["gpus"], r["micro_batch"]): r for r in memory.table(archs=("7b",), gpu_counts=(1, 8), cards=())}
    reduced = {(r["scheme"], r["gpus"], r["micro_batch"]): r
               for r in memory.table(max_pixels=memory.REDUCED_PIXELS, archs=("7b",), gpu_counts=(1, 8), cards=())}
    assert reduced[("stochastic+8bit", 1, 4)]["fits"] and not full[("stochastic+8bit", 1, 8)]["fits"]
    assert full[("stochastic+8bit", 1, 1)]["fits"] and full[("stochastic+8bit", 1, 1)]["recommended"]  # micro-batch 1
    assert reduced[("master", 8, 8)]["fits"] and not full[("master", 8, 8)]["fits"]
    assert full[("master", 8, 2)]["fits"] and full[("master", 8, 2)]["recommended"]
    assert all(r["max_pixels"] == memory.DEFAULT_PIXELS for r in full.values())


def test_sft_comparison_rows():
    """The SFT (LoRA rank 8) holds the bf16 base and little else; its RL at G = 4 on 8 GPUs fits an 80 GB card."""
    rows = memory.sft_rl_rows()
    assert [r["phase"] for r in rows] == ["sft (LoRA rank 8)", "rl (G 4)", "rl (G 4)"]
    base = 2 * memory.shape_of("7b")["params"] / memory.GiB
    assert base < rows[0]["peak_gib"] < memory.USABLE_GIB and rows[1]["peak_gib"] < memory.USABLE_GIB


def test_an_fsdp_rollout_holds_the_whole_model_gathered(seven_b):
    """Under torchrun the rollout gathers every FSDP unit once and keeps it (distributed.gathered): the rollout
    phase holds the whole model in bf16, of which `gathered` (the root and two layers) is already counted."""
    p = memory.plan(seven_b, "master", False, 8, decode_chunk=1, **memory.PAPER)
    kv = (memory._kv_bytes(seven_b, 8, 1300 + 2048, 2) + memory._kv_bytes(seven_b, 1, 1300, 2)
          + 5 * 8 * seven_b["vocab"] * 4)
    assert p["rollout_kv"] == kv + 2 * SEVEN_B_PARAMS - p["gathered"]
    assert memory.plan(seven_b, "master", False, 1, decode_chunk=1, **memory.PAPER)["rollout_kv"] == kv
