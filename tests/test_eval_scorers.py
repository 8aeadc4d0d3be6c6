"""eval.py's scorers (docs/rewardmap.md §6) on hand-worked examples: the weight tables, ReasonMap-Plus weighted
accuracy, the map score (short and long questions), planning accuracy and map score weighted."""
from __future__ import annotations

import math

import pytest

from conftest import CHAIN, ans, plus_sample
from eval import REASONMAP_PLUS_WEIGHTS, REASONMAP_WEIGHTS, map_score, planning_scores, plus_accuracy
from transit.metro import Sample, best_route, route_text


def test_weight_tables_match_spec():
    assert REASONMAP_PLUS_WEIGHTS == {"easy": 1.0, "middle": 1.5, "hard": 2.0}
    assert REASONMAP_WEIGHTS[("easy", "easy")] == 1.0 and REASONMAP_WEIGHTS[("hard", "hard")] == 3.0
    assert REASONMAP_WEIGHTS[("medium", "easy")] == REASONMAP_WEIGHTS[("easy", "middle")] == 1.5
    assert len(REASONMAP_WEIGHTS) == 9


def test_plus_accuracy():
    samples = [plus_sample("torf1", "yes", "easy"), plus_sample("counting2", "4", "hard"),
               plus_sample("counting1", "A", "middle"), plus_sample("torf2", "no", "hard")]  # fmt: skip
    responses = ["\\boxed{yes}", "\\boxed{5}", "\\boxed{A}", "\\boxed{yes}"]
    out = plus_accuracy(samples, responses)
    assert out["correct"] == [True, False, True, False]
    assert out["weighted_acc"] == pytest.approx((1.0 + 1.5) / (1.0 + 2.0 + 1.5 + 2.0))
    assert out["count"] == pytest.approx(1.5 / 3.5)
    assert out["torf"] == pytest.approx(1.0 / 3.0)
    assert out["acc"] == 0.5 and out["n"] == 4
    assert out["per_type"]["counting1"] == 1.0 and "counting3" not in out["per_type"]
    assert math.isnan(plus_accuracy([], [])["weighted_acc"])
    with pytest.raises(ValueError):
        plus_accuracy(samples, responses[:2])


def test_map_score_short(sg):
    s1, s2 = "Somerset Station", "Bras Basah Station"
    ref = [("North South Line", "Somerset Station", "Dhoby Ghaut Station"), ("Circle Line", "Dhoby Ghaut Station", "Bras Basah Station")]
    assert map_score(route_text(ref), sg, s1, s2, [ref]) == 1 + 4 + 4 + 10  # ends, 2 pairs, correct
    other = [("North South Line", "Somerset Station", "City Hall Station"), ("East West Line", "City Hall Station", "Bugis Station")]
    wrong = ans(("North South Line", "Somerset", "Dhoby Ghaut"), ("Downtown Line", "Dhoby Ghaut", "Bras Basah"))
    assert map_score(wrong, sg, s1, s2, [ref]) == 1 + 4 + 1 + 1  # second pair: line differs, stops match
    assert map_score(wrong, sg, s1, s2, [other, ref]) == 7  # best over references
    assert map_score(wrong, sg, s1, s2, [other]) == 1 + 3 + 0  # pair 1: line + departure
    assert map_score(ans(("North South Line", "Somerset", "Orchard")), sg, s1, s2, [ref]) == 0  # ends wrong
    assert map_score("", sg, s1, s2, [ref]) == 0


def test_map_score_short_cap():
    route = [(f"Line {k}", s, e) for k, (s, e) in enumerate(zip("ACE", "CEG"), start=1)]
    assert map_score(route_text(route), CHAIN, "A", "G", [route]) == 10 + 10  # 1 + 12 capped at 10


def test_map_score_long_variants(sg):
    s1, s2 = "Clarke Quay Station", "Farrer Park Station"
    ref = [("North East Line", s1, s2)]
    base = "Route Name: North East Line\nDeparture Stop: Clarke Quay Station\nArrival Stop: Farrer Park Station\n"
    assert map_score(base + "Number of Via Stops: 2", sg, s1, s2, [ref], via="count") == 1 + 4 + 4 + 20
    assert map_score(base + "Number of Via Stops: 3", sg, s1, s2, [ref], via="count") == 1 + 4 + 2 + 20
    assert map_score(base + "Number of Via Stops: 9", sg, s1, s2, [ref], via="count") == 1 + 4 + 0 + 20
    assert map_score(base, sg, s1, s2, [ref], via="count") == 1 + 4 + 0 + 20  # missing count reads as 0
    full = base + "Via Stops: Dhoby Ghaut Station, Little India Station"
    assert map_score(full, sg, s1, s2, [ref], via="list") == 1 + 4 + (10 * 1 + 2) / 2 + 20
    half = base + "Via Stops: Dhoby Ghaut"
    assert map_score(half, sg, s1, s2, [ref], via="list") == 1 + 4 + (10 * 0.5 + 1) / 2 + 20
    assert route_text(ref, via=sg).endswith("Number of Via Stops: 2")
    with pytest.raises(ValueError):
        map_score(base, sg, s1, s2, [ref], via="both")


def test_planning_scores(sg):
    def sample(s1, s2, qd, md, long_q=None):
        route = best_route(sg, s1, s2)
        return Sample(id="p", qtype="planning", question="", answer=route_text(route), image=None, metro=sg,
                      map_difficulty=md, station_1=s1, station_2=s2, question_difficulty=qd,
                      transfer_count=len(route) - 1, route=route, routes=[route], question_long=long_q)  # fmt: skip

    a = sample("Clarke Quay Station", "Farrer Park Station", "easy", "hard")  # weight 2.0
    b = sample("Somerset Station", "Bras Basah Station", "medium", "hard")  # weight 2.5
    out = planning_scores([a, b], [a.answer, "I don't know"], official=False)
    assert out["correct"] == [True, False]
    assert out["weighted_acc"] == pytest.approx(2.0 / 4.5) and out["acc"] == 0.5
    assert out["weighted_map_score"] == pytest.approx(2.0 * 15 / 4.5)  # (1 + 4) + 10 for a, 0 for b
    long_a = route_text(a.route, via=sg)
    out = planning_scores([a], [long_a], long=True, official=False)
    assert out["weighted_map_score"] == 1 + 4 + 4 + 20
    a.question_difficulty = None  # derived from transfers: 0 -> easy
    assert planning_scores([a], [a.answer], official=False)["weighted_acc"] == 1.0


def test_planning_scores_default_to_the_official_evaluator(sg):
    """eval.py's headline planning numbers: official verdicts and map score (route-name points outside China
    only for names without ASCII letters: quirk 4 of released.py), weighted by the paper's table."""
    route = best_route(sg, "Clarke Quay Station", "Farrer Park Station")  # one segment, North East Line
    s = Sample(id="p", qtype="planning", question="", answer=route_text(route), image=None, metro=sg, country="singapore",
               city="singapore", map_difficulty="hard", station_1="Clarke Quay Station", station_2="Farrer Park Station",
               question_difficulty="easy", transfer_count=0, route=route, routes=[route],
               reference_plans=[[{"route_name": "North East Line", "departure_stop": "Clarke Quay",
                                  "arrival_stop": "Farrer Park", "via_stops": [], "num_via_stops": 2}]])
    out = planning_scores([s], [route_text(route) + "\n"])
    assert out["correct"] == [True] and out["weighted_acc"] == 1.0
    # ends +1, departure +1, arrival +1 (" Station" appended to the reference), no route-name points: 3 + 10
    assert out["weighted_map_score"] == 13.0
    assert planning_scores([s], [route_text(route) + "\n"], official=False)["weighted_map_score"] == 1 + 4 + 10
