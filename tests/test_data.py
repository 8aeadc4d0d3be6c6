"""The transit-map world: maps.py (generator), synthetic.py (questions, split), data.py (export / load of the
released layouts), metro.py (metro files, routes) on real metro data.

Ground truth is recomputed here by independent, deliberately plain methods (membership tests, index
arithmetic, a BFS over the line graph), never by calling the code under test.
"""
import base64
import collections
import dataclasses
import io
import json
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
from PIL import Image

import data
from offline import maps
from offline import synthetic
from conftest import REAL_CITIES
from conftest import REAL_METRO as REAL
from transit.metro import LETTERS, Sample, MAP_DIFFICULTIES, QTYPES, best_route, clean_metro, load_metro, route_text, strip_suffix, via_stops


# ------------------------------------------------------------------------------------------ helpers


def lines_of(metro, station):
    return [line for line, st in metro.items() if station in st]


def min_transfers(metro, a, b):
    """Fewest transfers from a to b: BFS over lines (two lines are adjacent when they share a station)."""
    start = [line for line in metro if a in metro[line]]
    goal = {line for line in metro if b in metro[line]}
    if not start or not goal:
        return None
    dist = {line: 0 for line in start}
    queue = collections.deque(start)
    while queue:
        line = queue.popleft()
        if line in goal:
            return dist[line]
        for other in metro:
            if other not in dist and set(metro[line]) & set(metro[other]):
                dist[other] = dist[line] + 1
                queue.append(other)
    return None


def stops_between(stations, a, b):
    """Intermediate stops between a and b on one line; a loop (first == last) goes the shorter way."""
    if stations[0] == stations[-1]:
        ring = stations[:-1]
        d = abs(ring.index(a) - ring.index(b))
        return min(d, len(ring) - d) - 1
    return abs(stations.index(a) - stations.index(b)) - 1


def check_route(metro, route, a, b):
    """A route is a chain of segments along real lines from a to b."""
    assert route, "empty route"
    assert route[0][1] == a and route[-1][2] == b
    for line, dep, arr in route:
        assert dep in metro[line] and arr in metro[line] and dep != arr
    for (_, _, arr), (_, dep, _) in zip(route, route[1:]):
        assert arr == dep


def connected(metro):
    stations = {s for st in metro.values() for s in st}
    adj = collections.defaultdict(set)
    for st in metro.values():
        for x, y in zip(st, st[1:]):
            adj[x].add(y)
            adj[y].add(x)
    seen, todo = set(), [next(iter(stations))]
    while todo:
        s = todo.pop()
        if s not in seen:
            seen.add(s)
            todo += adj[s]
    return seen == stations


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    return out, synthetic.synthetic_dataset(6, seed=7, out_dir=out, questions_per_type=12, progress=False)


# ------------------------------------------------------------------------------------------ generator


@pytest.mark.parametrize("difficulty,lo,hi", [("easy", 2, 4), ("middle", 4, 7), ("hard", 7, 12)])
def test_generated_cities(difficulty, lo, hi):
    for seed in range(4):
        city = maps.generate_city(seed, difficulty)
        metro = maps.generate_metro(seed, difficulty)
        assert metro == city.metro == maps.generate_city(seed, difficulty).metro  # deterministic
        assert lo <= len(metro) <= hi
        assert len(set(city.colours.values())) == len(metro)  # distinct colours
        stations = {s for st in metro.values() for s in st}
        assert all(s.endswith(" Station") and strip_suffix(s) == s for s in stations)
        keys = {s.lower().replace(" ", "").replace("-", "") for s in stations}
        assert len(keys) == len(stations)  # unique even after ReasonMap's name normalisation
        assert connected(metro)
        for line, st in metro.items():
            body = st[:-1] if st[0] == st[-1] else st
            assert len(set(body)) == len(body) >= 3, line
            if line.endswith(" Line") and not line.startswith("Line"):  # "Red Line" is drawn red
                assert city.colours[line] == maps.PALETTE[line.removesuffix(" Line")]
        # interchanges exist as soon as there are two lines (lines are anchored on each other)
        assert sum(len(lines_of(metro, s)) > 1 for s in stations) >= len(metro) - 1


def test_map_sizes(tmp_path):
    widths = {}
    for d in MAP_DIFFICULTIES:
        w, h = maps.render_map(maps.generate_city(1, d), tmp_path / f"{d}.png")
        assert Image.open(tmp_path / f"{d}.png").size == (w, h)
        widths[d] = w
    assert widths["easy"] < 1200 < widths["middle"] < 2000 <= widths["hard"] <= 3000


def test_loops_appear_and_via_stops_go_the_short_way():
    hard = [maps.generate_city(s, "hard") for s in range(6)]
    assert any(c.loops for c in hard)
    loop = {"C": ["a", "b", "c", "d", "e", "f", "a"]}
    assert via_stops(loop, "C", "b", "f") == ["a"]
    assert via_stops(loop, "C", "f", "c") == ["a", "b"]
    assert via_stops(loop, "C", "b", "d") == ["c"]
    assert best_route(loop, "b", "f") == [("C", "b", "f")]


# ------------------------------------------------------------------------------------------ questions


def test_all_types_with_independent_ground_truth(world):
    _, samples = world
    by_type = collections.defaultdict(list)
    for s in samples:
        by_type[s.qtype].append(s)
        m = s.metro
        if s.qtype == "torf1":
            truth = any(s.station_1 in st and s.station_2 in st for st in m.values())
            assert s.answer == ("yes" if truth else "no")
            assert f"is it true that {s.station_1} is the same line as {s.station_2}?" in s.question
        elif s.qtype == "torf2":
            assert s.answer == ("yes" if s.station_1 in m[s.line] else "no")
            assert s.question.endswith(f"is it true that {s.station_1} is on the line {s.line}?")
        elif s.qtype == "counting1":
            shared = [line for line in m if s.station_1 in m[line] and s.station_2 in m[line]]
            counts = {stops_between(m[line], s.station_1, s.station_2) for line in shared}
            assert len(counts) == 1  # unambiguous
            assert len(set(s.choices)) == 4 and min(s.choices) >= 0
            assert s.choices[LETTERS.index(s.answer)] == counts.pop() == len(s.extra["via_stops"])
            for letter, c in zip(LETTERS, s.choices):
                assert f"\n{letter}) {c} \n" in s.question
        elif s.qtype == "counting2":
            assert s.answer == str(len(lines_of(m, s.station_1)))
        elif s.qtype == "counting3":
            assert s.answer == str(len(m))
        elif s.qtype == "planning":
            t = min_transfers(m, s.station_1, s.station_2)
            assert t is not None and s.transfer_count == t == len(s.route) - 1
            check_route(m, s.route, s.station_1, s.station_2)
            assert s.question_difficulty == ["easy", "medium", "hard"][min(t, 2)]
            assert s.routes == [s.route] and s.answer == route_text(s.route)
            assert s.question.startswith(f"According to the subway map, how do I get from {s.station_1} to {s.station_2}?")
            assert "Number of Via Stops: x" in s.question_long and "Number of Via Stops" not in s.question
        assert s.question.startswith(("Please solve", "According to the subway map"))
        assert Path(s.image).is_file()
    assert set(by_type) == set(QTYPES)
    assert len(by_type["counting3"]) == len({s.city for s in samples})
    for q in ("torf1", "torf2"):
        share = sum(s.answer == "yes" for s in by_type[q]) / len(by_type[q])
        assert 0.45 <= share <= 0.55, (q, share)
    letters = collections.Counter(s.answer for s in by_type["counting1"])
    assert set(letters) == set(LETTERS) and max(letters.values()) <= 2 * min(letters.values())
    assert {s.question_difficulty for s in by_type["planning"]} == {"easy", "medium", "hard"}
    assert {s.map_difficulty for s in samples} == set(MAP_DIFFICULTIES)


def test_split_is_by_city(world):
    _, samples = world
    split_of = collections.defaultdict(set)
    for s in samples:
        split_of[s.city].add(s.split)
    assert all(len(v) == 1 for v in split_of.values())
    assert {next(iter(v)) for v in split_of.values()} == {"train", "test"}
    train, test = synthetic.split_by_city(samples, 0.5, seed=1)
    assert len(train) + len(test) == len(samples) and not {s.city for s in train} & {s.city for s in test}


def test_same_arguments_same_samples_and_pngs(tmp_path):
    a = synthetic.synthetic_dataset(3, 5, tmp_path / "a", questions_per_type=4, progress=False)
    b = synthetic.synthetic_dataset(3, 5, tmp_path / "b", questions_per_type=4, progress=False)
    strip = lambda s: {**dataclasses.asdict(s), "image": Path(s.image).name}  # noqa: E731
    assert [strip(s) for s in a] == [strip(s) for s in b]
    for s in a:
        assert Path(s.image).read_bytes() == (tmp_path / "b" / "maps" / Path(s.image).name).read_bytes()
    c = synthetic.synthetic_dataset(3, 6, tmp_path / "c", questions_per_type=4, progress=False)
    assert [s.question for s in c] != [s.question for s in a]


# ------------------------------------------------------------------------------------------ export / load


def test_export_load_round_trip(world):
    out, samples = world
    counts = data.export_dataset(samples, out)
    assert (out / "train.jsonl").exists() and (out / "test.jsonl").exists()
    assert sorted(p.name for p in (out / "metro").iterdir()) == sorted(f"{c}.json" for c in {s.city for s in samples})
    row = json.loads((out / "train.jsonl").read_text().splitlines()[0])
    assert {"country", "city", "station_1", "station_2", "figure", "question", "answer", "type", "difficulty_city",
            "city_line_count", "city_transfer_count", "json"} <= set(row)
    loaded = data.load_samples(out, "train") + data.load_samples(out, "test")
    assert {"train": len(data.load_samples(out, "train")), "test": len(data.load_samples(out, "test"))} == counts

    def norm(s):
        return {**dataclasses.asdict(s), "image": str(Path(s.image).resolve())}

    assert sorted(map(norm, loaded), key=lambda d: d["id"]) == sorted(map(norm, samples), key=lambda d: d["id"])


def _png_b64(tmp_path):
    Image.new("RGB", (4, 3), (200, 0, 0)).save(tmp_path / "tiny.png")
    return base64.b64encode((tmp_path / "tiny.png").read_bytes()).decode()


def test_loader_normalises_released_variants(tmp_path):
    metro = {"Line 1": ["A Station", "B Station (Transfer Station)", "C Station"], "Line 2": ["B Station", "D Station"]}
    (tmp_path / "stations").mkdir()
    (tmp_path / "stations" / "x.json").write_text(json.dumps(metro))
    Image.new("RGB", (8, 8)).save(tmp_path / "map.png")
    c1q = ("... between A Station and C Station (except for this two stops)? \nA) 0 \nB) 2 \nC) 1 \nD) 3 \n")
    base = {"city": "x", "country": "y", "figure": "map.png", "json": "stations/x.json", "difficulty_city": "hard"}
    rows = [
        {**base, "type": "TorF1", "question": "q", "answer": 1, "station_1": "A Station", "station_2": "C Station"},
        {**base, "type": "torf 1", "question": "q", "answer": "no"},
        {**base, "type": "torf2", "question": "... is it true that A Station is on the line Line 2?", "answer": False},
        {**base, "type": "TorF2", "question": "q", "answer": "True", "figure": _png_b64(tmp_path)},
        {**base, "type": "Counting1", "question": c1q, "answer": 2, "json": metro},
        {**base, "type": "counting1", "question": c1q, "answer": "c"},
        {**base, "type": "Counting3", "question": "q", "answer": 2.0},
        {**base, "type": "planning", "question_short": "short", "question_long": "long", "station_1": "A Station",
         "station_2": "D Station (Transfer Station)", "question_transfer_count": 1, "difficulty_question": "medium",
         "routes": {"plan_1": [{"route_name": "Line 1", "departure_stop": "A Station", "arrival_stop": "B Station"},
                               {"route_name": "Line 2", "departure_stop": "B Station", "arrival_stop": "D Station"}]}},
    ]
    (tmp_path / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    s = data.load_samples(tmp_path / "rows.jsonl")
    assert [x.qtype for x in s] == ["torf1", "torf1", "torf2", "torf2", "counting1", "counting1", "counting3", "planning"]
    assert [x.answer for x in s[:4]] == ["yes", "no", "no", "yes"]
    assert s[0].metro["Line 1"][1] == "B Station" and s[0].map_difficulty == "hard"
    assert s[0].image == str((tmp_path / "map.png").resolve())
    assert s[2].line == "Line 2"
    assert Image.open(s[3].image).size == (4, 3) and ".figure_cache" in s[3].image  # base64 decoded once
    assert s[4].answer == s[5].answer == "C" and s[4].choices == [0, 2, 1, 3]
    assert s[6].answer == "2"
    p = s[7]
    assert p.question == "short" and p.question_long == "long" and p.station_2 == "D Station"
    assert p.route == [("Line 1", "A Station", "B Station"), ("Line 2", "B Station", "D Station")] == p.routes[0]
    assert p.transfer_count == 1 and p.question_difficulty == "medium"
    assert p.answer == route_text(p.route)
    # the same rows as a JSON list, and a folder holding SPLIT.json
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "test.json").write_text(json.dumps([{**r, "figure": "../map.png"} for r in rows[:2]]))
    assert [x.answer for x in data.load_samples(tmp_path / "ds", "test")] == ["yes", "no"]


@pytest.mark.parametrize("change,field", [
    ({"type": "TorF9"}, "type"),
    ({"answer": "maybe"}, "answer"),
    ({"figure": "maps/missing.png"}, "figure"),
    ({"figure": "!!not base64!!"}, "figure"),
    ({"json": "metro/missing.json"}, "json"),
    ({"json": {"Line 1": "not a list"}}, "json"),
    ({"type": "Counting1", "answer": 7, "choices": [0, 1, 2, 3]}, "answer"),
    ({"type": "Counting1", "answer": 1, "question": "no options here"}, "choices"),
    ({"type": "Counting2", "answer": "two"}, "answer"),
    ({"difficulty_city": "extreme"}, "difficulty_city"),
    ({"difficulty_city": None}, "difficulty_city"),
    ({"type": "planning", "question_transfer_count": -1}, "question_transfer_count"),
    ({"question": ""}, "question"),
    ({"type": "planning", "station_2": "Nowhere Station"}, "station_2"),
    ({"figure": base64.b64encode(b"plain text, not an image").decode()}, "figure"),  # valid base64, not an image
    ({"type": "planning", "routes": "{not json"}, "routes"),
    ({"type": "planning", "routes": 5}, "routes"),
    ({"type": "planning", "routes": {"plan_1": "Line 1: A Station -> B Station"}}, "routes"),  # a plan, not a list
    ({"type": "planning", "routes": {"plan_1": {"route_name": "Line 1"}}}, "routes"),
    ({"type": "planning", "routes": [[{"route_name": "Line 1", "departure_stop": "A Station"}]]}, "routes"),  # no arrival
    ({"type": "planning", "routes": [[["Line 1", "A Station"]]]}, "routes"),  # a 2-tuple segment
    ({"type": "planning", "routes": json.dumps({"plan_1": [{"route_name": "Line 1", "arrival_stop": "B"}]})}, "routes"),
    ({"type": "planning", "station_1": None}, "station_1"),
    ({"type": "planning", "station_2": None}, "station_2"),
    ({"type": "planning", "station_2": None, "routes": [[["Line 1", "A Station", "B Station"]]]}, "station_2"),
    ({"type": "planning", "json": None}, "json"),
    ({"type": "planning", "difficulty_question": "extreme"}, "difficulty_question"),
    ({"type": "planning", "question_transfer_count": "two"}, "question_transfer_count"),
    ({"type": None, "question": "q", "answer": 1}, "type"),  # not a planning row: stations and a question
])
def test_bad_rows_name_file_row_and_field(tmp_path, change, field):
    metro = {"Line 1": ["A Station", "B Station"]}
    good = {"type": "TorF1", "question": "q", "answer": 1, "json": metro, "station_1": "A Station",
            "station_2": "B Station", "difficulty_city": "easy"}
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, **change}) + "\n")
    with pytest.raises(ValueError) as e:
        data.load_samples(path)
    msg = str(e.value)
    assert str(path) in msg and "row 2" in msg and f"field '{field}'" in msg, msg


@pytest.mark.parametrize("line", ['[1, 2]', '"a string"', '7', 'null'])
def test_row_that_is_not_an_object_names_file_row_and_field(tmp_path, line):
    good = {"type": "TorF1", "question": "q", "answer": 1, "json": {"L": ["A", "B"]}, "difficulty_city": "easy"}
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(good) + "\n\n" + line + "\n")  # a blank line still counts: the bad row is line 3
    with pytest.raises(ValueError) as e:
        data.load_samples(path)
    msg = str(e.value)
    assert str(path) in msg and "row 3" in msg and "field '<row>'" in msg and "JSON object" in msg, msg
    (tmp_path / "rows.json").write_text(json.dumps([good, json.loads(line)]))  # a JSON list: row 2
    with pytest.raises(ValueError, match=r"rows.json: row 2: field '<row>'"):
        data.load_samples(tmp_path / "rows.json")


def test_missing_dataset_path_names_it(tmp_path):
    missing = tmp_path / "no" / "such-dataset"
    for call in (lambda: data.load_samples(missing), lambda: data.load_samples(missing, "test"),
                 lambda: data.dataset_splits(missing), lambda: data.load_samples(missing / "train.jsonl")):
        with pytest.raises(FileNotFoundError) as e:
            call()
        assert str(missing) in str(e.value) and "no such dataset file or folder" in str(e.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path / 'empty'}: no test data"):
        data.load_samples(tmp_path / "empty", "test")


def test_read_only_dataset_caches_base64_figures_in_a_temp_folder(tmp_path, monkeypatch):
    """A dataset folder the user cannot write to: decoded figures go to the temp folder, loading still works.
    chmod does not stop root (the tests may run as root), so os.access is made to say "read-only" too."""
    folder = tmp_path / "ro"
    folder.mkdir()
    row = {"type": "TorF1", "question": "q", "answer": 1, "json": {"L": ["A", "B"]}, "difficulty_city": "easy",
           "figure": _png_b64(tmp_path)}
    (folder / "test.jsonl").write_text(json.dumps(row) + "\n" + json.dumps({**row, "answer": 0}) + "\n")
    temp = tmp_path / "system-temp"
    monkeypatch.setattr(tempfile, "tempdir", str(temp))  # tempfile.gettempdir() -> here
    real_access = os.access
    monkeypatch.setattr(data.os, "access", lambda p, mode, *a, **kw: False if Path(p) == folder and mode & os.W_OK
                        else real_access(p, mode, *a, **kw))
    folder.chmod(0o555)
    try:
        samples = data.load_samples(folder, "test")
    finally:
        folder.chmod(0o755)
    assert [s.answer for s in samples] == ["yes", "no"]
    assert {Path(s.image).parent for s in samples} == {temp / "rewardmap_figures"}  # one cached file, in the temp folder
    with Image.open(samples[0].image) as im:
        assert im.size == (4, 3)
    assert not (folder / ".figure_cache").exists() and sorted(p.name for p in folder.iterdir()) == ["test.jsonl"]
    # a writable folder keeps its cache next to the data
    monkeypatch.setattr(data.os, "access", real_access)
    assert {Path(s.image).parent for s in data.load_samples(folder, "test")} == {folder / ".figure_cache"}


def test_unparsable_jsonl_line_and_missing_optional_packages(tmp_path, monkeypatch):
    (tmp_path / "broken.jsonl").write_text('{"type": "TorF1"}\n{oops\n')
    with pytest.raises(ValueError, match=r"broken.jsonl: row 2"):
        data.load_samples(tmp_path / "broken.jsonl")
    # pyarrow / datasets are optional for users: simulate their absence (a None entry in sys.modules
    # makes `import` raise ImportError) so the clear message is checked even where they are installed
    for name in ("pyarrow", "pyarrow.parquet", "datasets"):
        monkeypatch.setitem(sys.modules, name, None)
    (tmp_path / "x.parquet").write_bytes(b"PAR1")
    with pytest.raises(ImportError, match="optional package pyarrow: pip install pyarrow"):
        data.load_samples(tmp_path / "x.parquet")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "dataset_dict.json").write_text('{"splits": ["train"]}')
    with pytest.raises(ImportError, match="optional package datasets: pip install datasets"):
        data.load_samples(tmp_path / "hf", "train")


# ------------------------------------------------------------------------------------------ released layouts
# (parquet and HuggingFace folders: real only when the optional packages are installed, as in CI)

# two cities with different line names: inline metro dicts in one parquet column become one struct
# type holding every city's lines, the other city's lines read back as None
RM_METROS = {
    "alpha": {"Line 1": ["A Station", "B Station (Transfer Station)", "C Station"],
              "Line 2": ["B Station（换乘站）", "D Station", "E Station"]},
    "beta": {"Red Line": ["P Station", "Q Station (Branch-starting Station)", "R Station"],
             "Blue Line": ["Q Station", "S Station"]},
}
C1Q = ('Please solve the multiple choice problem and put your answer (one of ABCD) in one "\\boxed{}". According '
       "to the subway map, how many intermediate stops are there between A Station and C Station (except for this "
       "two stops)? \nA) 0 \nB) 2 \nC) 1 \nD) 3 \n")


def _png(colour, size):
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def _plan(*segments):
    return [{"route_name": line, "departure_stop": dep, "arrival_stop": arr, "via_stops": []}
            for line, dep, arr in segments]


def released_rows(figure, metro):
    """Rows as the released parquet holds them: one column type per field (answers as integers,
    planning rows with no answer), `figure(city)` and `metro(city)` giving those two fields."""
    common = dict(country="testland", difficulty_city="middle", city_line_count=2, city_transfer_count=1,
                  question_short=None, question_long=None, routes=None, question_transfer_count=None)

    def row(city, qtype, question, answer, s1=None, s2=None, **kw):
        return {**common, "city": city, "type": qtype, "question": question, "answer": answer, "station_1": s1,
                "station_2": s2, "figure": figure(city), "json": metro(city), **kw}

    return [
        row("alpha", "TorF1", "... is it true that A Station is the same line as C Station?", 1, "A Station",
            "C Station (Transfer Station)"),
        row("alpha", "TorF2", "... is it true that A Station is on the line Line 2?", 0, "A Station"),
        row("alpha", "Counting1", C1Q, 2, "A Station", "C Station"),
        row("beta", "Counting2", "... how many lines pass through Q Station?", 2, "Q Station"),
        row("beta", "Counting3", "... how many subway (metro) lines are there in total?", 2),
        # planning: no `question`; two reference plans here, one in the next row (a struct column's
        # missing plan reads back as None)
        row("alpha", "planning", None, None, "A Station", "E Station", question_short="short A-E",
            question_long="long A-E", question_transfer_count=1,
            routes={"plan_1": _plan(("Line 1", "A Station", "B Station (Transfer Station)"),
                                    ("Line 2", "B Station", "E Station")),
                    "plan_2": _plan(("Line 1", "A Station", "B Station"), ("Line 2", "B Station", "E Station"))}),
        row("beta", "planning", None, None, "P Station", "S Station", question_short="short P-S",
            question_long="long P-S", question_transfer_count=1,
            routes={"plan_1": _plan(("Red Line", "P Station", "Q Station"), ("Blue Line", "Q Station", "S Station"))}),
    ]


def check_released(samples, sizes):
    """What `released_rows` must load as; `sizes[city]` is the size of that city's figure."""
    assert [s.qtype for s in samples] == ["torf1", "torf2", "counting1", "counting2", "counting3", "planning",
                                          "planning"]
    assert [s.answer for s in samples[:5]] == ["yes", "no", "C", "2", "2"]
    assert samples[2].choices == [0, 2, 1, 3] and samples[1].line == "Line 2"
    assert samples[0].station_2 == "C Station" and samples[0].map_difficulty == "middle"
    for s in samples:
        assert s.metro == clean_metro(RM_METROS[s.city]), s.city  # only this city's lines, suffix-free
        assert not any("(" in x or "（" in x for st in s.metro.values() for x in st)
        with Image.open(s.image) as im:
            assert im.size == sizes[s.city]
        assert s.country == "testland" and s.extra["city_line_count"] == 2  # unknown fields kept in extra
    a, b = samples[5], samples[6]
    assert a.question == "short A-E" and a.question_long == "long A-E" and a.transfer_count == 1
    assert a.question_difficulty == "medium"
    assert a.route == [("Line 1", "A Station", "B Station"), ("Line 2", "B Station", "E Station")]
    assert a.routes == [a.route, a.route] and a.answer == route_text(a.route)
    assert b.routes == [[("Red Line", "P Station", "Q Station"), ("Blue Line", "Q Station", "S Station")]]
    assert b.route == b.routes[0] and b.answer == route_text(b.route)


SIZES = {"alpha": (5, 3), "beta": (3, 7)}
PNGS = {city: _png((200, 30, 30) if city == "alpha" else (30, 30, 200), size) for city, size in SIZES.items()}


@pytest.mark.parametrize("figure_kind", ["base64", "data-uri", "image-struct", "path"])
@pytest.mark.parametrize("metro_kind", ["dict", "json-text"])
def test_released_parquet_file(tmp_path, figure_kind, metro_kind):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    (tmp_path / "maps").mkdir()
    for city, raw in PNGS.items():
        (tmp_path / "maps" / f"{city}.png").write_bytes(raw)
    b64 = {city: base64.b64encode(raw).decode() for city, raw in PNGS.items()}
    figure = {"base64": b64.get, "data-uri": lambda c: "data:image/png;base64," + b64[c],
              "image-struct": lambda c: {"bytes": PNGS[c], "path": None},  # a HuggingFace Image column
              "path": lambda c: f"./maps/{c}.png"}[figure_kind]
    metro = {"dict": RM_METROS.get, "json-text": lambda c: json.dumps(RM_METROS[c], ensure_ascii=False)}[metro_kind]
    table = pa.Table.from_pylist(released_rows(figure, metro))
    if metro_kind == "dict":  # the struct padding the loader has to drop
        assert table.to_pylist()[0]["json"]["Red Line"] is None
    pq.write_table(table, tmp_path / "reasonmap.parquet")
    samples = data.load_samples(tmp_path / "reasonmap.parquet")
    check_released(samples, SIZES)
    if figure_kind == "path":
        assert samples[0].image == str((tmp_path / "maps" / "alpha.png").resolve())
    else:  # decoded once per distinct image into .figure_cache next to the data
        assert {Path(s.image).parent for s in samples} == {tmp_path / ".figure_cache"}
        assert len({s.image for s in samples}) == 2
    assert [s.id for s in samples[:2]] == ["reasonmap-1", "reasonmap-2"]


def test_released_parquet_folder_layout(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rows = released_rows(lambda c: base64.b64encode(PNGS[c]).decode(), RM_METROS.get)
    (tmp_path / "data").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "data" / "test-00000-of-00001.parquet")
    # train in two shards, read in name order
    pq.write_table(pa.Table.from_pylist(rows[:3]), tmp_path / "data" / "train-00001-of-00002.parquet")
    pq.write_table(pa.Table.from_pylist(rows[3:]), tmp_path / "data" / "train-00000-of-00002.parquet")
    test = data.load_samples(tmp_path, "test")
    check_released(test, SIZES)
    assert {s.split for s in test} == {"test"}
    train = data.load_samples(tmp_path, "train")
    assert [s.qtype for s in train] == ["counting2", "counting3", "planning", "planning", "torf1", "torf2",
                                        "counting1"]
    both = data.load_samples(tmp_path)
    assert [s.split for s in both] == ["train"] * 7 + ["test"] * 7
    assert len({s.id for s in both}) == 14
    with pytest.raises(FileNotFoundError, match="validation"):
        data.load_samples(tmp_path, "validation")


def test_huggingface_save_to_disk_folder(tmp_path):
    datasets = pytest.importorskip("datasets")
    pytest.importorskip("pyarrow")

    def split(rows, metro_as_text):
        rows = [{**r, "figure": Image.open(io.BytesIO(r["figure"]))} for r in rows]  # PIL images, as HF holds
        if metro_as_text:
            rows = [{**r, "json": json.dumps(r["json"])} for r in rows]
        ds = datasets.Dataset.from_list(rows)
        return ds.cast_column("figure", datasets.Image())

    rows = released_rows(PNGS.get, RM_METROS.get)
    # train keeps the metro inline (a struct column), test as JSON text: the splits' features differ
    dd = datasets.DatasetDict({"train": split(rows[:4], False), "test": split(rows, True)})
    assert isinstance(dd["test"].features["figure"], datasets.Image)
    dd.save_to_disk(str(tmp_path / "hf"))
    test = data.load_samples(tmp_path / "hf", "test")
    check_released(test, SIZES)
    assert {s.split for s in test} == {"test"}
    assert all(Path(s.image).parent == tmp_path / "hf" / ".figure_cache" for s in test)
    train = data.load_samples(tmp_path / "hf", "train")
    assert [s.answer for s in train] == ["yes", "no", "C", "2"] and {s.split for s in train} == {"train"}
    both = data.load_samples(tmp_path / "hf")
    assert [s.split for s in both] == ["train"] * 4 + ["test"] * 7
    assert [s.answer for s in both] == [s.answer for s in train + test]
    assert len({s.id for s in both}) == 11  # ids unique across splits
    with pytest.raises(ValueError, match="no split 'validation'"):
        data.load_samples(tmp_path / "hf", "validation")
    # a single Dataset saved on its own (no DatasetDict): every row, split from the argument
    split(rows[:2], False).save_to_disk(str(tmp_path / "hf1"))
    assert [s.answer for s in data.load_samples(tmp_path / "hf1")] == ["yes", "no"]
    assert [(s.id, s.split) for s in data.load_samples(tmp_path / "hf1", "train")] == [("hf1-1", "train"),
                                                                                      ("hf1-2", "train")]
    # a bad row names the split folder, the row and the field
    dd["test"].map(lambda r, i: {"answer": 7 if i == 2 else r["answer"]}, with_indices=True).save_to_disk(
        str(tmp_path / "bad" / "test"))
    (tmp_path / "bad" / "dataset_dict.json").write_text('{"splits": ["test"]}')
    with pytest.raises(ValueError, match=r"bad/test: row 3: field 'answer'"):
        data.load_samples(tmp_path / "bad")


# ------------------------------------------------------------------------------------------ real metro data


def test_real_metro_files_load_and_routes_agree():
    files = sorted(REAL.glob("*/*.json"))
    assert sorted(str(f.relative_to(REAL)) for f in files) == sorted(REAL_CITIES)
    rng = random.Random(0)
    for f in files:
        metro = load_metro(f)
        stations = sorted({s for st in metro.values() for s in st})
        assert not any("Transfer Station" in s or "换乘站" in s or "支线起始站" in s for s in stations), f
        for _ in range(50):  # 4 cities: 200 random pairs
            a, b = rng.sample(stations, 2)
            route = best_route(metro, a, b)
            t = min_transfers(metro, a, b)
            if t is None:
                assert route is None, (f.name, a, b)
            else:
                assert route is not None and len(route) - 1 == t, (f.name, a, b, route, t)
                check_route(metro, route, a, b)


def test_questions_on_real_metro_data():
    """The question generators work on real names (Chinese, suffixes stripped, a loop line, gaps)."""
    for city in ("china/shanghai.json", "singapore/singapore.json", "america/new_york.json"):
        metro = load_metro(REAL / city)
        samples = synthetic.make_questions(metro, random.Random(1), 6, city=city)
        assert {s.qtype for s in samples} == set(QTYPES)
        for s in samples:
            if s.qtype == "planning":
                assert s.transfer_count == min_transfers(metro, s.station_1, s.station_2)
            if s.qtype == "counting1":
                line = next(li for li in metro if s.station_1 in metro[li] and s.station_2 in metro[li])
                if len(set(metro[line])) == len(metro[line]) - (metro[line][0] == metro[line][-1]):
                    assert s.choices[LETTERS.index(s.answer)] == stops_between(metro[line], s.station_1, s.station_2)



# ------------------------------------------------------------------------------------------ released-layout fixtures
# tests/data/released: hand-made imitations of ReasonMap (validation, rows without `type`), ReasonMap-Plus
# (train / test) and ReasonMap-Train (train: Plus repeats + planning); see its README.md

RELEASED = Path(__file__).resolve().parent / "data" / "released"
ALL_CITIES = ("los_angeles", "miami", "new_york", "washington", "sydney", "toronto", "beijing", "changsha",
              "changzhou", "dalian", "guiyang", "hangzhou", "hefei", "huhehaote", "jinan", "kunming", "nanchang",
              "nanning", "shanghai", "shenzhen", "xian", "budapest", "rome", "kl", "auckland", "oslo", "lisboa",
              "singapore", "geneva", "dubai")  # the 30 cities of ReasonMap's stations/ folder
OFFICIAL = {"los_angeles", "miami", "toronto", "singapore", "auckland", "rome", "lisboa", "beijing", "hangzhou",
            "budapest", "geneva"}  # ReasonMap cal_metrics.py city_list


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture
def released(tmp_path):
    """A private copy of tests/data/released (decoded base64 figures are cached next to the data)."""
    shutil.copytree(RELEASED, tmp_path / "released")
    return tmp_path / "released"


def test_released_fixture_files_are_small_and_metro_files_are_the_shipped_ones():
    files = [f for f in RELEASED.rglob("*") if f.is_file()]
    assert sum(f.stat().st_size for f in files) < 100_000
    for png in RELEASED.glob("maps/*/*.png"):
        assert png.stat().st_size < 1000 and Image.open(png).format == "PNG"
    for f in RELEASED.glob("stations/*/*.json"):
        assert f.read_bytes() == (REAL / f.relative_to(RELEASED / "stations")).read_bytes()


def test_reasonmap_validation_rows_without_type_load_as_planning(released):
    folder = released / "ReasonMap"
    rows = read_jsonl(folder / "validation.jsonl")
    assert all("type" not in r for r in rows)
    assert data.dataset_splits(folder) == ["validation"]
    samples = data.load_samples(folder, "validation")
    assert [s.qtype for s in samples] == ["planning"] * 5
    assert [s.city for s in samples] == ["beijing", "beijing", "singapore", "singapore", "shanghai"]
    assert [s.id for s in samples] == [f"validation-{n}" for n in range(1, 6)] and {s.split for s in samples} == {"validation"}
    for s, r in zip(samples, rows):
        assert s.question == r["question_short"] and s.question_long == r["question_long"]
        assert (s.station_1, s.station_2) == (r["station_1"], r["station_2"])
        assert s.metro == clean_metro(r["json"])  # the inline metro dict
        assert s.transfer_count == r["question_transfer_count"] == min_transfers(s.metro, s.station_1, s.station_2)
        assert s.question_difficulty == {"easy": "easy", "middle": "medium"}[r["difficulty_question"]]
        check_route(s.metro, s.route, s.station_1, s.station_2)
        assert s.answer == route_text(s.route)
        # reference plans kept exactly as the row gives them (route_name, stops without 站 / Station, via stops)
        assert s.reference_plans == list(r["routes"].values())
        assert len(s.routes) == len(r["routes"])
        assert s.extra["city_line_count"] == r["city_line_count"] and s.map_difficulty == r["difficulty_city"]
        with Image.open(s.image) as im:  # base64 figure decoded next to the data
            assert im.size == Image.open(released / "maps" / r["country"] / f"{s.city}.png").size
    b = samples[0]
    assert b.reference_plans[0][1] == {"route_name": "地铁13号线(西直门--东直门)", "departure_stop": "西直门",
                                       "arrival_stop": "五道口", "via_stops": ["大钟寺", "知春路"], "num_via_stops": 2}
    assert b.routes[0] == [("地铁2号线(外环)", "积水潭", "西直门"), ("地铁13号线(西直门--东直门)", "西直门", "五道口")]
    assert b.route == [("Line 2", "积水潭站", "西直门站"), ("Line 13", "西直门站", "五道口站")]
    assert samples[3].reference_plans[0][0]["route_name"] == "North East Line"
    assert samples[3].reference_plans[0][0]["departure_stop"] == "Chinatown"
    assert samples[3].route == [("North East Line", "Chinatown Station", "Serangoon Station"),
                                ("Circle Line", "Serangoon Station", "Bishan Station")]
    # split None reads the validation split too; a missing split names it
    assert [s.id for s in data.load_samples(folder)] == [s.id for s in samples]
    with pytest.raises(FileNotFoundError, match="no test data"):
        data.load_samples(folder, "test")


@pytest.mark.parametrize("row,error", [
    ({"question_short": "short", "station_1": "A Station", "station_2": "C Station"}, None),
    ({"question_long": "long", "station_1": "A Station", "station_2": "C Station"}, None),
    ({"routes": {"plan_1": [{"route_name": "Line 1", "departure_stop": "A", "arrival_stop": "C"}]},
      "question": "q", "station_1": "A Station", "station_2": "C Station"}, None),
    ({"station_1": "A Station", "station_2": "C Station"}, "question"),  # planning, but no prompt text at all
    ({"question": "q", "station_1": "A Station", "station_2": "C Station"}, "type"),  # a Plus row missing its type
    ({"question": "q", "answer": 1}, "type"),
    ({"question_short": None, "routes": None, "question": "q", "station_1": "A Station"}, "type"),
])
def test_rows_without_type(tmp_path, row, error):
    metro = {"Line 1": ["A Station", "B Station", "C Station"]}
    good = {"type": "TorF1", "question": "q", "answer": 1, "json": metro, "difficulty_city": "easy"}
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps({"json": metro, "difficulty_city": "easy", **row}) + "\n")
    if error is not None:
        with pytest.raises(ValueError) as e:
            data.load_samples(path)
        msg = str(e.value)
        assert str(path) in msg and "row 2" in msg and f"field '{error}'" in msg, msg
        return
    s = data.load_samples(path)[1]
    assert s.qtype == "planning" and s.route == [("Line 1", "A Station", "C Station")] and s.transfer_count == 0
    assert s.question == next(row[k] for k in ("question", "question_short", "question_long") if k in row)
    assert s.answer == route_text(s.route) and s.question_difficulty == "easy"


def test_validation_split_everywhere(released, tmp_path):
    rows = read_jsonl(released / "ReasonMap" / "validation.jsonl")
    # a plain folder: validation.jsonl, and data/validation-*.parquet shards
    assert len(data.load_samples(released / "ReasonMap", "validation")) == 5
    # a single file whose rows carry a split field
    mixed = [{**r, "split": sp} for r, sp in zip(rows, ["validation", "train", "validation", "test", "validation"])]
    (tmp_path / "mixed.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in mixed) + "\n")
    shutil.copytree(released / "maps", tmp_path / "maps")
    got = data.load_samples(tmp_path / "mixed.jsonl", "validation")
    assert [s.station_1 for s in got] == [rows[k]["station_1"] for k in (0, 2, 4)]
    # export: validation samples get their own file and read back as validation
    out = tmp_path / "export"
    counts = data.export_dataset(data.load_samples(released / "ReasonMap", "validation"), out)
    assert counts == {"train": 0, "test": 0, "validation": 5} and data.dataset_splits(out) == list(data.SPLITS)
    back = data.load_samples(out, "validation")
    assert [s.route for s in back] == [s.route for s in data.load_samples(released / "ReasonMap", "validation")]
    assert [s.reference_plans for s in back] == [list(r["routes"].values()) for r in rows]
    assert {s.split for s in back} == {"validation"}


def test_validation_split_of_a_huggingface_folder(released):
    datasets = pytest.importorskip("datasets")
    pytest.importorskip("pyarrow")
    rows = read_jsonl(released / "ReasonMap" / "validation.jsonl")
    # as published: one `validation` split, figures base64 text, metro dicts a struct column
    datasets.DatasetDict({"validation": datasets.Dataset.from_list(rows)}).save_to_disk(str(released / "ReasonMap-hf"))
    assert data.dataset_splits(released / "ReasonMap-hf") == ["validation"]
    hf = data.load_samples(released / "ReasonMap-hf", "validation")
    plain = data.load_samples(released / "ReasonMap", "validation")
    assert [(s.qtype, s.metro, s.route, s.transfer_count) for s in hf] == [(s.qtype, s.metro, s.route, s.transfer_count)
                                                                          for s in plain]
    assert [s.reference_plans for s in hf] == [s.reference_plans for s in plain]  # plan_2 padding dropped
    assert [s.id for s in hf] == [f"validation-{n}" for n in range(1, 6)]
    assert len(data.load_samples(released / "ReasonMap-hf")) == 5
    train, test = data.load_data(str(released / "ReasonMap-hf"))
    assert train == [] and {s.city for s in test} == {"beijing", "singapore"}
    # ReasonMap-Train as download_dataset.py saves it: a DatasetDict with only `train` (no test to fall back on)
    rows = read_jsonl(released / "data" / "ReasonMap-Train" / "train.jsonl")
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(
        str(released / "data" / "ReasonMap-Train-hf"))
    train, test = data.load_data(str(released / "data" / "ReasonMap-Train-hf"))
    assert len(train) == 6 and test == []


def test_official_test_cities():
    assert data.TEST_CITIES == ("los_angeles", "miami", "toronto", "singapore", "auckland", "rome", "lisboa",
                                "beijing", "hangzhou", "budapest", "geneva")
    assert set(data.TEST_CITIES) == OFFICIAL and set(data.TEST_CITIES) <= set(ALL_CITIES)
    samples = [Sample(id=f"{c}-{k}", qtype="torf1", question="q", answer="yes", image=None, metro={}, city=c)
               for c in ALL_CITIES for k in range(2)]
    kept = data.official_test_subset(samples)
    assert {s.city for s in kept} == OFFICIAL and len(kept) == 22
    assert [s.id for s in kept] == [s.id for s in samples if s.city in OFFICIAL]  # order kept
    assert data.official_test_subset(samples, ("shanghai",)) == [s for s in samples if s.city == "shanghai"]


def test_load_samples_city_filter(released, tmp_path):
    folder = released / "ReasonMap"
    kept = data.load_samples(folder, "validation", cities=data.TEST_CITIES)
    assert [s.city for s in kept] == ["beijing", "beijing", "singapore", "singapore"]
    assert [s.id for s in kept] == ["validation-1", "validation-2", "validation-3", "validation-4"]  # row numbers kept
    assert kept == data.official_test_subset(data.load_samples(folder, "validation"))
    assert [s.id for s in data.load_samples(folder, "validation", cities=["shanghai"])] == ["validation-5"]
    # rows of other cities are not read, so their errors do not stop the evaluation subset
    rows = read_jsonl(folder / "validation.jsonl")
    rows[4]["difficulty_city"] = "extreme"
    (tmp_path / "v").mkdir()
    (tmp_path / "v" / "validation.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows))
    assert len(data.load_samples(tmp_path / "v", "validation", cities=data.TEST_CITIES)) == 4
    with pytest.raises(ValueError, match=r"validation.jsonl: row 5: field 'difficulty_city'"):
        data.load_samples(tmp_path / "v", "validation")


def _metro_of(released, country, city):
    return load_metro(released / "stations" / country / f"{city}.json")


def test_reasonmap_plus_fixture(released):
    folder = released / "data" / "ReasonMap-Plus"
    assert data.dataset_splits(folder) == ["train", "test"]
    test, train = data.load_samples(folder, "test"), data.load_samples(folder, "train")
    assert len(test) == 11 and len(train) == 5 and {s.split for s in test} == {"test"}
    assert {s.city for s in test} == {"beijing", "singapore"} <= set(data.TEST_CITIES)
    assert {s.city for s in train} == {"shanghai"} and "shanghai" not in data.TEST_CITIES
    for city in ("beijing", "singapore"):
        assert {s.qtype for s in test if s.city == city} == {"torf1", "torf2", "counting1", "counting2", "counting3"}
    assert {s.qtype for s in train} == {"torf1", "torf2", "counting1", "counting2", "counting3"}
    rows = read_jsonl(folder / "test.jsonl") + read_jsonl(folder / "train.jsonl")
    for s, r in zip(test + train, rows):
        m = _metro_of(released, r["country"], r["city"])
        assert s.metro == m and s.image == str((released / r["figure"]).resolve())
        # released encodings: TorF 1/0, Counting1 0-3, Counting2/3 integers; ground truth recomputed here
        if r["type"] == "TorF1":
            assert r["answer"] == int(any(s.station_1 in st and s.station_2 in st for st in m.values()))
        elif r["type"] == "TorF2":
            assert s.line in m and r["answer"] == int(s.station_1 in m[s.line])
        elif r["type"] == "Counting1":
            line = next(li for li in m if s.station_1 in m[li] and s.station_2 in m[li])
            assert s.choices[r["answer"]] == stops_between(m[line], s.station_1, s.station_2)
            assert s.answer == LETTERS[r["answer"]]
        elif r["type"] == "Counting2":
            assert r["answer"] == len(lines_of(m, s.station_1))
        else:
            assert r["answer"] == len(m) == r["city_line_count"]
        if r["type"].startswith("TorF"):
            assert s.answer == ("yes" if r["answer"] == 1 else "no")
        else:
            assert s.answer == (LETTERS[r["answer"]] if r["type"] == "Counting1" else str(r["answer"]))
    assert {s.answer for s in test if s.qtype == "torf1"} == {"yes", "no"}


def test_reasonmap_train_fixture(released):
    folder = released / "data" / "ReasonMap-Train"
    assert data.dataset_splits(folder) == ["train"]
    train = data.load_samples(folder, "train")
    assert [s.qtype for s in train] == ["torf1", "torf2", "counting1", "counting2", "planning", "planning"]
    plus = data.load_samples(released / "data" / "ReasonMap-Plus", "train")
    assert [data.question_key(s) for s in train[:4]] == [data.question_key(s) for s in plus[:4]]
    rows = read_jsonl(folder / "train.jsonl")
    for s, r in zip(train[4:], rows[4:]):
        assert s.question == r["question"] == r["question_short"] and s.question_long == r["question_long"]
        assert s.reference_plans == list(r["routes"].values())
        assert s.transfer_count == r["question_transfer_count"] == min_transfers(s.metro, s.station_1, s.station_2)
        check_route(s.metro, s.route, s.station_1, s.station_2)
    assert train[5].reference_plans[0][0]["route_name"] == "地铁1号线(莘庄--富锦路)"
    assert train[5].route == [("Line 1", "莘庄站", "汉中路站")]


def test_load_data_drops_questions_repeated_across_folders(released, capsys):
    plus, rm_train = released / "data" / "ReasonMap-Plus", released / "data" / "ReasonMap-Train"
    train, test = data.load_data(f"{plus},{rm_train}")
    out = capsys.readouterr().out
    assert [s.qtype for s in train] == ["torf1", "torf2", "counting1", "counting2", "counting3", "planning", "planning"]
    assert [s.id for s in train[:5]] == [f"train-{n}" for n in range(1, 6)]  # the first folder's copies kept
    assert len(test) == 11 and {s.split for s in test} == {"test"}
    assert len({data.question_key(s) for s in train}) == len(train)
    notes = [line for line in out.splitlines() if "duplicate" in line]
    assert len(notes) == 1 and "dropped 4 duplicate questions" in notes[0] and "train 4, test 0" in notes[0], out
    assert f"{rm_train} has no test or validation split" in out
    # the other order keeps ReasonMap-Train's copies and adds the one Plus question it lacks
    train, _ = data.load_data(f"{rm_train},{plus}")
    assert [s.qtype for s in train] == ["torf1", "torf2", "counting1", "counting2", "planning", "planning", "counting3"]
    assert "dropped 4 duplicate" in capsys.readouterr().out
    # one folder alone: nothing dropped, no note
    train, _ = data.load_data(str(rm_train))
    assert len(train) == 6 and "duplicate" not in capsys.readouterr().out


def test_load_data_keeps_repeats_within_one_folder_and_notes_leaks(tmp_path, capsys):
    row = {"type": "TorF1", "question": "q", "answer": 1, "difficulty_city": "easy", "city": "x",
           "json": {"L": ["A", "B"]}, "station_1": "A", "station_2": "B"}
    other = {**row, "question": "q2"}
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "train.jsonl").write_text(json.dumps(row) + "\n" + json.dumps(row) + "\n")
    (tmp_path / "a" / "test.jsonl").write_text(json.dumps(row) + "\n" + json.dumps(other) + "\n")
    train, test = data.load_data(str(tmp_path / "a"))
    assert len(train) == 2 and len(test) == 2  # the folder as published
    out = capsys.readouterr().out
    assert "duplicate" not in out and "1 of the 2 evaluation questions also appear in the training data" in out


def test_load_data_split_fallback(released, tmp_path, capsys):
    bench = released / "ReasonMap"
    train, test = data.load_data(str(bench))
    out = capsys.readouterr().out
    assert train == [] and [s.city for s in test] == ["beijing", "beijing", "singapore", "singapore"]
    assert {s.split for s in test} == {"validation"}
    assert f"{bench} has no test split: evaluating its validation split, official test cities only" in out
    assert "4 of 5 questions" in out and f"{bench} has no train split" in out
    _, test = data.load_data(str(bench), eval_cities=None)
    assert len(test) == 5 and "validation split (5 questions)" in capsys.readouterr().out
    # a validation split with none of the test cities (not the benchmark): the whole split
    (tmp_path / "v").mkdir()
    rows = [r for r in read_jsonl(bench / "validation.jsonl") if r["city"] == "shanghai"]
    (tmp_path / "v" / "validation.jsonl").write_text(json.dumps(rows[0], ensure_ascii=False) + "\n")
    _, test = data.load_data(str(tmp_path / "v"))
    assert [s.city for s in test] == ["shanghai"] and "validation split (1 questions)" in capsys.readouterr().out
    # test wins over validation when a folder has both
    (tmp_path / "v" / "test.jsonl").write_text(json.dumps({**rows[0], "city": "elsewhere"}, ensure_ascii=False) + "\n")
    (tmp_path / "v" / "train.jsonl").write_text("")
    train, test = data.load_data(str(tmp_path / "v"))
    assert train == [] and [s.city for s in test] == ["elsewhere"] and "note" not in capsys.readouterr().out
    # Plus (test) + the benchmark (validation, 11 cities) + ReasonMap-Train (train only), together
    plus, rm_train = released / "data" / "ReasonMap-Plus", released / "data" / "ReasonMap-Train"
    train, test = data.load_data(f"{plus},{bench},{rm_train}")
    assert len(train) == 7 and len(test) == 11 + 4
    assert collections.Counter(s.split for s in test) == {"test": 11, "validation": 4}
    # nothing there at all
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no train/validation/test data"):
        data.load_data(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="no such dataset file or folder"):
        data.load_data(str(tmp_path / "missing"))
