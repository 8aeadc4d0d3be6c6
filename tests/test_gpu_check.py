"""tools/gpu_check.py: `bench --gpu-check --dry-run` runs every check of the CUDA path on the CPU with tiny shapes
(the script is checked here; the GPU is not), and the runner's rules: a failing check does not stop the others, a
check that does not fit the time left is skipped and says so."""
import json

import pytest
import torch

from tools import bench, gpu_check


def test_dry_run_runs_every_check_and_writes_its_json(tmp_path, capsys):
    out = tmp_path / "gpu_check.json"
    report = bench.main(["--gpu-check", "--dry-run", "--cache-dir", str(tmp_path / "cache"), "--out", str(out)])
    written = json.loads(out.read_text())
    assert written["dry_run"] and list(written["checks"]) == [name for name, _, _ in gpu_check.CHECKS]
    checks = report["checks"]
    for name, r in checks.items():
        assert r["ok"] is True or (r["ok"] is None and r["skipped"]), (name, r)  # ran and passed, or said why not
    exact = checks["decode_exact"]
    assert all(exact[f"{kind}_{mode}_rows_same"] == 1.0 for kind in ("greedy", "sampled") for mode in ("off", "eager"))
    speed = checks["decode_speed"]
    assert speed["off"]["host_syncs_per_token"] == 1 / 16 and speed["goal_sync_every_16"]
    assert speed["eager"]["tokens_per_s"] > 0 and speed["off"]["generate_tokens_per_s"] > 0
    for step in ("step_3b", "step_7b"):
        assert len(checks[step]["steps"]) == 2 and len(set(checks[step]["decode_chunks"])) == 1
    printed = capsys.readouterr().out
    assert all(f"\n{name:18s}" in printed for name in checks) and f"wrote {out}" in printed


def test_a_failing_check_is_reported_and_a_late_one_skipped(tmp_path, monkeypatch, capsys):
    """On a (pretended) GPU with a 10 s budget: the first check raises (FAIL, with its error), the second runs, the
    third needs more time than is left and is skipped."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)

    def broken(run):
        raise RuntimeError("no kernel image is available")

    monkeypatch.setattr(gpu_check, "CHECKS", [("broken", broken, 1), ("fine", lambda run: {"ok": True, "x": 1}, 1),
                                              ("long", lambda run: pytest.fail("should not run"), 60)])
    report = gpu_check.run_checks(out=str(tmp_path / "r.json"), budget_s=10)
    c = report["checks"]
    assert c["broken"]["ok"] is False and c["broken"]["error"] == "RuntimeError: no kernel image is available"
    assert c["fine"]["ok"] is True and c["long"]["ok"] is None and c["long"]["skipped"].startswith("out of time")
    printed = capsys.readouterr().out
    assert "FAIL" in printed and "skip" in printed


def test_without_a_gpu_the_real_check_is_a_one_line_error(tmp_path, capsys):
    from plumbing import cli

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(SystemExit) as stop:
        cli.run(bench.main, ["--gpu-check", "--out", str(tmp_path / "x.json")])
    assert stop.value.code == 2 and "--gpu-check needs a CUDA GPU" in capsys.readouterr().err
