"""The learning demo (`train.py --preset demo`, docs/demo.md), short: its world, its text-only model, and a trained
folder that eval.py evaluates on the held-out cities of the world it was trained on."""
import json

import data
import eval as evaluation
import model as models
import train
from offline import synthetic

SHORT = ["--preset", "demo", "--cities", "30", "--sft", "30", "--sft-drill", "10", "--max-steps-per-stage", "3",
         "--batch-size", "4", "--group-size", "2", "--eval-samples", "12", "--eval-every", "2"]


def test_demo_world_is_small_text_only_cities_with_one_token_names(tmp_path):
    train_samples, test = data.load_data("", 30, 0, tmp_path, world="demo")
    assert not any(s.image for s in train_samples + test)
    assert {s.city for s in train_samples}.isdisjoint({s.city for s in test}) and len({s.city for s in test}) == 3
    pool = set(synthetic.demo_names())
    for s in train_samples:
        assert 2 <= len(s.metro) <= 4 and all(4 <= len(st) <= 6 for st in s.metro.values())
        assert {st for line in s.metro.values() for st in line} <= pool
    policy = models.load_model("tiny", train_samples, cache_dir=tmp_path)
    assert not policy.is_vlm  # the map is read as text
    assert all(list(s.metro) == [f"Line {x}" for x in "ABCD"[: len(s.metro)]] for s in train_samples)  # lettered
    assert "Line A:" in models.chat_text(policy, train_samples[0])  # by line: the text models' default
    demo = models.load_model("tiny", train_samples, cache_dir=tmp_path, world="demo")
    assert demo.map_text == "station" and models.metro_as_text(train_samples[0].metro, "station") in \
        models.chat_text(demo, train_samples[0])
    names = sorted(pool & {st for s in train_samples for line in s.metro.values() for st in line})
    assert all(len(policy.tokenizer.tokenize(" " + n)) == 1 for n in names)  # each name one token
    rows = [row for s in train_samples for row in models.metro_as_text(s.metro, "station").split("\n")]
    assert all(len(demo.tokenizer.tokenize(row)) == 2 for row in rows)  # a row: the name, then its lines' letters
    assert data.load_data("", 30, 0, tmp_path, world="demo")[0][0].metro == train_samples[0].metro  # read back


def test_demo_preset_trains_into_runs_demo_and_eval_uses_its_world(tmp_path, monkeypatch):
    cfg = train.parse_args(["--preset", "demo"])
    assert (cfg.world, cfg.out, cfg.model) == ("demo", "runs/demo", "tiny")
    out = tmp_path / "demo"
    train.main(SHORT + ["--out", str(out), "--cache-dir", str(tmp_path / "cache")])
    made = json.loads((out / "config.json").read_text())
    assert made["world"] == "demo" and made["cities"] == 30 and made["sft_data"] == "working" and made["sft_drill"] == 10
    evals = [json.loads(line) for line in (out / "evals.jsonl").read_text().splitlines()]
    # --eval-every 2 over 3 + 3 + 3 steps: global steps 2, 4 and 8 mid-stage (6 is the counting stage's end, which
    # evaluates anyway), and each stage's end
    assert [(e["global_step"], e["stage"], e["stage_end"]) for e in evals] == [
        (2, "judgement", False), (3, "judgement", True), (4, "counting", False), (6, "counting", True),
        (8, "planning", False), (9, "planning", True)]
    assert evals[-1]["planning"]["n"] > 0 and "weighted_map_score" in evals[-1]["planning"]
    # no --cities / --world / --seed: the folder's own world, its held-out cities, with each type's answer prior
    summary = evaluation.main(["--model", str(out / "model"), "--cache-dir", str(tmp_path / "cache")])
    _, test = data.load_data("", 30, 0, tmp_path / "cache", world="demo")
    assert summary["n"] == len(test)
    written = json.loads((out / "model" / "eval.json").read_text())
    assert set(written["priors"]) == set(written["per_type_accuracy"]) == {s.qtype for s in test}


def test_demo_model_reads_a_stations_line_set_from_the_map_before_any_training(tmp_path):
    """The demo's text model starts with an induction circuit (tiny_model.set_induction_circuit): untrained, given
    a question's prompt and the asked station's name, it already writes that station's line set from the map (the
    row ` Alder AC`) far more often than its 1 / vocabulary chance; the question, where the name is followed by
    other words, is the main competitor."""
    import torch

    from transit.metro import station_lines

    train_samples, _ = data.load_data("", 30, 0, tmp_path, world="demo")
    demo = models.load_model("tiny", train_samples, cache_dir=tmp_path, world="demo")
    right = asked = 0
    for s in [s for s in train_samples if s.qtype in ("counting2", "torf2")][:60]:
        name, line_set = models.station_row(s.station_1, station_lines(s.metro)[s.station_1]).rsplit(" ", 1)
        ids = demo.tokenizer(models.chat_text(demo, s) + name, add_special_tokens=False, return_tensors="pt")
        with torch.no_grad():
            predicted = demo.model(**ids).logits[0, -1].argmax().item()
        right += predicted == demo.tokenizer.convert_tokens_to_ids(demo.tokenizer.tokenize(" " + line_set))[0]
        asked += 1
    assert asked == 60 and right / asked > 0.25
