"""The synthetic transit-map world's questions: all six types asked about seeded cities (docs/rewardmap.md §2.4).

maps.py generates each city's network and draws its map; this module asks the questions (the ReasonMap /
ReasonMap-Plus templates of docs/rewardmap.md §2.2, answers computed from the metro data) and splits the
cities into train / test.

    samples = synthetic_dataset(30, seed=0, out_dir="data_out")   # maps under data_out/maps/
    make_questions(metro, random.Random(0), 20)                   # questions about any metro data
"""
from __future__ import annotations

import random
import zlib
from pathlib import Path

from tqdm import tqdm

from offline.maps import generate_city, make_word, render_map
from transit.metro import (LETTERS, MAP_DIFFICULTIES, QTYPES, Metro, Sample, best_route, question_difficulty, route_plan,
                   route_text, station_lines, via_stops)

# ---------------------------------------------------------------------------------------------------
# question templates (docs/rewardmap.md §2.2, verbatim; the answer goes in \boxed{})

TEMPLATES = {
    "counting1": 'Please solve the multiple choice problem and put your answer (one of ABCD) in one "\\boxed{}". '
    "According to the subway map, how many intermediate stops are there between {stop1} and {stop2} "
    "(except for this two stops)? \nA) {a} \nB) {b} \nC) {c} \nD) {d} \n",
    "counting2": 'Please solve the problem and put your answer in one "\\boxed{}". '
    "According to the subway map, how many lines pass through {stop1}?",
    "counting3": 'Please solve the problem and put your answer in one "\\boxed{}". '
    "According to the subway map, how many subway (metro) lines are there in total?",
    "torf1": 'Please solve the problem and put your answer (only answer yes or no) in one "\\boxed{}". '
    "According to the subway map, is it true that {stop1} is the same line as {stop2}?",
    "torf2": 'Please solve the problem and put your answer (only answer yes or no) in one "\\boxed{}". '
    "According to the subway map, is it true that {stop1} is on the line {line}?",
}
_SEGMENT = "Route Name: Line x\nDeparture Stop: xx Station\nArrival Stop: xx Station"
_SEGMENT_LONG = _SEGMENT + "\nNumber of Via Stops: x"
PLANNING_SHORT = (
    "According to the subway map, how do I get from {stop1} to {stop2}? Provide only one optimal route, with only "
    "the line name and the departure and arrival stations. The format should be strictly followed:\n"
    + f"{_SEGMENT}\n--\n{_SEGMENT}"
)
# Long template 1: the same question, each segment also giving its number of via stops.
PLANNING_LONG = (
    "According to the subway map, how do I get from {stop1} to {stop2}? Provide only one optimal route, with the "
    "line name, the departure and arrival stations, and the number of via stops. The format should be strictly "
    "followed:\n" + f"{_SEGMENT_LONG}\n--\n{_SEGMENT_LONG}"
)


def fill(template: str, **values) -> str:
    """Put values into a template's `{name}` slots (str.format would choke on the literal `\\boxed{}`)."""
    for key, value in values.items():
        template = template.replace("{" + key + "}", str(value))
    return template


# ---------------------------------------------------------------------------------------------------
# question generation from metro data. Each generator returns dicts of qtype-specific Sample fields.


def _balanced(rng: random.Random, yes: list, no: list, n: int) -> list[tuple[object, str]]:
    """n items, half with answer yes and half no (the odd one by a coin flip); fewer if a side runs short."""
    n_yes = n // 2 + (n % 2 and rng.random() < 0.5)
    if len(yes) < n_yes or len(no) < n - n_yes:  # keep the balance rather than the count
        n_yes = min(len(yes), len(no), n // 2)
        n = 2 * n_yes
    items = [(x, "yes") for x in rng.sample(yes, n_yes)] + [(x, "no") for x in rng.sample(no, n - n_yes)]
    rng.shuffle(items)
    return items


def _torf1(metro: Metro, rng: random.Random, n: int) -> list[dict]:
    lines_at = station_lines(metro)
    stations = sorted(lines_at)
    yes, no = [], []
    for i, a in enumerate(stations):
        for b in stations[i + 1 :]:
            (yes if set(lines_at[a]) & set(lines_at[b]) else no).append((a, b))
    out = []
    for (a, b), ans in _balanced(rng, yes, no, n):
        if rng.random() < 0.5:
            a, b = b, a
        out.append(dict(question=fill(TEMPLATES["torf1"], stop1=a, stop2=b), answer=ans, station_1=a, station_2=b))
    return out


def _torf2(metro: Metro, rng: random.Random, n: int) -> list[dict]:
    lines_at = station_lines(metro)
    yes = [(s, line) for s in sorted(lines_at) for line in metro if line in lines_at[s]]
    no = [(s, line) for s in sorted(lines_at) for line in metro if line not in lines_at[s]]
    return [dict(question=fill(TEMPLATES["torf2"], stop1=s, line=line), answer=ans, station_1=s, line=line)
            for (s, line), ans in _balanced(rng, yes, no, n)]


def _loop_tie(metro: Metro, line: str, a: str, b: str) -> bool:
    """True when a and b sit opposite each other on a loop line: both ways round are equally long."""
    st = metro[line]
    if not (len(st) > 2 and st[0] == st[-1]):
        return False
    ring = st[:-1]
    d = (ring.index(b) - ring.index(a)) % len(ring)
    return d == len(ring) - d


def _counting1(metro: Metro, rng: random.Random, n: int) -> list[dict]:
    lines_at = station_lines(metro)
    stations = sorted(lines_at)
    pairs = []
    for i, a in enumerate(stations):
        for b in stations[i + 1 :]:
            shared = [line for line in lines_at[a] if line in lines_at[b]]
            if not shared or any(_loop_tie(metro, line, a, b) for line in shared):
                continue
            # several shared lines must agree on the count, or the question would have two answers
            if len({len(via_stops(metro, line, a, b)) for line in shared}) == 1:
                pairs.append((a, b, shared[0]))
    # the right letter cycles evenly over A-D; a pair can take letter k only if k smaller counts exist
    rng.shuffle(pairs)
    letters = [k % 4 for k in range(min(n, len(pairs)))]
    rng.shuffle(letters)
    out = []
    for k in letters:
        pick = next((p for p in pairs if len(via_stops(metro, p[2], p[0], p[1])) >= k), pairs[0])
        pairs.remove(pick)
        a, b, line = pick if rng.random() < 0.5 else (pick[1], pick[0], pick[2])
        inner = via_stops(metro, line, a, b)
        count = len(inner)
        k = min(k, count)
        # choices ascending, the right one at letter k: k smaller distractors and 3 - k larger ones
        choices = sorted(rng.sample(range(max(0, count - 6), count), k) + [count]
                         + rng.sample(range(count + 1, count + 7), 3 - k))
        out.append(dict(question=fill(TEMPLATES["counting1"], stop1=a, stop2=b, a=choices[0], b=choices[1],
                                      c=choices[2], d=choices[3]),
                        answer=LETTERS[k], station_1=a, station_2=b, choices=choices, extra={"via_stops": inner}))
    return out


def _counting2(metro: Metro, rng: random.Random, n: int) -> list[dict]:
    lines_at = station_lines(metro)
    inter = sorted(s for s, ls in lines_at.items() if len(ls) > 1)
    plain = sorted(s for s, ls in lines_at.items() if len(ls) == 1)
    k = min(len(inter), n // 2)  # half interchanges, so that "1" is not almost always right
    picked = rng.sample(inter, k) + rng.sample(plain, min(len(plain), n - k))
    rng.shuffle(picked)
    return [dict(question=fill(TEMPLATES["counting2"], stop1=s), answer=str(len(lines_at[s])), station_1=s)
            for s in picked]


def _counting3(metro: Metro, rng: random.Random, n: int) -> list[dict]:
    return [dict(question=TEMPLATES["counting3"], answer=str(len(metro)))]  # one per map


def _planning(metro: Metro, rng: random.Random, n: int) -> list[dict]:
    """Pairs with a route, spread over 0 / 1 / >= 2 transfers where the network allows; no-route pairs skipped."""
    stations = sorted(station_lines(metro))
    buckets: list[list] = [[], [], []]
    seen = set()
    for _ in range(8 * n):
        a, b = rng.sample(stations, 2)
        if (a, b) in seen:
            continue
        seen.add((a, b))
        route = best_route(metro, a, b)
        if route:  # None: no route (disconnected lines) -> never asked
            buckets[min(len(route) - 1, 2)].append((a, b, route))
    picked = []
    while len(picked) < n and any(buckets):
        for bucket in buckets:
            if bucket and len(picked) < n:
                picked.append(bucket.pop(0))
    rng.shuffle(picked)
    out = []
    for a, b, route in picked:
        out.append(dict(question=fill(PLANNING_SHORT, stop1=a, stop2=b),
                        question_long=fill(PLANNING_LONG, stop1=a, stop2=b),
                        answer=route_text(route), station_1=a, station_2=b, route=route, routes=[route],
                        reference_plans=[route_plan(metro, route)],
                        transfer_count=len(route) - 1, question_difficulty=question_difficulty(len(route) - 1)))
    return out


_GENERATORS = {"torf1": _torf1, "torf2": _torf2, "counting1": _counting1, "counting2": _counting2,
               "counting3": _counting3, "planning": _planning}


def make_questions(metro: Metro, rng: random.Random, questions_per_type: int = 20, *, city: str = "",
                   country: str = "", image: str | None = None, map_difficulty: str = "easy") -> list[Sample]:
    """Questions of all six types about one map, answers computed from `metro` (one counting3 per map)."""
    lines_at = station_lines(metro)
    city_info = {"city_line_count": len(metro), "city_transfer_count": sum(len(ls) > 1 for ls in lines_at.values())}
    samples = []
    for qtype in QTYPES:
        for k, fields in enumerate(_GENERATORS[qtype](metro, rng, questions_per_type)):
            extra = {**city_info, **fields.pop("extra", {})}
            samples.append(Sample(id=f"{city}-{qtype}-{k:03d}", qtype=qtype, image=image, metro=metro, city=city,
                                  country=country, map_difficulty=map_difficulty, extra=extra, **fields))
    return samples


# ---------------------------------------------------------------------------------------------------
# the synthetic dataset


def split_by_city(samples: list[Sample], test_fraction: float = 0.37, seed: int = 0) -> tuple[list[Sample], list[Sample]]:
    """Set `split` on every sample, whole cities at a time, and return (train, test).

    ReasonMap-Plus holds out 11 of its 30 cities (0.37). Test cities are drawn round-robin over map
    difficulties so that both splits see every difficulty when there are enough cities; with two or
    more cities each split gets at least one.
    """
    difficulty = {s.city: s.map_difficulty for s in samples}
    rng = random.Random(f"rewardmap-split:{seed}")
    groups = [sorted(c for c, d in difficulty.items() if d == level) for level in MAP_DIFFICULTIES]
    groups.append(sorted(c for c, d in difficulty.items() if d not in MAP_DIFFICULTIES))
    for g in groups:
        rng.shuffle(g)
    order = [g[k] for k in range(max(map(len, groups), default=0)) for g in groups if k < len(g)]
    n = len(order)
    k = min(max(round(test_fraction * n), 1), n - 1) if n >= 2 else 0
    test_cities = set(order[:k])
    for s in samples:
        s.split = "test" if s.city in test_cities else "train"
    return [s for s in samples if s.split == "train"], [s for s in samples if s.split == "test"]


WORLDS = ("default", "demo")
"""The synthetic worlds: `default`, cities drawn as map images (offline/maps.py's LEVELS); `demo`, the learning
demo's (docs/demo.md): many small networks read as text, for a small text model to learn from (DEMO_LEVELS)."""
DEMO_LEVELS = {
    "easy": dict(lines=(2, 2), stations=(4, 6), grid=(6, 5), spacing=84, loop_p=0.0, width=16, font=17),
    "middle": dict(lines=(2, 3), stations=(4, 6), grid=(6, 6), spacing=84, loop_p=0.0, width=16, font=17),
    "hard": dict(lines=(3, 4), stations=(4, 6), grid=(7, 6), spacing=84, loop_p=0.0, width=16, font=17),
}
"""The demo world's networks: 2 to 4 lines of 4 to 6 stations, no circle lines; a city's map is ~60 tokens of text."""
DEMO_CITIES = 3000
"""The demo's number of cities (train.py --preset demo): ~63,000 questions, generated in seconds (no images)."""
DEMO_NAME_POOL = 300
"""The demo world's station names: 300 one-word names shared by every city, each station of a city one of them
(drawn per city), so that a small tokenizer gives each name one token and the names say nothing of the lines."""
DEMO_QUESTIONS = 4
"""Questions of each type per demo city (one counting3): counting2 asks half of them at interchanges, which a small
network has few of, so more questions per city would make "1" the answer of most."""
DEMO_TEST_FRACTION = 0.1
"""The demo world's held-out cities (a tenth of many cities is still hundreds)."""


DEMO_VERSION = 2
"""Bump when what the demo world generates changes (part of its cache folder's name: data.load_data)."""
LINE_LETTERS = "ABCDEFGH"
"""The demo world's line names, `Line A` to `Line D` in a city's order: a station's lines then read as one word
(`AC`: model.station_row), one token for the model to find and copy."""


def demo_names(n: int = DEMO_NAME_POOL) -> list[str]:
    """The demo world's pool of `n` station names: two-syllable made-up words of at most 9 letters, the same pool
    for every seed."""
    rng, names, seen = random.Random("rewardmap-demo-names"), [], set()
    while len(names) < n:
        word = make_word(rng, (2, 2))
        if word.lower() not in seen and len(word) <= 9:
            seen.add(word.lower())
            names.append(word)
    return names


def synthetic_dataset(n_cities: int, seed: int, out_dir: str | Path, questions_per_type: int | None = None,
                      test_fraction: float | None = None, progress: bool = True, world: str = "default") -> list[Sample]:
    """Generate `n_cities` synthetic cities, draw their maps under `out_dir/maps/`, ask questions.

    Map difficulty cycles easy, middle, hard, so every difficulty appears from 3 cities on. Each city
    gets `questions_per_type` questions of each type (one counting3; fewer when a small network has
    too few distinct ones), and `split` is set by city (`split_by_city`). Same arguments give identical
    samples and byte-identical PNGs. `world` "demo": DEMO_LEVELS' small networks, their stations renamed from
    `demo_names()`, its lines lettered (LINE_LETTERS), and no images (the map is read as text:
    model.metro_as_text). Unless given, the world's own
    `questions_per_type` and `test_fraction`: default 20 and 0.37 (ReasonMap-Plus's 11 of 30 cities held out), demo
    DEMO_QUESTIONS and DEMO_TEST_FRACTION.
    """
    if world not in WORLDS:
        raise ValueError(f"world must be one of {', '.join(WORLDS)}, got {world!r}")
    demo = world == "demo"
    questions_per_type = questions_per_type or (DEMO_QUESTIONS if demo else 20)
    test_fraction = test_fraction if test_fraction is not None else (DEMO_TEST_FRACTION if demo else 0.37)
    out_dir = Path(out_dir)
    pool = demo_names() if demo else []
    samples: list[Sample] = []
    slugs: set[str] = set()
    for i in tqdm(range(n_cities), desc="cities", disable=not progress or n_cities < 5):
        difficulty = MAP_DIFFICULTIES[i % len(MAP_DIFFICULTIES)]
        city = generate_city(zlib.crc32(f"{seed}:{i}".encode()), difficulty, DEMO_LEVELS[difficulty] if pool else None)
        slug = city.slug if city.slug not in slugs else f"{city.slug}{i}"
        slugs.add(slug)
        rng = random.Random(f"rewardmap-questions:{seed}:{i}")
        metro, image = city.metro, None
        if pool:
            stations = sorted({s for line in metro.values() for s in line})
            name = dict(zip(stations, rng.sample(pool, len(stations))))
            metro = {f"Line {LINE_LETTERS[k]}": [name[s] for s in line_stations]
                     for k, line_stations in enumerate(metro.values())}
        else:
            image = out_dir / "maps" / f"{slug}.png"
            render_map(city, image)
        samples += make_questions(metro, rng, questions_per_type, city=slug, country="synthetic",
                                  image=str(image) if image else None, map_difficulty=difficulty)
    split_by_city(samples, test_fraction, seed)
    return samples
