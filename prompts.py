"""Prompts: questions (and their map images) -> chat-templated, left-padded tensors with Qwen2.5-VL's 3-D rotary
positions (mrope), and prompt + response batches for the log-prob passes. `policy` is a model.Policy."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from model import Policy

IMAGE_TOKEN, VIDEO_TOKEN = "<|image_pad|>", "<|video_pad|>"


def metro_as_text(metro: dict[str, list[str]]) -> str:
    """The map as text for text-only models: one line per metro line with its stations in order."""
    return "\n".join(f"{line}: {', '.join(stations)}" for line, stations in metro.items())


def encode_prompts(policy: Policy, samples) -> dict:
    """Chat-template the samples' questions (with their images) into left-padded prompt tensors.

    Returns `input_ids`, `attention_mask` [B, L]; `position_ids` ([3, B, L] mrope for VLMs, [B, L]
    otherwise; 0 on padding); `next_pos` [B], the rotary position of the first response token;
    for VLMs with images `pixel_values`, `image_grid_thw` and `image_index` [B] (-1: no image).
    Text-only policies (and image-less samples) get the metro map as text before the question.
    """
    from PIL import Image

    tok, images, texts = policy.tokenizer, [], []
    for s in samples:
        if policy.is_vlm and s.image:
            images.append(Image.open(s.image).convert("RGB"))
            content = [{"type": "image"}, {"type": "text", "text": s.question}]
        else:
            content = f"{metro_as_text(s.metro)}\n\n{s.question}" if s.metro else s.question
        texts.append(tok.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                             add_generation_prompt=True))
    out = {}
    if images:
        vis = policy.image_processor(images=images, return_tensors="pt")
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
