"""The policy: a model with its tokenizer and image processor, how a question becomes its input, forward passes.

- `load_model`: the policy train.py trains and eval.py evaluates: "tiny" (the offline stand-in,
  offline/tiny_model.py) or any Qwen2-VL / Qwen2.5-VL checkpoint, or a text-only causal LM, which then gets
  the metro map as text in the prompt (ReasonMap's symbolic setting); bf16 on CUDA.
- `encode_prompts`: chat template + map image -> left-padded prompt tensors, with Qwen2.5-VL's 3-D rotary
  positions (mrope) computed once per prompt; `join_prompt_response` appends sampled responses.
- `forward_logits` / `forward_hidden`: one forward pass with explicit positions.
Log-probs of sampled tokens and the batched decode are speed/logprobs.py and speed/decode.py.
"""
from __future__ import annotations

import copy
import json
import os
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from offline import tiny_model
from offline.tiny_model import IMAGE_TOKEN, VIDEO_TOKEN  # noqa: F401
from scaling import lora
from scaling.distributed import fsdp_entry
from scaling.precision import autocast
from transit.metro import station_lines

# Response-token budgets of the tiny default: a whole boxed answer is one token of its tokenizer, a route
# block about 48 (a real model answers in text: the paper allows 2,048).
TINY_MAX_NEW_TOKENS = 4
TINY_PLANNING_MAX_NEW_TOKENS = 48
PAPER_MAX_NEW_TOKENS = 2048  # the paper's response budget, for every question type, for any real model
BUDGETS_FILE = "rewardmap.json"  # written beside a saved policy: the token budgets it was trained with
IMAGE_CACHE_BYTES = 8 << 30
"""Host memory the preprocessed map images of a run may hold (`image_inputs`); the least recently used go first.
ReasonMap's 30 maps at a checkpoint's default budget of 12.8 M pixels: ~154 MB each in bf16, 4.6 GB in all."""


@dataclass
class Policy:
    """A model plus everything needed to prompt it and sample from it."""

    model: nn.Module
    tokenizer: object  # a transformers fast tokenizer with a chat template
    image_processor: object | None  # Qwen2-VL Pillow image processor; None for text-only models
    is_vlm: bool
    device: torch.device
    max_pixels: int | None
    min_pixels: int | None
    suppress_ids: Tensor  # token ids never sampled: special tokens except end-of-turn, unused vocab rows
    eos_id: int  # end of turn (<|im_end|>)
    pad_id: int
    images: OrderedDict = field(default_factory=OrderedDict, repr=False, compare=False)  # `image_inputs`' cache
    map_text: str = "line"  # a text model's map: "line" (by line) or "station" (by station: the demo world's)


# ----------------------------------------------------------------------------- loading and saving

def load_model(name: str, train_samples=(), seed: int = 0, cache_dir: str | Path = ".cache", max_pixels: int = 0,
               gradient_checkpointing: bool = False, dtype: torch.dtype | None = None,
               master_weights: bool = False, qlora: bool = False, world: str = "default") -> Policy:
    """The policy that train.py trains and eval.py evaluates: `name` "tiny" builds the tiny model (its
    tokenizer trained on `train_samples`, cached under `cache_dir/tiny-model`; a text-only model of
    `tiny_model.TEXT_SHAPE` when no training sample has an image), anything else is a
    checkpoint folder or hub id for `load_policy`. `max_pixels` 0 keeps the model's image budget;
    `dtype` (default: `compute_dtype()`), `master_weights` and `qlora` as in `load_policy`. `world` "demo": a text
    model is shown each map by station (`metro_as_text`), the demo world's input mode."""
    policy = _load_model(name, train_samples, seed, cache_dir, max_pixels, gradient_checkpointing, dtype,
                         master_weights, qlora)
    policy.map_text = "station" if world == "demo" else "line"
    return policy


def _load_model(name, train_samples, seed, cache_dir, max_pixels, gradient_checkpointing, dtype, master_weights,
                qlora) -> Policy:
    size = {"max_pixels": max_pixels} if max_pixels else {}
    precision = dict(dtype=dtype or compute_dtype(), master_weights=master_weights, qlora=qlora)
    if name == "tiny":  # a text model where the data has no images (the demo world): it reads the map as text
        text_only = bool(train_samples) and not any(s.image for s in train_samples)
        corpus = tiny_model.tokenizer_corpus(train_samples)
        if text_only:
            corpus += sorted({metro_as_text(s.metro, by) for s in train_samples if s.metro for by in MAP_TEXTS})
        return build_tiny_policy(seed=seed, corpus=corpus, cache_dir=str(Path(cache_dir) / "tiny-model"),
                                 text_only=text_only, **({} if text_only else size), **precision,
                                 **(tiny_model.TEXT_SHAPE if text_only else {}))
    return load_policy(name, gradient_checkpointing=gradient_checkpointing, **size, **precision)


def build_tiny_policy(seed: int = 0, corpus: list[str] | None = None, cache_dir: str | Path = ".cache/tiny-model",
                      max_pixels: int = 112 * 112, min_pixels: int = 28 * 28, text_only: bool = False,
                      device: str | None = None, dtype: torch.dtype = torch.float32, master_weights: bool = False,
                      qlora: bool = False, **shape) -> Policy:
    """The tiny offline policy (offline/tiny_model.py, built once into `cache_dir`), loaded like a checkpoint.
    `shape`: its sizes (hidden_size, num_layers, ...: `tiny_model.build_tiny_model`)."""
    path = tiny_model.build_tiny_model(seed, corpus, cache_dir, max_pixels=max_pixels, min_pixels=min_pixels,
                                       text_only=text_only, **shape)
    return load_policy(str(path), device=device, dtype=dtype, max_pixels=max_pixels, min_pixels=min_pixels,
                       master_weights=master_weights, qlora=qlora)


def allow_tf32(device: torch.device) -> None:
    """On CUDA, float32 matmuls (what stays float32 under bf16 autocast: the float32 master weights' optimizer
    arithmetic, a float32 LoRA adapter, the sampler's logits) run on TF32 tensor cores: ~10 mantissa bits in the
    products, float32 accumulation; PyTorch's default on Ampere and later is full float32 (`highest`)."""
    if torch.device(device).type == "cuda":
        torch.set_float32_matmul_precision("high")
        torch.backends.cudnn.allow_tf32 = True


def default_attn_implementation(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> str:
    """flash-attention 2 for bf16 / fp16 compute on CUDA when the optional flash-attn package imports, else
    PyTorch's SDPA (flash-attention rejects float32 inputs at the first forward)."""
    if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16):
        try:
            import flash_attn  # noqa: F401
            return "flash_attention_2"
        except ImportError:
            pass
    return "sdpa"


def load_policy(name_or_path: str, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                gradient_checkpointing: bool = False, attn_implementation: str | None = None,
                max_pixels: int | None = None, min_pixels: int | None = None, master_weights: bool = False,
                qlora: bool = False) -> Policy:
    """Load a Qwen2-VL / Qwen2.5-VL checkpoint, or a text-only causal LM (detected from the config), or a LoRA
    adapter folder that `save_policy` wrote (its base, then the adapter: lora.py; the image processor saved with
    the adapter, so its image budget is the one it was trained with).

    `dtype` is the compute dtype. Defaults: CUDA if available, bf16 there (fp32 on CPU), flash-attention 2
    when `flash_attn` imports (CUDA only), else SDPA. `max_pixels` / `min_pixels` override the checkpoint's
    image processor. `master_weights` with a bf16 `dtype`: the weights are kept in float32 and every
    forward runs under bf16 autocast (precision.py, the `master` scheme), so small updates are not lost.
    `qlora`: the weights in 4-bit NF4 (bitsandbytes, CUDA only), frozen, for LoRA adapters on top.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer

    adapter = Path(name_or_path) / lora.CONFIG_FILE
    if adapter.is_file():
        base = json.loads(adapter.read_text())["base_model_name_or_path"]
        try:
            policy = load_policy(base, device, dtype, gradient_checkpointing, attn_implementation, max_pixels,
                                 min_pixels, master_weights, qlora)
        except (OSError, ValueError) as e:
            raise ValueError(f"{name_or_path}: LoRA adapters whose base model cannot be loaded ({e}); point "
                             f"base_model_name_or_path in {adapter} at the base model's folder or hub id") from e
        lora.load_adapter(policy.model, name_or_path)
        if policy.is_vlm and (Path(name_or_path) / "preprocessor_config.json").is_file():  # the budget it trained with
            policy.image_processor = image_processor(name_or_path, max_pixels, min_pixels)
            policy.max_pixels = policy.image_processor.size["longest_edge"]
            policy.min_pixels = policy.image_processor.size["shortest_edge"]
        return policy
    check_model_path(name_or_path)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    allow_tf32(device)
    if qlora:
        lora.check_qlora(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    attn_implementation = attn_implementation or default_attn_implementation(device, dtype)
    config = AutoConfig.from_pretrained(name_or_path)
    is_vlm = getattr(config, "vision_config", None) is not None
    auto = AutoModelForImageTextToText if is_vlm else AutoModelForCausalLM
    master = master_weights and dtype != torch.float32
    model = auto.from_pretrained(name_or_path, dtype=torch.float32 if master else dtype, attn_implementation=attn_implementation,
                                 **(lora.qlora_from_pretrained_kwargs(device, dtype) if qlora else {}))
    model = model if qlora else model.to(device)  # a 4-bit model is placed by from_pretrained
    if master:
        model.autocast_dtype = dtype  # read by forward_logits (precision.autocast)
    if gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, padding_side="left")
    processor = image_processor(name_or_path, max_pixels, min_pixels) if is_vlm else None
    if processor is not None:
        max_pixels, min_pixels = processor.size["longest_edge"], processor.size["shortest_edge"]
    return _make_policy(model, tokenizer, processor, device, max_pixels, min_pixels)


def image_processor(name_or_path: str, max_pixels: int | None = None, min_pixels: int | None = None):
    """The Qwen2-VL image processor saved in `name_or_path` (Pillow-backed: no torchvision), its pixel budget
    overridden where given."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    processor = Qwen2VLImageProcessorPil.from_pretrained(name_or_path)
    if max_pixels is not None:
        processor.size["longest_edge"] = max_pixels
    if min_pixels is not None:
        processor.size["shortest_edge"] = min_pixels
    return processor


def check_model_path(name_or_path: str) -> None:
    """A clear error for a --model that cannot be a model: a folder without config.json, or a path that does not
    exist (absolute, starting with . or ~, or with more than one /). Other names are hub ids (`org/name`), for
    transformers to find."""
    path = Path(name_or_path).expanduser()
    if path.is_dir() and not (path / "config.json").is_file():
        raise ValueError(f"{name_or_path}: not a model folder (no config.json; a model folder is what "
                         "save_pretrained writes: config.json, *.safetensors, the tokenizer's files)")
    if not path.exists() and (name_or_path.startswith(("/", ".", "~")) or name_or_path.count("/") > 1):
        raise FileNotFoundError(f"{name_or_path}: no such model folder")


def _make_policy(model, tokenizer, image_processor, device, max_pixels, min_pixels) -> Policy:
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if eos is None or eos == tokenizer.unk_token_id:
        eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    vocab = model.get_output_embeddings().weight.shape[0]
    special = [i for i, t in tokenizer.added_tokens_decoder.items() if t.special and i != eos]
    suppress = sorted(set(special) | set(range(len(tokenizer), vocab)))  # also rows with no token
    return Policy(model=model, tokenizer=tokenizer, image_processor=image_processor,
                  is_vlm=image_processor is not None, device=torch.device(device), max_pixels=max_pixels,
                  min_pixels=min_pixels, suppress_ids=torch.tensor(suppress, dtype=torch.long, device=device),
                  eos_id=int(eos), pad_id=int(pad))


def token_budgets(model: str, plus: int = 0, planning: int = 0) -> tuple[int, int]:
    """(judgement / counting, planning) response-token budgets: the given ones where nonzero; else the
    budgets a policy folder saved by train.py records (`BUDGETS_FILE`); else the tiny model's 4 / 48 for
    "tiny" and the paper's 2,048 for any other model."""
    saved = Path(model) / BUDGETS_FILE
    if model == "tiny":
        default = (TINY_MAX_NEW_TOKENS, TINY_PLANNING_MAX_NEW_TOKENS)
    elif saved.is_file():
        record = json.loads(saved.read_text())
        default = (record["max_new_tokens"], record["planning_max_new_tokens"])
    else:
        default = (PAPER_MAX_NEW_TOKENS, PAPER_MAX_NEW_TOKENS)
    return plus or default[0], planning or default[1]


def trained_on(model: str) -> dict | None:
    """The data a policy folder saved by train.py was trained on ({"data", "cities", "seed"}), if it says."""
    saved = Path(model) / BUDGETS_FILE
    return json.loads(saved.read_text()).get("trained_on") if model != "tiny" and saved.is_file() else None


def compute_dtype(name: str = "") -> torch.dtype:
    """The `--dtype` flag as a torch dtype: 'float32' or 'bfloat16'; '' picks bfloat16 on CUDA, float32 on CPU."""
    if name == "":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    if name not in ("float32", "bfloat16"):
        raise ValueError(f"--dtype must be float32 or bfloat16, got {name!r}")
    return getattr(torch, name)


def reference_model(policy: Policy) -> nn.Module:
    """A frozen copy of the policy's model (eval mode, no grad): the KL anchor pi_ref (docs/rewardmap.md §4.2).
    With float32 master weights for bf16 compute, the copy is stored in bf16 (it is never updated)."""
    ref = copy.deepcopy(policy.model).eval()
    ref.requires_grad_(False)
    if getattr(ref, "autocast_dtype", None) is not None:
        ref.to(ref.autocast_dtype)
    return ref


def save_policy(policy: Policy, out_dir: str | Path, dtype: torch.dtype | None = None,
                budgets: tuple[int, int] | None = None, state_dict: dict | None = None,
                trained_on: dict | None = None) -> None:
    """HF `save_pretrained` (safetensors) + tokenizer + image processor: loadable by `load_policy` and by
    plain transformers (`AutoModelForImageTextToText` / `AutoModelForCausalLM`, `AutoTokenizer`).
    `dtype` casts the saved weights (e.g. bf16 for an export of float32 master weights); None keeps them.
    `budgets` (judgement / counting, planning tokens) go to `BUDGETS_FILE`, read by `token_budgets`, with
    `trained_on` (train.py's --data, --cities, --seed), read by `trained_on`.
    `state_dict`: the weights to save instead of the model's own (a sharded model's, gathered). A model with
    LoRA adapters saves the adapters alone, in peft's format, naming its base (lora.save_adapter)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    state = state_dict
    if dtype is not None and any(p.dtype != dtype for p in policy.model.parameters()):
        state = {k: v.detach().to(device="cpu", dtype=dtype) if v.is_floating_point() else v
                 for k, v in (state_dict or policy.model.state_dict()).items()}
    if lora.lora_layers(policy.model):
        base = policy.model.config.name_or_path
        lora.save_adapter(policy.model, out_dir, str(Path(base).resolve()) if Path(base).exists() else base)
    else:
        policy.model.save_pretrained(out_dir, safe_serialization=True, state_dict=state)
    if budgets is not None:
        (Path(out_dir) / BUDGETS_FILE).write_text(json.dumps(
            {"max_new_tokens": budgets[0], "planning_max_new_tokens": budgets[1],
             **({"trained_on": trained_on} if trained_on else {})}) + "\n")
    policy.tokenizer.save_pretrained(out_dir)
    if policy.image_processor is not None:
        policy.image_processor.save_pretrained(out_dir)


# ----------------------------------------------------------------------------- prompts


MAP_TEXTS = ("line", "station")


def metro_as_text(metro: dict[str, list[str]], by: str = "line") -> str:
    """The map as text for text-only models. `by` "line": one line per metro line with its stations in order;
    "station": one `station_row` per station, stations in the order the lines list them first. The demo world's
    model reads the second (docs/demo.md): the questions it answers ask which lines a station is on, and its working
    (variants/sft.working) copies the asked station's row."""
    if by == "line":
        return "\n".join(f"{line}: {', '.join(stations)}" for line, stations in metro.items())
    if by != "station":
        raise ValueError(f"metro_as_text: by must be one of {', '.join(MAP_TEXTS)}, got {by!r}")
    return "\n".join(station_row(station, lines) for station, lines in station_lines(metro).items())


def station_row(station: str, lines: list[str]) -> str:
    """A station's row of the map read by station: a space, its name, a space, then the labels of its lines joined
    (a line's label: its name without "Line "): ` Alder AC` for Line A and Line C. The demo world letters its lines,
    so a row is three tokens: the name as it stands in the questions (one token, with its space) and one token for
    the set of lines, which the model finds by the name alone (tools/lookup_drill.py, docs/demo.md)."""
    return f" {station} {''.join(line.removeprefix('Line ') for line in lines)}"


def chat_text(policy: Policy, sample) -> str:
    """The sample's prompt as text, before its <|image_pad|> is expanded into one token per merged patch."""
    if policy.is_vlm and sample.image:
        # the released dataset's user turn, "<image>\n" + question.strip(): the image, a newline, the question
        content = [{"type": "image"}, {"type": "text", "text": "\n" + sample.question.strip()}]
    else:
        content = f"{metro_as_text(sample.metro, policy.map_text)}\n\n{sample.question}" if sample.metro \
            else sample.question
    return policy.tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                add_generation_prompt=True)


def prompt_length(policy: Policy, sample) -> int:
    """Tokens of the sample's prompt, as `encode_prompts` builds it, from the image's size alone (no pixels read):
    the image processor's resize (`smart_resize`) gives its grid, one token per merged patch."""
    from PIL import Image
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    n = len(policy.tokenizer(chat_text(policy, sample), add_special_tokens=False)["input_ids"])
    if policy.is_vlm and sample.image:
        proc = policy.image_processor
        with Image.open(sample.image) as im:
            width, height = im.size
        h, w = smart_resize(height, width, factor=proc.patch_size * proc.merge_size,
                            min_pixels=proc.size["shortest_edge"], max_pixels=proc.size["longest_edge"])
        n += (h // proc.patch_size) * (w // proc.patch_size) // proc.merge_size ** 2 - 1  # the pad, expanded
    return n


def drop_long_prompts(policy: Policy, samples: list, limit: int, report: bool = True) -> list:
    """The samples whose prompt has at most `limit` tokens (`prompt_length`); the others are counted and, with
    `report`, reported per question type (train.py's --max-prompt-tokens, the released loader's cap)."""
    long = [prompt_length(policy, s) > limit for s in samples]
    if any(long) and report:
        per_type = Counter(s.qtype for s, cut in zip(samples, long) if cut)
        print(f"--max-prompt-tokens {limit}: dropped {sum(long)} of {len(samples)} training questions with longer "
              f"prompts ({', '.join(f'{q} {n}' for q, n in sorted(per_type.items()))})")
    return [s for s, cut in zip(samples, long) if not cut]


def encode_prompts(policy: Policy, samples) -> dict:
    """Chat-template the samples' questions (with their images) into left-padded prompt tensors.

    Returns `input_ids`, `attention_mask` [B, L]; `position_ids` ([3, B, L] mrope for VLMs, [B, L]
    otherwise; 0 on padding); `next_pos` [B], the rotary position of the first response token;
    for VLMs with images `pixel_values`, `image_grid_thw` and `image_index` [B] (-1: no image).
    Text-only policies (and image-less samples) get the metro map as text before the question. The user turn
    is the released dataset's (verl/utils/rl_dataset.py: `"<image>\n" + question.strip()`), under the chat
    template's default system prompt: in Qwen2.5-VL's template, `<|im_start|>system\nYou are a helpful
    assistant.<|im_end|>\n<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>\n{question}<|im_end|>
    \n<|im_start|>assistant\n` (tests/test_model.py checks it token for token).
    """
    tok, texts = policy.tokenizer, [chat_text(policy, s) for s in samples]
    images = [image_inputs(policy, s.image) for s in samples if policy.is_vlm and s.image]  # [speed] once per run
    out = {}
    if images:
        vis = {"pixel_values": torch.cat([pv for pv, _ in images]), "image_grid_thw": torch.cat([g for _, g in images])}
        merge = policy.image_processor.merge_size ** 2
        k = 0
        for i, s in enumerate(samples):  # expand the single <|image_pad|> into one token per merged patch
            if policy.is_vlm and s.image:
                texts[i] = texts[i].replace(IMAGE_TOKEN, IMAGE_TOKEN * int(vis["image_grid_thw"][k].prod() // merge), 1)
                k += 1
        out["pixel_values"] = vis["pixel_values"].to(policy.device, policy.model.dtype)
        out["image_grid_thw"] = vis["image_grid_thw"].to(policy.device)
        has = torch.tensor([bool(policy.is_vlm and s.image) for s in samples])
        out["image_index"] = torch.where(has, has.long().cumsum(0) - 1, -1).to(policy.device)
    enc = tok(texts, add_special_tokens=False, padding=True, return_tensors="pt")
    ids, mask = enc["input_ids"].to(policy.device), enc["attention_mask"].to(policy.device)
    if policy.is_vlm:
        # Qwen2.5-VL mrope (transformers get_rope_index): text tokens advance (t, h, w) together, image
        # tokens get their (t, h, w) grid coordinates; the next text position is max(position) + 1.
        image_id = policy.model.config.image_token_id
        pos, _ = policy.model.model.get_rope_index(ids, mm_token_type_ids=(ids == image_id).int(),
                                                   image_grid_thw=out.get("image_grid_thw"), attention_mask=mask)
        out["next_pos"] = pos.amax(dim=(0, 2)) + 1
    else:
        pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
        out["next_pos"] = mask.sum(-1)
    out.update(input_ids=ids, attention_mask=mask, position_ids=pos)
    return out


def join_prompt_response(prompts: dict, prompt_index: Tensor, response_ids: Tensor, response_mask: Tensor) -> dict:
    """Full-sequence batch for `response_logprobs`: row n = prompt `prompt_index[n]` + its response.

    Responses are right-padded to a common length T, so the response occupies the last T columns.
    Rotary positions continue the prompt's (`next_pos + t`), exactly as in the KV-cached decode.
    """
    T = response_ids.shape[1]
    pos = prompts["position_ids"][..., prompt_index, :]
    resp_pos = prompts["next_pos"][prompt_index, None] + torch.arange(T, device=response_ids.device)
    resp_pos = resp_pos.expand(pos.shape[:-1] + (T,)) if pos.dim() == 3 else resp_pos
    batch = dict(input_ids=torch.cat([prompts["input_ids"][prompt_index], response_ids], 1),
                 attention_mask=torch.cat([prompts["attention_mask"][prompt_index], response_mask.long()], 1),
                 position_ids=torch.cat([pos, resp_pos], -1), response_len=T)
    if "pixel_values" in prompts:  # keep only the images these rows use (the encoder runs once per image)
        used = prompts["image_index"][prompt_index]
        has = used >= 0
        if not has.any():
            return batch
        uniq, inv = torch.unique(used[has], return_inverse=True)
        grid = prompts["image_grid_thw"]
        sizes = grid.prod(-1).tolist()
        starts = [0] + list(torch.tensor(sizes).cumsum(0).tolist())
        pv = prompts["pixel_values"]
        batch.update(pixel_values=torch.cat([pv[starts[i]:starts[i] + sizes[i]] for i in uniq.tolist()]),
                     image_grid_thw=grid[uniq], row_image=torch.full_like(used, -1).masked_scatter(has, inv))
    return batch


def image_inputs(policy: Policy, path: str) -> tuple[Tensor, Tensor]:
    """(pixel_values [patches, 3 x 2 x 14 x 14] in the model's dtype, image_grid_thw [1, 3]) of the image file at
    `path` under the policy's image budget, on the CPU. [speed] Decoded, resized and normalised once per run:
    ReasonMap has ~30 maps, asked for at every step that uses them (1.9 s for one 32 MP map on a busy 2-core CPU,
    serial with the GPU). Kept in `policy.images`, keyed by the file (path, size, modification time) and the
    budget, up to `IMAGE_CACHE_BYTES` (least recently used out first: at full resolution a map is ~0.4-0.8 GB)."""
    from PIL import Image

    proc, stat = policy.image_processor, os.stat(path)
    key = (os.path.abspath(path), stat.st_size, stat.st_mtime_ns, proc.size["longest_edge"], proc.size["shortest_edge"])
    if key in policy.images:
        policy.images.move_to_end(key)
        return policy.images[key]
    with Image.open(path) as image:
        vis = proc(images=[image.convert("RGB")], return_tensors="pt")
    policy.images[key] = entry = (vis["pixel_values"].to(policy.model.dtype), vis["image_grid_thw"])
    while len(policy.images) > 1 and sum(v[0].nbytes for v in policy.images.values()) > IMAGE_CACHE_BYTES:
        policy.images.popitem(last=False)
    return entry


# ----------------------------------------------------------------------------- forward passes

def kv_cache(output):
    """The KV cache a forward returned (`output.cache`, or `output.past_key_values` in older transformers)."""
    return output.cache if hasattr(output, "cache") else output.past_key_values


def embed_inputs(model: nn.Module, batch: dict) -> Tensor:
    """Token embeddings with image features scattered into the <|image_pad|> slots.

    The vision encoder runs once per distinct image; rows sharing a prompt (a GRPO group) reuse its
    features (`row_image` maps rows to images), and gradients flow back through the shared features.
    """
    ids = batch["input_ids"]
    embeds = model.get_input_embeddings()(ids)
    if batch.get("pixel_values") is None:
        return embeds
    out = model.get_image_features(batch["pixel_values"], batch["image_grid_thw"])
    feats = out.pooler_output if hasattr(out, "pooler_output") else out  # tuple: one tensor per image
    row_image = batch.get("row_image")
    rows = list(range(len(feats))) if row_image is None else [i for i in row_image.tolist() if i >= 0]
    if not rows:
        return embeds
    image_embeds = torch.cat([feats[i] for i in rows]).to(embeds.dtype)
    slots = (ids == model.config.image_token_id).unsqueeze(-1)
    return embeds.masked_scatter(slots, image_embeds)


@fsdp_entry
def forward_logits(model: nn.Module, batch: dict, cache=None, use_cache: bool = False, logits_to_keep: int = 0):
    """One forward pass with explicit positions (no hidden rope_deltas state); returns the model output
    (`.logits`, and the KV cache when `use_cache` or a `cache` is given)."""
    with autocast(model):  # bf16 compute over float32 master weights, when the model keeps them
        return model(inputs_embeds=embed_inputs(model, batch), attention_mask=batch["attention_mask"],
                     position_ids=batch["position_ids"], use_cache=use_cache or cache is not None,
                     logits_to_keep=logits_to_keep, cache=cache)


@fsdp_entry
def forward_hidden(model: nn.Module, batch: dict, cache=None, use_cache: bool = False):
    """`forward_logits` without the LM head: the decoder's output (`.last_hidden_state`, and the KV cache when
    `use_cache` or a `cache` is given), for `head_logprobs` to turn into log-probs a chunk at a time."""
    decoder = model.model
    with autocast(model):
        return decoder(inputs_embeds=embed_inputs(model, batch), attention_mask=batch["attention_mask"],
                       position_ids=batch["position_ids"], use_cache=use_cache or cache is not None,
                       cache=cache)
