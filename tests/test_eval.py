"""eval.py: the paper's metrics on hand-built responses, the text table, and the self-contained HTML page."""
import json
from html.parser import HTMLParser

import pytest

import cli
import eval as evaluation
import rewards
import synthetic
from metro import route_text

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
    plan = [(s, i % 2 == 0) for i, s in enumerate(samples) if s.qtype == "planning"]
    assert 0 < summary["planning"]["weighted_acc"] < 1
    for q, acc in summary["per_type_accuracy"].items():
        oks = [i % 2 == 0 for i, s in enumerate(samples) if s.qtype == q]
        assert acc == pytest.approx(sum(oks) / len(oks)), q
    assert len(plan) == sum(1 for s in samples if s.qtype == "planning")


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
