"""The task's schema and the metro graph: question types, `Sample`, metro data, best route, route text.

Metro data is a dict `line name -> ordered list of station names` (docs/rewardmap.md §2.1), with the
released files' suffixes (` (Transfer Station)`, ` (Branch-starting Station)`, `（换乘站）`, `（支线起始站）`)
stripped. A station on several lines is an interchange; a loop line repeats its first station last.

    metro = load_metro("tests/data/reasonmap-metro/singapore/singapore.json")
    best_route(metro, "Clarke Quay Station", "Farrer Park Station")   # [(line, departure, arrival)]
    route_text(route)                                                 # the ReasonMap answer format
"""
from __future__ import annotations

import heapq
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

# The six question types (docs/rewardmap.md §2.2): the one list every module uses.
TORF_QTYPES = ("torf1", "torf2")
COUNT_QTYPES = ("counting1", "counting2", "counting3")
PLUS_QTYPES = TORF_QTYPES + COUNT_QTYPES  # the ReasonMap-Plus questions, answered in one \boxed{}
QTYPES = PLUS_QTYPES + ("planning",)
TYPE_NAMES = {"torf1": "TorF1", "torf2": "TorF2", "counting1": "Counting1", "counting2": "Counting2",
              "counting3": "Counting3", "planning": "planning"}
"""The released datasets' spelling of each question type (their `type` field)."""
LETTERS = "ABCD"  # counting1's options; the released data stores the answer as 0-3
MAP_DIFFICULTIES = ("easy", "middle", "hard")
QUESTION_DIFFICULTIES = ("easy", "medium", "hard")

Metro = dict[str, list[str]]
Segment = tuple[str, str, str]  # (line, departure station, arrival station)


@dataclass
class Sample:
    """One question about one map. Field names follow the paper; the loaders map the released names."""

    id: str
    qtype: str  # one of QTYPES
    question: str  # the prompt text (planning: the short template)
    answer: str  # "yes"/"no", "A"-"D", an integer as text, or (planning) the reference route as text
    image: str | None  # path to the map PNG; None for text-only use
    metro: Metro  # line -> ordered, suffix-free station names
    city: str = ""
    country: str = ""
    map_difficulty: str = "easy"  # easy | middle | hard (the released `difficulty_city`)
    station_1: str | None = None
    station_2: str | None = None
    line: str | None = None  # torf2: the line asked about
    choices: list[int] | None = None  # counting1: the four options A-D; `answer` is the letter
    question_difficulty: str | None = None  # planning: easy | medium | hard (0 / 1 / >=2 transfers)
    transfer_count: int | None = None  # planning: transfers of the optimal route
    route: list[Segment] | None = None  # planning: the optimal route
    question_long: str | None = None  # planning: the long template (with via stops)
    routes: list[list[Segment]] | None = None  # planning: reference plans for the map score
    reference_plans: list[list[dict]] | None = None  # planning: the same plans as the released rows give them
    # (one dict per segment: route_name unmodified, departure_stop, arrival_stop, via_stops, num_via_stops);
    # the official map score reads these
    extra: dict = field(default_factory=dict)  # anything else a loader found, kept not dropped
    split: str = ""  # "train" | "test" (split by city), "" when unknown


_SUFFIX = re.compile(r"\s*(\((Transfer Station|Branch-starting Station)\)|（(换乘站|支线起始站)）)\s*$")


def strip_suffix(name: str) -> str:
    """Remove the released files' interchange / branch markers (possibly several) from a station name."""
    name = name.strip()
    while True:
        stripped = _SUFFIX.sub("", name)
        if stripped == name:
            return name
        name = stripped.strip()


def clean_metro(raw: dict) -> Metro:
    """Validate a raw `{line: [station, ...]}` mapping and strip suffixes from every station."""
    if not isinstance(raw, dict) or not raw:
        raise ValueError(f"metro data must be a non-empty dict of line -> station list, got {type(raw).__name__}")
    metro: Metro = {}
    for line, stations in raw.items():
        if not isinstance(stations, list) or not all(isinstance(s, str) for s in stations):
            raise ValueError(f"metro line {line!r}: expected a list of station names")
        metro[str(line).strip()] = [strip_suffix(s) for s in stations]
    return metro


def load_metro(path: str | Path) -> Metro:
    """Read a metro JSON file (ours or ReasonMap's) into suffix-free metro data."""
    path = Path(path)
    with open(path, encoding="utf-8") as f:
        raw = json.load(f)
    try:
        return clean_metro(raw)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def via_stops(metro: Metro, line: str, departure: str, arrival: str) -> list[str] | None:
    """Stations strictly between `departure` and `arrival` on `line`, along the shorter way.

    None when the line does not exist or does not hold both stations. A loop line (first == last
    station, like Shanghai Line 4) can be ridden either way round: the shorter way is taken, the
    listed direction on a tie. A line listing a station twice is handled by taking the closest pair
    of positions.
    """
    stations = metro.get(line)
    if stations is None:
        return None
    if len(stations) > 2 and stations[0] == stations[-1] and departure in stations and arrival in stations:
        ring = stations[:-1]
        n, i, j = len(ring), ring.index(departure), ring.index(arrival)
        ahead, behind = (j - i) % n, (i - j) % n
        if ahead <= behind:
            return [ring[(i + k) % n] for k in range(1, ahead)]
        return [ring[(i - k) % n] for k in range(1, behind)]
    a = [i for i, s in enumerate(stations) if s == departure]
    b = [i for i, s in enumerate(stations) if s == arrival]
    if not a or not b:
        return None
    i, j = min(((i, j) for i in a for j in b), key=lambda p: (abs(p[0] - p[1]), p))
    inner = stations[i + 1 : j] if i <= j else stations[j + 1 : i][::-1]
    return inner


def station_lines(metro: Metro) -> dict[str, list[str]]:
    """station -> the lines (in metro order) that stop there."""
    out: dict[str, list[str]] = {}
    for line, stations in metro.items():
        for s in stations:
            if line not in out.setdefault(s, []):
                out[s].append(line)
    return out


def _neighbours(metro: Metro) -> dict[tuple[str, str], list[str]]:
    """(station, line) -> adjacent stations on that line."""
    adj: dict[tuple[str, str], list[str]] = {}
    for line, stations in metro.items():
        for a, b in zip(stations, stations[1:]):
            if a == b:
                continue
            adj.setdefault((a, line), []).append(b)
            adj.setdefault((b, line), []).append(a)
    return adj


def best_route(metro: Metro, stop1: str, stop2: str) -> list[Segment] | None:
    """The optimal route from stop1 to stop2: fewest transfers, then fewest stops travelled.

    Dijkstra over (station, line) states with the lexicographic cost (transfers, stops). Returns the
    route as segments `(line, departure, arrival)` (transfers = len(route) - 1), `[]` when the two
    stops are the same station, and None when either stop is unknown or no route exists. Ties are
    broken deterministically by the order of lines in `metro`.
    """
    lines_at = station_lines(metro)
    if stop1 == stop2:
        return [] if stop1 in lines_at else None
    adj = _neighbours(metro)
    line_order = {line: k for k, line in enumerate(metro)}
    start = lines_at.get(stop1)
    if not start or stop2 not in lines_at:
        return None
    # heap entries: (transfers, stops, line order, station, line)
    heap = [(0, 0, line_order[line], stop1, line) for line in start]
    heapq.heapify(heap)
    best: dict[tuple[str, str], tuple[int, int]] = {(stop1, line): (0, 0) for line in start}
    parent: dict[tuple[str, str], tuple[str, str] | None] = {(stop1, line): None for line in start}
    done: set[tuple[str, str]] = set()
    goal = None
    while heap:
        transfers, stops, _, station, line = heapq.heappop(heap)
        state = (station, line)
        if state in done:
            continue
        done.add(state)
        if station == stop2:
            goal = state
            break
        moves = [((nxt, line), (transfers, stops + 1)) for nxt in adj.get(state, [])]
        moves += [((station, other), (transfers + 1, stops)) for other in lines_at[station] if other != line]
        for nstate, cost in moves:
            if nstate not in best or cost < best[nstate]:
                best[nstate] = cost
                parent[nstate] = state
                heapq.heappush(heap, (*cost, line_order[nstate[1]], *nstate))
    if goal is None:
        return None
    path = []
    state: tuple[str, str] | None = goal
    while state is not None:
        path.append(state)
        state = parent[state]
    path.reverse()
    route: list[Segment] = []
    seg_start = path[0]
    for prev, cur in zip(path, path[1:]):
        if cur[1] != prev[1]:  # a transfer at prev's station
            if prev[0] != seg_start[0]:
                route.append((prev[1], seg_start[0], prev[0]))
            seg_start = cur
    route.append((path[-1][1], seg_start[0], path[-1][0]))
    return route


def route_text(route: list[Segment], via: Metro | None = None) -> str:
    """A route in the ReasonMap answer format (segments separated by `--`).

    With `via` (the metro data), each segment also lists `Number of Via Stops` (the long template).
    """
    blocks = []
    for line, dep, arr in route:
        block = f"Route Name: {line}\nDeparture Stop: {dep}\nArrival Stop: {arr}"
        if via is not None:
            inner = via_stops(via, line, dep, arr)
            block += f"\nNumber of Via Stops: {len(inner) if inner is not None else 0}"
        blocks.append(block)
    return "\n--\n".join(blocks)


def route_plan(metro: Metro, route: list[Segment]) -> list[dict]:
    """A route in the released datasets' `routes` shape: one dict per segment, with its via stops."""
    out = []
    for line, dep, arr in route:
        inner = via_stops(metro, line, dep, arr) or []
        out.append({"route_name": line, "departure_stop": dep, "arrival_stop": arr, "via_stops": inner,
                    "num_via_stops": len(inner)})
    return out


def question_difficulty(transfers: int) -> str:
    """ReasonMap's question difficulty from the optimal route's transfers: 0 / 1 / >= 2 -> easy / medium / hard."""
    return QUESTION_DIFFICULTIES[min(transfers, 2)]
