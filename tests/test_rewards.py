"""Hand-worked examples for rewards.py: every branch of the correctness check (docs/rewardmap.md §3.3), of both
detail variants (§3.4, §3.5), the Plus answer rules and the difficulty weight (§3.6).

The paper's own examples use the real Singapore metro file shipped under tests/data/."""
from __future__ import annotations

from dataclasses import replace

import pytest

from conftest import CHAIN, ans, plus_sample
from transit.metro import Sample, best_route, route_text, station_lines, via_stops
from rewards import (
    RewardConfig,
    boxed_answers,
    detail_reward,
    difficulty_weight,
    is_correct,
    normalize_line,
    normalize_station,
    parse_segments,
    planning_correct,
    reward,
    transfer_count,
)

LENIENT = RewardConfig(lenient_parsing=True)  # this project's reading of the paper's text (docs/rewardmap.md §3.3)


# ---------------------------------------------------------------------------------------------------
# Name normalisation (docs/rewardmap.md §3.3)


def test_station_normalisation():
    assert normalize_station("Clarke Quay Station") == normalize_station("clarke quay") == "clarkequay"
    assert normalize_station("Outram Park Station (Transfer Station)") == "outrampark"
    assert normalize_station("One-North") == normalize_station("One North station") == "onenorth"
    assert normalize_station("**Bishan**, Metro") == "bishan"
    assert normalize_station("西单站（换乘站）") == normalize_station("西单") == "西单"
    assert normalize_station("苹果园站") == normalize_station("苹果园") == "苹果园"


def test_line_normalisation():
    assert normalize_line("Line 1") == normalize_line("Route 1") == normalize_line("1") == normalize_line("1号线")
    assert normalize_line("line1") == normalize_line("**Line 1**") == "1"
    assert normalize_line("Line 1") != normalize_line("Line 12")
    assert normalize_line("North South Line") == normalize_line("north-south") == "northsouth"
    assert normalize_line("Metrorail Green Line") == "metrorailgreen"  # 'metro' only as a word


# ---------------------------------------------------------------------------------------------------
# Parsing


def test_parse_ignores_surrounding_text_and_markdown():
    text = (
        "Sure! Looking at the map...\n**Route Name:** Line 1\n**Departure Stop:** A Station\n"
        "**Arrival Stop:** C Station\n--\nroute name: Line 2\ndeparture stop: C\narrival stop: E\n\nHave a nice trip."
    )
    segs = parse_segments(text)
    assert [(s["route"], s["dep"], s["arr"]) for s in segs] == [("Line 1", "A Station", "C Station"), ("Line 2", "C", "E")]
    assert parse_segments("Route Name: Line 1\nDeparture Stop: A") == []  # a key missing: not a segment
    assert parse_segments("") == [] and parse_segments(None) == []  # type: ignore[arg-type]


def test_parse_long_template_fields():
    segs = parse_segments("Route Name: L\nDeparture Stop: A\nArrival Stop: B\nNumber of Via Stops: 3\nVia Stops: X, Y")
    assert segs[0]["num_via"] == "3" and segs[0]["via"] == "X, Y"
    assert "via" not in parse_segments("Route Name: L\nDeparture Stop: A\nArrival Stop: B\nNumber of Via Stops: 3")[0]


# ---------------------------------------------------------------------------------------------------
# Correctness (docs/rewardmap.md §3.3): one test per condition


def test_correct_route_and_each_failure(sg):
    s1, s2 = "Somerset Station", "Bras Basah Station"
    good = ans(("North South Line", "Somerset Station", "Dhoby Ghaut Station"), ("Circle Line", "Dhoby Ghaut Station", "Bras Basah Station"))
    assert planning_correct(good, sg, s1, s2)
    assert not planning_correct("no route here", sg, s1, s2)  # no segment
    wrong_start = ans(("North South Line", "Orchard Station", "Dhoby Ghaut Station"), ("Circle Line", "Dhoby Ghaut Station", "Bras Basah Station"))
    assert not planning_correct(wrong_start, sg, s1, s2)
    wrong_end = ans(("North South Line", "Somerset Station", "Dhoby Ghaut Station"), ("Circle Line", "Dhoby Ghaut Station", "Esplanade Station"))
    assert not planning_correct(wrong_end, sg, s1, s2)
    unknown_line = ans(("Purple Line", "Somerset Station", "Dhoby Ghaut Station"), ("Circle Line", "Dhoby Ghaut Station", "Bras Basah Station"))
    assert not planning_correct(unknown_line, sg, s1, s2)
    stop_off_line = ans(("East West Line", "Somerset Station", "Dhoby Ghaut Station"), ("Circle Line", "Dhoby Ghaut Station", "Bras Basah Station"))
    assert not planning_correct(stop_off_line, sg, s1, s2)
    broken = ans(("North South Line", "Somerset Station", "City Hall Station"), ("Circle Line", "Dhoby Ghaut Station", "Bras Basah Station"))
    assert not planning_correct(broken, sg, s1, s2)


def test_correct_route_tolerates_naming_noise(sg):
    noisy = (
        "Here is the route.\nRoute Name: north south line\nDeparture Stop: somerset\nArrival Stop: Dhoby Ghaut "
        "Station (Transfer Station)\n--\nRoute Name: **Circle Line**\nDeparture Stop: Dhoby-Ghaut\n"
        "Arrival Stop: Bras Basah Station\nThat's it!"
    )
    assert planning_correct(noisy, sg, "Somerset Station", "Bras Basah Station")


def test_light_line_names_and_chinese_names():
    bj = {"Line 1": ["苹果园站", "古城站", "西单"], "Line 4": ["西单", "灵境胡同站"]}
    text = ans(("1号线", "苹果园", "西单站"), ("Route 4", "西单站", "灵境胡同"))
    assert planning_correct(text, bj, "苹果园站", "灵境胡同站")
    assert planning_correct(ans(("1", "A", "C"), ("Line 2", "C", "E")), CHAIN, "A", "E")


def test_non_optimal_but_valid_route_is_correct():
    """ReasonMap's check does not test optimality: A -> M via the six lines is 'correct'."""
    route = [(f"Line {k}", s, e) for k, (s, e) in enumerate(zip("ACEGIK", "CEGIKM"), start=1)]
    assert planning_correct(route_text(route), CHAIN, "A", "M")
    assert best_route(CHAIN, "A", "M") == [("Loop", "A", "M")]


# ---------------------------------------------------------------------------------------------------
# Detail reward, paper variant (docs/rewardmap.md §3.4, Algorithm 1 as printed): Somerset -> Bras Basah, 1 transfer


@pytest.mark.parametrize(
    "segments, expected, why",
    [
        ([("North South Line", "Somerset", "Dhoby Ghaut"), ("Circle Line", "Dhoby Ghaut", "Bras Basah")], 7, "2 ends + 4 first ok + 1 transfer"),
        ([("North South Line", "Somerset", "Dhoby Ghaut"), ("Circle Line", "Dhoby Ghaut", "Esplanade")], 7, "'or': departure alone earns 2"),
        ([("North South Line", "Orchard", "Dhoby Ghaut"), ("Circle Line", "Dhoby Ghaut", "Promenade")], 5, "no end right: 4 + 1"),
        ([("East West Line", "Somerset", "Dhoby Ghaut"), ("Circle Line", "Dhoby Ghaut", "Bras Basah")], 2, "first route not ok: no 4, no 1"),
        ([("North South Line", "Somerset", "City Hall"), ("Circle Line", "Dhoby Ghaut", "Bras Basah")], 6, "broken transfer: no 1"),
        ([("North South Line", "Somerset", "Dhoby Ghaut"), ("Circle Line", "Dhoby Ghaut", "Bras Basah"), ("Circle Line", "Bras Basah", "Esplanade")], 3, "2 + 4 + 1 + 1 - 5 extra"),
        ([("Circle Line", "Somerset", "Bras Basah")], 2, "fewer segments: ends only (Somerset not on CCL)"),
    ],
)
def test_detail_paper_variant(sg, segments, expected, why):
    assert detail_reward(ans(*segments), sg, "Somerset Station", "Bras Basah Station", 1) == expected, why


def test_detail_paper_no_segment_cap_and_floor():
    assert detail_reward("", CHAIN, "A", "M", 5) == 0
    assert detail_reward("Route Name: Line 1 and so on", CHAIN, "A", "M", 5) == 0
    six = [(f"Line {k}", s, e) for k, (s, e) in enumerate(zip("ACEGIK", "CEGIKM"), start=1)]
    assert detail_reward(route_text(six[:5]), CHAIN, "A", "K", 4) == 10  # 2 + 4 + 4
    assert detail_reward(route_text(six), CHAIN, "A", "M", 5) == 10  # 2 + 4 + 5 = 11, capped
    rambling = route_text([("Nope", "X", "Y")] * 5)
    assert detail_reward(rambling, CHAIN, "A", "M", 0) == -20  # four extra segments, nothing right
    assert detail_reward(rambling, CHAIN, "A", "M", 0, floor=-10) == -10


def test_detail_paper_light_route_names():
    assert detail_reward(ans(("Route 1", "A", "C"), ("2", "C", "E")), CHAIN, "A", "E", 1) == 7


# ---------------------------------------------------------------------------------------------------
# Detail reward, released variant (docs/rewardmap.md §3.5)


def released(text, metro, s1, s2, t):
    return detail_reward(text, metro, s1, s2, t, variant="released")


def test_detail_released_variant(sg):
    s1, s2 = "Somerset Station", "Bras Basah Station"
    good = ans(("North South Line", "Somerset", "Dhoby Ghaut"), ("Circle Line", "Dhoby Ghaut", "Bras Basah"))
    # 2 ends; seg 0: +3 key, +1 transfer; seg 1: -5 (i + 1 > 1), +3 key
    assert released(good, sg, s1, s2, 1) == 4
    # "and": one end right is worth nothing at all
    assert released(ans(("North South Line", "Somerset", "Dhoby Ghaut"), ("Circle Line", "Dhoby Ghaut", "Esplanade")), sg, s1, s2, 1) == 0
    # exact route names: 'north south line' is not a key -> seg 0 earns nothing
    assert released(ans(("north south line", "Somerset", "Dhoby Ghaut"), ("Circle Line", "Dhoby Ghaut", "Bras Basah")), sg, s1, s2, 1) == 0
    # broken transfer: key +3 but no +1
    assert released(ans(("North South Line", "Somerset", "City Hall"), ("Circle Line", "Dhoby Ghaut", "Bras Basah")), sg, s1, s2, 1) == 3
    # the quirk: skipping the transfer scores more than the correct route (no -5 for one segment)
    assert released(ans(("North South Line", "Somerset", "Bras Basah")), sg, s1, s2, 1) == 5
    # extra segment: -5 and no +1 for the transfer into it
    extra = ans(("North South Line", "Somerset", "Dhoby Ghaut"), ("Circle Line", "Dhoby Ghaut", "Bras Basah"), ("Circle Line", "Bras Basah", "Bras Basah"))
    assert released(extra, sg, s1, s2, 1) == 2 + 3 + 1 - 5 + 3 - 5 + 3


def test_detail_released_zero_transfers_and_cap(sg):
    s1, s2 = "Clarke Quay Station", "Farrer Park Station"
    assert released(ans(("North East Line", "Clarke Quay", "Farrer Park")), sg, s1, s2, 0) == 2 - 5 + 4
    assert released(ans(("Circle Line", "Clarke Quay", "Farrer Park")), sg, s1, s2, 0) == 2 - 5  # key, wrong line
    assert released(ans(("NEL", "Clarke Quay", "Farrer Park")), sg, s1, s2, 0) == 2 - 5  # not a key
    route = [(f"Line {k}", s, e) for k, (s, e) in enumerate(zip("ACEG", "CEGI"), start=1)]
    assert released(route_text(route), CHAIN, "A", "I", 3) == 10  # 4 * 3 = 12, capped
    assert released("", CHAIN, "A", "I", 3) == 0


def test_detail_rejects_unknown_variant():
    with pytest.raises(ValueError):
        detail_reward("", CHAIN, "A", "C", 0, variant="nope")
    with pytest.raises(ValueError):
        RewardConfig(detail_variant="nope")


# ---------------------------------------------------------------------------------------------------
# The paper's Singapore examples (ReasonMap-Plus questions and the planning reward)


def test_paper_example_clarke_quay_farrer_park(sg):
    inner = via_stops(sg, "North East Line", "Clarke Quay Station", "Farrer Park Station")
    assert inner == ["Dhoby Ghaut Station", "Little India Station"]
    s = plus_sample("counting1", "B", station_1="Clarke Quay Station", station_2="Farrer Park Station", choices=[1, 2, 3, 4])
    assert reward(s, "There are 2 stops between them. \\boxed{B}").correctness == 10
    assert reward(s, "\\boxed{B) 2}", LENIENT).correctness == 10
    assert reward(s, "\\boxed{B) 2}").correctness == 0  # the released extraction reads "b)2"
    assert reward(s, "\\boxed{2}").correctness == 0  # the letter is the answer (released evaluation)
    planning = Sample(id="p", qtype="planning", question="", answer="", image=None, metro=sg, map_difficulty="easy",
                      station_1="Clarke Quay Station", station_2="Farrer Park Station", transfer_count=0)  # fmt: skip
    r = reward(planning, ans(("North East Line", "Clarke Quay Station", "Farrer Park Station")))
    assert (r.format, r.correctness, r.detail, r.weight) == (1, 10, 6, 1.0)  # detail 2 + 4
    assert r.total == 1.0 * (1 + 10 + 0.5 * 6)


def test_paper_example_somerset_bras_basah(sg):
    lines = station_lines(sg)
    assert not set(lines["Somerset Station"]) & set(lines["Bras Basah Station"])
    s = plus_sample("torf1", "no", "middle", station_1="Somerset Station", station_2="Bras Basah Station")
    r = reward(s, "Somerset is on the North South Line, Bras Basah on the Circle Line. \\boxed{No}")
    assert (r.format, r.correctness, r.detail, r.weight, r.total) == (1, 10, 0, 1.2, 1.2 * 11)
    assert reward(s, "\\boxed{yes}").correctness == 0


# ---------------------------------------------------------------------------------------------------
# ReasonMap-Plus answers


@pytest.mark.parametrize(
    "response, fmt, correct",
    [
        ("\\boxed{yes}", 1, 10),
        ("\\boxed{ Yes. }", 1, 10),
        ("\\boxed{\\text{YES}}", 1, 10),
        ("$\\boxed{\\textbf{yes}}$", 1, 10),
        ("\\boxed{no}", 1, 0),
        ("\\boxed{yes, they are}", 0, 0),  # a box, but not a yes/no answer
        ("\\boxed{no} wait, actually \\boxed{yes}", 0, 10),  # two boxes: format fails, the last one counts
        ("\\boxed{yes} hmm \\boxed{no}", 0, 0),
        ("\\boxed{yes", 0, 0),  # unclosed
        ("\\boxed{}", 0, 0),
        ("The answer is yes.", 0, 0),  # no box, no answer
        ("", 0, 0),
    ],
)
def test_torf_answers(response, fmt, correct):
    r = reward(plus_sample("torf2", "yes", line="Line 1"), response, LENIENT)
    assert (r.format, r.correctness) == (fmt, correct)


@pytest.mark.parametrize(
    "content, correct",
    [("C", True), ("c", True), ("C)", True), ("(C)", True), ("C. 7", True), ("C: 7", True), (" c. ", True),
     ("\\text{C}", True), ("B", False), ("7", False), ("option C", False), ("CD", False), ("", False)],
)  # fmt: skip
def test_counting1_answers(content, correct):
    s = plus_sample("counting1", "C", choices=[5, 6, 7, 8])
    assert (reward(s, f"\\boxed{{{content}}}", LENIENT).correctness == 10) is correct


@pytest.mark.parametrize(
    "content, correct",
    [("3", True), (" 3 ", True), ("03", True), ("3.", True), ("\\text{3}", True), ("{3}", True),
     ("3 lines", False), ("3.0", False), ("three", False), ("4", False), ("9" * 5000, False)],
)  # fmt: skip
def test_integer_answers(content, correct):
    for qtype in ("counting2", "counting3"):
        assert (reward(plus_sample(qtype, "3"), f"\\boxed{{{content}}}", LENIENT).correctness == 10) is correct


def test_format_needs_an_answer_of_the_questions_kind():
    """A box holding the wrong kind of answer (yes to a counting question) earns no format reward;
    a wrong answer of the right kind does."""
    count, choice, torf = plus_sample("counting2", "3"), plus_sample("counting1", "C", choices=[5, 6, 7, 8]), \
        plus_sample("torf1", "yes")
    assert reward(count, "\\boxed{yes}").format == 0 and reward(count, "\\boxed{7}").format == 1
    assert reward(choice, "\\boxed{2}").format == 0 and reward(choice, "\\boxed{B)}").format == 1
    assert reward(torf, "\\boxed{3}").format == 0 and reward(torf, "\\boxed{No.}").format == 1
    assert reward(count, "\\boxed{3 lines}").format == 0 and reward(count, "\\boxed{ 3 }").format == 1


@pytest.mark.parametrize("qtype, gold, response, correct", [
    ("torf1", "yes", "\\boxed{yes}", True), ("torf1", "yes", "Yes", True), ("torf1", "yes", "\\boxed{\\text{Yes}}", False),
    ("torf1", "no", "**No**", False), ("torf1", "no", "The answer is no.", True), ("counting1", "B", "B", True),
    ("counting1", "B", "\\boxed{(B)}", False), ("counting1", "B", "The answer is B.", True),
    ("counting2", "3", "3", True), ("counting2", "3", "\\boxed{03}", True), ("counting2", "3", "\\boxed{3.0}", False),
])  # fmt: skip
def test_default_correctness_is_the_released_reward_codes(qtype, gold, response, correct):
    """By default the reward's correctness is the released reward code's (= the official ReasonMap-Plus
    extraction): bare answers and 'The answer is' count, LaTeX-wrapped or bracketed ones do not."""
    assert (reward(plus_sample(qtype, gold), response).correctness == 10) is correct


def test_default_planning_correctness_is_strict():
    """The released parser: exact keys, and the text after the last arrival belongs to the arrival."""
    route = ans(("Line 1", "A", "C"), ("Line 2", "C", "E"))
    sample = Sample(id="p", qtype="planning", question="", answer="", image=None, metro=CHAIN, station_1="A",
                    station_2="E", transfer_count=1)
    assert reward(sample, route).correctness == 10
    assert reward(sample, route + "\nThat is the route.").correctness == 0
    assert reward(sample, route + "\nThat is the route.", LENIENT).correctness == 10
    assert reward(sample, route.replace("Route Name", "route name")).correctness == 0
    assert reward(sample, route.replace("Route Name", "route name"), LENIENT).correctness == 10


def test_gold_answer_variants():
    assert reward(plus_sample("torf1", "1"), "\\boxed{yes}").correctness == 10
    assert reward(plus_sample("torf1", "False"), "\\boxed{no}").correctness == 10
    assert reward(plus_sample("counting1", "2"), "\\boxed{C}").correctness == 10  # dataset index 0-3


def test_boxed_nesting():
    assert boxed_answers("a \\boxed{x{y}z} b \\boxed {w}") == ["x{y}z", "w"]
    assert boxed_answers("}}} \\boxed{a}}}") == ["a"]
    assert boxed_answers("{\\boxed{a}") == ["a"]


# ---------------------------------------------------------------------------------------------------
# Difficulty weight and the assembled reward


def test_difficulty_weight():
    cfg = RewardConfig()
    assert difficulty_weight("easy", None, cfg) == 1.0
    assert difficulty_weight("middle", None, cfg) == 1.2
    assert difficulty_weight("hard", None, cfg) == 1.5
    assert difficulty_weight("hard", 0, cfg) == 1.5
    assert difficulty_weight("middle", 1, cfg) == pytest.approx(1.7)
    assert difficulty_weight("hard", 3, cfg) == 2.0
    assert difficulty_weight("hard", 3, replace(cfg, difficulty_weight=False)) == 1.0
    assert difficulty_weight("hard", 2, replace(cfg, gammas=(1.0, 1.5, 2.0), betas=(0.0, 0.8))) == pytest.approx(2.8)
    with pytest.raises(ValueError):
        difficulty_weight("medium", None, cfg)  # 'medium' is a question difficulty, not a map difficulty


def test_reward_switches_and_total(sg):
    s = Sample(id="p", qtype="planning", question="", answer="", image=None, metro=sg, map_difficulty="hard",
               station_1="Somerset Station", station_2="Bras Basah Station", transfer_count=1)  # fmt: skip
    wrong = ans(("North South Line", "Somerset", "Dhoby Ghaut"), ("Circle Line", "Dhoby Ghaut", "Esplanade"))
    r = reward(s, wrong)
    assert (r.format, r.correctness, r.detail, r.weight) == (1, 0, 7, 2.0)
    assert r.total == pytest.approx(2.0 * (1 + 0 + 0.5 * 7))
    r = reward(s, wrong, RewardConfig(detail_reward=False))
    assert (r.detail, r.total) == (0, 2.0)
    r = reward(s, wrong, RewardConfig(difficulty_weight=False, alpha=1.0, format_score=0.0))
    assert (r.weight, r.total) == (1.0, 7.0)
    r = reward(s, wrong, RewardConfig(detail_variant="released"))
    assert r.detail == 0  # "and": the arrival is wrong
    assert not is_correct(s, wrong) and is_correct(s, wrong.replace("Esplanade", "Bras Basah"))
    assert is_correct(plus_sample("counting3", "6"), "\\boxed{6}")
    r = reward(s, "Take the metro.")
    assert (r.format, r.correctness, r.detail, r.total) == (0, 0, 0, 0)


def test_reward_transfer_count_fallback(sg):
    """Without a stored transfer count, the optimal route's is used (here 1: weight gamma + beta_1)."""
    s = Sample(id="p", qtype="planning", question="", answer="", image=None, metro=sg, map_difficulty="easy",
               station_1="Somerset Station", station_2="Bras Basah Station")  # fmt: skip
    assert reward(s, "").weight == 1.5


def test_negative_transfer_count_is_bad_data():
    cfg = RewardConfig()
    for bad in (-1, -5):
        with pytest.raises(ValueError, match="transfer count"):
            difficulty_weight("easy", bad, cfg)
    s = Sample(id="p", qtype="planning", question="", answer="", image=None, metro=CHAIN, map_difficulty="easy",
               station_1="A", station_2="C", transfer_count=-1)
    with pytest.raises(ValueError, match="transfer count"):
        reward(s, "")


def _chain_planning(**kw):
    return Sample(id="p", qtype="planning", question="", answer="", image=None, metro=CHAIN, map_difficulty="easy", **kw)


LONG_WAY = [("Line 1", "A", "C"), ("Line 2", "C", "E"), ("Line 3", "E", "G"), ("Line 4", "G", "I"),
            ("Line 5", "I", "K"), ("Line 6", "K", "M")]  # A -> M with 5 transfers; the Loop line takes none


def test_transfer_count_stored_then_route_then_best_route():
    """The stored count wins (0 included); else the sample's own route (not a recomputed best one); else best_route
    on its metro; no route at all counts 0. The Plus weight W = gamma + beta follows."""
    assert best_route(CHAIN, "A", "M") == [("Loop", "A", "M")]  # the hand-made city: the direct line exists
    assert transfer_count(_chain_planning(station_1="A", station_2="M", route=LONG_WAY, transfer_count=3)) == 3
    assert transfer_count(_chain_planning(station_1="A", station_2="M", route=LONG_WAY, transfer_count=0)) == 0
    assert transfer_count(_chain_planning(station_1="A", station_2="M", route=LONG_WAY)) == 5  # its route
    assert transfer_count(_chain_planning(station_1="A", station_2="M", route=LONG_WAY[:1])) == 0
    assert transfer_count(_chain_planning(station_1="A", station_2="M")) == 0  # best_route: the Loop line
    assert transfer_count(_chain_planning(station_1="B", station_2="L")) == 2  # Line 1 -> Loop -> Line 6
    assert transfer_count(_chain_planning(station_1="D", station_2="H")) == 2  # Line 2 -> Line 3 -> Line 4
    assert transfer_count(_chain_planning(station_1="A", station_2="Nowhere")) == 0  # no route: 0
    # the reward's weight uses it: easy map gamma 1.0, plus beta_1 = 0.5 for >= 1 transfer, beta_0 = 0 for none
    assert reward(_chain_planning(station_1="A", station_2="M", route=LONG_WAY), "").weight == 1.5
    assert reward(_chain_planning(station_1="A", station_2="M"), "").weight == 1.0
    assert reward(_chain_planning(station_1="B", station_2="L"), "").weight == 1.5


def test_transfer_count_fallback_on_the_real_singapore_file(sg):
    """Shipped metro data (tests/data/reasonmap-metro): Somerset -> Bras Basah needs one transfer; a stored route
    with two segments counts one, whatever the metro says; a same-line pair counts none."""
    s = Sample(id="p", qtype="planning", question="", answer="", image=None, metro=sg, map_difficulty="easy",
               station_1="Somerset Station", station_2="Bras Basah Station")  # fmt: skip
    assert transfer_count(s) == len(best_route(sg, s.station_1, s.station_2)) - 1 == 1
    line = next(li for li, st in sg.items() if "Somerset Station" in st)
    other = next(x for x in sg[line] if x != "Somerset Station")
    same = replace(s, station_2=other)
    assert transfer_count(same) == 0 and reward(same, "").weight == 1.0
    given = replace(s, metro={}, route=[("X", "Somerset Station", "Y"), ("Z", "Y", "Bras Basah Station")])
    assert transfer_count(given) == 1  # from the route alone: no metro needed


def test_reward_rejects_unknown_qtype():
    with pytest.raises(ValueError):
        reward(plus_sample("riddle", "yes"), "\\boxed{yes}")
