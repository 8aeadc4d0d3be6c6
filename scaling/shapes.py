"""Qwen2.5-VL-3B and -7B as published (their config.json values), for models built without downloading weights:
the memory plan's parameter counts (scaling/memory.py) and the benchmark's random-init models (tools/bench.py)."""
from __future__ import annotations

import torch

from offline import tiny_model

# Qwen2.5-VL published config values (config.json of Qwen/Qwen2.5-VL-{3B,7B}-Instruct).
VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14, spatial_merge_size=2,
               temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31], hidden_act="silu")
QWEN25_VL = {
    "3b": dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
               num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, rms_norm_eps=1e-6,
               max_position_embeddings=128000, rope_theta=1e6, mrope_section=[16, 24, 24]),
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False, rms_norm_eps=1e-6,
               max_position_embeddings=128000, rope_theta=1e6, mrope_section=[16, 24, 24]),
}


def shape_config(arch: str, tok, vision: dict | None = None, **text):
    """Qwen2.5-VL config at the published size, with this tokenizer's special-token ids. `text` / `vision` override
    fields of the language model / vision tower (e.g. num_hidden_layers=2: the real widths, two layers); a shallower
    tower keeps the published full-attention blocks it still has, else makes its last block one."""
    from transformers import Qwen2_5_VLConfig

    a = {**QWEN25_VL[arch], **text}
    rope = {"rope_type": "default", "rope_theta": a.pop("rope_theta"), "mrope_section": a.pop("mrope_section")}
    ids = tok.convert_tokens_to_ids
    vision = {**VISION, "out_hidden_size": a["hidden_size"], **(vision or {})}
    vision["fullatt_block_indexes"] = [i for i in vision["fullatt_block_indexes"] if i < vision["depth"]] or [vision["depth"] - 1]
    return Qwen2_5_VLConfig(text_config=dict(a, rope_parameters=rope), vision_config=vision,
                            tie_word_embeddings=a["tie_word_embeddings"], image_token_id=ids("<|image_pad|>"),
                            video_token_id=ids("<|video_pad|>"), vision_start_token_id=ids("<|vision_start|>"),
                            vision_end_token_id=ids("<|vision_end|>"))


def count_shape_params(arch: str) -> dict:
    """Build the shape model on the meta device (no memory) and count parameters."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    cfg = shape_config(arch, tiny_model.build_tokenizer(tiny_model.builtin_corpus()))
    with torch.device("meta"):
        m = Qwen2_5_VLForConditionalGeneration(cfg)
    total = sum(p.numel() for p in m.parameters())
    vision = sum(p.numel() for p in m.model.visual.parameters())
    embed = m.get_input_embeddings().weight.numel()
    return {"params": total, "vision_params": vision, "lm_params": total - vision, "embed_params": embed,
            "tied": bool(cfg.tie_word_embeddings)}
