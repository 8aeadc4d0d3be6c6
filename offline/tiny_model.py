"""The offline stand-in for Qwen2.5-VL: a tiny random-init model with a tokenizer the project trains itself.

No weights can be downloaded on the machines this project is built and tested on, so the default run uses
`build_tiny_model`: a randomly initialised Qwen2.5-VL-architecture model (well under 10M parameters) with a
byte-level BPE tokenizer trained on the question templates and the dataset's questions and answers, a
Qwen-style chat template and transformers' Pillow image processor (no torchvision). It is saved in the
HuggingFace format into a cache folder keyed by everything it depends on, and `model.load_policy` loads it
exactly like a real checkpoint, so it runs through the same code path as Qwen2.5-VL-7B.
`text_only=True` gives a tiny Qwen2 causal LM instead (the map as text in the prompt).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

IMAGE_TOKEN, VIDEO_TOKEN = "<|image_pad|>", "<|video_pad|>"

TINY_VERSION = 6  # bump when build_tiny_policy changes what it builds (part of the cache key)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  IMAGE_TOKEN, VIDEO_TOKEN]
QWEN2_PRETOKENIZE_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                           r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
"""transformers' Qwen2Tokenizer's pre-split (its PRETOKENIZE_REGEX): a text-only tiny model is loaded back as one,
which splits with this whatever the saved tokenizer says, so the text-only tokenizer is trained with it too."""
TEXT_SHAPE = dict(vocab_size=2048, hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2)
"""The text-only tiny model's shape (the demo world's: docs/demo.md), ~0.7M parameters; a vocabulary of 2048 gives
each of the demo's 300 station names one token."""
TEXT_INIT = 0.05
"""The text-only tiny model's initial weights' standard deviation (Qwen2's default: 0.02). With 0.02 the demo's
lookup stays at chance for thousands of steps (tools/lookup_drill.py, docs/demo.md)."""
INDUCTION = dict(match=8.0, carry=1.0, write=8.0)
"""The sizes of the induction circuit the text-only tiny model starts with (`set_induction_circuit`): how sharply
its matching head picks the earlier position, how strongly layer 1 carries tokens into its two subspaces, how
strongly the found token is written towards its own logit. With them the drill's lookup is right 96% after 50
steps and 99.7-99.9% after 300 on both seeds tried; without it the lookup forms at a random step or not at all."""
# Qwen2-VL's chat template, minus the default system prompt (shorter prompts for the tiny model).
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)



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


def build_tokenizer(corpus: list[str], vocab_size: int = 1024, pre_split: bool = False):
    """Byte-level BPE trained on `corpus`, with Qwen's chat/vision special tokens.

    Unlike Qwen's tokenizer there is no regex pre-split (`use_regex=False`), so merges may cross spaces
    and punctuation: frequent whole answers such as `\\boxed{yes}` or `Route Name: ` become single
    tokens and template sentences a few tokens. A random-init model then emits a well-formed answer by
    chance often enough (about 1 token in vocab_size) for GRPO to find a reward signal from step one;
    with Qwen's split, `\\boxed{yes}` is 5 tokens and a random model essentially never writes it.
    `pre_split` (the text-only model): Qwen2's regex pre-split, which transformers applies to a text model loaded
    back whatever the saved tokenizer says; each word then keeps its own tokens wherever it stands (the demo's
    station names, one token each), and the SFT, not chance, teaches the answer format.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    if pre_split:  # Qwen2's own pre-tokenizer: NFC, its regex split (words with their leading space), bytes
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False), byte_level])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   padding_side="left")
    fast.chat_template = CHAT_TEMPLATE
    return fast




def build_tiny_model(seed: int = 0, corpus: list[str] | None = None, cache_dir: str | Path = ".cache/tiny-model",
                     vocab_size: int = 1024, hidden_size: int | None = None, num_layers: int = 2,
                     num_heads: int = 4, num_kv_heads: int = 2, intermediate_size: int | None = None, vision_depth: int = 1,
                     vision_hidden: int = 32, patch_size: int = 14, max_pixels: int = 112 * 112,
                     min_pixels: int = 28 * 28, text_only: bool = False) -> Path:
    """The tiny offline model's folder (HuggingFace format): built deterministically from `seed` into
    `cache_dir/<key>` the first time, found there afterwards.

    `corpus` is extra tokenizer-training text (e.g. the dataset's questions and answers), added to
    `builtin_corpus()`. The cache key hashes every argument that changes the result, so a cache hit
    is the same model a fresh build would give. `text_only=True`: a Qwen2 causal LM instead (no vision), weights
    of standard deviation `TEXT_INIT`, with the induction circuit where its shape holds one (`set_induction_circuit`).
    Defaults: VLM 64 wide / 256 MLP (~0.24M parameters), text-only 128 wide / 512 MLP (~0.6M).
    Built and saved in float32; `model.load_policy` loads it in any dtype.
    """
    hidden_size = hidden_size or (128 if text_only else 64)
    intermediate_size = intermediate_size or 4 * hidden_size
    knobs = dict(version=TINY_VERSION, seed=seed, corpus=list(corpus or []), vocab_size=vocab_size,
                 hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads, num_kv_heads=num_kv_heads,
                 intermediate_size=intermediate_size, vision_depth=vision_depth, vision_hidden=vision_hidden,
                 patch_size=patch_size, max_pixels=max_pixels, min_pixels=min_pixels, text_only=text_only)
    if text_only:
        knobs["pre_split"] = "qwen2"
    key = hashlib.sha256(json.dumps(knobs, sort_keys=True).encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"{'qwen2' if text_only else 'qwen2_5_vl'}-{key}"
    if not (path / "config.json").exists():
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Config, Qwen2ForCausalLM

        tok = build_tokenizer(builtin_corpus() + list(corpus or []), vocab_size, pre_split=text_only)
        ids = tok.convert_tokens_to_ids
        text = dict(vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=intermediate_size,
                    num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                    max_position_embeddings=4096, bos_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|im_end|>"),
                    pad_token_id=ids("<|endoftext|>"), tie_word_embeddings=True)
        torch.manual_seed(seed)
        if text_only:
            model = Qwen2ForCausalLM(Qwen2Config(**text, initializer_range=TEXT_INIT,
                                                 rope_parameters={"rope_type": "default", "rope_theta": 1e4}))
            if holds_induction_circuit(model.config):
                set_induction_circuit(model, seed=seed, **INDUCTION)
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
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=".tmp-"))
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        if image_processor is not None:
            image_processor.save_pretrained(tmp)
        try:
            os.replace(tmp, path)  # atomic: a concurrent builder of the same key wrote identical files
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def set_position_head(attention, head: int, head_dim: int, size: float, back: int, theta: float = 1e4) -> None:
    """Start attention head `head` (and its key head) as a head that looks `back` positions back, whatever the
    tokens: zero query and key weights, and biases whose RoPE rotations differ by `back` positions' angle in every
    frequency pair, so that the score sum_f size^2 cos((i - j - back) theta_f) peaks at i - j = back (0: the
    position itself). Training may change it like any weight."""
    half, per = head_dim // 2, attention.config.num_attention_heads // attention.config.num_key_value_heads
    query, key = head * head_dim, head // per * head_dim
    angles = back / theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
    with torch.no_grad():
        for proj, start in ((attention.q_proj, query), (attention.k_proj, key)):
            proj.weight[start:start + head_dim].zero_()
            proj.bias[start:start + head_dim].zero_()
        attention.k_proj.bias[key:key + half] = size
        attention.q_proj.bias[query:query + half] = size * torch.cos(angles)  # rotated back: peaks at i - j = back
        attention.q_proj.bias[query + half:query + head_dim] = -size * torch.sin(angles)


def holds_induction_circuit(config) -> bool:
    """Whether a Qwen2 config has room for `set_induction_circuit`: >= 2 layers, >= 2 key heads, hidden >= 3 head
    widths. The text-only tiny model starts with the circuit when it does (the demo's shape does); smaller text
    models, built by tests, start without it."""
    head_dim = config.hidden_size // config.num_attention_heads
    return config.num_hidden_layers >= 2 and config.num_key_value_heads >= 2 and config.hidden_size >= 3 * head_dim


POSITION_HEAD = 5.0
"""The bias size of `set_position_head`'s heads in the induction circuit: 91% (one back) and 95% (itself) of the
head's attention on its position at the start, on random tokens."""


def set_induction_circuit(model, match: float, carry: float, write: float, seed: int = 0, theta: float = 1e4,
                          slowest: int = 6) -> None:
    """Start a Qwen2 causal LM (>= 2 layers, >= 2 key heads, hidden >= 3 head widths) with an induction head: the
    circuit by which a transformer copies from its context (Olsson et al. 2022, "In-context learning and induction
    heads"), which every pretrained language model has (Qwen2.5-VL, RewardMap's start, included) and a small model
    trained from scratch finds only after a plateau of random length (docs/demo.md). Here it is what lets the demo's
    model read a map row: at ` Alder` in its working it finds ` Alder AC` in the map and reads `AC`.

    Layer 1: head 0 looks one position back, the first head of the second key head at its own position
    (`set_position_head`); both read the same projection R of the token (their values) and write it, times `carry`,
    into two orthogonal subspaces of the residual stream: "the token before me" and "I". Layer 2, head 0: its query
    reads "I", its key "the token before me" (times `match`), so each position attends to the earlier positions
    that follow a copy of its own token; its value reads "I" there and writes it back along R (times `write`), where
    the tied unembedding turns it into that token's logit. Query and key use only the `slowest` RoPE frequency
    pairs, which turn by under one radian over 300 positions, so the match fades little with distance. The rest of
    both layers is the random initialisation, and every weight, the circuit's included, is trained."""
    cfg = model.config
    width, heads, kv_heads = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = width // heads
    if not holds_induction_circuit(cfg):
        raise ValueError(f"set_induction_circuit: needs >= 2 layers, >= 2 key heads and hidden >= 3 head widths, "
                         f"got {cfg.num_hidden_layers} layers, {kv_heads} key heads, hidden {width} / head width "
                         f"{head_dim}")
    basis = torch.linalg.qr(torch.randn(width, width, generator=torch.Generator().manual_seed(seed)))[0]
    token, before, itself = (basis[:, k * head_dim:(k + 1) * head_dim] for k in range(3))
    token = token.T
    self_head = heads // kv_heads  # the first query head of key head 1
    first, second = model.model.layers[0].self_attn, model.model.layers[1].self_attn
    half = head_dim // 2
    slow = [f for f in range(half - slowest, half)] + [f + half for f in range(half - slowest, half)]
    set_position_head(first, 0, head_dim, POSITION_HEAD, back=1, theta=theta)
    set_position_head(first, self_head, head_dim, POSITION_HEAD, back=0, theta=theta)
    with torch.no_grad():
        first.v_proj.weight[:2 * head_dim] = torch.cat([token, token])
        first.v_proj.bias[:2 * head_dim].zero_()
        for head, subspace in ((0, before), (self_head, itself)):
            first.o_proj.weight[:, head * head_dim:(head + 1) * head_dim] = carry * subspace
        for proj, read in ((second.q_proj, match * itself.T), (second.k_proj, before.T)):
            proj.weight[:head_dim].zero_()
            proj.bias[:head_dim].zero_()
            proj.weight[slow] = read[slow]
        second.v_proj.weight[:head_dim] = itself.T
        second.v_proj.bias[:head_dim].zero_()
        second.o_proj.weight[:, :head_dim] = write * token.T


def make_image_processor(patch_size: int = 14, merge_size: int = 2, max_pixels: int = 112 * 112,
                         min_pixels: int = 28 * 28):
    """transformers' Pillow-backed Qwen2-VL image processor (no torchvision needed)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(patch_size=patch_size, merge_size=merge_size, temporal_patch_size=2,
                                    min_pixels=min_pixels, max_pixels=max_pixels)


def tokenizer_corpus(train_samples) -> list[str]:
    """Text the tiny model's tokenizer is trained on: the training questions, and the answers in the
    form a response gives them (`\\boxed{yes}`; planning: the route block)."""
    answers = [s.answer if s.qtype == "planning" else f"\\boxed{{{s.answer}}}" for s in train_samples]
    return [s.question for s in train_samples] + answers
