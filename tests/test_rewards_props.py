"""Property tests for rewards.py: totality and ranges on arbitrary text; a `best_route` answer is always
correct with the maximal detail for its transfer count; any single corruption makes it incorrect."""
from __future__ import annotations

import math
import random
import time

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from conftest import REAL_METRO
from eval import map_score, planning_scores, plus_accuracy
from offline.maps import generate_metro
from transit.metro import Sample, best_route, load_metro, route_text
from rewards import (
    MAX_SEGMENTS,
    RewardConfig,
    boxed_answers,
    detail_reward,
    normalize_line,
    normalize_station,
    parse_segments,
    planning_correct,
    reward,
)

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def random_metro(seed: int) -> dict[str, list[str]]:
    """A small random city: 2-5 lines over a pool of 14 stations, so lines share interchanges."""
    rng = random.Random(seed)
    pool = [f"Stop {k}" for k in range(14)]
    return {f"Line {k + 1}": rng.sample(pool, rng.randint(3, 8)) for k in range(rng.randint(2, 5))}


def _metros() -> list[tuple[str, dict]]:
    out = [(f"random{s}", random_metro(s)) for s in range(3)]
    out += [(f"synthetic-{d}", generate_metro(7, d)) for d in ("easy", "middle", "hard")]
    out += [(rel, load_metro(REAL_METRO / rel)) for rel in ("singapore/singapore.json", "china/beijing.json")]
    return out


METROS = _metros()
METRO_IDS = [name for name, _ in METROS]


def planning_sample(metro, s1, s2, t=1, difficulty="hard"):
    return Sample(id="p", qtype="planning", question="", answer="", image=None, metro=metro,
                  map_difficulty=difficulty, station_1=s1, station_2=s2, transfer_count=t)  # fmt: skip


PLUS = [Sample(id=q, qtype=q, question="", answer=a, image=None, metro={}, map_difficulty="hard")
        for q, a in (("torf1", "yes"), ("torf2", "no"), ("counting1", "B"), ("counting2", "3"), ("counting3", "12"))]  # fmt: skip

FRAGMENTS = ["Route Name:", "Departure Stop:", "Arrival Stop:", "Number of Via Stops:", "Via Stops:", "--", "\n",
             " ", "**", "\\boxed{", "{", "}", "yes", "B)", "3", "Line 1", "Somerset Station", "Stop 1", "Stop 2",
             "(Transfer Station)", "站", "（", "）", "(", ")", ",", "\x00", "\ud7ff", "9" * 50]  # fmt: skip
junk = st.one_of(
    st.text(max_size=3000),
    st.binary(max_size=1000).map(lambda b: b.decode("latin-1")),
    st.lists(st.sampled_from(FRAGMENTS), max_size=400).map("".join),
)


def check_reward(r, cfg=RewardConfig()):
    values = (r.format, r.correctness, r.detail, r.weight, r.total)
    assert all(isinstance(v, float) or isinstance(v, int) for v in values) and all(map(math.isfinite, values))
    assert r.format in (0, cfg.format_score) and r.correctness in (0, cfg.correct_score)
    assert cfg.floor <= r.detail <= 10
    assert 1.0 <= r.weight <= 2.0
    assert -10 <= r.total <= 32
    assert r.total == pytest.approx(r.weight * (r.format + r.correctness + cfg.alpha * r.detail))


# ---------------------------------------------------------------------------------------------------
# Totality


@pytest.mark.parametrize("name, metro", METROS, ids=METRO_IDS)
@FAST
@given(text=junk, t=st.integers(0, 6))
def test_any_text_is_scored_finitely_and_in_range(name, metro, text, t):
    stations = sorted({s for line in metro.values() for s in line})
    s1, s2 = stations[0], stations[-1]
    for variant in ("paper", "released"):
        cfg = RewardConfig(detail_variant=variant)
        check_reward(reward(planning_sample(metro, s1, s2, t), text, cfg), cfg)
        raw = detail_reward(text, metro, s1, s2, t, variant)
        assert math.isfinite(raw) and raw <= 10 and raw >= -5 * (MAX_SEGMENTS + 1)
    for s in PLUS:
        check_reward(reward(s, text))
    assert 0 <= map_score(text, metro, s1, s2, [[]]) <= 20
    assert 0 <= map_score(text, metro, s1, s2, [[(next(iter(metro)), s1, s2)]], via="list") <= 40
    assert 0 <= map_score(text, metro, s1, s2, [[(next(iter(metro)), s1, s2)]], via="count") <= 40


def test_huge_inputs_return_quickly():
    metro = random_metro(0)
    seg = "Route Name: Line 1\nDeparture Stop: Stop 1\nArrival Stop: Stop 2\nNumber of Via Stops: 9\n--\n"
    inputs = ["--" * 2_500_000, "\\boxed{" * 700_000, "{" * 5_000_000, "(" * 5_000_000, seg * 70_000,
              "Route Name: " + "(" * 5_000_000, "a" * 5_000_000, "\\boxed{" + "9" * 5_000_000 + "}"]  # fmt: skip
    start = time.perf_counter()
    for text in inputs:
        assert len(text) >= 4_900_000
        for s in PLUS + [planning_sample(metro, "Stop 1", "Stop 2", 0)]:
            check_reward(reward(s, text))
        detail_reward(text, metro, "Stop 1", "Stop 2", 0, "released")
        map_score(text, metro, "Stop 1", "Stop 2", [[("Line 1", "Stop 1", "Stop 2")]], via="count")
    assert time.perf_counter() - start < 10  # about 0.5 s in practice; generous for busy machines


def test_non_string_response_is_scored_as_empty():
    check_reward(reward(PLUS[0], None))  # type: ignore[arg-type]
    assert parse_segments(b"Route Name:") == [] and boxed_answers(123) == []  # type: ignore[arg-type]


def test_eval_scorers_on_junk():
    s = planning_sample(random_metro(1), "Stop 1", "Stop 2", 0, "easy")
    s.route = [("Line 1", "Stop 1", "Stop 2")]
    out = planning_scores([s, s], ["", "\x00" * 100], long=True)
    assert out["weighted_acc"] == 0 and out["weighted_map_score"] == 0
    assert plus_accuracy(PLUS, ["}{"] * len(PLUS))["weighted_acc"] == 0


# ---------------------------------------------------------------------------------------------------
# Optimal routes are correct and get the maximal detail


def pair(draw_data, metro):
    stations = sorted({s for line in metro.values() for s in line})
    s1 = draw_data.draw(st.sampled_from(stations))
    s2 = draw_data.draw(st.sampled_from([s for s in stations if normalize_station(s) != normalize_station(s1)]))
    route = best_route(metro, s1, s2)
    assume(route)
    return s1, s2, route


def cosmetic(route, style):
    """The same route written the way models write it."""
    if style == 0:
        return route_text(route)
    if style == 1:
        return "Let me look at the map.\n" + route_text([(l, d.lower(), a.upper()) for l, d, a in route]) + "\nDone."
    if style == 2:
        return route_text([(l, d + " (Transfer Station)", a.replace(" Station", "")) for l, d, a in route])
    return route_text([(f"**{l}**", f"**{d}**", a) for l, d, a in route]).replace("--", "---")


@pytest.mark.parametrize("name, metro", METROS, ids=METRO_IDS)
@FAST
@given(draw_data=st.data(), style=st.integers(0, 3))
def test_best_route_is_correct_with_maximal_detail(name, metro, draw_data, style):
    s1, s2, route = pair(draw_data, metro)
    t = len(route) - 1
    text = cosmetic(route, style)
    assert planning_correct(text, metro, s1, s2)
    assert detail_reward(text, metro, s1, s2, t, "paper") == min(6 + t, 10)  # 2 + 4 + one per transfer
    if style != 3:  # the released variant matches route names exactly, so no markdown there
        assert detail_reward(text, metro, s1, s2, t, "released") == (1 if t == 0 else min(4 * t, 10))
    assert map_score(text, metro, s1, s2, [route]) == min(10, 1 + 4 * len(route)) + 10
    r = reward(planning_sample(metro, s1, s2, t), text, RewardConfig(lenient_parsing=True))
    assert r.correctness == 10 and r.format == 1
    if style in (0, 2):  # the released parser: exact keys, nothing after the last arrival
        assert reward(planning_sample(metro, s1, s2, t), text).correctness == 10


# ---------------------------------------------------------------------------------------------------
# Any single corruption makes the route incorrect


def on_line(metro, line, station):
    return normalize_station(station) in {normalize_station(s) for s in metro[line]}


@pytest.mark.parametrize("name, metro", METROS, ids=METRO_IDS)
@FAST
@given(draw_data=st.data(), kind=st.sampled_from(["wrong_line", "wrong_stop", "broken_transfer", "extra_segment"]))
def test_single_corruption_is_incorrect(name, metro, draw_data, kind):
    s1, s2, route = pair(draw_data, metro)
    route = list(route)
    stations = sorted({s for line in metro.values() for s in line})
    i = draw_data.draw(st.integers(0, len(route) - 1))
    line, dep, arr = route[i]
    if kind == "wrong_line":  # a line that does not hold both stops, or a name that is no line
        bad = [x for x in metro if not (on_line(metro, x, dep) and on_line(metro, x, arr))]
        bad.append("Line 98765")
        new = draw_data.draw(st.sampled_from(bad))
        assert normalize_line("Line 98765") not in {normalize_line(x) for x in metro}
        route[i] = (new, dep, arr)
    elif kind == "wrong_stop":  # any other station in the departure or the arrival field
        field = draw_data.draw(st.sampled_from([1, 2]))
        old = route[i][field]
        new = draw_data.draw(st.sampled_from(stations))
        assume(normalize_station(new) != normalize_station(old))
        route[i] = tuple(new if k == field else v for k, v in enumerate(route[i]))
    elif kind == "broken_transfer":  # arrive somewhere else on the right line, then depart as planned
        assume(len(route) >= 2 and i < len(route) - 1)
        others = [s for s in metro[line] if normalize_station(s) not in (normalize_station(arr), normalize_station(dep))]
        assume(others)
        route[i] = (line, dep, draw_data.draw(st.sampled_from(others)))
    else:  # one more segment after the destination
        through = [x for x in metro if on_line(metro, x, s2) and len({normalize_station(s) for s in metro[x]}) > 1]
        extra_line = draw_data.draw(st.sampled_from(through))
        ends = [s for s in metro[extra_line] if normalize_station(s) != normalize_station(s2)]
        route.append((extra_line, route[-1][2], draw_data.draw(st.sampled_from(ends))))
    text = route_text(route)
    assert not planning_correct(text, metro, s1, s2)
    assert reward(planning_sample(metro, s1, s2, len(route) - 1), text).correctness == 0


def test_sparsity_script_smoke(capsys):
    """`python -m tools.sparsity` in miniature: runs and reports shares in [0, 1], and the detail reward leaves
    fewer groups without signal than format + correctness alone."""
    from tools.sparsity import main

    rows = main(["--groups", "4", "--p-correct", "0", "--seeds", "1", "--questions", "3"])
    out = capsys.readouterr().out
    assert "zero reward variance" in out
    row = out.strip().splitlines()[-1].split()
    assert row[0] == "4" and all(0 <= float(x.rstrip("%")) <= 100 for x in row[3:])
    assert len(rows) == 1 and rows[0]["zero_var_dense"] < rows[0]["zero_var_sparse"]
