"""ablate.py end to end on the CPU: two rows x two seeds of tiny runs, the table checked by hand against the
runs' own metrics.jsonl and eval_<stage>.json, the plot, and a second call that skips the finished runs."""
import json
import statistics
from pathlib import Path

import pytest

from tools import ablate
import train

# tiny runs: 3 cities, 2 prompts x 2 responses, 1 step per curriculum stage, 4 held-out questions
SMALL = ["--cities", "3", "--batch-size", "2", "--group-size", "2", "--max-new-tokens", "6",
         "--planning-max-new-tokens", "12", "--max-steps-per-stage", "1", "--eval-samples", "4"]
ROWS, SEEDS = ["rl-baseline", "rewardmap"], [0, 1]


def args(tmp_path: Path, *extra: str) -> list[str]:
    return ["--rows", *ROWS, "--seeds", *map(str, SEEDS), "--out", str(tmp_path / "abl"),
            "--cache-dir", str(tmp_path / "cache"), *SMALL, *extra]


def read_table(md: str) -> tuple[list[str], dict[tuple[str, str], dict[str, str]]]:
    """(header, {(ablation, stage): {column: cell}}) of the markdown table in ablation.md."""
    lines = [l for l in md.splitlines() if l.startswith("|")]
    split = lambda l: [c.strip() for c in l.strip("|").split("|")]  # noqa: E731
    header = split(lines[0])
    table = {}
    for l in lines[2:]:
        cells = dict(zip(header, split(l)))
        table[(cells["ablation"], cells["stage"].strip("*"))] = cells
    return header, table


def expect(values: list[float], percent: bool = False) -> str:
    """mean ± sample std, by hand."""
    m, s = statistics.mean(values), statistics.stdev(values)
    return f"{100 * m:.1f} ± {100 * s:.1f}" if percent else f"{m:.2f} ± {s:.2f}"


def log(folder: Path) -> list[dict]:
    return [json.loads(l) for l in (folder / "metrics.jsonl").read_text().splitlines() if l.strip()]


@pytest.fixture(scope="module")
def ablation(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ablate")
    results = ablate.main(args(tmp))
    return tmp, results


def test_table_rows_columns_and_values_by_hand(ablation):
    tmp, results = ablation
    out = tmp / "abl"
    md = (out / "ablation.md").read_text()
    header, table = read_table(md)
    assert header == ["ablation", "stage", "steps", "training reward", "zero-var groups", "TorF", "Count",
                      "planning", "map score"]
    assert list(table) == [("RL baseline", "whole run (all), final model"), ("RewardMap", "judgement"),
                           ("RewardMap", "counting"), ("RewardMap", "planning"), ("RewardMap", "whole run, final model")]
    assert "python -m tools.ablate --rows rl-baseline rewardmap" in md and "Date: " in md
    assert list(results) == ROWS and [r["seed"] for r in results["rewardmap"]] == SEEDS

    runs = {row: [out / row / f"seed-{s}" for s in SEEDS] for row in ROWS}
    # equal training: the one-stage row gets 3 x the per-stage cap, each curriculum stage gets the cap
    assert [len(log(f)) for f in runs["rl-baseline"]] == [3, 3]
    assert [[r["stage"] for r in log(f)] for f in runs["rewardmap"]] == [["judgement", "counting", "planning"]] * 2

    def by_hand(row: str, stage: str | None) -> dict[str, str]:
        logs = [[r for r in log(f) if stage is None or r["stage"] == stage] for f in runs[row]]
        return {"steps": str(len(logs[0])),
                "training reward": expect([statistics.mean(r["reward/total"] for r in l) for l in logs]),
                "zero-var groups": expect([statistics.mean(r["groups/zero_std_frac"] for r in l) for l in logs])}

    for (row, name), stage in (("rewardmap", "RewardMap"), "judgement"), (("rewardmap", "RewardMap"), "counting"), \
                               (("rewardmap", "RewardMap"), "planning"):
        got = table[(name, stage)]
        assert {k: got[k] for k in ("steps", "training reward", "zero-var groups")} == by_hand(row, stage), stage
    assert {k: table[("RewardMap", "whole run, final model")][k] for k in ("steps", "training reward", "zero-var groups")} \
        == {**by_hand("rewardmap", None), "steps": "3"}
    assert {k: table[("RL baseline", "whole run (all), final model")][k] for k in ("steps", "training reward", "zero-var groups")} \
        == by_hand("rl-baseline", None)

    # end-of-stage accuracy: train.py's own eval_<stage>.json; the stage's other kinds are not measured
    evals = lambda row, stage: [json.loads((f / f"eval_{stage}.json").read_text()) for f in runs[row]]  # noqa: E731
    assert table[("RewardMap", "judgement")]["TorF"] == expect([e["plus"]["torf"] for e in evals("rewardmap", "judgement")], True)
    assert table[("RewardMap", "counting")]["Count"] == expect([e["plus"]["count"] for e in evals("rewardmap", "counting")], True)
    assert table[("RewardMap", "judgement")]["Count"] == table[("RewardMap", "counting")]["TorF"] == "–"
    assert table[("RewardMap", "planning")]["map score"] == \
        expect([e["planning"]["weighted_map_score"] for e in evals("rewardmap", "planning")])
    # the final model's sample is the one train.py evaluates a one-stage run on at its end (every kind, same
    # seed), and that stage's end is the final model: so the RL baseline's final cells are its eval_all.json's
    final = table[("RL baseline", "whole run (all), final model")]
    for col, part, key in (("TorF", "plus", "torf"), ("Count", "plus", "count"), ("planning", "planning", "weighted_acc")):
        vals = [(e.get(part) or {}).get(key) for e in evals("rl-baseline", "all")]
        if all(v is not None for v in vals):
            assert final[col] == expect(vals, True), col
        else:  # a kind missing from a seed's 4 questions: the mean of the others, saying how many
            assert final[col].endswith(f"(n={sum(v is not None for v in vals)})") or final[col] == "–", col
    for base, rm in zip(results["rl-baseline"], results["rewardmap"]):  # every row of a seed: the same questions
        assert base["final"]["n"] == 4 and rm["final"]["ids"] == base["final"]["ids"]
    assert [sorted(r["final"]["ids"]) for r in results["rl-baseline"]] == \
        [sorted(x["id"] for x in e["records"]) for e in evals("rl-baseline", "all")]
    assert (out / "ablation.png").stat().st_size > 10_000


def test_second_call_skips_finished_runs_and_a_cut_run_resumes(ablation, monkeypatch):
    tmp, first = ablation
    out = tmp / "abl"
    table_before = read_table((out / "ablation.md").read_text())[1]
    monkeypatch.setattr(train, "train", lambda cfg: pytest.fail(f"finished run trained again: {cfg.out}"))
    again = ablate.main(args(tmp))
    assert again == first and read_table((out / "ablation.md").read_text())[1] == table_before
    monkeypatch.undo()

    # a run whose result.json is missing (killed after its last checkpoint) resumes there: no step trained again
    (out / "rewardmap" / "seed-1" / "result.json").unlink()
    steps = []
    real_step = train.grpo.grpo_step
    monkeypatch.setattr(train.grpo, "grpo_step", lambda *a, **kw: steps.append(1) or real_step(*a, **kw))
    resumed = ablate.main(args(tmp))
    assert steps == [] and (out / "rewardmap" / "seed-1" / "result.json").exists()
    assert read_table((out / "ablation.md").read_text())[1] == table_before
    assert resumed["rewardmap"][1]["final"] == first["rewardmap"][1]["final"]


def test_refuses_other_flags_over_finished_runs_and_flags_it_sets(ablation):
    tmp, _ = ablation
    with pytest.raises(ValueError, match="other flags"):
        ablate.main(args(tmp, "--lr", "0.001"))
    with pytest.raises(ValueError, match="--seed is set by ablate.py"):
        ablate.main(args(tmp, "--seed", "3"))
    with pytest.raises(ValueError, match="--curriculum is set by ablate.py"):
        ablate.main(args(tmp, "--curriculum=coarse"))


def test_cells_mean_and_sample_std():
    assert ablate.cell([0.5, 0.7, None], percent=True) == "60.0 ± 14.1 (n=2)"
    assert ablate.cell([1.0, 2.0, 3.0]) == "2.00 ± 1.00"
    assert ablate.cell([0.25]) == "0.25 ± 0.00" and ablate.cell([None, None]) == "–"


def test_sft_rows_are_the_papers_comparison(tmp_path):
    """The SFT row trains and evaluates the SFT model alone (no GRPO step); SFT -> RL runs GRPO from it without a
    curriculum (one stage), the authors' SFT + RL."""
    assert ablate.train_argv("sft", 0, 1, 4, [])[:10] == [*ablate.FROM_SCRATCH, "--stage", "sft"]  # the row's --sft wins
    out = ablate.main(["--rows", "sft", "sft-rl", "--seeds", "0", "--out", str(tmp_path / "abl"),
                       "--cache-dir", str(tmp_path / "cache"), *SMALL, "--sft", "3"])
    sft_run, sft_rl = out["sft"][0], out["sft-rl"][0]
    assert sft_run["whole_run"]["steps"] == 0 and sft_run["stages"] == {} and sft_run["final"]["n"] == 4
    assert list(sft_rl["stages"]) == ["all"] and sft_rl["whole_run"]["steps"] == 3  # 3 x 1 step: no curriculum
    md = (tmp_path / "abl" / "ablation.md").read_text()
    assert "| SFT | **whole run" in md and "| SFT -> RL | **whole run" in md
