"""The benchmark's workloads: seeded questions about one synthetic city, and the policies they run on (the tiny
models, or Qwen2.5-VL-3B / 7B's published architecture with random weights). Shared by tools/bench.py,
tools/decode_bench.py and tools/gpu_check.py."""
from __future__ import annotations

import dataclasses
import functools
import random
import zlib
from pathlib import Path

import torch

from offline import tiny_model
from scaling.shapes import shape_config


@dataclasses.dataclass
class Workload:
    """One benchmark setting: model kind and size, prompts x G x new tokens, memory savers."""

    name: str
    kind: str  # "text" (tiny Qwen2), "vlm" (tiny Qwen2.5-VL), "shape" (real Qwen2.5-VL architecture)
    prompts: int = 4  # prompts per step
    group_size: int = 8
    max_new_tokens: int = 64
    micro_batch_size: int = 32
    arch: str | None = None  # "3b" / "7b" for shape workloads
    gradient_checkpointing: bool = False
    eight_bit: bool = False
    max_pixels: int = 112 * 112
    map_text: bool = True  # text workloads: the map as text before the question (False: the question alone)


WORKLOADS = {
    "tiny-text": Workload("tiny-text", "text"),
    "tiny-text-short": Workload("tiny-text-short", "text", map_text=False),
    "tiny-vlm": Workload("tiny-vlm", "vlm"),
    "qwen2.5-vl-3b-shape": Workload("qwen2.5-vl-3b-shape", "shape", prompts=4, max_new_tokens=1024, micro_batch_size=8,
                                    arch="3b", gradient_checkpointing=True, eight_bit=True, max_pixels=1280 * 28 * 28),
    "qwen2.5-vl-7b-shape": Workload("qwen2.5-vl-7b-shape", "shape", prompts=2, max_new_tokens=2048, micro_batch_size=4,
                                    arch="7b", gradient_checkpointing=True, eight_bit=True, max_pixels=1280 * 28 * 28),
}


# ----------------------------------------------------------------------------- workload construction

def bench_samples(n: int, with_images: bool, image_dir: Path, seed: int = 0):
    """n questions (mixed types) about one seeded synthetic city; its map rendered when `with_images`."""
    from offline.maps import generate_city, render_map
    from offline.synthetic import make_questions

    city = generate_city(zlib.crc32(f"bench:{seed}".encode()), "easy")
    questions = make_questions(city.metro, random.Random(seed), 2, city=city.slug)
    picked = [questions[i * len(questions) // n] for i in range(n)]  # spread over the question types
    image = None
    if with_images:
        image = image_dir / f"bench-map-{seed}.png"
        if not image.exists():
            image.parent.mkdir(parents=True, exist_ok=True)
            render_map(city, image)
    return [dataclasses.replace(s, image=str(image) if image else None) for s in picked]


def make_policy(w: Workload, device: torch.device, cache_dir: Path):
    """The workload's policy: the tiny model, or the real architecture with random bf16 weights on the GPU."""
    import model as M

    if w.kind in ("text", "vlm"):
        return M.build_tiny_policy(seed=0, cache_dir=cache_dir / "tiny-model", text_only=w.kind == "text",
                                   device=str(device))
    policy = shape_policy(w.arch, device, torch.bfloat16, w.max_pixels)
    if w.gradient_checkpointing:
        policy.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return policy


def shape_policy(arch: str, device: torch.device, dtype: torch.dtype = torch.bfloat16, max_pixels: int = 1280 * 28 * 28,
                 vision: dict | None = None, seed: int = 0, **text):
    """A policy of Qwen2.5-VL-3B's / -7B's published architecture (scaling/shapes.py; `vision` / `text` override
    its fields, e.g. num_hidden_layers=2) with random weights made on `device` in `dtype` (nothing can be
    downloaded), the project's small tokenizer and an image processor of budget `max_pixels`."""
    import model as M
    from transformers import Qwen2_5_VLForConditionalGeneration

    tok = shape_tokenizer()
    torch.manual_seed(seed)
    attn = M.default_attn_implementation(torch.device(device), dtype)
    cfg = shape_config(arch, tok, vision, **text)
    cfg._attn_implementation = attn
    with torch.device(device):  # random weights straight on the device, in the compute dtype
        model = Qwen2_5_VLForConditionalGeneration._from_config(cfg, dtype=dtype, attn_implementation=attn)
    proc = tiny_model.make_image_processor(14, 2, max_pixels, 56 * 56)
    return M._make_policy(model, tok, proc, device, max_pixels, 56 * 56)


@functools.lru_cache(maxsize=1)
def shape_tokenizer():
    """The project's small tokenizer (offline/tiny_model.py) for the shape models: trained once per process."""
    return tiny_model.build_tokenizer(tiny_model.builtin_corpus())


def force_full_length(policy):
    """Never sample end-of-turn: every response is exactly max_new_tokens (the same work on both sides)."""
    ids = torch.cat([policy.suppress_ids, torch.tensor([policy.eos_id], device=policy.suppress_ids.device)])
    return dataclasses.replace(policy, suppress_ids=ids)
