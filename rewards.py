"""The RewardMap training reward (docs/rewardmap.md §3).

    R = W_difficulty * (R_format + R_correctness + alpha * R_detail)

- `reward(sample, response, cfg)` scores one response to any of the six question types.
- `planning_correct` is ReasonMap's route correctness check (§3.3).
- `detail_reward` is RewardMap Algorithm 1, as the paper states it (`variant="paper"`, the default, §3.4)
  or as the released code computes it (`variant="released"`, §3.5).
- `difficulty_weight` is W = W_map + W_question (§3.6).

The evaluation metrics built on these checks (Table 1) are eval.py's; `python -m tools.sparsity` shows, in
numbers, the sparse-reward problem the detail reward fixes.

Totality: every function that reads a model response accepts any string and returns a finite value.
Work is bounded by construction: only the first `MAX_RESPONSE_CHARS` characters of a response are read,
each field value is cut to `MAX_FIELD_CHARS`, and at most `MAX_SEGMENTS + 1` route segments are parsed.
No regex here has nested quantifiers, so there is no catastrophic backtracking.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from transit import released
from transit.metro import MAP_DIFFICULTIES, PLUS_QTYPES, TORF_QTYPES, Metro, Sample, best_route

MAX_RESPONSE_CHARS = 100_000  # ~25k tokens, 12x the 2,048-token response limit; the rest is ignored
MAX_FIELD_CHARS = 200  # a station or line name longer than this is cut (names are < 60 chars)
MAX_SEGMENTS = 32  # real optimal routes have <= 6 segments; a longer answer is never correct
DETAIL_MAX = 10.0  # Algorithm 1's `min(score, 10)`


DETAIL_FLOOR = -10.0  # the detail reward's floor (RewardConfig.detail_floor; not in Algorithm 1)


@dataclass(frozen=True)
class RewardConfig:
    """How a response is scored (docs/rewardmap.md §3). Each field is a flag of train.py (`--alpha`, `--no-detail-reward`).
    Frozen: derive variants with `dataclasses.replace`."""

    detail_reward: bool = True
    """add the detail reward (planning only); --no-detail-reward is the paper's 'w/o detail reward' ablation"""
    alpha: float = 0.5
    """weight of the detail reward inside the bracket (paper: 0.5)"""
    difficulty_weight: bool = True
    """multiply by the difficulty weight W; --no-difficulty-weight gives every sample W = 1 (the released 'baseline' mode)"""
    gammas: tuple[float, float, float] = (1.0, 1.2, 1.5)
    """W_map: map-difficulty weights for easy / middle / hard maps"""
    betas: tuple[float, float] = (0.0, 0.5)
    """W_question: added for planning questions with 0 / >= 1 transfers (not for the Plus types)"""
    format_score: float = 1.0
    """R_format of an answer in the required format. The paper gives no value and the released code has no format
    term (0 reproduces it); 1 is a small shaping signal that never rivals a correct answer"""
    correct_score: float = 10.0
    """R_correctness of a correct answer: 10 as in the released code, so a correct route (10) always beats the best
    partial credit of a wrong one (alpha x 10 = 5)"""
    detail_variant: str = "paper"
    """detail reward: 'paper' (Algorithm 1 as written, docs/rewardmap.md §3.4) | 'released' (the authors' code, §3.5)"""
    detail_floor: bool = True
    """floor the detail reward at -10 (a deviation: Algorithm 1 only caps it at 10; each segment beyond the expected
    count costs 5, so a rambling answer would reach -160 and swamp its group's std); --no-detail-floor: unfloored"""
    lenient_parsing: bool = False
    """judge correctness by this project's lenient reading of the paper's text (the last complete box; keys in any
    case or bold, route names lightly normalised), not the released reward code's (docs/rewardmap.md §3.3)"""

    def __post_init__(self):
        if self.detail_variant not in ("paper", "released"):
            raise ValueError(f"--detail-variant must be paper or released, got {self.detail_variant!r}")
        if self.alpha < 0:
            raise ValueError(f"--alpha must be >= 0, got {self.alpha!r}")

    @property
    def parsing(self) -> str:
        """How correctness reads an answer: 'released' (default), exactly as the authors' released reward code does
        (released.py: the official ReasonMap-Plus answer extraction with its fallbacks when there is no box; the
        strict planning parser), so the reward agrees with the evaluation Table 1 was computed with; or 'lenient'.
        With 'released' parsing and the 'released' detail variant the detail reward is the released code's too
        (its parser); otherwise Algorithm 1 runs on the lenient parse."""
        return "lenient" if self.lenient_parsing else "released"

    @property
    def floor(self) -> float | None:
        """The detail reward's lower bound (None: unfloored)."""
        return DETAIL_FLOOR if self.detail_floor else None


@dataclass
class Reward:
    """One scored response; `total = weight * (format + correctness + alpha * detail)`.

    Ranges (defaults in brackets): format in {0, format_score} [{0, 1}]; correctness in {0, correct_score}
    [{0, 10}]; detail in [detail_floor, 10] for planning [-10, 10], 0 for the Plus types and when
    `detail_reward` is off; weight in [min(gammas), max(gammas) + max(betas)] [1.0, 2.0], or 1;
    total in [-10, 32] with the defaults. All finite.
    """

    format: float
    correctness: float
    detail: float
    weight: float
    total: float


# ----------------------------------------------------------------------------------------------------
# Name normalisation (docs/rewardmap.md §3.3)

_BRACKETED = re.compile(r"[(（][^()（）]*[)）]")
_STATION_NOISE = re.compile(r"station|metro|[,*\s\-]", re.IGNORECASE)
_LINE_WORDS = re.compile(r"(?<![a-z])(?:line|route|metro)(?![a-z])|地铁|号线$|线$", re.IGNORECASE)
_LINE_NOISE = re.compile(r"[,*.\s\-]")


def normalize_station(name: str) -> str:
    """Station name for comparison (docs/rewardmap.md §3.3): drop bracketed parts (ASCII or full-width brackets, e.g.
    ` (Transfer Station)`, `（换乘站）`), `Station`/`station`, `Metro`/`metro`, commas, asterisks,
    whitespace and hyphens; case-fold; drop one trailing `站`. 'Clarke Quay Station' -> 'clarkequay'."""
    s = _BRACKETED.sub("", name[:MAX_FIELD_CHARS])
    s = _STATION_NOISE.sub("", s).casefold()
    return s[:-1] if s.endswith("站") else s


def normalize_line(name: str) -> str:
    """Route name for comparison, lightly (docs/rewardmap.md §3.3): `Line 1` = `Route 1` = `1` = `1号线`.

    Drops bracketed parts, the words line / route / metro, `地铁`, a trailing `号线` or `线`, commas,
    asterisks, periods, whitespace and hyphens; case-folds. 'North South Line' -> 'northsouth'."""
    s = _BRACKETED.sub("", name[:MAX_FIELD_CHARS]).strip(" *")
    return _LINE_NOISE.sub("", _LINE_WORDS.sub("", s)).casefold()


# ----------------------------------------------------------------------------------------------------
# Parsing a route answer

_SEGMENT_SEP = "--"
_FIELD = {
    "route": re.compile(r"route\s?name[\s*]{0,3}[:：][ \t]*([^\n]*)", re.IGNORECASE),
    "dep": re.compile(r"departure\s?stop[\s*]{0,3}[:：][ \t]*([^\n]*)", re.IGNORECASE),
    "arr": re.compile(r"arrival\s?stop[\s*]{0,3}[:：][ \t]*([^\n]*)", re.IGNORECASE),
    "num_via": re.compile(r"number\s?of\s?via\s?stops[\s*]{0,3}[:：][ \t]*([^\n]*)", re.IGNORECASE),
    "via": re.compile(r"(?<!of )\bvia\s?stops[\s*]{0,3}[:：][ \t]*([^\n]*)", re.IGNORECASE),
}


def parse_segments(response: str) -> list[dict[str, str]]:
    """Route segments of an answer, in order (docs/rewardmap.md §3.3, ReasonMap's parser).

    The (first `MAX_RESPONSE_CHARS` of the) text is split on `--`; a piece is a segment iff it holds
    `Route Name:`, `Departure Stop:` and `Arrival Stop:` (keys case-insensitive, `:` or `：`); any other
    piece, and any text around the keys, is ignored (markdown `**Route Name:**` is fine). Each value is
    the rest of its line (first occurrence in the piece), cut to `MAX_FIELD_CHARS`, stripped of
    whitespace and `*`. Keys `route`, `dep`, `arr`, plus `num_via` / `via` when present. Parsing stops
    after `MAX_SEGMENTS + 1` segments.
    """
    if not isinstance(response, str):
        return []
    segments = []
    for piece in response[:MAX_RESPONSE_CHARS].split(_SEGMENT_SEP):
        if ":" not in piece and "：" not in piece:
            continue
        found = {}
        for key, pattern in _FIELD.items():
            m = pattern.search(piece)
            if m:
                found[key] = m.group(1)[:MAX_FIELD_CHARS].strip(" \t\r*")
        if "route" in found and "dep" in found and "arr" in found:
            segments.append(found)
            if len(segments) > MAX_SEGMENTS:
                break
    return segments


def _line_index(metro: Metro) -> tuple[dict[str, list[str]], dict[str, set[str]]]:
    """(normalised line name -> metro lines, metro line -> normalised station names)."""
    by_norm: dict[str, list[str]] = {}
    for line in metro:
        by_norm.setdefault(normalize_line(line), []).append(line)
    stations = {line: {normalize_station(s) for s in names} for line, names in metro.items()}
    return by_norm, stations


def _route_ok(seg: dict[str, str], by_norm, stations) -> bool:
    """The segment's route name is a metro line (light normalisation) holding both of its stops."""
    dep, arr = normalize_station(seg["dep"]), normalize_station(seg["arr"])
    lines = by_norm.get(normalize_line(seg["route"]), [])
    return any(dep in stations[line] and arr in stations[line] for line in lines)


# ----------------------------------------------------------------------------------------------------
# Planning: correctness (docs/rewardmap.md §3.3) and detail (§3.4, §3.5)


def planning_correct(response: str, metro: Metro, stop1: str, stop2: str) -> bool:
    """ReasonMap's correctness algorithm (docs/rewardmap.md §3.3). True iff: at least one segment parses (and at most
    `MAX_SEGMENTS`); the first departs from stop1 and the last arrives at stop2; every route name is a
    metro line whose stations include both of the segment's stops; each arrival equals the next departure.
    Route optimality is not checked (as in ReasonMap)."""
    segs = parse_segments(response)
    if not 0 < len(segs) <= MAX_SEGMENTS:
        return False
    s1, s2 = normalize_station(stop1), normalize_station(stop2)
    if normalize_station(segs[0]["dep"]) != s1 or normalize_station(segs[-1]["arr"]) != s2:
        return False
    by_norm, stations = _line_index(metro)
    if not all(_route_ok(seg, by_norm, stations) for seg in segs):
        return False
    return all(normalize_station(a["arr"]) == normalize_station(b["dep"]) for a, b in zip(segs, segs[1:]))


def detail_reward(
    response: str,
    metro: Metro,
    stop1: str,
    stop2: str,
    transfer_count: int,
    variant: str = "paper",
    floor: float | None = None,
) -> float:
    """RewardMap Algorithm 1 (docs/rewardmap.md §3.4, §3.5): partial credit for the verifiable parts of a route answer.

    `transfer_count` is the question's (the optimal route's) number of transfers. Returns a value in
    [floor, 10]; 0 when no segment parses. Without a floor the paper variant's minimum is
    -5 * (MAX_SEGMENTS - transfer_count) + 2 + 4 + ... (about -155); `reward` passes `cfg.floor`.
    A correct route with t transfers scores min(6 + t, 10) ('paper') or 1 if t = 0 else min(4t, 10)
    ('released', where dropping the last transfer would score 4t + 1: a quirk of the authors' code).
    """
    if variant not in ("paper", "released"):
        raise ValueError(f"variant must be 'paper' or 'released', got {variant!r}")
    segs = parse_segments(response)
    if not segs:
        return 0.0
    t = max(0, int(transfer_count or 0))
    by_norm, stations = _line_index(metro)
    s1, s2 = normalize_station(stop1), normalize_station(stop2)
    dep = [normalize_station(seg["dep"]) for seg in segs]
    arr = [normalize_station(seg["arr"]) for seg in segs]
    last = len(segs) - 1
    score = 0.0
    if variant == "paper":
        if dep[0] == s1 or arr[-1] == s2:  # "or": either end right earns the 2
            score += 2
        for i, seg in enumerate(segs):  # i = transfers made so far
            ok = _route_ok(seg, by_norm, stations)
            if i > t:  # more segments than the optimal route has
                score -= 5
            if i == 0 and ok:
                score += 4
            if ok and i < last and arr[i] == dep[i + 1]:
                score += 1
    elif dep[0] == s1 and arr[-1] == s2:  # released: "and", and everything below is inside the if
        score += 2
        lines_with_both = {line for line, names in stations.items() if s1 in names and s2 in names}
        for i, seg in enumerate(segs):
            extra = i + 1 > t  # so a correct 0-transfer answer loses 5 here
            if extra:
                score -= 5
            name = seg["route"].strip()  # exact route names in this variant
            if name in metro:
                if t == 0:
                    score += 4 if name in lines_with_both else 0
                else:
                    score += 3
                on_line = dep[i] in stations[name] and arr[i] in stations[name]
                if on_line and i < last and arr[i] == dep[i + 1] and not extra:
                    score += 1
    score = min(score, DETAIL_MAX)
    return score if floor is None else max(score, float(floor))


# ----------------------------------------------------------------------------------------------------
# ReasonMap-Plus answers (docs/rewardmap.md §3.2 format, §3.3 correctness)

_BOX_TOKEN = re.compile(r"\\boxed\s*\{|[{}]")
_LATEX_CMD = re.compile(r"\\[a-zA-Z]+")
_CHOICE = re.compile(r"\(?([a-d])\)?(?:[\s.):,].*)?", re.DOTALL)
_INTEGER = re.compile(r"[+-]?\d{1,9}")


def boxed_answers(response: str) -> list[str]:
    """Contents of every complete `\\boxed{...}` (balanced nested braces), in order of opening.

    One linear pass over the first `MAX_RESPONSE_CHARS` characters; an unclosed box is not an answer."""
    if not isinstance(response, str):
        return []
    text = response[:MAX_RESPONSE_CHARS]
    stack: list[tuple[bool, int]] = []  # (opened by \boxed, content start)
    found: list[tuple[int, str]] = []
    for m in _BOX_TOKEN.finditer(text):
        tok = m.group()
        if tok == "}":
            if stack:
                boxed, start = stack.pop()
                if boxed:
                    found.append((start, text[start : m.start()]))
        else:
            stack.append((tok != "{", m.end()))
    return [content for _, content in sorted(found)]


def clean_boxed(content: str) -> str:
    """A boxed answer for comparison: LaTeX commands (`\\text`, ...), braces, `$` and asterisks dropped,
    case-folded, trimmed, trailing `.!;:,` and full-width `。` removed. `\\text{Yes.}` -> 'yes'."""
    s = _LATEX_CMD.sub("", content[:MAX_FIELD_CHARS])
    s = re.sub(r"[{}$*]", "", s).strip().casefold()
    return s.rstrip(".!;:,。 \t\n").strip()


def _gold(sample: Sample) -> str:
    """The sample's answer in canonical form: 'yes'/'no', 'a'-'d', or an integer string."""
    a = str(sample.answer).strip().casefold()
    if sample.qtype in TORF_QTYPES:
        return {"1": "yes", "true": "yes", "0": "no", "false": "no"}.get(a, a)
    if sample.qtype == "counting1":
        return {"0": "a", "1": "b", "2": "c", "3": "d"}.get(a, a)
    return str(int(a)) if _INTEGER.fullmatch(a) else a


def _plus_answer(qtype: str, content: str) -> str | None:
    """The answer a boxed `content` gives to a question of type `qtype`, canonical, or None when it is
    not an answer of that kind. torf: 'yes'/'no' after `clean_boxed`; counting1: the option letter,
    alone or as `B)`, `(B)`, `B. 5` (the letter decides, as in the released evaluation; a bare number is
    not accepted, the prompt asks for one of ABCD); counting2/3: an integer, nothing else (`3 lines` is
    not one, as in the released evaluation)."""
    s = clean_boxed(content)
    if qtype in TORF_QTYPES:
        return s if s in ("yes", "no") else None
    if qtype == "counting1":
        m = _CHOICE.fullmatch(s)
        return m.group(1) if m else None
    if qtype in ("counting2", "counting3"):
        return str(int(s)) if _INTEGER.fullmatch(s) else None
    raise ValueError(f"not a ReasonMap-Plus question type: {qtype!r}")


def plus_answer_correct(qtype: str, content: str, gold: str) -> bool:
    """Is the boxed `content` the right answer (see `_plus_answer` for what counts as an answer)?"""
    answer = _plus_answer(qtype, content)
    return answer is not None and answer == gold


def plus_scores(sample: Sample, response: str) -> tuple[bool, bool]:
    """(format ok, correct) for a ReasonMap-Plus response.

    Format (docs/rewardmap.md §3.2, §3.7: "the answer is inside exactly one \\boxed{...}"): exactly one complete box, and
    what it holds is an answer of the question's kind (yes/no; a letter A-D; an integer), right or wrong.
    This project reads "the answer" that way on purpose: `\\boxed{yes}` to a counting question is a
    box but not an answer, and rewarding it as format would pay a policy for carrying the previous
    stage's answers into the next (seen with the tiny model: it kept answering yes to counting questions).
    Correct: the LAST boxed answer is right (so boxing two answers cannot hedge), judged even when the
    format fails. No box, no answer: the released '`the answer is`' fallback is not used."""
    boxes = boxed_answers(response)
    fmt = len(boxes) == 1 and _plus_answer(sample.qtype, boxes[0]) is not None
    correct = bool(boxes) and plus_answer_correct(sample.qtype, boxes[-1], _gold(sample))
    return fmt, correct


# ----------------------------------------------------------------------------------------------------
# Difficulty weight and the training reward (docs/rewardmap.md §3.1, §3.6)


def difficulty_weight(map_difficulty: str, transfer_count: int | None, cfg: RewardConfig) -> float:
    """W = W_map + W_question (docs/rewardmap.md §3.6): gammas by map difficulty, plus betas[0] (0 transfers) or betas[1]
    (>= 1) for planning; `transfer_count=None` (the Plus types) adds nothing. 1.0 when `cfg.difficulty_weight`
    is off. Raises ValueError on an unknown map difficulty or a negative transfer count (bad data)."""
    if not cfg.difficulty_weight:
        return 1.0
    if map_difficulty not in MAP_DIFFICULTIES:
        raise ValueError(f"map difficulty must be one of {MAP_DIFFICULTIES}, got {map_difficulty!r}")
    w = cfg.gammas[MAP_DIFFICULTIES.index(map_difficulty)]
    if transfer_count is not None:
        if transfer_count < 0:
            raise ValueError(f"transfer count must be >= 0, got {transfer_count}")
        w += cfg.betas[0] if transfer_count == 0 else cfg.betas[1]
    return float(w)


def transfer_count(sample: Sample) -> int:
    """A planning sample's transfers: the stored count, else from its route, else from `best_route`."""
    if sample.transfer_count is not None:
        return int(sample.transfer_count)
    route = sample.route or best_route(sample.metro, sample.station_1, sample.station_2)
    return max(0, len(route) - 1) if route else 0


def is_correct(sample: Sample, response: str, parsing: str = "released") -> bool:
    """Is the response right, for any question type? `parsing` 'released': the released reward code's
    verdict (released.py); 'lenient': `planning_correct` or the Plus rule of `plus_scores`. Never raises
    on the response."""
    s1, s2 = sample.station_1 or "", sample.station_2 or ""
    if parsing == "released":
        if sample.qtype == "planning":
            return released.reward_planning_correct(response, sample.metro, s1, s2)
        return released.plus_correct(sample.qtype, response, released.official_gold(sample))
    if sample.qtype == "planning":
        return planning_correct(response, sample.metro, s1, s2)
    return plus_scores(sample, response)[1]


def reward(sample: Sample, response: str, cfg: RewardConfig = RewardConfig()) -> Reward:
    """Score one response (docs/rewardmap.md §3.1): R = W * (R_format + R_correctness + alpha * R_detail).

    Plus types: format = one `\\boxed{}` holding an answer of the question's kind (see `plus_scores`), no
    detail. Planning: format = at least one parsed segment, detail = `detail_reward(cfg.detail_variant,
    floor=cfg.floor)`. Correctness: `is_correct(..., cfg.parsing)`. Never raises on the response; raises
    ValueError on a malformed sample (unknown qtype or map difficulty)."""
    if not isinstance(response, str):
        response = ""
    if sample.qtype == "planning":
        t = transfer_count(sample)
        s1, s2 = sample.station_1 or "", sample.station_2 or ""
        fmt = bool(parse_segments(response))
        correct = is_correct(sample, response, cfg.parsing)
        detail = 0.0
        if cfg.detail_reward and cfg.parsing == "released" and cfg.detail_variant == "released":
            detail = released.reward_detail(response, sample.metro, s1, s2, t)  # the released code, exactly
            detail = detail if cfg.floor is None else max(detail, cfg.floor)
        elif cfg.detail_reward:
            detail = detail_reward(response, sample.metro, s1, s2, t, cfg.detail_variant, cfg.floor)
        weight = difficulty_weight(sample.map_difficulty, t, cfg)
    elif sample.qtype in PLUS_QTYPES:
        fmt = plus_scores(sample, response)[0]
        correct = is_correct(sample, response, cfg.parsing)
        detail = 0.0
        weight = difficulty_weight(sample.map_difficulty, None, cfg)
    else:
        raise ValueError(f"unknown question type {sample.qtype!r}")
    f = cfg.format_score if fmt else 0.0
    c = cfg.correct_score if correct else 0.0
    return Reward(format=f, correctness=c, detail=detail, weight=weight, total=weight * (f + c + cfg.alpha * detail))
