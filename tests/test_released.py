"""released.py: the authors' released scoring, quirks included. Every expected value below was worked out by
hand from the official code (ReasonMap main.py / main_plus.py / utils.py / tools.py / cal_metrics.py,
RewardMap reason_map.py), not by running released.py."""
from __future__ import annotations

import json
import math
import time

import pytest
from hypothesis import given, settings, strategies as st

from transit import released as R
from conftest import REAL_CITIES, REAL_METRO, ans, plus_sample
from transit.metro import Sample, load_metro

CQ, FP, DG, OR = "Clarke Quay Station", "Farrer Park Station", "Dhoby Ghaut Station", "Orchard Station"
NE, NS = "North East Line", "North South Line"


def seg(line, dep, arr, **via):
    """One reference segment as the released `routes` rows give it."""
    return {"route_name": line, "departure_stop": dep, "arrival_stop": arr, **via}


def planning(metro, s1, s2, plans, country="singapore", city="singapore", question_long="", **kw):
    return Sample(id="p", qtype="planning", question="", answer="", image=None, metro=metro, country=country,
                  city=city, station_1=s1, station_2=s2, reference_plans=plans, question_long=question_long,
                  transfer_count=kw.pop("transfer_count", 0), **kw)


def text(*sections, sep="\n--\n"):
    """Answer text from ready-made sections."""
    return sep.join(sections)


def section(line, dep, arr, extra=None):
    return f"Route Name: {line}\nDeparture Stop: {dep}\nArrival Stop: {arr}" + (f"\n{extra}" if extra else "")


NUMBER_Q = "... Route Name: ...\nNumber of Via Stops: ..."  # a long question in number mode
VIA_Q = "... Route Name: ...\nVia Stops: ..."  # a long question in via-list mode


# ------------------------------------------------------------------------------------------ clean_string
def test_reasonmap_clean_keeps_station_and_zhan():
    assert R.reasonmap_clean("Jurong East Station (Transfer Station)") == "jurongeaststation"
    assert R.reasonmap_clean("Metro  A-B,*\nC（x）") == "abc"
    assert R.reasonmap_clean("苹果园站") == "苹果园站"


def test_clean_bracket_groups_do_not_nest_and_mix_bracket_kinds():
    assert R.reasonmap_clean("A (B") == "a(b"  # unclosed: kept
    assert R.reasonmap_clean("A（B)C") == "ac"  # full-width open, ASCII close
    assert R.reasonmap_clean("A ((b) c)") == "ac)"  # the group ends at the first close


def test_rewardmap_clean_drops_station_and_one_trailing_zhan():
    assert R.rewardmap_clean("Jurong East Station") == "jurongeast"
    assert R.rewardmap_clean("苹果园站") == "苹果园"
    assert R.rewardmap_clean("X站站") == "x站"
    assert R.rewardmap_clean("X站 ") == "x站"  # the trailing space blocks the strip
    assert R.rewardmap_clean("X站（换乘站）") == "x站"  # checked before brackets are dropped


def test_rewardmap_clean_renames():
    assert R.rewardmap_clean("Univ. Tech. Road") == "universityersitytechnologynologylu"
    assert R.rewardmap_clean("Asian Games Village") == "yayuncun"
    assert R.rewardmap_clean("Raffles' Place") == "rafflesplace"


def test_our_metro_equals_the_scripts_metro_for_reasonmap_clean():
    for rel in REAL_CITIES:
        path = REAL_METRO / rel
        ours, theirs = load_metro(path), R.released_metro(json.loads(path.read_text(encoding="utf-8")))
        assert list(ours) == list(theirs)
        for line in ours:
            assert [R.reasonmap_clean(s) for s in ours[line]] == [R.reasonmap_clean(s) for s in theirs[line]]


def test_rewardmap_clean_differs_on_one_beijing_station_only():
    path = REAL_METRO / "china" / "beijing.json"
    ours, theirs = load_metro(path), R.released_metro(json.loads(path.read_text(encoding="utf-8")))
    diff = {(line, a, b) for line in ours for a, b in zip(ours[line], theirs[line])
            if R.rewardmap_clean(a) != R.rewardmap_clean(b)}
    assert diff == {("Line 16", "东管头南站", "东管头南站 ")}
    answer = section("Line 16", "东管头南站", "宛平城站")
    assert R.reward_planning_correct(answer, ours, "东管头南站", "宛平城站")
    assert not R.reward_planning_correct(answer, theirs, "东管头南站", "宛平城站")  # the released reward
    assert R.official_planning_correct(answer, theirs, "东管头南站", "宛平城站")


# ------------------------------------------------------------------------------------------ ReasonMap-Plus
@pytest.mark.parametrize("response", [r"\boxed{\text{Yes}}", "**Yes**", "THE ANSWER IS YES", r"\boxed{}"])
def test_plus_torf_wrong_forms(response):
    assert not R.plus_correct("torf1", response, 1)


@pytest.mark.parametrize("response", ["Yes", " yes \n", r"\boxed{yes}", "The answer is Yes.",
                                      "the answer is yes. Because no", "the answer is no, or rather the answer is yes"])
def test_plus_torf_right_forms(response):
    assert R.plus_correct("torf1", response, 1)


def test_plus_torf_gold_other_than_one_means_no():
    assert R.plus_correct("TorF2", "no", 0) and R.plus_correct("torf2", "no", 2)


@pytest.mark.parametrize("response", [r"\boxed{(B)}", r"\boxed{B) 5}", r"\boxed{E}", "Option B"])
def test_plus_counting1_wrong_forms(response):
    assert not R.plus_correct("counting1", response, 1)


@pytest.mark.parametrize("response", ["B", "b", r"\boxed{B}", "The answer is B.", r"\boxed{: B}"])
def test_plus_counting1_right_forms(response):
    assert R.plus_correct("counting1", response, 1)


@pytest.mark.parametrize("response,right", [
    ("3", True), ("03", True), ("+3", True), (r"\boxed{3}", True), ("3.0", False), (r"\boxed{3.0}", False),
    (r"\boxed{x = 3}", True), (r"\boxed{3 km}", True), (r"\boxed{3 stations}", False), ("$3$", True),
    (r"\boxed{3", False),  # unclosed box: the whole text is read
    (r"\boxed{3} and {4}", True),  # a '}' before any '{': cut there
    (r"\boxed{2} no, wait: \boxed{3}", True), (r"\boxed{3} no, wait: \boxed{2}", False),  # the last box
    ("The final answer is 3\nmore", True), ("the final answer is 4", False),
])
def test_plus_counting2_int_rule(response, right):
    assert R.plus_correct("counting2", response, 3) is right


def test_plus_quirky_numbers():
    assert R.plus_correct("counting3", r"\boxed{1_0}", 10)  # Python int() accepts underscores
    assert R.plus_answer(r"\boxed{.}") == "0" and R.plus_correct("counting2", r"\boxed{.}", 0)  # "." -> "0." -> "0"
    assert R.plus_answer(r"\boxed{\text{Yes}}") == "{yes}"


def test_plus_reads_only_the_first_100k_characters():
    assert not R.plus_correct("counting2", "x" * R.MAX_RESPONSE_CHARS + r"\boxed{3}", 3)


def test_official_gold_and_official_correct_for_plus():
    assert R.official_gold(plus_sample("torf1", "yes")) == 1 and R.official_gold(plus_sample("torf2", "no")) == 0
    assert R.official_gold(plus_sample("counting1", "C")) == 2 and R.official_gold(plus_sample("counting3", "7")) == 7
    assert R.official_correct(plus_sample("counting1", "C"), "c")
    assert R.reward_plus_correct is R.plus_correct


def test_plus_correct_rejects_a_planning_type():
    with pytest.raises(ValueError):
        R.plus_correct("planning", "3", 3)


# ------------------------------------------------------------------------------------------ planning accuracy
def test_planning_correct_short(sg):
    assert R.official_planning_correct(ans((NE, CQ, FP)), sg, CQ, FP)


def test_planning_keys_are_case_sensitive(sg):
    assert not R.official_planning_correct(ans((NE, CQ, FP)).replace("Route Name", "route name"), sg, CQ, FP)


def test_planning_route_name_needs_space_and_newline(sg):
    assert not R.official_planning_correct(ans((NE, CQ, FP)).replace("Route Name: ", "Route Name:"), sg, CQ, FP)
    assert not R.official_planning_correct(  # the name runs to the first newline
        f"Route Name: {NE} Departure Stop: {CQ}\nArrival Stop: {FP}", sg, CQ, FP)


def test_short_arrival_is_all_trailing_text(sg):
    assert not R.official_planning_correct(ans((NE, CQ, FP)) + "\nTotal: 3 stops", sg, CQ, FP)
    assert R.official_planning_correct(ans((NE, CQ, FP)) + " (NE8)\n\n", sg, CQ, FP)  # cleaning drops it


def test_long_arrival_needs_a_newline(sg):
    assert not R.official_planning_correct(ans((NE, CQ, FP)), sg, CQ, FP, long=True)
    assert R.official_planning_correct(ans((NE, CQ, FP)) + "\n", sg, CQ, FP, long=True)
    assert R.official_planning_correct(ans((NE, CQ, FP)) + "\nTotal: 3 stops", sg, CQ, FP, long=True)


def test_route_name_must_be_an_exact_metro_key(sg):
    assert not R.official_planning_correct(ans(("north east line", CQ, FP)), sg, CQ, FP)
    assert not R.official_planning_correct(ans(("NE Line", CQ, FP)), sg, CQ, FP)
    assert R.official_planning_correct(ans((NE + "   ", CQ, FP)), sg, CQ, FP)  # the name is stripped


def test_beijing_batong_and_daxing_renames():
    bj = load_metro(REAL_METRO / "china" / "beijing.json")
    assert R.official_planning_correct(ans(("八通线", "苹果园站", "古城站")), bj, "苹果园站", "古城站")
    assert not R.official_planning_correct(ans(("1号线", "苹果园站", "古城站")), bj, "苹果园站", "古城站")
    assert R.official_planning_correct(ans(("大兴线", "安河桥北站", "北宫门站")), bj, "安河桥北站", "北宫门站")
    # the 大兴 test runs on the already renamed name, so 八通 wins
    assert R.official_planning_correct(ans(("八通大兴", "苹果园站", "古城站")), bj, "苹果园站", "古城站")
    assert not R.official_planning_correct(ans(("八通大兴", "安河桥北站", "北宫门站")), bj, "安河桥北站", "北宫门站")


def test_direction_and_optimality_are_not_checked(sg):
    detour = ans((NE, CQ, "HarbourFront Station"), (NE, "HarbourFront Station", FP))
    assert R.official_planning_correct(detour, sg, CQ, FP)


def test_transfers_must_chain(sg):
    assert R.official_planning_correct(ans((NE, CQ, DG), (NS, DG, OR)), sg, CQ, OR)
    assert not R.official_planning_correct(ans((NE, CQ, FP), (NS, DG, OR)), sg, CQ, OR)


def test_station_suffix_reasonmap_vs_rewardmap(sg):
    bare = ans((NE, "Clarke Quay", "Farrer Park"))
    assert not R.official_planning_correct(bare, sg, CQ, FP)  # ReasonMap keeps "station"
    assert R.reward_planning_correct(bare, sg, CQ, FP)  # RewardMap drops it


def test_answer_stops_are_cleaned_twice(sg):
    assert R.official_planning_correct(ans((NE, "METRO " + CQ, FP)), sg, CQ, FP)  # "metro..." removed 2nd time


def test_sections_without_the_three_keys_are_skipped(sg):
    assert R.official_planning_correct("Here is the route:\n--\n" + ans((NE, CQ, FP)) + "\n--\nHave a nice trip", sg, CQ, FP)


def test_official_correct_dispatches_planning(sg):
    sample = planning(sg, CQ, FP, [])
    assert R.official_correct(sample, ans((NE, CQ, FP))) and not R.official_correct(sample, ans((NE, CQ, FP)), long=True)


# ------------------------------------------------------------------------------------------ map score: abroad
SG_PLAN = [[seg(NE, "Clarke Quay", "Farrer Park", via_stops=["Dhoby Ghaut", "Little India"], num_via_stops=2)]]


def test_map_score_short_abroad(sg):
    # endpoints 1 + route 0 ("North East Line" -> "Line No") + departure 1 + arrival 1 = 3, +10 accurate
    assert R.official_map_score(planning(sg, CQ, FP, SG_PLAN), ans((NE, CQ, FP))) == 13.0


def test_map_score_abroad_route_points_only_without_ascii():
    metro = {"環状線": ["Ueno Station", "Tokyo Station"]}
    sample = planning(metro, "Ueno Station", "Tokyo Station", [[seg("Yamanote", "Ueno", "Tokyo")]],
                      country="japan", city="tokyo")
    assert R.official_map_score(sample, ans(("環状線", "Ueno Station", "Tokyo Station"))) == 15.0  # 1+2+1+1, +10


def test_map_score_abroad_route_name_mapping_quirks(sg):
    sample = planning(sg, CQ, FP, SG_PLAN)
    assert R.official_map_score(sample, ans(("Line Li", CQ, FP))) == 5.0  # "Line Li" -> "Line Li": +2, not accurate
    assert R.official_map_score(sample, section("", CQ, FP)) == 5.0  # an empty name maps to itself
    assert R._abroad_line("Circle Line", "singapore") == "Line Ci"
    assert R._abroad_line("Metro A Line", "los_angeles") == "Line A"
    assert R._abroad_line("Linea C", "rome") == "Line C" and R._abroad_line("B1", "rome") == "Line B"
    assert R._abroad_line("環状線", "tokyo") == "環状線"


def test_map_score_reference_arrival_replaced_when_departure_ends_with_station(sg):
    plan = [seg(NE, CQ, "Farrer Park", via_stops=[], num_via_stops=2)]
    assert R.official_map_score(planning(sg, CQ, FP, [plan]), ans((NE, CQ, FP))) == 12.0  # 1+0+1+0, +10
    long_answer = ans((NE, CQ, FP)) + "\nNumber of Via Stops: 2"  # long, abroad: replaced too
    assert R.official_map_score(planning(sg, CQ, FP, [plan], question_long=NUMBER_Q), long_answer, long=True) == 26.0


def test_map_score_answer_stops_cleaned_twice(sg):
    # "METRO Clarke Quay Station" -> "metroclarkequaystation" -> "clarkequaystation": the departure point counts
    assert R.official_map_score(planning(sg, CQ, FP, SG_PLAN), ans((NE, "METRO " + CQ, FP))) == 13.0


def test_map_score_extra_answer_segments_ignored(sg):
    detour = ans((NE, CQ, DG), (NE, DG, FP))  # accurate; only (first section, the plan's one segment) is scored
    assert R.official_map_score(planning(sg, CQ, FP, SG_PLAN), detour) == 12.0  # 1+0+1+0, +10


def test_map_score_zero_without_endpoints_or_plans(sg):
    assert R.official_map_score(planning(sg, CQ, FP, SG_PLAN), ans((NE, CQ, DG))) == 0.0
    assert R.official_map_score(planning(sg, CQ, FP, []), ans((NE, CQ, FP))) == 0.0  # accurate, but no plan
    assert R.official_map_score(planning(sg, CQ, FP, SG_PLAN), "") == 0.0


def test_map_score_long_number_mode(sg):
    sample = planning(sg, CQ, FP, SG_PLAN, question_long=NUMBER_Q)
    answer = ans((NE, CQ, FP)) + "\nNumber of Via Stops: {}"
    assert R.official_map_score(sample, answer.format(2), long=True) == 27.0  # 3 + 4, +20
    assert R.official_map_score(sample, answer.format(3), long=True) == 25.0  # 3 + (4 - 1/2*4), +20
    assert R.official_map_score(sample, answer.format(5), long=True) == 23.0  # 3 + max(0, 4 - 3/2*4), +20
    assert R.official_map_score(sample, answer.format("two"), long=True) == 23.0  # no integer: 0 -> err 2


def test_map_score_number_mode_needs_the_space(sg):
    sample = planning(sg, CQ, FP, SG_PLAN, question_long=NUMBER_Q)
    answer = "1. " + ans((NE, CQ, FP)) + "\nNumber of Via Stops:2"  # first integer in the section: 1
    assert R.official_map_score(sample, answer, long=True) == 25.0


def test_map_score_number_mode_reference_zero(sg):
    plan = [[seg(NE, "Clarke Quay", "Farrer Park", via_stops=[], num_via_stops=0)]]
    sample = planning(sg, CQ, FP, plan, question_long=NUMBER_Q)
    assert R.official_map_score(sample, ans((NE, CQ, FP)) + "\nNumber of Via Stops: 1", long=True) == 23.0
    assert R.official_map_score(sample, ans((NE, CQ, FP)) + "\nNumber of Via Stops: 0", long=True) == 27.0


def test_map_score_abroad_via_list_scores_nothing(sg):
    sample = planning(sg, CQ, FP, SG_PLAN, question_long=VIA_Q)  # the reference via stops are never set abroad
    answer = ans((NE, CQ, FP)) + "\nVia Stops: Dhoby Ghaut站,Little India站"
    assert R.official_map_score(sample, answer, long=True) == 23.0  # 3 + 0, +20


# ------------------------------------------------------------------------------------------ map score: China
CHINA1 = {"Line 1": ["甲站", "乙站", "丙站", "丁站"]}
CN_PLAN = [[seg("地铁1号线", "甲", "丁", via_stops=["乙", "丙"], num_via_stops=2)]]


def cn1(plans=CN_PLAN, question_long=VIA_Q):
    return planning(CHINA1, "甲站", "丁站", plans, country="china", city="beijing", question_long=question_long)


@pytest.mark.parametrize("vias,expected", [
    ("乙站,丙站", 5 + (1 * 10 + 2) / 2 + 20),  # IoU 1, two matches
    ("乙站, 丙站", 5 + ((1 / 3) * 10 + 1) / 2 + 20),  # " 丙站" is not stripped: one match, union of three
    ("Yi, Bing", 5 + 0 + 20),  # no 站: the list is ignored (union = the reference's, IoU 0)
    ("乙站,乙站,乙站", 5 + (0.5 * 10 + 3) / 2 + 20),  # repeats count
    (",".join(["乙站"] * 12), 5 + (0.5 * 10 + 10) / 2 + 20),  # matches capped at 10
])
def test_map_score_china_via_list_mode(vias, expected):
    answer = section("Line 1", "甲站", "丁站", f"Via Stops: {vias}")
    assert R.official_map_score(cn1(), answer, long=True) == pytest.approx(expected)


def test_map_score_china_via_iou_needs_matching_route_names():
    answer = section("1号线", "甲站", "丁站", "Via Stops: 乙站,丙站")  # not a metro key: inaccurate
    assert R.official_map_score(cn1(), answer, long=True) == 4.0  # 1 + 0 + 1 + 1, (0 + 2) / 2


def test_map_score_china_route_name_mapping():
    assert R._china_line("地铁5号线(后关--虎滩新区)") == "Line 5"
    assert R._china_line("地铁2号线(8号线)") == "Line 2"
    assert R._china_line("地铁昌平线(昌平西山口--蓟门桥)") == "昌平线"


def test_map_score_china_arrival_replacement_short_only():
    plans = [[seg("地铁1号线", "甲站", "丁", via_stops=["乙", "丙"], num_via_stops=2)]]
    assert R.official_map_score(cn1(plans), section("Line 1", "甲站", "丁站")) == 14.0  # 1+2+1+0, +10
    long_answer = section("Line 1", "甲站", "丁站", "Via Stops: 乙站,丙站")
    assert R.official_map_score(cn1(plans), long_answer, long=True) == 31.0  # 1+2+1+1 + 6, +20


CHAIN3 = {"Line 1": ["甲站", "乙站", "丙站"], "Line 2": ["丙站", "丁站", "戊站"], "Line 3": ["戊站", "己站", "庚站"]}


def chain_plan(nums=(1, 1, 1)):
    return [seg("地铁1号线(甲--丙)", "甲", "丙", via_stops=["乙"], num_via_stops=nums[0]),
            seg("地铁2号线(丙--戊)", "丙", "戊", via_stops=["丁"], num_via_stops=nums[1]),
            seg("地铁3号线", "戊", "庚", via_stops=["己"], num_via_stops=nums[2])]


def chain_answer(extra=None):
    return text(section("Line 1", "甲站", "丙站", extra and extra.format("乙站")),
                section("Line 2", "丙站", "戊站", extra and extra.format("丁站")),
                section("Line 3", "戊站", "庚站", extra and extra.format("己站")))


def chain(plans, question_long=VIA_Q):
    return planning(CHAIN3, "甲站", "庚站", plans, country="china", city="beijing", question_long=question_long)


def test_map_score_short_cap_then_bonus():
    assert R.official_map_score(chain([chain_plan()]), chain_answer()) == 20.0  # min(10, 1 + 3*4) + 10


def test_map_score_long_via_mode_three_segments():
    # 13 segment points + (10 * IoU 1 + 3 matches) / 2 = 19.5, +20
    assert R.official_map_score(chain([chain_plan()]), chain_answer("Via Stops: {}"), long=True) == 39.5


def test_map_score_long_number_mode_caps():
    # numbers all exact: 12 -> capped 10; 13 + 10 = 23 -> capped 20; +20
    answer = chain_answer("Number of Via Stops: 1")
    assert R.official_map_score(chain([chain_plan()], NUMBER_Q), answer, long=True) == 40.0


def test_map_score_best_plan_and_ties_to_the_later_one():
    answer = chain_answer("Number of Via Stops: 1")
    exact, off = chain_plan(), chain_plan((1, 1, 4))  # off: 4 + 4 + (4 - 3/4*4) = 9; 13 + 9 -> 20 as well
    assert R.official_map_score(chain([exact, off], NUMBER_Q), answer, long=True) == 40.0
    first = R.official_metrics([chain([exact, off], NUMBER_Q)], [answer], long=True)
    second = R.official_metrics([chain([off, exact], NUMBER_Q)], [answer], long=True)
    assert first["num_via_stop_score"] == 9.0 and second["num_via_stop_score"] == 10.0
    worse = chain_plan((5, 5, 5))  # 4 - 4/5*4 = 0.8 each: 13 + 2.4
    for plans in ([worse, exact], [exact, worse]):
        assert R.official_map_score(chain(plans, NUMBER_Q), answer, long=True) == 40.0


def test_map_score_beijing_rename_is_for_accuracy_only():
    bj = load_metro(REAL_METRO / "china" / "beijing.json")
    sample = planning(bj, "苹果园站", "古城站", [[seg("地铁1号线八通线(古城--环球度假区)", "苹果园", "古城")]],
                      country="china", city="beijing")
    assert R.official_map_score(sample, ans(("八通线", "苹果园站", "古城站"))) == 13.0  # 1+0+1+1, +10


def test_map_score_only_for_planning():
    with pytest.raises(ValueError):
        R.official_map_score(plus_sample("torf1", "yes"), "yes")


# ------------------------------------------------------------------------------------------ released reward
def test_reward_detail_direct_route(sg):
    # +2 endpoints, -5 (segment 1 > 0 transfers), +4 (the line holds both stations)
    assert R.reward_detail(ans((NE, CQ, FP)), sg, CQ, FP, 0) == 1.0


def test_reward_detail_one_transfer(sg):
    # +2; segment 1: +3 +1 (transfer ok); segment 2: -5 +3
    assert R.reward_detail(ans((NE, CQ, DG), (NS, DG, OR)), sg, CQ, OR, 1) == 4.0


def test_reward_detail_cap_and_no_floor():
    metro = {"Line 1": ["A", "B", "C"], "Line 2": ["C", "D", "E"], "Line 3": ["E", "F", "G"]}
    answer = ans(("Line 1", "A", "C"), ("Line 2", "C", "E"), ("Line 3", "E", "G"))
    assert R.reward_detail(answer, metro, "A", "G", 5) == 10.0  # 2 + 4 + 4 + 3 = 13 -> 10
    assert R.reward_detail(answer, metro, "A", "G", 0) == -13.0  # 2 - 3*5, no line holds A and G
    assert R.reward_detail(answer, metro, "A", "F", 2) == 0.0  # wrong endpoint


def test_released_reward_sections_any_case_in_detail_only(sg):
    answer = ans((NE, CQ, FP)) + "\n--\nroute name: x\ndeparture stop: y\narrival stop: z"
    assert R.reward_planning_correct(answer, sg, CQ, FP)  # the lowercase section is skipped here
    assert R.reward_detail(answer, sg, CQ, FP, 0) == 0.0  # but parsed here: its "arrival" breaks the endpoints
    assert R.released_reward(planning(sg, CQ, FP, [], map_difficulty="easy"), answer) == 10.0


def test_released_reward_weights(sg):
    direct = planning(sg, CQ, FP, [], map_difficulty="easy")
    assert R.released_reward(direct, ans((NE, CQ, FP))) == 10.5  # (10 + 0.5 * 1) * 1.0
    one = planning(sg, CQ, OR, [], map_difficulty="hard", transfer_count=1)
    answer = ans((NE, CQ, DG), (NS, DG, OR))
    assert R.released_reward(one, answer) == 24.0  # (10 + 0.5 * 4) * (1.5 + 0.5)
    assert R.released_reward(one, answer, mode="baseline") == 12.0
    assert R.released_reward(plus_sample("torf1", "yes", "middle"), "Yes") == pytest.approx(12.0)
    assert R.released_reward(plus_sample("torf1", "yes", "middle"), "No") == 0.0
    with pytest.raises(ValueError):
        R.released_reward(direct, "", mode="other")


# ------------------------------------------------------------------------------------------ aggregation
def test_official_metrics_pool_the_test_cities(sg):
    good, bad = ans((NE, CQ, FP)), ans((NE, CQ, DG))
    sh = planning(sg, CQ, FP, SG_PLAN, city="shanghai", country="china")
    samples = [planning(sg, CQ, FP, SG_PLAN), planning(sg, CQ, FP, SG_PLAN), sh,
               plus_sample("torf1", "yes", city="singapore"), plus_sample("counting2", "3", city="beijing")]
    responses = [good, bad, good, "Yes", "4"]
    m = R.official_metrics(samples, responses)
    assert m == {"n_planning": 2, "accuracy": 0.5, "map_score": 6.5, "n_plus": 2, "plus_accuracy": 0.5}
    assert R.official_metrics(samples, responses, cities=None)["n_planning"] == 3
    assert set(R.official_metrics(samples, responses, long=True)) >= {"via_stops_score", "num_via_stop_score"}
    assert R.official_metrics([], [])["accuracy"] is None
    with pytest.raises(ValueError):
        R.official_metrics(samples, responses[:-1])


# ------------------------------------------------------------------------------------------ totality
PIECES = ["Route Name: ", "Departure Stop: ", "Arrival Stop: ", "Via Stops: ", "Number of Via Stops: ", "--", "\n",
          "North East Line", CQ, FP, "站", "(", "）", "oxed{", "}", "{", "the answer is", "=", ".", "3", "Yes", "B",
          "\\sqrt", "\\frac", "/", "$", "Metro", " ", "八通", "\u0130", "\U0001F600", "\x00"]
fragments = st.lists(st.sampled_from(PIECES), max_size=30).map("".join)


@settings(max_examples=50, deadline=None)
@given(st.one_of(st.text(max_size=200), fragments))
def test_every_function_accepts_any_string(sg, response):
    s = planning(sg, CQ, FP, SG_PLAN, question_long=NUMBER_Q)
    cn = cn1()
    assert isinstance(R.plus_answer(response), str)
    for qtype, gold in (("torf1", 1), ("counting1", 2), ("counting2", 3)):
        assert isinstance(R.plus_correct(qtype, response, gold), bool)
    for long in (False, True):
        assert isinstance(R.official_correct(s, response, long), bool)
        for sample in (s, cn):
            score = R.official_map_score(sample, response, long)
            assert math.isfinite(score) and 0.0 <= score <= (40.0 if long else 20.0)
    assert isinstance(R.reward_planning_correct(response, sg, CQ, FP), bool)
    assert R.reward_detail(response, sg, CQ, FP, 1) <= 10.0
    assert math.isfinite(R.released_reward(s, response))
    assert isinstance(R.reasonmap_clean(response), str) and isinstance(R.rewardmap_clean(response), str)


@pytest.mark.parametrize("piece", ["(", "（a", "oxed{", "OXED{", "Route Name: ", "Metro ", "9",
                                   section(NE, CQ, FP, "Number of Via Stops: 2\n") + "--"])
def test_huge_adversarial_inputs_stay_fast(sg, piece):
    response = piece * (5_000_000 // len(piece))
    s = planning(sg, CQ, FP, SG_PLAN, question_long=NUMBER_Q)
    start = time.perf_counter()
    R.plus_correct("counting2", response, 3)
    R.official_map_score(s, response, long=True)
    R.official_map_score(s, response)
    R.released_reward(s, response)
    R.reasonmap_clean(response[:R.MAX_RESPONSE_CHARS])
    assert time.perf_counter() - start < 2.0
