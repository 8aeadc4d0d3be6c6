"""A rollout of a sharded tiny model under torchrun (`torchrun --nproc_per_node 2 tests/distributed_rollout.py OUT
CACHE`): how many FSDP all-gathers it makes with the layers gathered once for the rollout (distributed.gathered,
what sample_groups does) and without (every layer gathered again for every token). Rank 0 writes OUT (.json)."""
import contextlib
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch.distributed.fsdp import FSDPModule  # noqa: E402
from torch.distributed.fsdp._fully_shard import _fsdp_param_group  # noqa: E402

from scaling import distributed  # noqa: E402
import model as M  # noqa: E402
from speed import decode  # noqa: E402
from transit.metro import Sample  # noqa: E402

T = 12


def main(out: str, cache: str) -> None:
    distributed.setup()
    with distributed.main_first():  # rank 0 builds the cached tiny model, then the other reads it
        policy = M.build_tiny_policy(seed=0, cache_dir=cache, text_only=True)
    eos = torch.tensor([policy.eos_id])
    policy.suppress_ids = torch.cat([policy.suppress_ids, eos])  # every response T tokens long
    distributed.shard(policy.model)
    samples = [Sample(id=str(i), qtype="torf1", question=f"Is station {i} on line {i + 1}?", answer="yes", image=None,
                      metro={}) for i in range(2)]
    gathers = []
    real = _fsdp_param_group.foreach_all_gather
    _fsdp_param_group.foreach_all_gather = lambda *a, **k: gathers.append(1) or real(*a, **k)
    counts, texts = {}, {}
    for name, context in (("gathered", decode.gathered), ("per_token", lambda model: contextlib.nullcontext())):
        decode.gathered = context
        gathers.clear()
        ro = decode.sample_groups(policy, samples, 2, T, generator=torch.Generator().manual_seed(distributed.rank()))
        counts[name], texts[name] = len(gathers), ro.texts
    units = sum(isinstance(m, FSDPModule) for m in policy.model.modules())
    resharded = all(p.to_local().numel() < p.numel() for p in policy.model.parameters() if hasattr(p, "to_local"))
    if distributed.is_main():
        with open(out + ".json", "w") as f:
            json.dump({**counts, "units": units, "tokens": T, "same_texts": texts["gathered"] == texts["per_token"],
                       "resharded": resharded}, f)
    distributed.teardown()


if __name__ == "__main__":
    main(*sys.argv[1:3])
