"""eval.py: the paper's metrics on hand-built responses, the text table, and the self-contained HTML page."""
import html
import json
import math
import random
from html.parser import HTMLParser

import pytest
import torch
from PIL import Image
from conftest import plus_sample

from plumbing import cli
import data
import eval as evaluation
import rewards
from offline import synthetic
from transit.metro import route_text

PLUS_W = {"easy": 1.0, "middle": 1.5, "hard": 2.0}  # docs/rewardmap.md §6.1, written out here, not read from eval.py


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    return synthetic.synthetic_dataset(3, seed=5, out_dir=tmp_path_factory.mktemp("ds"), questions_per_type=3, progress=False)


def right(s):
    return route_text(s.route) if s.qtype == "planning" else f"The answer is \\boxed{{{s.answer}}}."


def wrong(s):
    if s.qtype == "planning":
        return "Route Name: Nowhere Line\nDeparture Stop: A\nArrival Stop: B"
    return {"yes": "\\boxed{no}", "no": "\\boxed{yes}"}.get(s.answer, "\\boxed{999}" if s.qtype != "counting1" else
                                                         "\\boxed{" + "ABCD"[("ABCD".index(s.answer) + 1) % 4] + "}")


def test_metrics_on_hand_built_responses(samples):
    # every other question answered right, so the expected weighted accuracies are easy to compute here
    responses = [right(s) if i % 2 == 0 else wrong(s) for i, s in enumerate(samples)]
    summary = evaluation.metrics_for(samples, responses)
    plus = [(s, i % 2 == 0) for i, s in enumerate(samples) if s.qtype != "planning"]

    def wacc(types):
        pairs = [(PLUS_W[s.map_difficulty], ok) for s, ok in plus if s.qtype in types]
        return sum(w * ok for w, ok in pairs) / sum(w for w, _ in pairs)

    assert summary["plus"]["weighted_acc"] == pytest.approx(wacc({"torf1", "torf2", "counting1", "counting2", "counting3"}))
    assert summary["plus"]["count"] == pytest.approx(wacc({"counting1", "counting2", "counting3"}))
    assert summary["plus"]["torf"] == pytest.approx(wacc({"torf1", "torf2"}))
    # planning: weight 1 + (question difficulty + map difficulty) / 2 steps (docs/rewardmap.md §6.2: 1.0 .. 3.0)
    plan = [(1 + 0.5 * (["easy", "medium", "hard"].index(s.question_difficulty)
                        + ["easy", "middle", "hard"].index(s.map_difficulty)), i % 2 == 0)
            for i, s in enumerate(samples) if s.qtype == "planning"]
    assert len({w for w, _ in plan}) > 1 and {ok for _, ok in plan} == {True, False}  # the weights matter here
    assert summary["planning"]["weighted_acc"] == pytest.approx(sum(w * ok for w, ok in plan) / sum(w for w, _ in plan))
    assert summary["planning"]["acc"] == pytest.approx(sum(ok for _, ok in plan) / len(plan))
    for q, acc in summary["per_type_accuracy"].items():
        oks = [i % 2 == 0 for i, s in enumerate(samples) if s.qtype == q]
        assert acc == pytest.approx(sum(oks) / len(oks)), q


def test_all_right_and_all_wrong(samples):
    best = evaluation.metrics_for(samples, [right(s) for s in samples])
    worst = evaluation.metrics_for(samples, [wrong(s) for s in samples])
    assert best["plus"]["weighted_acc"] == 1.0 and best["planning"]["weighted_acc"] == 1.0
    assert worst["plus"]["weighted_acc"] == 0.0 and worst["planning"]["weighted_acc"] == 0.0
    assert best["planning"]["weighted_map_score"] > worst["planning"]["weighted_map_score"]
    text = evaluation.table(best)
    assert "ReasonMap-Plus weighted acc" in text and "100.0%" in text and "accuracy planning" in text
    torf = [s for s in samples if s.qtype == "torf1"]
    line = evaluation.one_line(evaluation.metrics_for(torf, [right(s) for s in torf]))
    assert "Count n/a" in line and "TorF 100.0%" in line  # an empty split shows n/a, not nan or 0


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.sections, self.srcs, self.text = 0, [], []

    def handle_starttag(self, tag, attrs):
        self.sections += tag == "section"
        self.srcs += [v for k, v in attrs if k in ("src", "href")]

    def handle_data(self, d):
        self.text.append(d)


def test_html_page_is_self_contained(samples, tmp_path):
    responses = [right(s) if i % 3 else "<script>alert(1)</script>" for i, s in enumerate(samples)]
    summary = evaluation.metrics_for(samples, responses)
    summary["records"] = [{"id": s.id, "qtype": s.qtype, "map_difficulty": s.map_difficulty, "question": s.question,
                           "answer": s.answer, "response": r, "image": s.image,
                           "reward": vars(rewards.reward(s, r))} for s, r in zip(samples, responses)]
    page = tmp_path / "eval.html"
    evaluation.write_html(summary, page, n_examples=6)
    html = page.read_text(encoding="utf-8")
    parsed = _Page()
    parsed.feed(html)
    assert parsed.sections == 6
    assert parsed.srcs and all(s.startswith("data:image/png;base64,") for s in parsed.srcs)  # no server, no files
    assert "<script>" not in html  # responses are escaped, not executed
    assert "ReasonMap-Plus weighted acc" in "".join(parsed.text)
    json.loads(cli.dumps(summary))  # eval.json is strict JSON


def test_scorers_name_the_bad_sample(samples):
    plan = next(s for s in samples if s.qtype == "planning")
    with pytest.raises(ValueError, match=f"sample {plan.id}"):
        evaluation.plus_accuracy([plan], ["no box"])


# ------------------------------------------------------------------------------------------ evaluate / generate


class _FakeRollout:
    def __init__(self, texts, finished):
        self.texts, self.finished = texts, torch.tensor(finished, dtype=torch.bool)


def _fake_sampler(calls, cut):
    """A grpo.sample_groups that records each call and answers every question right (`right`), tagged with its
    id; questions whose id is in `cut` come back unfinished (hit the token budget)."""
    def sample_groups(policy, samples, group_size, max_new_tokens, temperature=1.0, top_p=1.0, generator=None,
                      **kw):
        calls.append(dict(ids=[s.id for s in samples], qtypes={s.qtype for s in samples}, tokens=max_new_tokens,
                          group_size=group_size, temperature=temperature))
        return _FakeRollout([f"[{s.id}]\n{right(s)}" for s in samples], [s.id not in cut for s in samples])

    return sample_groups


@pytest.mark.parametrize("planning_tokens,batch_size", [(48, 4), (None, 5), (48, 64)])
def test_evaluate_keeps_input_order_and_per_type_budgets(samples, monkeypatch, planning_tokens, batch_size):
    shuffled = list(samples)
    random.Random(3).shuffle(shuffled)  # types and question lengths interleaved, so batching must reorder
    cut = {s.id for s in shuffled[::4]}
    calls = []
    monkeypatch.setattr(evaluation.grpo, "sample_groups", _fake_sampler(calls, cut))
    summary = evaluation.evaluate(None, shuffled, max_new_tokens=7, planning_max_new_tokens=planning_tokens,
                                  batch_size=batch_size, progress=False)
    # records in input order, each with its own response and truncation flag
    assert [r["id"] for r in summary["records"]] == [s.id for s in shuffled]
    assert [r["response"] for r in summary["records"]] == [f"[{s.id}]\n{right(s)}" for s in shuffled]
    assert [r["truncated"] for r in summary["records"]] == [s.id in cut for s in shuffled]
    assert summary["truncated"] == len(cut) and summary["n"] == len(shuffled)
    # metrics scored on the right pairs: every answer is right for its own question
    assert summary["plus"]["weighted_acc"] == 1.0 and summary["planning"]["weighted_acc"] == 1.0
    assert all(r["reward"]["correctness"] > 0 for r in summary["records"])
    # each question generated once, greedily, at most batch_size at a time
    assert sorted(i for c in calls for i in c["ids"]) == sorted(s.id for s in shuffled)
    for c in calls:
        assert c["group_size"] == 1 and c["temperature"] == 0.0 and len(c["ids"]) <= batch_size
        if planning_tokens is None:  # one budget for every type (planning may share a batch)
            assert c["tokens"] == 7, c
        else:  # a batch holds one kind, generated with that kind's budget
            assert c["qtypes"] == {"planning"} or "planning" not in c["qtypes"], c
            assert c["tokens"] == (48 if c["qtypes"] == {"planning"} else 7), c
    if planning_tokens:
        assert {c["tokens"] for c in calls} == {7, 48}


# ------------------------------------------------------------------------------------------ the HTML page


FIELDS = {"id": 'id-"1"<b>bold-id</b>', "question": "<script>alert('question')</script>",
          "answer": "<b>answer</b> & <i>more</i>", "response": "<script>alert('response')</script><b>r</b>",
          "qtype": "<b>torf1</b>", "map_difficulty": "<b>easy</b>"}


def test_html_page_escapes_every_field(samples, tmp_path):
    s = next(x for x in samples if x.qtype == "torf1")
    summary = evaluation.metrics_for([s], [right(s)])
    Image.new("RGB", (8, 6), (200, 30, 30)).save(tmp_path / "map.png")  # small: the page embeds it per card
    rec = {"id": s.id, "qtype": s.qtype, "map_difficulty": s.map_difficulty, "question": s.question, "answer": s.answer,
           "response": right(s), "image": str(tmp_path / "map.png"), "reward": vars(rewards.reward(s, right(s)))}
    summary["records"] = [{**rec, field: value} for field, value in FIELDS.items()]  # one hostile field per card
    page = tmp_path / "eval.html"
    evaluation.write_html(summary, page, n_examples=len(FIELDS))
    text = page.read_text(encoding="utf-8")
    parsed = _Page()
    parsed.feed(text)
    assert parsed.sections == len(FIELDS)
    for field, value in FIELDS.items():
        assert value not in text, field  # never raw
        assert html.escape(value) in text, field  # but shown, escaped
    assert "<script" not in text and "<b>" not in text
    assert text.count('alt="map for ' + html.escape(FIELDS["id"]) + '"') == 1  # the attribute quote escaped too
    assert "".join(parsed.text).count("alert('response')") == 1  # the browser shows the text itself


# ------------------------------------------------------------------------------------------ the command line


def test_eval_main_end_to_end_writes_strict_json_and_html(tmp_path, capsys):
    """eval.py on an exported dataset whose test split has no counting questions (Count accuracy NaN -> null)."""
    made = synthetic.synthetic_dataset(3, seed=5, out_dir=tmp_path / "made", questions_per_type=3, progress=False)
    kept = [s for s in made if s.split == "train" or s.qtype in ("torf1", "torf2", "planning")]
    folder = tmp_path / "ds"
    data.export_dataset(kept, folder)
    out = tmp_path / "out"
    summary = evaluation.main(["--data", str(folder), "--limit", "6", "--out", str(out),
                               "--cache-dir", str(tmp_path / "cache"), "--planning-max-new-tokens", "6"])
    strict = lambda c: pytest.fail(f"eval.json is not strict JSON: {c}")  # noqa: E731
    written = json.loads((out / "eval.json").read_text(encoding="utf-8"), parse_constant=strict)
    test_ids = {s.id for s in kept if s.split == "test"}
    assert written["n"] == summary["n"] == 6 and len(written["records"]) == 6
    assert {r["id"] for r in written["records"]} <= test_ids and len({r["id"] for r in written["records"]}) == 6
    assert written["plus"]["count"] is None and math.isnan(summary["plus"]["count"])
    assert written["records"] == json.loads(cli.dumps(summary["records"]))
    parsed = _Page()
    parsed.feed((out / "eval.html").read_text(encoding="utf-8"))
    assert parsed.sections == 6 and "ReasonMap-Plus weighted acc" in "".join(parsed.text)
    printed = capsys.readouterr().out
    assert f"wrote {out / 'eval.json'} and {out / 'eval.html'}" in printed


def test_answer_priors_are_the_training_splits_most_common_answers():
    train = [plus_sample("torf1", a) for a in "yes yes no".split()] + [plus_sample("counting2", a) for a in "2 1 1".split()]
    test = [plus_sample("torf1", a) for a in "yes no no no".split()] + [plus_sample("counting2", "1")]
    priors = evaluation.answer_priors(train, test)
    assert priors == {"torf1": {"answer": "yes", "accuracy": 0.25}, "counting2": {"answer": "1", "accuracy": 1.0}}
    summary = {"per_type_accuracy": {"torf1": 0.5}, "priors": priors}
    assert "accuracy torf1 (answer prior 25.0%)" in evaluation.table(summary)
    tied = evaluation.answer_priors(train[:2] + [plus_sample("torf1", "no")] * 2, test)  # yes 2, no 2
    assert tied["torf1"] == {"answer": "no / yes", "accuracy": (0.75 + 0.25) / 2}


def test_eval_loads_the_model_with_the_image_budget_dtype_and_qlora_asked(tmp_path, monkeypatch):
    """--max-pixels (the training budget: a base checkpoint's own is 12.8 M pixels), --dtype and --qlora reach the
    model loader; without them it gets the defaults (the folder's budget, the device's dtype, no 4-bit base)."""
    got = []

    def load(name, train, **kw):
        got.append(kw)
        raise SystemExit  # stop before generating: only the loader's arguments matter here

    monkeypatch.setattr(evaluation.models, "load_model", load)
    monkeypatch.setattr(evaluation.lora, "check_qlora", lambda device: None)  # this CPU has no 4-bit kernels
    base = ["--cache-dir", str(tmp_path / "cache"), "--cities", "3"]
    for argv in (base, base + ["--max-pixels", "1003520", "--dtype", "bfloat16", "--qlora"]):
        with pytest.raises(SystemExit):
            evaluation.main(argv)
    assert (got[0]["max_pixels"], got[0]["dtype"], got[0]["qlora"]) == (0, torch.float32, False)
    assert (got[1]["max_pixels"], got[1]["dtype"], got[1]["qlora"]) == (1003520, torch.bfloat16, True)


def test_eval_qlora_on_a_cpu_is_a_one_line_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        cli.run(evaluation.main, ["--model", str(tmp_path / "absent-model"), "--qlora", "--cache-dir",
                                  str(tmp_path / "cache"), "--cities", "3"])
    assert stop.value.code == 2 and "error: --qlora needs a CUDA GPU and bitsandbytes" in capsys.readouterr().err
