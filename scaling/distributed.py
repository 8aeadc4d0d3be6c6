"""Data-parallel GRPO over several processes: torchrun + PyTorch's FSDP2 (docs/rewardmap.md §9).

    torchrun --nproc_per_node 8 train.py --preset paper ...          # one node, 8 GPUs
    python train.py ...                                              # one process: everything here is a no-op

Each rank takes a disjoint share of the step's prompts, samples whole groups, scores them and computes its
groups' advantages (the batch-wide estimators, REINFORCE++, take their statistics over every rank); the loss is divided by the whole batch's normaliser (`all_sum` of the token or response
counts), and the gradients are summed over ranks, so the update equals the one-process update on the same
rollouts. The policy and the reference are sharded with `fully_shard` (decoder layers, vision blocks, then
the root), so each GPU holds 1/N of the weights, gradients and optimizer state.

What makes it work, and what a reader of grpo.py sees of it:
- FSDP gathers a unit's weights in its forward hooks, so every rank must run the same forwards: grpo's decode
  stops only when `everyone` is done, micro-batches never skip rows, the per-rank prompt count is equal.
- model.py's functions use the embedding, the decoder and the LM-head weight separately, not through the
  model's forward: `fsdp_entry` runs them inside the forward of `_Root`, the root FSDP unit.
- Backend: nccl on CUDA, gloo on CPU (how the tests run this on one machine).
Every function is the identity / a no-op when torch.distributed is not initialised (world size 1).
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import pickle

import torch
import torch.distributed as dist
from torch import nn


def world() -> int:
    """Number of ranks (1 without torchrun)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def launched_ranks() -> int:
    """The number of processes torchrun started (its WORLD_SIZE; 1 without torchrun), known before `setup`."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    """This process's rank (0 without torchrun)."""
    return dist.get_rank() if world() > 1 else 0


def is_main() -> bool:
    """Rank 0: the one process that writes files and prints."""
    return rank() == 0


def setup() -> torch.device | None:
    """Join the process group when started by torchrun (WORLD_SIZE > 1); returns this rank's device (CUDA:
    LOCAL_RANK, or CPU), or None for a plain one-process run."""
    if launched_ranks() <= 1:
        return None
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def teardown() -> None:
    """Leave the process group once every rank is here. Without it the group is destroyed at interpreter exit,
    and a rank that finished first can abort ("terminate called without an active exception") while rank 0
    still writes the model."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _reduce(values: list[float], op: str) -> list[float]:
    """All-reduce a few floats (float64, on the GPU under nccl) with 'sum' or 'min'."""
    if world() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN}[op])
    return t.tolist()


def all_sum(*values: float) -> list[float]:
    """The sums over ranks of `values` (one all-reduce)."""
    return _reduce(list(values), "sum")


def all_min(value: float) -> float:
    """The smallest `value` over ranks."""
    return _reduce([value], "min")[0]


def everyone(flag: bool) -> bool:
    """True when `flag` is true on every rank (e.g. "all my rows are finished": stop decoding together)."""
    return bool(all_min(float(flag)))


def gather(obj) -> list:
    """Every rank's `obj`, in rank order (pickled; for small things: rewards, responses, metrics)."""
    if world() == 1:
        return [obj]
    out = [None] * world()
    dist.all_gather_object(out, obj)
    return out


def my_share(items: list) -> list:
    """This rank's contiguous share of a step's prompts; groups never span ranks (a group is one prompt's G
    rows). The count must divide evenly: FSDP needs every rank to run the same number of forwards."""
    n = world()
    if len(items) % n:
        raise ValueError(f"a batch of {len(items)} prompts cannot be split evenly over {n} ranks: "
                         f"make --batch-size a multiple of the world size")
    k = len(items) // n
    return items[rank() * k : (rank() + 1) * k]


# ----------------------------------------------------------------------------- FSDP2

class _Root(nn.Module):
    """The root FSDP unit: its forward runs `fn(model, ...)`, so that FSDP gathers the root's weights (embedding,
    LM head, norms, vision patch embedding) for everything `fn` does and reduces their gradients afterwards."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.active = False

    def forward(self, fn, *args, **kwargs):
        self.active = True
        try:
            return fn(self.model, *args, **kwargs)
        finally:
            self.active = False


def fsdp_entry(fn):
    """Decorator for model.py's entry points (`fn(model, ...)`): on a sharded model, run `fn` inside its root's
    forward (once: nested entry points run directly); on a plain model, just call it."""

    @functools.wraps(fn)
    def run(model, *args, **kwargs):
        root = model.__dict__.get("fsdp_root")
        if root is None or root.active:
            return fn(model, *args, **kwargs)
        return root(fn, *args, **kwargs)

    return run


def shard(model: nn.Module, param_dtype: torch.dtype | None = None) -> nn.Module:
    """Shard `model` in place over the ranks with FSDP2's `fully_shard`: each decoder layer and vision block
    (transformers' `_no_split_modules`), then the root. `param_dtype` (e.g. bf16 over float32 master weights):
    the dtype weights are gathered in for compute, with float32 gradient reduction. Gradients are summed over
    ranks, not averaged: the loss is already divided by the whole batch's normaliser (grpo.loss_denominator).
    Returns the model (its parameters are now DTensors holding this rank's shard)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    blocks = set(getattr(model, "_no_split_modules", None) or ())
    units = [m for m in model.modules() if type(m).__name__ in blocks]
    if not units:
        raise ValueError(f"{type(model).__name__}: no decoder layers to shard (its _no_split_modules is empty)")
    for unit in units:
        fully_shard(unit, mp_policy=mp)
    root = _Root(model)
    fully_shard(root, mp_policy=mp)
    for m in [root, *units]:
        m.set_gradient_divide_factor(1.0)  # a plain sum (gloo has no pre-multiplied sum)
        m.set_force_sum_reduction_for_comms(True)
    model.__dict__["fsdp_root"] = root  # a plain attribute: not a submodule of the model it wraps
    return model


def is_sharded(model: nn.Module) -> bool:
    return model.__dict__.get("fsdp_root") is not None


def _reshard(model: nn.Module) -> None:
    """Back to shards only. FSDP keeps the root unit's weights gathered after a forward (so a decode does not
    gather the embedding and LM head for every token); until it is resharded, `model.parameters()` yields those
    gathered copies, not the sharded parameters the optimizer and the checkpoints hold."""
    model.__dict__["fsdp_root"].reshard()


@contextlib.contextmanager
def gathered(model: nn.Module):
    """A sharded model's weights gathered once for a whole block (a rollout), then resharded. The decode runs the
    model once per token: sharded per layer, FSDP would all-gather every layer for every token (at 7B ~13 GB of
    all-gather per token step per rank), so several GPUs would decode no faster per token than one. Costs the
    gathered weights for the block's duration (the whole model in its compute dtype on every rank). A no-op on an
    unsharded model."""
    if not is_sharded(model):
        yield
        return
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]  # the layers (the root keeps its weights)
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)  # the first forward gathers each unit; it stays
    try:
        yield
    finally:
        for unit in units:
            unit.set_reshard_after_forward(True, recurse=False)
            unit.reshard()


def full_state_dict(model: nn.Module) -> dict:
    """The whole model's weights as ordinary CPU tensors (on rank 0; other ranks get {}). Every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if not is_sharded(model):
        return model.state_dict()
    _reshard(model)
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_sharded(folder, model: nn.Module, optimizer) -> None:
    """Every rank writes its shards of the weights and the optimizer state (torch.distributed.checkpoint)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    _reshard(model)
    weights, moments = get_state_dict(model, optimizer)
    dcp.save({"model": weights, "optimizer": moments}, checkpoint_id=str(folder))


def load_sharded(folder, model: nn.Module, optimizer) -> None:
    """Read `save_sharded`'s files back into the sharded model and optimizer (same world size)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    _reshard(model)
    weights, moments = get_state_dict(model, optimizer)
    state = {"model": weights, "optimizer": moments}
    load_checked(state, folder)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


# torch.distributed.checkpoint reads its `.metadata` with pickle.load and its non-tensor items with torch.load(
# weights_only=False): a checkpoint someone hands you could run code. `load_checked` first reads `.metadata` with an
# unpickler that builds only what dcp's metadata holds (below), and reads every non-tensor item with weights_only=True.
_METADATA_GLOBALS = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
                     ("pathlib", "WindowsPath"), ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
                     ("collections", "OrderedDict")}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        allowed = (module, name) in _METADATA_GLOBALS or module == "torch.distributed.checkpoint.metadata" or (
            module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format)))
        if not allowed:
            raise pickle.UnpicklingError(f"{module}.{name} (a checkpoint's metadata holds dcp's own records only)")
        return super().find_class(module, name)


def load_checked(state: dict, folder) -> None:
    """`dcp.load(state, folder)` that refuses code: ValueError naming the file when `.metadata` or a non-tensor
    item would build anything but data."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    from torch.distributed.checkpoint.api import CheckpointException

    refused = []

    class WeightsOnly(DefaultLoadPlanner):
        def load_bytes(self, read_item, value):
            try:
                torch.load(value, weights_only=True)  # tensors and plain values only, or an error
            except pickle.UnpicklingError:
                refused.append(f"{folder}: item {read_item.dest_index.fqn!r} is not plain data (tensors, numbers, "
                               "strings, lists, dicts): refused, it could run code")
                raise
            value.seek(0)
            super().load_bytes(read_item, value)

    metadata = os.path.join(str(folder), ".metadata")
    try:
        with open(metadata, "rb") as f:
            _MetadataUnpickler(f).load()
    except pickle.UnpicklingError as e:
        raise ValueError(f"{metadata}: refused, it would build {e}") from None
    try:
        dcp.load(state, checkpoint_id=str(folder), planner=WeightsOnly())
    except CheckpointException:  # what dcp makes of any rank's error
        if refused:
            raise ValueError(refused[0]) from None
        raise


def checkpoint_errors() -> tuple:
    """What a failed torch.distributed.checkpoint save raises (CheckpointException, a BaseException), under
    torchrun; () in one process."""
    if world() == 1:
        return ()
    from torch.distributed.checkpoint.api import CheckpointException

    return (CheckpointException,)


def barrier() -> None:
    if world() > 1:
        dist.barrier()


@contextlib.contextmanager
def main_first():
    """Rank 0 runs the block first (e.g. builds the cached dataset and tiny model), then the others (which
    then read the cache)."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def rank_seed(seed: int) -> int:
    """The seed of this rank's sampling generator: `seed` on rank 0 (so one process is unchanged), a hash of
    (seed, rank) elsewhere; its state goes into each checkpoint, so every step's draws are fixed by (seed, rank,
    step) and a run is reproducible for a given world size."""
    r = rank()
    return seed if r == 0 else int.from_bytes(hashlib.sha256(f"{seed}:{r}".encode()).digest()[:7], "big")


def even_share(indices: list) -> list:
    """This rank's slice of `indices` for sharded evaluation, padded with repeats so that every rank gets the same
    count (every rank must run the same forwards); the caller drops the repeats after `gather`."""
    k = -(-len(indices) // world())
    mine = indices[rank() :: world()]  # strided: prompts sorted by length spread evenly
    return mine + [indices[-1]] * (k - len(mine))


def trim_batches(batches: list[list]) -> tuple[list[list], int]:
    """Each batch cut to a multiple of the world size (a stage's last, partial batch may not divide evenly),
    empty ones dropped; returns the batches and how many prompts were left out (for a warning)."""
    n = world()
    kept = [b[: len(b) - len(b) % n] for b in batches]
    return [b for b in kept if b], sum(len(b) for b in batches) - sum(len(b) for b in kept)
