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
import random
import sys
from pathlib import Path

import pytest
from PIL import Image

import data
import maps
import synthetic
from conftest import REAL_CITIES
from conftest import REAL_METRO as REAL
from metro import LETTERS, MAP_DIFFICULTIES, QTYPES, best_route, clean_metro, load_metro, route_text, strip_suffix, via_stops


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
