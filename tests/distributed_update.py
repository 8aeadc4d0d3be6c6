"""One GRPO update (grpo.policy_update, two PPO epochs, KL to a reference) on a fixed rollout of 4 prompts x 2
responses, in one process (`python tests/distributed_update.py OUT CACHE`) or sharded over torchrun ranks, each
rank updating its share of the same rows. Writes the updated weights (gathered) and the update's metrics to OUT
(.safetensors / .json). tests/test_distributed.py compares the two: the sharded update must equal the plain one."""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from scaling import distributed  # noqa: E402
import grpo  # noqa: E402
import model as M  # noqa: E402
from transit.metro import Sample  # noqa: E402

B, G, T = 4, 2, 5


def fixed_rollout(policy, samples, rows: slice) -> grpo.Rollout:
    """The same response tokens for the same rows in every process (drawn from one seeded generator)."""
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(10, policy.model.config.get_text_config().vocab_size - 50, (B * G, T), generator=g)
    lengths = torch.tensor([5, 3, 4, 5, 2, 5, 1, 4])
    mask = (torch.arange(T)[None] < lengths[:, None]).float()
    ids, mask = tokens[rows], mask[rows]
    n = len(samples)
    return grpo.Rollout(prompts=M.encode_prompts(policy, samples), group_size=G,
                        prompt_index=torch.arange(n).repeat_interleave(G), response_ids=ids, response_mask=mask,
                        texts=[""] * (n * G), logprobs=torch.zeros_like(mask), entropy=torch.zeros_like(mask),
                        finished=torch.ones(n * G, dtype=torch.bool))


def main(out: str, cache: str) -> None:
    distributed.setup()
    torch.manual_seed(0)
    policy = M.build_tiny_policy(seed=0, cache_dir=cache)
    with torch.no_grad():  # a random model whose log-probs differ from token to token
        g = torch.Generator().manual_seed(3)
        for p in policy.model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    reference = M.reference_model(policy)
    with torch.no_grad():  # a reference that differs from the policy: a non-zero KL term
        for p in reference.parameters():
            p.mul_(0.9)
    images = []
    for i in range(B):
        path = os.path.join(os.path.dirname(out), f"image-{i}.png")
        if distributed.is_main():
            Image.new("RGB", (56 + 14 * i, 70), (40 * i, 200, 30)).save(path)
        images.append(path)
    distributed.barrier()
    samples = [Sample(id=str(i), qtype="torf1", question=f"Is station {i} on line {i + 1}?", answer="yes",
                      image=images[i], metro={}) for i in range(B)]
    mine = distributed.my_share(list(range(B)))
    rollout = fixed_rollout(policy, [samples[i] for i in mine], slice(mine[0] * G, (mine[-1] + 1) * G))
    rewards = torch.tensor([1.0, 0.0, 0.5, 2.0, 0.0, 0.0, 3.0, -1.0]).view(B, G)[mine].flatten()
    cfg = grpo.GRPOConfig(group_size=G, kl_coef=0.1, ppo_epochs=2, micro_batch_size=2, clip_eps=0.05)
    if distributed.world() > 1:
        distributed.shard(policy.model)
        distributed.shard(reference)
    optimizer = torch.optim.SGD(policy.model.parameters(), lr=1.0)  # linear in the gradient: compares gradients
    advantages = grpo.group_advantages(rewards, G)
    batches = grpo.micro_batches(rollout, advantages, cfg)
    ref, old = grpo.reference_logprobs(reference, policy.model, batches, cfg)
    metrics = grpo.policy_update(policy.model, optimizer, batches, advantages, ref, old,
                                 grpo.loss_denominator(rollout, cfg), cfg)
    weights = distributed.full_state_dict(policy.model)
    if distributed.is_main():
        save_file({k: v.detach().clone() for k, v in weights.items()}, out + ".safetensors")
        with open(out + ".json", "w") as f:
            json.dump(metrics, f)
    distributed.teardown()


if __name__ == "__main__":
    main(*sys.argv[1:3])
