"""Policy models: the offline tiny Qwen2.5-VL kit, real HF checkpoints, prompts and log-probs.

Everything the GRPO loop needs from a model lives here:

- `build_tiny_policy`: a randomly initialised Qwen2.5-VL-architecture model (well under 10M parameters)
  with a byte-level BPE tokenizer trained by the project, a Qwen-style chat template and a Pillow image
  processor (no torchvision). Deterministic from a seed and cached on disk. `text_only=True` gives a tiny
  Qwen2 causal LM (~0.6M parameters) with the same tokenizer, for benchmarks against TRL.
- `load_policy`: any Qwen2-VL / Qwen2.5-VL checkpoint (or a text-only causal LM, which then gets the metro
  map as text in the prompt: ReasonMap's symbolic setting), bf16 + flash-attention 2 / SDPA on CUDA.
- `encode_prompts` (prompts.py): chat template + image -> left-padded prompt tensors, with Qwen2.5-VL's 3-D rotary
  positions (mrope) computed once per prompt.
- `response_logprobs` / `shared_prompt_logprobs`: per-token log-probs of response tokens, the LM head fused
  with the log-softmax a chunk of rows at a time (`head_logprobs`): no [rows, T, vocab] logits.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

import lora
from distributed import fsdp_entry
from precision import autocast
from prompts import IMAGE_TOKEN, VIDEO_TOKEN, encode_prompts, join_prompt_response, metro_as_text  # noqa: F401

TINY_VERSION = 2  # bump when build_tiny_policy changes what it builds (part of the cache key)
# Response-token budgets of the tiny default: a whole boxed answer is one token of its tokenizer, a route
# block about 48 (a real model answers in text: the paper allows 2,048).
TINY_MAX_NEW_TOKENS = 4
TINY_PLANNING_MAX_NEW_TOKENS = 48
PAPER_MAX_NEW_TOKENS = 2048  # the paper's response budget, for every question type, for any real model
BUDGETS_FILE = "rewardmap.json"  # written beside a saved policy: the token budgets it was trained with
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  IMAGE_TOKEN, VIDEO_TOKEN]
# Qwen2-VL's chat template, minus the default system prompt (shorter prompts for the tiny model).
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


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


# ----------------------------------------------------------------------------- tokenizer + tiny models

def builtin_corpus() -> list[str]:
    """Deterministic text covering the question templates (docs/rewardmap.md §2.2),, answers and the route format (tokenizer training)."""
    stations = ["Alder", "Birch", "Cedar", "Dove", "Elm", "Fern", "Grove", "Harbor", "Iris", "Juniper",
                "Kings Cross", "Lake", "Maple", "North Gate", "Oak", "Pine", "Queens", "River", "South Park"]
    out = ['What colour fills the image: red or blue? Put your answer in one "\\boxed{}".', "red", "blue", "yes", "no"]
    out += ["\\boxed{red}", "\\boxed{blue}"] * 4  # the toy task's answers (tests, the learning check)
    for k, s in enumerate(stations):
        a, b, line = f"{s} Station", f"{stations[(k + 3) % len(stations)]} Station", f"Line {k % 9 + 1}"
        out += [
            f'Please solve the problem and put your answer (only answer yes or no) in one "\\boxed{{}}". '
            f"According to the subway map, is it true that {a} is the same line as {b}?",
            f'Please solve the problem and put your answer (only answer yes or no) in one "\\boxed{{}}". '
            f"According to the subway map, is it true that {a} is on the line {line}?",
            f'Please solve the problem and put your answer in one "\\boxed{{}}". According to the subway map, '
            f"how many lines pass through {a}?",
            'Please solve the problem and put your answer in one "\\boxed{}". According to the subway map, '
            "how many subway (metro) lines are there in total?",
            f'Please solve the multiple choice problem and put your answer (one of ABCD) in one "\\boxed{{}}". '
            f"According to the subway map, how many intermediate stops are there between {a} and {b} "
            f"(except for this two stops)? \nA) {k % 4} \nB) {k % 4 + 1} \nC) {k % 4 + 2} \nD) {k % 4 + 3} \n",
            f"According to the subway map, how do I get from {a} to {b}? Provide only one optimal route, with "
            "only the line name and the departure and arrival stations. The format should be strictly followed:",
            f"Route Name: {line}\nDeparture Stop: {a}\nArrival Stop: {b}\nNumber of Via Stops: {k % 5}\n"
            f"Via Stops: {stations[(k + 1) % len(stations)]} Station\n--\n",
            f"{line}: {', '.join(stations[k:] + stations[:k])}",
            f"\\boxed{{yes}} \\boxed{{no}} \\boxed{{{k % 4}}} \\boxed{{{'ABCD'[k % 4]}}} \\boxed{{{k + 2}}}",
        ]
    return out


def build_tokenizer(corpus: list[str], vocab_size: int = 1024):
    """Byte-level BPE trained on `corpus`, with Qwen's chat/vision special tokens.

    Unlike Qwen's tokenizer there is no regex pre-split (`use_regex=False`), so merges may cross spaces
    and punctuation: frequent whole answers such as `\\boxed{yes}` or `Route Name: ` become single
    tokens and template sentences a few tokens. A random-init model then emits a well-formed answer by
    chance often enough (about 1 token in vocab_size) for GRPO to find a reward signal from step one;
    with Qwen's split, `\\boxed{yes}` is 5 tokens and a random model essentially never writes it.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   padding_side="left")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_policy(seed: int = 0, corpus: list[str] | None = None, cache_dir: str | Path = ".cache/tiny-model",
                      vocab_size: int = 1024, hidden_size: int | None = None, num_layers: int = 2,
                      num_heads: int = 4, num_kv_heads: int = 2, intermediate_size: int | None = None, vision_depth: int = 1,
                      vision_hidden: int = 32, patch_size: int = 14, max_pixels: int = 112 * 112,
                      min_pixels: int = 28 * 28, text_only: bool = False, device: str | None = None,
                      dtype: torch.dtype = torch.float32, master_weights: bool = False, qlora: bool = False) -> Policy:
    """The tiny offline policy: built deterministically from `seed`, cached under `cache_dir/<key>`.

    `corpus` is extra tokenizer-training text (e.g. the dataset's questions and answers), added to
    `builtin_corpus()`. The cache key hashes every argument that changes the result, so a cache hit
    is the same model a fresh build would give. `text_only=True`: a Qwen2 causal LM instead (no vision).
    Defaults: VLM 64 wide / 256 MLP (~0.24M parameters), text-only 128 wide / 512 MLP (~0.6M).
    Built in float32; `dtype`, `master_weights` and `qlora` are how it is loaded (as in `load_policy`).
    """
    hidden_size = hidden_size or (128 if text_only else 64)
    intermediate_size = intermediate_size or 4 * hidden_size
    knobs = dict(version=TINY_VERSION, seed=seed, corpus=list(corpus or []), vocab_size=vocab_size,
                 hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads, num_kv_heads=num_kv_heads,
                 intermediate_size=intermediate_size, vision_depth=vision_depth, vision_hidden=vision_hidden,
                 patch_size=patch_size, max_pixels=max_pixels, min_pixels=min_pixels, text_only=text_only)
    key = hashlib.sha256(json.dumps(knobs, sort_keys=True).encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"{'qwen2' if text_only else 'qwen2_5_vl'}-{key}"
    if not (path / "config.json").exists():
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Config, Qwen2ForCausalLM

        tok = build_tokenizer(builtin_corpus() + list(corpus or []), vocab_size)
        ids = tok.convert_tokens_to_ids
        text = dict(vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=intermediate_size,
                    num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                    max_position_embeddings=4096, bos_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|im_end|>"),
                    pad_token_id=ids("<|endoftext|>"), tie_word_embeddings=True)
        torch.manual_seed(seed)
        if text_only:
            model = Qwen2ForCausalLM(Qwen2Config(**text, rope_parameters={"rope_type": "default", "rope_theta": 1e4}))
            image_processor = None
        else:
            half = hidden_size // num_heads // 2  # mrope splits the rotary half-dim into (t, h, w) sections
            section = [half - 2 * (half * 3 // 8), half * 3 // 8, half * 3 // 8]
            text["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e4, "mrope_section": section}
            vision = dict(depth=vision_depth, hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
                          num_heads=2, patch_size=patch_size, spatial_merge_size=2, temporal_patch_size=2,
                          window_size=4 * patch_size * 2, out_hidden_size=hidden_size,
                          fullatt_block_indexes=list(range(vision_depth)))
            config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True,
                                      image_token_id=ids(IMAGE_TOKEN), video_token_id=ids(VIDEO_TOKEN),
                                      vision_start_token_id=ids("<|vision_start|>"),
                                      vision_end_token_id=ids("<|vision_end|>"))
            model = Qwen2_5_VLForConditionalGeneration(config)
            image_processor = make_image_processor(patch_size, 2, max_pixels, min_pixels)
        policy = _make_policy(model, tok, image_processor, torch.device("cpu"), max_pixels, min_pixels)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=".tmp-"))
        save_policy(policy, tmp)
        try:
            os.replace(tmp, path)  # atomic: a concurrent builder of the same key wrote identical files
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    return load_policy(str(path), device=device, dtype=dtype, max_pixels=max_pixels, min_pixels=min_pixels,
                       master_weights=master_weights, qlora=qlora)


def make_image_processor(patch_size: int = 14, merge_size: int = 2, max_pixels: int = 112 * 112,
                         min_pixels: int = 28 * 28):
    """transformers' Pillow-backed Qwen2-VL image processor (no torchvision needed)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(patch_size=patch_size, merge_size=merge_size, temporal_patch_size=2,
                                    min_pixels=min_pixels, max_pixels=max_pixels)


# ----------------------------------------------------------------------------- real models

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
    adapter folder that `save_policy` wrote (its base, then the adapter: lora.py).

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
        policy = load_policy(base, device, dtype, gradient_checkpointing, attn_implementation, max_pixels, min_pixels,
                             master_weights, qlora)
        lora.load_adapter(policy.model, name_or_path)
        return policy
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
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
    image_processor = None
    if is_vlm:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        image_processor = Qwen2VLImageProcessorPil.from_pretrained(name_or_path)
        if max_pixels is not None:
            image_processor.size["longest_edge"] = max_pixels
        if min_pixels is not None:
            image_processor.size["shortest_edge"] = min_pixels
        max_pixels, min_pixels = image_processor.size["longest_edge"], image_processor.size["shortest_edge"]
    return _make_policy(model, tokenizer, image_processor, device, max_pixels, min_pixels)


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


def tokenizer_corpus(train_samples) -> list[str]:
    """Text the tiny model's tokenizer is trained on: the training questions, and the answers in the
    form a response gives them (`\\boxed{yes}`; planning: the route block)."""
    answers = [s.answer if s.qtype == "planning" else f"\\boxed{{{s.answer}}}" for s in train_samples]
    return [s.question for s in train_samples] + answers


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


def compute_dtype(name: str = "") -> torch.dtype:
    """The `--dtype` flag as a torch dtype: 'float32' or 'bfloat16'; '' picks bfloat16 on CUDA, float32 on CPU."""
    if name == "":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    if name not in ("float32", "bfloat16"):
        raise ValueError(f"--dtype must be float32 or bfloat16, got {name!r}")
    return getattr(torch, name)


def load_model(name: str, train_samples=(), seed: int = 0, cache_dir: str | Path = ".cache", max_pixels: int = 0,
               gradient_checkpointing: bool = False, dtype: torch.dtype | None = None,
               master_weights: bool = False, qlora: bool = False) -> Policy:
    """The policy that train.py trains and eval.py evaluates: `name` "tiny" builds the tiny model (its
    tokenizer trained on `train_samples`, cached under `cache_dir/tiny-model`), anything else is a
    checkpoint folder or hub id for `load_policy`. `max_pixels` 0 keeps the model's image budget;
    `dtype` (default: `compute_dtype()`), `master_weights` and `qlora` as in `load_policy`."""
    size = {"max_pixels": max_pixels} if max_pixels else {}
    precision = dict(dtype=dtype or compute_dtype(), master_weights=master_weights, qlora=qlora)
    if name == "tiny":
        return build_tiny_policy(seed=seed, corpus=tokenizer_corpus(train_samples),
                                 cache_dir=str(Path(cache_dir) / "tiny-model"), **size, **precision)
    return load_policy(name, gradient_checkpointing=gradient_checkpointing, **size, **precision)


def reference_model(policy: Policy) -> nn.Module:
    """A frozen copy of the policy's model (eval mode, no grad): the KL anchor pi_ref (docs/rewardmap.md §4.2).
    With float32 master weights for bf16 compute, the copy is stored in bf16 (it is never updated)."""
    ref = copy.deepcopy(policy.model).eval()
    ref.requires_grad_(False)
    if getattr(ref, "autocast_dtype", None) is not None:
        ref.to(ref.autocast_dtype)
    return ref


def save_policy(policy: Policy, out_dir: str | Path, dtype: torch.dtype | None = None,
                budgets: tuple[int, int] | None = None, state_dict: dict | None = None) -> None:
    """HF `save_pretrained` (safetensors) + tokenizer + image processor: loadable by `load_policy` and by
    plain transformers (`AutoModelForImageTextToText` / `AutoModelForCausalLM`, `AutoTokenizer`).
    `dtype` casts the saved weights (e.g. bf16 for an export of float32 master weights); None keeps them.
    `budgets` (judgement / counting, planning tokens) go to `BUDGETS_FILE`, read by `token_budgets`.
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
            {"max_new_tokens": budgets[0], "planning_max_new_tokens": budgets[1]}) + "\n")
    policy.tokenizer.save_pretrained(out_dir)
    if policy.image_processor is not None:
        policy.image_processor.save_pretrained(out_dir)


# ----------------------------------------------------------------------------- forward + log-probs

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


class _HeadLogProbs(torch.autograd.Function):
    """log p(token) = z[token] - logsumexp(z) with z = h W^T (+ s (h A^T) B^T for a LoRA adapter on the head) from
    hidden states h [R, H], the LM head W [V, H] and, when given, the adapter A [r, H], B [V, r] and scale s,
    `chunk` rows at a time, and (when asked) the entropy of each row's distribution.

    The LM head and the log-softmax are computed together: forward keeps only h, W (A, B) and per-row values;
    backward recomputes one chunk's logits at a time, so no [rows, vocab] tensor ever exists beyond one chunk (at
    7B a micro-batch's logits would be [8, 2049, 152064] = 4.6 GiB in bf16). Gradients: with dz = g (onehot - p)
    (- g_H p (log p + H) for the entropy), dh = dz W and dW = dz^T h, accumulated over chunks in float32; with an
    adapter, u = h A^T: dB = s dz^T u, dA = s (dz B)^T h, and dh gains s (dz B) A. dW is only computed when W
    trains (a frozen LoRA base never holds a [V, H] float32 gradient).
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, lora_a: Tensor | None, lora_b: Tensor | None, scale: float,
                tokens: Tensor, chunk: int, with_entropy: bool):
        w = weight.to(hidden.dtype)
        logp, entropy = [], []
        for h, tk in zip(hidden.split(chunk), tokens.split(chunk)):
            z = _head_logits(h, w, lora_a, lora_b, scale)
            lse = z.logsumexp(-1)
            logp.append(z.gather(-1, tk[:, None]).squeeze(-1) - lse)
            if with_entropy:
                entropy.append(lse - ((z - lse[:, None]).exp() * z).sum(-1))
        logp = torch.cat(logp)
        entropy = torch.cat(entropy) if with_entropy else logp.new_zeros(0)
        ctx.save_for_backward(hidden, weight, lora_a, lora_b, tokens, entropy)
        ctx.chunk, ctx.scale = chunk, scale
        return logp, entropy

    @staticmethod
    def backward(ctx, grad: Tensor, grad_entropy: Tensor):
        hidden, weight, lora_a, lora_b, tokens, entropy = ctx.saved_tensors
        with_entropy = entropy.numel() > 0 and grad_entropy is not None
        s, w = ctx.scale, weight.to(hidden.dtype)
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if ctx.needs_input_grad[1] else None
        grad_a = torch.zeros_like(lora_a) if lora_a is not None else None
        grad_b = torch.zeros_like(lora_b) if lora_b is not None else None
        for start in range(0, hidden.shape[0], ctx.chunk):
            rows = slice(start, start + ctx.chunk)
            h, tk, g = hidden[rows], tokens[rows], grad[rows]
            logp = _head_logits(h, w, lora_a, lora_b, s).log_softmax(-1)
            p = logp.exp()
            dz = -p * g[:, None]
            dz.scatter_add_(-1, tk[:, None], g[:, None])
            if with_entropy:
                dz -= p * (logp + entropy[rows, None]) * grad_entropy[rows, None]
            if lora_a is not None:  # the adapter's path in its own (float32) dtype, as LoraLinear computes it
                hf, dzf = h.to(lora_a.dtype), dz.to(lora_b.dtype)
                dzb = dzf @ lora_b
                grad_b += s * (dzf.T @ (hf @ lora_a.T))
                grad_a += s * (dzb.T @ hf)
            dz = dz.to(hidden.dtype)
            grad_hidden[rows] = dz @ w
            if lora_a is not None:
                grad_hidden[rows] += (s * (dzb @ lora_a)).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight += (dz.T @ h).float()
        grad_weight = grad_weight.to(weight.dtype) if grad_weight is not None else None
        return grad_hidden, grad_weight, grad_a, grad_b, None, None, None, None


def _head_logits(h: Tensor, w: Tensor, lora_a: Tensor | None, lora_b: Tensor | None, scale: float) -> Tensor:
    """One chunk's logits in float32: h W^T, plus s (h A^T) B^T with an adapter on the head."""
    z = (h @ w.T).float()
    if lora_a is not None:
        z = z + scale * ((h.to(lora_a.dtype) @ lora_a.T) @ lora_b.T).float()
    return z


def head_logprobs(model: nn.Module, hidden: Tensor, tokens: Tensor, chunk: int | None = None,
                  with_entropy: bool = False):
    """Log-probs [N, T] (float32) of `tokens` [N, T] given the decoder's `hidden` [N, T, H] that predict
    them, through the model's LM head without materialising the [N, T, vocab] logits (`_HeadLogProbs`);
    with `with_entropy`, the pair (logp, entropy). A LoRA adapter on the head (lora.LoraLinear) is included
    unless it is disabled (the reference policy)."""
    head = model.get_output_embeddings()
    a = b = None
    scale = 1.0
    if isinstance(head, lora.LoraLinear):
        if not head.disabled:
            a, b, scale = head.lora_A.weight, head.lora_B.weight, head.scaling
        head = head.base_layer
    weight = head.weight
    shape, chunk = tokens.shape, _rows_per_chunk(weight.shape[0], chunk)
    logp, entropy = _HeadLogProbs.apply(hidden.reshape(-1, hidden.shape[-1]), weight, a, b, scale,
                                        tokens.reshape(-1), chunk, with_entropy)
    return (logp.view(shape), entropy.view(shape)) if with_entropy else logp.view(shape)


def _rows_per_chunk(vocab: int, chunk: int | None) -> int:
    """Rows per chunk: by default a float32 [rows, vocab] block of ~256 MB (e.g. ~440 rows for Qwen's 152k)."""
    return chunk or max(1, (1 << 26) // vocab)


@fsdp_entry
def response_logprobs(model: nn.Module, batch: dict, chunk: int | None = None, with_entropy: bool = False):
    """Per-token log-probs [N, T] (float32) of the last `batch["response_len"]` tokens of each row (and, with
    `with_entropy`, the policy's entropy [N, T] there, differentiable: the pair (logp, entropy)).

    `batch` comes from `join_prompt_response` (left-padded prompt + right-padded response). Only the T
    response positions go through the LM head, fused with the log-softmax (`head_logprobs`). Padded response
    positions hold garbage: mask them.
    """
    T = batch["response_len"]
    hidden = forward_hidden(model, batch).last_hidden_state[:, -T - 1 : -1]  # position t predicts t+1
    return head_logprobs(model, hidden, batch["input_ids"][:, -T:], chunk, with_entropy)


def _checkpointing_drops_cache(model: nn.Module) -> bool:
    """True when transformers' gradient-checkpointed layers would silently drop a KV cache (training + grad)."""
    return model.training and torch.is_grad_enabled() and any(
        getattr(m, "gradient_checkpointing", False) for m in model.modules())


@fsdp_entry
def shared_prompt_logprobs(model: nn.Module, prompts: dict, prompt_index: Tensor, response_ids: Tensor,
                           response_mask: Tensor, chunk: int | None = None, with_entropy: bool = False):
    """`response_logprobs(model, join_prompt_response(...))`, computing each distinct prompt only once.

    The GRPO rows of a group share their prompt, and prompts (map text, image tokens) are usually longer
    than responses, so the full-sequence pass spends most of its FLOPs recomputing the same prompt G
    times. Here: prefill the distinct prompts with a KV cache (vision encoder once per image), select the
    cache rows for each response (differentiable: prompt gradients are summed over the group), then run
    only the response tokens. Same positions and masks as the decode, so the same log-probs up to float
    rounding. Falls back to the full-sequence pass when gradient checkpointing would drop the cache.
    `with_entropy`: also the entropy at each response position, as in `response_logprobs`.
    """
    if _checkpointing_drops_cache(model):
        return response_logprobs(model, join_prompt_response(prompts, prompt_index, response_ids, response_mask),
                                 chunk, with_entropy)
    uniq, rows = torch.unique(prompt_index, return_inverse=True)
    empty = response_ids[:len(uniq), :0]
    batch = join_prompt_response(prompts, uniq, empty, empty.float())  # the distinct prompts alone
    out = forward_hidden(model, batch, use_cache=True)
    # the last prompt position predicts response token 0
    parts = [head_logprobs(model, out.last_hidden_state[rows, -1:], response_ids[:, :1], chunk, with_entropy)]
    T = response_ids.shape[1]
    if T > 1:  # response tokens 0..T-2 predict tokens 1..T-1, attending to the cached prompt
        cache = kv_cache(out)
        cache.batch_select_indices(rows)
        pos = prompts["next_pos"][prompt_index, None] + torch.arange(T - 1, device=response_ids.device)
        step = dict(input_ids=response_ids[:, :-1],
                    attention_mask=torch.cat([batch["attention_mask"][rows], response_mask[:, :-1].long()], 1),
                    position_ids=pos[None].expand(3, -1, -1) if batch["position_ids"].dim() == 3 else pos)
        hidden = forward_hidden(model, step, cache=cache).last_hidden_state
        parts.append(head_logprobs(model, hidden, response_ids[:, 1:], chunk, with_entropy))
    if with_entropy:  # [N, T] log-probs and entropies, not a copy of the [N, T, vocab] logits
        return tuple(torch.cat(p, 1) for p in zip(*parts))
    return torch.cat(parts, 1)
