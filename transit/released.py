"""The authors' released scoring, rule for rule, quirks included (docs/rewardmap.md §6.3 describes it for users).

Two sources, re-implemented here in our own code (each function's docstring names the file it follows):

- ReasonMap's evaluators (github.com/fscdc/ReasonMap): `main.py` (planning accuracy and map score, short and
  long questions), `main_plus.py` + `utils.find_math_answer` (ReasonMap-Plus), `tools.clean_string`,
  `cal_metrics.py` (aggregation). Table 1 of the RewardMap paper was computed with them.
- RewardMap's released reward (github.com/fscdc/RewardMap, `verl/utils/reward_score/reason_map.py`): the
  same parsing with a different `clean_string`, and its detail reward and difficulty weights.

Quirks reproduced (ReasonMap main.py unless named otherwise):
 1. Plus: with no `oxed{`, four phrases ("the answer is", ...) cut the text, each lowercase then capitalised;
    with several boxes only the last counts; find_math_answer's cleaning; `.` `:` and spaces stripped
    (main_plus.py). So `\\boxed{\\text{Yes}}`, `\\boxed{(B)}`, `**Yes**` are wrong, bare `Yes`, `3`, `B` right;
    Counting2/3 use Python int() ("03", "+3", "1_0" pass, "3.0" fails), and `\\boxed{.}` reads as "0".
 2. Planning keys are case-sensitive; `Route Name: ` / `Departure Stop: ` values must end with a newline
    (else "Wrong"); a short answer's arrival is all the text after the segment's last `Arrival Stop:`, a
    long answer's needs the newline.
 3. Answer stops are cleaned twice (when parsed and again when compared), in the accuracy check AND in the
    map score, so e.g. "METRO A" matches "A". Route names must be exact metro keys (八通 -> Line 1,
    大兴 -> Line 4); direction and optimality are not checked.
 4. Map score, China: the reference route name's first integer gives "Line N", else `(...)` and 地铁 are
    dropped. Outside China the mapping runs on the ANSWER's own route name and its fourth pattern matches
    any letter or digit, so "Circle Line" -> "Line Ci": only a name with no ASCII letter or digit (or one
    like "Line Li") earns the +2. Reference names outside China are never read.
 5. Reference stops get 站 (China) / " Station" appended unless they end with it; the reference ARRIVAL is
    replaced by the departure when the departure already ends so (short everywhere, long outside China).
 6. Long questions: "Number of Via Stops:" in the question picks number mode (the first integer after the
    segment's last "Number of Via Stops: ", else anywhere in the segment, else 0; 4 points if exact,
    else max(0, 4 - 4*err/ref), 0 when ref is 0; sum capped at 10); otherwise via-list mode (text after the
    last "Via Stops: ", split on "," unstripped, only if it holds 站; matches counted with repeats, capped at
    10; IoU over segments whose route names match; adds (10*IoU + matches)/2).
 7. Outside China the reference via stops are never set (the script reuses the previous sample's); here
    they are empty. `zip` ignores answer segments beyond a plan. Best plan wins, ties to the later one;
    no reference plan gives 0. Caps 10 / 20, then +10 / +20 when accurate.
 8. RewardMap's clean_string also drops Station/station and one trailing 站 (checked before brackets are
    removed), renames Univ/Tech/road/Road/Asian Games Village (Univ. -> Universityersity, Tech. ->
    Technologynology) and removes apostrophes. Its detail reward checks keys case-insensitively but parses
    them case-sensitively, and takes 5 off for every segment past the transfer count (so also the last one).

Data: `Sample.metro` is equivalent to the scripts' metro data for ReasonMap's clean_string (checked on all
30 released cities). With RewardMap's clean_string one station differs: Beijing Line 16 "东管头南站 （换乘站）"
keeps its 站 in the released reward (the space blocks the strip); pass `released_metro(raw_json)` for exactness.

Totality: every function accepts any response string and is linear in it; only the first
`MAX_RESPONSE_CHARS` characters are read (as in rewards.py). The scripts' quadratic regexes (bracket groups,
`oxed{(.*)}`, `(.*?)\\n`) are replaced by linear equivalents; a via-stop count too large for a float scores 0
and reference plans lacking via keys count as having none, where the scripts would raise.
"""
from __future__ import annotations

import re

from transit.metro import TYPE_NAMES, Metro, Sample

MAX_RESPONSE_CHARS = 100_000  # the same cut as rewards.MAX_RESPONSE_CHARS
TEST_CITIES = ("los_angeles", "miami", "toronto", "singapore", "auckland",
               "rome", "lisboa", "beijing", "hangzhou", "budapest", "geneva")  # cal_metrics.py city_list
_MARKERS = ("（换乘站）", "（支线起始站）", " (Transfer Station)", " (Branch-starting Station)")
_OPEN, _CLOSE, _SPACE_DASH = re.compile(r"[(（]"), re.compile(r"[)）]"), re.compile(r"[\s\-]+")


# ----------------------------------------------------------------------------------------- name cleaning
def _drop_bracket_groups(s: str) -> str:
    """Linear equivalent of tools.clean_string's re.sub of `(...)` / `（...）` groups (no nesting)."""
    out, pos = [], 0
    while (m := _OPEN.search(s, pos)) and (c := _CLOSE.search(s, m.end())):
        out.append(s[pos:m.start()])
        pos = c.end()
    return "".join(out) + s[pos:]


def reasonmap_clean(name: str) -> str:
    """ReasonMap tools.py clean_string: no Metro/metro , * newlines, bracket groups, spaces, '-'; lowercase."""
    for old in ("Metro", "metro", ",", "*", "\n"):
        name = name.replace(old, "")
    return _SPACE_DASH.sub("", _drop_bracket_groups(name)).lower()


def rewardmap_clean(name: str) -> str:
    """RewardMap reason_map.py clean_string: ReasonMap's plus Station/站 removal and a few renames."""
    for old, new in (("Metro", ""), ("metro", ""), (",", ""), ("*", ""), ("\n", ""), ("'", ""),
                     ("Univ.", "University"), ("Univ", "University"), ("Tech.", "Technology"),
                     ("Tech", "Technology"), ("road", "lu"), ("Road", "lu"), ("Station", ""),
                     ("station", ""), ("Asian Games Village", "yayuncun")):
        name = name.replace(old, new)
    name = name[:-1] if name.endswith("站") else name
    return _SPACE_DASH.sub("", _drop_bracket_groups(name)).lower()


def released_metro(raw: dict) -> Metro:
    """The scripts' metro data (main.py / RewardMap custom.py): the four marker substrings removed, nothing else."""
    def unmark(s):
        for m in _MARKERS:
            s = s.replace(m, "")
        return s
    return {line: [unmark(s) for s in stations] for line, stations in raw.items()}


# ----------------------------------------------------------------------------------------- ReasonMap-Plus
def _after_phrase(text: str, phrase: str) -> str:
    """One main_plus.py fallback step: text after the phrase's last occurrence, stripped; if it occurred,
    only the first line, cut at the first '. '."""
    found = phrase in text
    text = text.rpartition(phrase)[2].strip()
    return text.split("\n")[0].split(". ")[0] if found else text


def _fix_sqrt(s: str) -> str:
    """utils.py _fix_sqrt: brace a one-character \\sqrt argument."""
    head, *parts = s.split("\\sqrt")
    return head + "".join("\\sqrt{" + p[0] + "}" + p[1:] if p and p[0] != "{" else "\\sqrt" + p for p in parts)


def _fix_fracs(s: str) -> str:
    """utils.py _fix_fracs: brace one-character \\frac arguments (the original string if one is too short)."""
    head, *parts = s.split("\\frac")
    out = head
    for p in parts:
        if p[:1] == "{":
            out += "\\frac" + p
        elif len(p) < 2:
            return s
        else:
            out += "\\frac{" + p[0] + "}" + (p[1] if p[1] == "{" else "{" + p[1] + "}") + p[2:]
    return out


def _fix_a_slash_b(s: str) -> str:
    """utils.py _fix_a_slash_b: 'a/b' of two plain integers -> \\frac{a}{b}."""
    parts = s.split("/")
    try:
        a, b = int(parts[0]), int(parts[1])
    except (ValueError, IndexError):
        return s
    return f"\\frac{{{a}}}{{{b}}}" if len(parts) == 2 and s == f"{a}/{b}" else s


def _strip_string(s: str) -> str:
    """utils.py _strip_string, step by step."""
    for old, new in (("\n", ""), ("\\!", ""), ("\\\\", "\\"), ("tfrac", "frac"), ("dfrac", "frac"),
                     ("\\left", ""), ("\\right", ""), ("^{\\circ}", ""), ("^\\circ", ""), ("\\$", ""), ("$", "")):
        s = s.replace(old, new)
    s = s.split("\\text{ ")[0].replace("\\%", "").replace(" .", " 0.").replace("{.", "{0.")
    if not s:
        return s
    s = "0" + s if s[0] == "." else s
    for sep in ("=", "\\approx"):
        if s.count(sep) == 1:
            s = s.split(sep)[-1]
    s = _fix_sqrt(s) if "sqrt" in s else s
    s = s.replace(" ", "")
    s = _fix_fracs(s) if "sqrt" in s else s  # sic: guarded by 'sqrt', not 'frac'
    return _fix_a_slash_b("\\frac{1}{2}" if s == "0.5" else s)


def find_math_answer(s: str) -> str:
    """ReasonMap utils.py find_math_answer (identical in RewardMap reasonmap_utils.py)."""
    s = s.lower().replace("{}", "")
    start, last = s.find("oxed{"), s.rfind("}")  # the greedy re.S 'oxed{(.*)}' match, found linearly
    ans = s[start + 5:last] if start != -1 and last >= start + 5 else s
    close, opening = ans.find("}"), ans.find("{")
    if close != -1 and (opening == -1 or close < opening):
        ans = ans.split("}")[0]
    ans = ans.split("=")[-1].split("\\approx")[-1]
    for old, new in ((" ", ""), ("\\,", ""), ("∞", "\\infty"), ("+\\infty", "\\infty"), ("\\\\", "\\"),
                     ("\n", ""), ("\\text", ""), ("\\mbox", ""), ("bmatrix", "pmatrix"), ("\\left", ""),
                     ("\\right", ""), ("^{\\circ}", ""), ("^\\circ", ""), ("{m}^3", ""), ("m^3", ""),
                     ("{units}", ""), ("units", ""), ("{km}", ""), ("km", "")):
        ans = ans.replace(old, new)
    return _strip_string(ans)


def plus_answer(response: str) -> str:
    """ReasonMap main_plus.py answer extraction (== RewardMap reason_map_compute_score's): the answer string."""
    text = response[:MAX_RESPONSE_CHARS]
    if "oxed{" not in text:
        for phrase in ("the final answer is", "the answer is", "the correct answer is", "the answer should be"):
            text = _after_phrase(_after_phrase(text, phrase), phrase.replace("the", "The"))
    elif text.count("oxed{") > 1:
        text = "\\boxed{" + text.rpartition("oxed{")[2]
    return find_math_answer(text).rstrip(".").lstrip(":").strip()


def official_gold(sample: Sample) -> int:
    """The released Plus gold answer from our normalised one (or the released encoding itself): TorF 1/0,
    Counting1 0-3, Counting2/3 the int. Raises ValueError on an answer of neither form."""
    answer = str(sample.answer).strip()
    if sample.qtype.startswith("torf"):
        return 1 if answer.lower() in ("yes", "1", "true") else 0
    if sample.qtype == "counting1" and len(answer) == 1 and answer.upper() in "ABCD":
        return "ABCD".index(answer.upper())
    return int(answer)


def plus_correct(qtype: str, response: str, gold: int) -> bool:
    """ReasonMap main_plus.py per-type check (== RewardMap get_acc_torf_counting); qtype ours or released."""
    kind, ans = TYPE_NAMES.get(qtype, qtype), plus_answer(response)
    if "TorF" in kind:
        return ans.lower() == ("yes" if gold == 1 else "no")
    if kind in ("Counting2", "Counting3"):
        try:
            return int(ans) == gold
        except ValueError:
            return False
    if kind == "Counting1":
        return ans.lower() in ("a", "b", "c", "d") and "abcd".index(ans.lower()) == gold
    raise ValueError(f"not a ReasonMap-Plus question type: {qtype!r}")


reward_plus_correct = plus_correct  # RewardMap's extraction and get_acc_torf_counting are the same code


# ----------------------------------------------------------------------------------------- planning
def _line_value(section: str, key: str) -> str | None:
    """re.search(key + '(.*?)\\n', section).group(1), linearly; None when there is no match."""
    i = section.find(key)
    j = section.find("\n", i + len(key)) if i != -1 else -1
    return section[i + len(key):j] if j != -1 else None


def _parse(response: str, clean, long: bool = False, any_case: bool = False) -> list[dict]:
    """main.py's route_data: one dict per `--` section holding the three keys (names as the script stores them)."""
    segs = []
    for section in response[:MAX_RESPONSE_CHARS].split("--"):
        probe = section.lower() if any_case else section
        keys = ("route name:", "departure stop:", "arrival stop:") if any_case else \
            ("Route Name:", "Departure Stop:", "Arrival Stop:")
        if not section.strip() or not all(k in probe for k in keys):
            continue
        name, dep = _line_value(section, "Route Name: "), _line_value(section, "Departure Stop: ")
        arr = _line_value(section, "Arrival Stop: ") if long else section.split("Arrival Stop:")[-1].strip()
        segs.append({"name": "Wrong" if name is None else name.strip(), "section": section,
                     "dep": "Wrong" if dep is None else clean(dep), "arr": "Wrong" if arr is None else clean(arr)})
    return segs


def _endpoints_ok(segs: list[dict], station_1: str, station_2: str, clean) -> bool:
    """main.py: the first departure and the last arrival equal the question's stations (cleaned again)."""
    return bool(segs) and clean(segs[0]["dep"]) == clean(station_1 or "") and \
        clean(segs[-1]["arr"]) == clean(station_2 or "")


def _line_name(name: str) -> str:
    """main.py's two Beijing renames before the metro lookup: 八通 -> Line 1, then (on the result) 大兴 -> Line 4."""
    name = "Line 1" if "八通" in name else name
    return "Line 4" if "大兴" in name else name


def _cleaned_line(metro: Metro, name: str, clean, cache: dict) -> set[str] | None:
    """The cleaned stations of an exact metro key (None if it is not one); cached for one call."""
    if name not in cache:
        cache[name] = {clean(s) for s in metro[name]} if name in metro else None
    return cache[name]


def _route_ok(segs: list[dict], metro: Metro, station_1: str, station_2: str, clean) -> bool:
    """main.py's accuracy check on parsed segments (the same in RewardMap get_acc_planning)."""
    if not _endpoints_ok(segs, station_1, station_2, clean):
        return False
    cache: dict = {}
    for i, seg in enumerate(segs):
        stations = _cleaned_line(metro, _line_name(seg["name"]), clean, cache)
        dep, arr = clean(seg["dep"]), clean(seg["arr"])
        if stations is None or dep not in stations or arr not in stations:
            return False
        if i < len(segs) - 1 and arr != clean(segs[i + 1]["dep"]):
            return False
    return True


def official_planning_correct(response: str, metro: Metro, station_1: str, station_2: str, long: bool = False) -> bool:
    """ReasonMap main.py, the short (or long) question's accuracy check (acc_short / acc_long)."""
    return _route_ok(_parse(response, reasonmap_clean, long), metro, station_1, station_2, reasonmap_clean)


def reward_planning_correct(response: str, metro: Metro, station_1: str, station_2: str) -> bool:
    """RewardMap reason_map.py get_acc_planning: main.py's short check with RewardMap's clean_string."""
    return _route_ok(_parse(response, rewardmap_clean), metro, station_1, station_2, rewardmap_clean)


def official_correct(sample: Sample, response: str, long: bool = False) -> bool:
    """ReasonMap main.py (planning: acc_short / acc_long) or main_plus.py (the Plus types) verdict."""
    if sample.qtype == "planning":
        return official_planning_correct(response, sample.metro, sample.station_1, sample.station_2, long)
    return plus_correct(sample.qtype, response, official_gold(sample))


# ----------------------------------------------------------------------------------------- map score
_M1 = re.compile(r"Metro\s+([A-Z0-9]{1,2})[-\s]?Line", re.IGNORECASE)
_M2 = re.compile(r"Metro\s+([A-Z0-9]{1,2})", re.IGNORECASE)
_M3 = re.compile(r"Linea\s+([A-Z0-9]{1,2})", re.IGNORECASE)
_M4 = re.compile(r"([A-Z0-9]{1,2})", re.IGNORECASE)
_REF_KEYS = {"route_name": ("route_name", "Route Name", "line"),
             "departure_stop": ("departure_stop", "Departure Stop", "departure"),
             "arrival_stop": ("arrival_stop", "Arrival Stop", "arrival")}


def _ref(seg: dict, key: str) -> str:
    """A reference segment's field (the loader's accepted spellings), '' when absent."""
    return str(next((seg[k] for k in _REF_KEYS[key] if seg.get(k) is not None), ""))


def _abroad_line(answer_name: str, city: str) -> str:
    """main.py's route-name mapping outside China, applied (sic) to the answer's own route name."""
    for rx in (_M1, _M2, _M3):
        if m := rx.search(answer_name):
            return "Line " + m.group(1)
    if m := _M4.search(answer_name):
        return "Line " + ("B" if m.group(1) == "B1" and city == "rome" else m.group(1))
    return answer_name  # the script's later branches all need an ASCII letter or digit: unreachable


def _china_line(ref_name: str) -> str:
    """main.py's mapping of a reference route name in China: first integer -> 'Line N', else no (...) / 地铁."""
    if m := re.search(r"\d+", ref_name):
        return "Line " + str(int(m.group()))
    return re.sub(r"\(.*?\)", "", ref_name).replace("地铁", "")


def _int_or_none(value) -> int | None:
    """int(value), None when that fails or is too large for the script's float arithmetic (it would raise)."""
    try:
        value = int(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return value if value < 10 ** 300 else None


def _plan_score(segs, plan, sample: Sample, long: bool, number_mode: bool) -> tuple[float, float, float]:
    """main.py's score of one reference plan once the endpoints match: (capped score, via part, number part)."""
    china, score, via_hits, num_score, union, inter = sample.country == "china", 1, 0, 0, set(), set()
    for seg, ref in zip(segs, plan):
        name, ref_dep, ref_arr = seg["name"], _ref(ref, "departure_stop"), _ref(ref, "arrival_stop")
        tag = "站" if china else "Station"
        dep_done = ref_dep.endswith(tag)
        dep = ref_dep if dep_done else ref_dep + ("站" if china else " Station")
        if china and long:
            arr = ref_arr if ref_arr.endswith("站") else ref_arr + "站"
        else:
            arr = ref_dep if dep_done else ref_arr + ("站" if china else " Station")
        line = _china_line(_ref(ref, "route_name")) if china else _abroad_line(name, sample.city)
        ref_via = [v if v.endswith("站") else v + "站" for v in ref.get("via_stops") or []] if china else []
        route_match = reasonmap_clean(line) == reasonmap_clean(name)
        score += 2 * route_match + (reasonmap_clean(dep) == reasonmap_clean(seg["dep"])) + \
            (reasonmap_clean(arr) == reasonmap_clean(seg["arr"]))
        if not long:
            continue
        if number_mode:
            m = re.search(r"\d+", seg["section"].split("Number of Via Stops: ")[-1].strip())
            got = _int_or_none(m.group()) if m else 0
            want = ref.get("num_via_stops")
            want = _int_or_none(want) if want is not None else len(ref.get("via_stops") or [])
            err = None if got is None or want is None else abs(got - want)
            if err == 0:
                num_score += 4
            elif err is not None and want != 0:
                num_score += max(0, 4 - (err / want) * 4)
        else:
            text = seg["section"].split("Via Stops: ")[-1].strip()
            via = text.split(",") if "站" in text else []
            ref_set = set(ref_via)
            via_hits += sum(v in ref_set for v in via)
            if route_match:
                union.update(ref_via, via)
                inter.update(ref_set.intersection(via))
    if not long:
        return float(min(10, score)), 0.0, 0.0
    via_part = ((len(inter) / len(union) if union else 0) * 10 + min(10, via_hits)) / 2
    num_score = min(10, num_score)
    return float(min(20, score + (via_part + num_score))), via_part, float(num_score)  # the script's `+=` order


def _planning_eval(sample: Sample, response: str, long: bool) -> tuple[bool, float, float, float]:
    """main.py on one planning question: (accurate, best map score, its via-stops part, its number part)."""
    segs = _parse(response, reasonmap_clean, long)
    acc = _route_ok(segs, sample.metro, sample.station_1, sample.station_2, reasonmap_clean)
    if not _endpoints_ok(segs, sample.station_1, sample.station_2, reasonmap_clean):
        return acc, 0.0, 0.0, 0.0
    number_mode = "Number of Via Stops:" in (sample.question_long or "")
    best = (0.0, 0.0, 0.0)
    for plan in sample.reference_plans or []:
        score, via_part, num_part = _plan_score(segs, plan, sample, long, number_mode)
        score += (20 if long else 10) * acc
        if score >= best[0]:  # ties: the later plan
            best = (score, via_part, num_part)
    return (acc, *best)


def official_map_score(sample: Sample, response: str, long: bool = False) -> float:
    """ReasonMap main.py, best map api score (short: 0-20; long: 0-40) of a planning question."""
    if sample.qtype != "planning":
        raise ValueError("the map score is defined for planning questions only")
    return _planning_eval(sample, response, long)[1]


# ----------------------------------------------------------------------------------------- released reward
def reward_detail(response: str, metro: Metro, station_1: str, station_2: str, transfer_count: int) -> float:
    """RewardMap reason_map.py get_detailed_reward_planning (its parse and clean_string); at most 10."""
    segs, clean, score = _parse(response, rewardmap_clean, any_case=True), rewardmap_clean, 0.0
    if not _endpoints_ok(segs, station_1, station_2, clean):
        return 0.0
    score += 2
    s1, s2 = clean(station_1 or ""), clean(station_2 or "")
    cache: dict = {}
    for i, seg in enumerate(segs):
        score -= 5 if i + 1 > transfer_count else 0
        stations = _cleaned_line(metro, _line_name(seg["name"]), clean, cache)
        if stations is None:
            continue
        score += (4 if s1 in stations and s2 in stations else 0) if transfer_count == 0 else 3
        dep, arr = clean(seg["dep"]), clean(seg["arr"])
        if dep in stations and arr in stations and i < len(segs) - 1 and arr == clean(segs[i + 1]["dep"]):
            score += 1 if i + 1 <= transfer_count else 0
    return min(score, 10.0)


def released_reward(sample: Sample, response: str, mode: str = "difficulty_aware") -> float:
    """RewardMap reason_map.py reason_map_compute_score: (10 * correct + 0.5 * detail) * difficulty weight."""
    t = sample.transfer_count or 0
    if sample.qtype == "planning":
        score = 10.0 * reward_planning_correct(response, sample.metro, sample.station_1, sample.station_2)
        score += 0.5 * reward_detail(response, sample.metro, sample.station_1, sample.station_2, t)
    else:
        score = 10.0 * plus_correct(sample.qtype, response, official_gold(sample))
    if mode not in ("baseline", "difficulty_aware"):
        raise ValueError(f"mode must be 'baseline' or 'difficulty_aware', got {mode!r}")
    if mode == "baseline":
        return score
    weight = {"easy": 1.0, "middle": 1.2, "hard": 1.5}[sample.map_difficulty]  # get_difficulty_weight
    return score * (weight + 0.5 if sample.qtype == "planning" and t > 0 else weight)


# ----------------------------------------------------------------------------------------- aggregation
def official_metrics(samples: list[Sample], responses: list[str], long: bool = False,
                     cities: tuple[str, ...] | None = TEST_CITIES) -> dict:
    """ReasonMap cal_metrics.py analyze_results: unweighted means pooled over every question of the test
    cities (not per city). Planning: accuracy and best map score (long: also the via parts); Plus: accuracy."""
    if len(samples) != len(responses):
        raise ValueError(f"{len(samples)} samples but {len(responses)} responses")
    kept = [(s, r) for s, r in zip(samples, responses) if cities is None or s.city in cities]
    plan = [_planning_eval(s, r, long) for s, r in kept if s.qtype == "planning"]
    plus = [float(official_correct(s, r)) for s, r in kept if s.qtype != "planning"]

    def mean(xs):
        xs = list(xs)
        return sum(xs) / len(xs) if xs else None
    out = {"n_planning": len(plan), "accuracy": mean(float(p[0]) for p in plan),
           "map_score": mean(p[1] for p in plan), "n_plus": len(plus), "plus_accuracy": mean(plus)}
    if long:
        out.update(via_stops_score=mean(p[2] for p in plan), num_via_stop_score=mean(p[3] for p in plan))
    return out
