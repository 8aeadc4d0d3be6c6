"""bench.py plumbing on a tiny workload (1 step, no TRL), and the exactness of the fast paths it times."""
import json
import os
import resource

import pytest
import torch
from conftest import colour_samples, fresh, text_samples

from tools import bench
import grpo
import model as M
from speed import logprobs


def _peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def test_bench_runs_and_prints_one_json_line(tmp_path, capsys):
    rss_before = _peak_rss_mb()
    out = bench.main(["--workload", "tiny-text", "--steps", "1", "--warmup", "0", "--prompts", "2",
                      "--group-size", "2", "--max-new-tokens", "3", "--cache-dir", str(tmp_path)])
    rss_after = _peak_rss_mb()
    lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("{")]
    assert len(lines) == 1 and json.loads(lines[0]) == json.loads(json.dumps(out))
    assert out["steps"] == 1 and out["completion_len"]["median"] == 3  # end-of-turn suppressed: full length
    for key in ("rollout_s", "scoring_s", "log-probs_s", "update_s", "step_s", "completion_tok/s"):
        assert 0 < out[key]["min"] == out[key]["median"] == out[key]["max"], key  # one step: one value
    phases = sum(out[k]["median"] for k in ("rollout_s", "scoring_s", "log-probs_s", "update_s"))
    assert 0.5 * out["step_s"]["median"] < phases <= out["step_s"]["median"]  # the phases of the timed step
    # 2 prompts x 2 responses x 3 tokens per step
    assert out["completion_tok/s"]["median"] * out["step_s"]["median"] == pytest.approx(12, rel=1e-6)
    # the process's peak RSS in MB on the CPU: not below what it was before the run (torch and the tiny model
    # already imported: hundreds of MB), not above what it is after, far below the machine's memory
    assert out["device"] == "cpu"
    assert 100 < rss_before <= out["peak_memory_mb"] <= rss_after
    assert out["peak_memory_mb"] < os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20
    assert "trl" not in out


def test_shape_workloads_are_the_published_sizes():
    assert bench.count_shape_params("3b")["params"] == 3_754_622_976  # Qwen2.5-VL-3B-Instruct
    assert bench.count_shape_params("7b")["params"] == 8_292_166_656  # Qwen2.5-VL-7B-Instruct


@pytest.mark.parametrize("kind", ["lm", "vlm"])
def test_shared_prompt_logprobs_equal_full_sequence_pass(kind, tiny_lm, tiny_vlm, tmp_path):
    """Each prompt computed once (KV cache expanded to its rows) == the full-sequence pass: values and grads."""
    policy = fresh(tiny_lm if kind == "lm" else tiny_vlm, scale=0.1)
    samples = text_samples(3) if kind == "lm" else colour_samples(tmp_path, ["red", "blue", "red"],
                                                                  sizes=[(150, 60), (60, 60), (90, 120)])
    ro = grpo.sample_groups(policy, samples, 4, 9, temperature=0.7, generator=torch.Generator().manual_seed(0))
    idx = torch.tensor([0, 5, 6, 11, 2, 9])  # rows of all three prompts, out of order
    args = (ro.prompts, ro.prompt_index[idx], ro.response_ids[idx], ro.response_mask[idx])
    mask, params = args[3], list(policy.model.parameters())
    policy.model.train()
    full = logprobs.response_logprobs(policy.model, M.join_prompt_response(*args))
    shared = logprobs.shared_prompt_logprobs(policy.model, *args)
    assert ((full - shared) * mask).abs().max() < 1e-5
    # and == the sampler's log-probs (KV-cached decoding: float32 rounding, larger with the text model's larger weights)
    assert ((shared - ro.logprobs[idx]) * mask).abs().max() < 1e-4
    g_full = torch.autograd.grad((full * mask).sum(), params, allow_unused=True)
    g_shared = torch.autograd.grad((shared * mask).sum(), params, allow_unused=True)
    assert sum(a is not None and bool(a.abs().sum() > 0) for a in g_full) > len(params) // 2  # real gradients compared
    for a, b in zip(g_full, g_shared):
        assert (a is None) == (b is None) and (a is None or torch.allclose(a, b, atol=1e-4, rtol=1e-3))  # float32 sums in another order


def test_decode_bench_prints_one_json_line_with_the_figures(tmp_path, capsys):
    """`bench --decode` on the tiny VLM only (the 3B-width model takes minutes on a CPU): ours vs generate, and the
    loop's host syncs per token, exactly one per 16 tokens (counted at 32 and 16 tokens)."""
    from tools import decode_bench

    out = decode_bench.run(str(tmp_path), steps=1, models={"tiny-vlm": (2, 32)})
    lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("{")]
    assert len(lines) == 1 and json.loads(lines[0]) == json.loads(json.dumps(out))
    m = out["models"]["tiny-vlm"]
    assert m["rows"] == 16 and m["new_tokens"] == 32
    assert m["tokens_per_s"] > 0 and m["generate_tokens_per_s"] > 0
    assert m["speedup_vs_generate"] == pytest.approx(m["tokens_per_s"] / m["generate_tokens_per_s"])
    assert m["host_syncs_per_token"] == 1 / 16 and m["generate_host_syncs_per_token"] >= 1  # generate: every token
