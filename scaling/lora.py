"""Low-rank adapters for the policy: LoRA (Hu et al. 2021) and QLoRA's 4-bit frozen base (Dettmers et al. 2023).

LoRA freezes each pretrained weight W0 [out, in] and learns a low-rank update: y = W0 x + (alpha / r) B A x with
A [r, in] and B [out, r]. A starts random (kaiming-uniform, as peft) and B at zero, so an adapted model starts
exactly at its base, and only r (in + out) numbers per layer train. Three things follow for GRPO:
- the reference policy pi_ref is the base itself: a forward under `adapters_disabled` (no second copy of the weights);
- the optimizer holds moments for the adapters only (`adapter_state_dict` for checkpoints);
- QLoRA stores the frozen base in 4-bit NormalFloat (nf4, double-quantised) with bf16 compute
  (`qlora_from_pretrained_kwargs`); the adapters stay float32 on top.
Written here (no peft at run time) but saved in peft's layout (`save_adapter`: adapter_config.json +
adapter_model.safetensors, keys `base_model.model.<module>.lora_A.weight`), so `PeftModel.from_pretrained` loads it.
"""
from __future__ import annotations

import json
import math
import re
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor, nn

# the language model's attention and MLP projections (Qwen2 / Qwen2.5-VL names), as in the QLoRA paper's "all
# linear layers" setting minus the LM head; add the spec "visual" (or "visual.<name>") for the vision tower
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def default_targets(model: str) -> tuple[str, ...]:
    """`--lora-targets`' default for a policy (train.py's --model): `DEFAULT_TARGETS`, and for the project's own
    tiny model ("tiny") also its LM head, "lm_head". The tiny model starts from random weights: its tied head
    rows have norm ~0.16 behind the final RMSNorm, which caps every token's probability near 0.4% whatever the
    decoder computes (a supervised probe with adapters on the projections alone stops at p = 0.0036; with the
    head adapted too it reaches 0.97 in 30 steps), so GRPO could not make an answer likely. A pretrained head
    already can, so real checkpoints keep the usual projections-only default."""
    return DEFAULT_TARGETS + ("lm_head",) if model == "tiny" else DEFAULT_TARGETS


VISION_TOWERS = ("visual", "vision_tower", "vision_model")  # module names of a VLM's vision encoder
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # peft's key prefix: PeftModel.base_model (LoraModel).model (the HF model)


class LoraLinear(nn.Module):
    """A frozen linear layer plus its low-rank update: y = base(x) + (alpha / r) B(A(x)).

    Attribute names are peft's (`base_layer`, `lora_A`, `lora_B`), so the state-dict keys are the ones peft saves.
    A and B are float32 whatever the base's dtype (a bf16 or 4-bit base): the update is small next to W0 and would
    be rounded away in bf16. `base_layer` may be any nn.Linear subclass (bitsandbytes' Linear4bit for QLoRA)."""

    def __init__(self, base_layer: nn.Linear, rank: int, alpha: float, generator: torch.Generator | None = None):
        super().__init__()
        self.base_layer, self.rank, self.alpha, self.scaling = base_layer, rank, alpha, alpha / rank
        self.disabled = False  # set by adapters_disabled
        device = base_layer.weight.device
        self.lora_A = nn.Linear(base_layer.in_features, rank, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(rank, base_layer.out_features, bias=False, device=device, dtype=torch.float32)
        a = torch.empty(rank, base_layer.in_features)  # drawn on the CPU from `generator`: the same on any device
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)  # peft's init_lora_weights=True
        with torch.no_grad():
            self.lora_A.weight.copy_(a)
        nn.init.zeros_(self.lora_B.weight)  # B = 0: the adapted model starts at its base

    def forward(self, x: Tensor) -> Tensor:
        y = self.base_layer(x)
        if self.disabled:
            return y
        return y + (self.lora_B(self.lora_A(x.to(self.lora_A.weight.dtype))) * self.scaling).to(y.dtype)


def lora_layers(model: nn.Module) -> dict[str, LoraLinear]:
    """The model's adapted layers by module path (empty when it has none)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLinear)}


def _in_vision_tower(name: str) -> bool:
    return any(part in VISION_TOWERS for part in name.split("."))


def _matches(name: str, spec: str) -> bool:
    """`spec` "q_proj" (or "mlp.up_proj"): a layer outside the vision tower whose path ends with it; "visual":
    every layer of the vision tower; "visual.<suffix>" (e.g. "visual.qkv"): those whose path ends with the suffix."""
    if spec == "visual":
        return _in_vision_tower(name)
    vision, suffix = spec.startswith("visual."), spec.removeprefix("visual.")
    return _in_vision_tower(name) == vision and (name == suffix or name.endswith("." + suffix))


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def _wrap(model: nn.Module, names: list[str], rank: int, alpha: float, seed: int = 0) -> list[str]:
    """Wrap the named linear layers and freeze everything but the adapters (A drawn from a generator seeded with
    `seed`, so the adapters do not depend on what else used the global random stream)."""
    model.requires_grad_(False)  # every weight so far; the adapters created below are trainable
    generator = torch.Generator().manual_seed(seed)
    for name in names:
        _replace(model, name, LoraLinear(model.get_submodule(name), rank, alpha, generator))
    return names


def add_lora(model: nn.Module, rank: int, alpha: float, targets=DEFAULT_TARGETS, seed: int = 0) -> list[str]:
    """Wrap every nn.Linear (or subclass) that a spec in `targets` names (see `_matches`; default: the language
    model's attention and MLP projections, not the vision tower; add "visual" for it) in a `LoraLinear`
    of rank `rank` and scale alpha / rank, and freeze every other parameter (`seed`: the A matrices' draw).
    Returns the wrapped module paths."""
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",")]
    if not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"LoRA rank must be a positive integer, got {rank!r}")
    if not alpha > 0:
        raise ValueError(f"LoRA alpha must be positive, got {alpha!r}")
    if not targets or any(not isinstance(t, str) or not t for t in targets):
        raise ValueError(f"LoRA targets must be non-empty module names, got {list(targets)!r}")
    if lora_layers(model):
        raise ValueError("the model already has LoRA adapters (merge_lora them first, or load_adapter into it)")
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    names = []
    for spec in targets:
        hits = [n for n in linears if _matches(n, spec)]
        if not hits:
            leaves = sorted({n.rpartition(".")[2] for n in linears if not _in_vision_tower(n)})
            raise ValueError(f"LoRA target {spec!r} matches no linear layer of {type(model).__name__} (language-model "
                             f"layer names: {', '.join(leaves)}; 'visual' or 'visual.<name>' for the vision tower)")
        names += [n for n in hits if n not in names]
    return _wrap(model, names, rank, alpha, seed)


@contextmanager
def adapters_disabled(model: nn.Module):
    """Forwards inside use the base weights only: the GRPO reference policy pi_ref without a second model.
    A flag per layer, restored on exit; nothing about autograd changes. (Use it for no-grad passes: a gradient-
    checkpointed forward run inside would be recomputed in backward, outside, with the adapters on.)"""
    layers = list(lora_layers(model).values())
    before = [layer.disabled for layer in layers]
    for layer in layers:
        layer.disabled = True
    try:
        yield model
    finally:
        for layer, flag in zip(layers, before):
            layer.disabled = flag


def adapter_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The adapters' weights only, keyed `<module path>.lora_A.weight` / `.lora_B.weight` (for checkpoints)."""
    return {f"{name}.{ab}.weight": getattr(layer, ab).weight.detach()
            for name, layer in lora_layers(model).items() for ab in ("lora_A", "lora_B")}


def load_adapter_state_dict(model: nn.Module, state: dict[str, Tensor], source: str = "the state dict") -> None:
    """Copy `adapter_state_dict`-style weights into the model's adapters; any missing, unexpected or mis-shaped key
    is a ValueError naming `source` and the key."""
    own = adapter_state_dict(model)
    diff = sorted(set(own) ^ set(state))
    if diff:
        key = diff[0]
        raise ValueError(f"{source}: adapter key {key!r} is {'missing' if key in own else 'unexpected'} "
                         f"(the model has {len(own)} adapter tensors, {source} has {len(state)})")
    for key, value in state.items():
        if value.shape != own[key].shape:
            raise ValueError(f"{source}: adapter key {key!r} has shape {tuple(value.shape)}, the model "
                             f"{tuple(own[key].shape)} (a different rank or base model?)")
    with torch.no_grad():
        for key, value in state.items():
            own[key].copy_(value)


def save_adapter(model: nn.Module, folder: str | Path, base_model_name_or_path: str = "") -> None:
    """Write the adapters as peft does: `adapter_config.json` (a LoraConfig; target_modules the exact wrapped
    paths, which peft matches by equality) and `adapter_model.safetensors` (keys `base_model.model.<path>.lora_A.weight`)."""
    from safetensors.torch import save_file

    layers = lora_layers(model)
    if not layers:
        raise ValueError("save_adapter: the model has no LoRA adapters (add_lora or load_adapter first)")
    (rank, alpha), *other = {(layer.rank, layer.alpha) for layer in layers.values()}
    if other:
        raise ValueError("save_adapter: layers have different ranks / alphas; peft's rank_pattern is not written")
    config = dict(peft_type="LORA", task_type="CAUSAL_LM", base_model_name_or_path=base_model_name_or_path, r=rank,
                  lora_alpha=alpha, target_modules=sorted(layers), lora_dropout=0.0, bias="none", fan_in_fan_out=False,
                  inference_mode=True, init_lora_weights=True, use_rslora=False, use_dora=False, modules_to_save=None,
                  layers_to_transform=None, layers_pattern=None, rank_pattern={}, alpha_pattern={}, revision=None)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    weights = {PEFT_PREFIX + k: v.to("cpu").contiguous() for k, v in adapter_state_dict(model).items()}
    save_file(weights, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})


def load_adapter(model: nn.Module, folder: str | Path) -> list[str]:
    """Load a `save_adapter` folder (or a plain LoRA one saved by peft) into the model, wrapping the layers its
    target_modules name (peft's rule: a string is a regex on the whole path, a list entry the path or its
    tail) unless the model already has adapters. Returns the adapted module paths."""
    from safetensors.torch import load_file

    folder = Path(folder)
    config = json.loads((folder / CONFIG_FILE).read_text())
    unsupported = {k: config.get(k) for k, default in dict(use_dora=False, use_rslora=False, rank_pattern={},
                   alpha_pattern={}, modules_to_save=None, fan_in_fan_out=False, bias="none",
                   exclude_modules=None, layers_to_transform=None).items() if config.get(k, default) != default}
    if config.get("peft_type") != "LORA" or unsupported:
        raise ValueError(f"{folder}: only plain LoRA adapters load here (peft_type {config.get('peft_type')!r}, "
                         f"unsupported settings {unsupported})")
    targets = config["target_modules"]
    if not lora_layers(model):
        hit = ((lambda n: re.fullmatch(targets, n) is not None) if isinstance(targets, str)
               else (lambda n: any(n == t or n.endswith("." + t) for t in targets)))
        names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and hit(n)]
        if not names:
            raise ValueError(f"{folder}: target_modules {targets!r} match no linear layer of {type(model).__name__}")
        _wrap(model, names, config["r"], config["lora_alpha"])
    for name, layer in lora_layers(model).items():
        if (layer.rank, layer.alpha) != (config["r"], config["lora_alpha"]):
            raise ValueError(f"{folder}: r={config['r']}, lora_alpha={config['lora_alpha']}, but {name} has "
                             f"r={layer.rank}, alpha={layer.alpha}")
    weights = load_file(str(folder / WEIGHTS_FILE))
    for key in weights:
        if not key.startswith(PEFT_PREFIX):
            raise ValueError(f"{folder / WEIGHTS_FILE}: key {key!r} lacks peft's prefix {PEFT_PREFIX!r}")
    load_adapter_state_dict(model, {k.removeprefix(PEFT_PREFIX): v for k, v in weights.items()}, str(folder / WEIGHTS_FILE))
    return list(lora_layers(model))


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold each adapter into its base weight, W0 += (alpha / r) B A (in float32, then cast back to W0's dtype),
    and put the plain base layers back: a model that `save_pretrained` writes and plain transformers loads.
    Its parameters stay frozen. A 4-bit base cannot take the update: reload the base in bf16 and merge there.
    An adapted LM head tied to the input embedding is untied first (its own copy of the weight, and the config's
    tie_word_embeddings off), so the merge changes the head's weight and not the embedding's."""
    embedding = model.get_input_embeddings().weight if hasattr(model, "get_input_embeddings") else None
    for name, layer in lora_layers(model).items():
        w = layer.base_layer.weight
        if not w.dtype.is_floating_point:
            raise ValueError(f"merge_lora: {name} has a {type(layer.base_layer).__name__} base of dtype {w.dtype} "
                             "(a QLoRA 4-bit base); load the base in bf16, load_adapter, then merge_lora")
        if w is embedding:
            w = layer.base_layer.weight = nn.Parameter(w.detach().clone(), requires_grad=False)
            _untie(model.config)
        with torch.no_grad():
            delta = layer.scaling * (layer.lora_B.weight.float() @ layer.lora_A.weight.float())
            w.copy_((w.float() + delta.to(w.device)).to(w.dtype))
        _replace(model, name, layer.base_layer)
    return model


def _untie(config) -> None:
    """tie_word_embeddings off in a config and its text config (a VLM's LM head setting lives in either)."""
    for c in (config, getattr(config, "text_config", None)):
        if c is not None and getattr(c, "tie_word_embeddings", False):
            c.tie_word_embeddings = False


def check_qlora(device: str | torch.device) -> None:
    """Raise unless QLoRA can run: bitsandbytes' 4-bit kernels need a CUDA device and the package."""
    if torch.device(device).type != "cuda" or not torch.cuda.is_available():
        raise ValueError(f"--qlora needs a CUDA GPU and bitsandbytes; the device here is {torch.device(device)} "
                           "(drop --qlora to train plain LoRA adapters over a bf16 / float32 base)")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ImportError("--qlora needs the optional package bitsandbytes (pip install -r requirements-gpu.txt)") from None


def qlora_from_pretrained_kwargs(device: str | torch.device = "cuda", compute_dtype: torch.dtype = torch.bfloat16) -> dict:
    """`from_pretrained` arguments (beside `dtype=compute_dtype`) that load the base in QLoRA's 4-bit NormalFloat
    with double quantisation and bf16 compute (Dettmers et al. 2023), placed on `device` (a 4-bit model is placed
    by device_map, not moved with `.to`). Checks `check_qlora` first. transformers keeps the LM head unquantised,
    so head_logprobs still reads a bf16 weight."""
    check_qlora(device)
    from transformers import BitsAndBytesConfig

    device = torch.device(device)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=compute_dtype)
    return dict(quantization_config=quant,
                device_map={"": device.index if device.index is not None else torch.cuda.current_device()})
