"""The released dataset layouts, both ways, and the one loader that train.py and eval.py share.

- `export_dataset` writes samples in the released datasets' field names (docs/rewardmap.md §2.3):
  `train.jsonl` / `test.jsonl`, `maps/`, `metro/`.
- `load_samples` reads our export and the released layouts (JSON / JSONL, parquet, HuggingFace
  `save_to_disk`; figures as paths or base64; metro data as a path or inline); a bad row raises an error
  naming the file, the row and the field.
- `load_data` gives (train, test): the `--data` folders, or the synthetic world generated once into a cache.

    python data.py --out data_out --cities 30 --seed 0    # export the synthetic dataset
    python data.py --preview                              # 3 maps + example questions in preview/
"""
from __future__ import annotations

import argparse
import base64
import binascii
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path

import cli
from metro import (LETTERS, MAP_DIFFICULTIES, QTYPES, QUESTION_DIFFICULTIES, TORF_QTYPES, TYPE_NAMES, Metro, Sample,
                   Segment, best_route, clean_metro, load_metro, question_difficulty, route_plan, route_text,
                   station_lines, strip_suffix)
from synthetic import synthetic_dataset

SYNTHETIC_CITIES = 60  # the default run's synthetic world: one pass over it is ~190 GRPO steps per Plus stage
CACHE_DIR = ".cache"  # where the synthetic dataset and the tiny model are generated once and reused

# ---------------------------------------------------------------------------------------------------
# export in the released datasets' field names (docs/rewardmap.md §2.3)


def _metro_file(metro: Metro) -> dict[str, list[str]]:
    """Metro data as the released files write it: interchanges carry ` (Transfer Station)`."""
    lines_at = station_lines(metro)
    return {line: [s + " (Transfer Station)" if len(lines_at[s]) > 1 else s for s in stations]
            for line, stations in metro.items()}


def sample_to_row(s: Sample, figure: str, metro_json: str) -> dict:
    """One exported row: released field names and answer encodings (TorF 1/0, Counting1 0-3)."""
    row = {"id": s.id, "country": s.country, "city": s.city, "type": TYPE_NAMES[s.qtype],
           "station_1": s.station_1, "station_2": s.station_2, "figure": figure, "json": metro_json,
           "difficulty_city": s.map_difficulty}
    if s.qtype == "planning":
        row["question_short"], row["question_long"] = s.question, s.question_long
        row["answer"] = s.answer
        row["question_transfer_count"] = s.transfer_count
        row["difficulty_question"] = s.question_difficulty
        plans = s.reference_plans or [route_plan(s.metro, r) for r in s.routes or []]
        row["routes"] = {f"plan_{k + 1}": plan for k, plan in enumerate(plans)}
    else:
        row["question"] = s.question
        if s.qtype in TORF_QTYPES:
            row["answer"] = 1 if s.answer == "yes" else 0
        elif s.qtype == "counting1":
            row["answer"] = LETTERS.index(s.answer)
            row["choices"] = s.choices
        else:
            row["answer"] = int(s.answer)
    if s.line is not None:
        row["line"] = s.line
    return {**row, **s.extra}


def export_dataset(samples: list[Sample], out_dir: str | Path) -> dict[str, int]:
    """Write `out_dir/{train,test}.jsonl`, `out_dir/maps/CITY.png`, `out_dir/metro/CITY.json`.

    Rows use the released field names; `figure` and `json` are paths relative to `out_dir`. Samples
    without a split go to train. Returns the number of rows per split.
    """
    out_dir = Path(out_dir)
    (out_dir / "maps").mkdir(parents=True, exist_ok=True)
    (out_dir / "metro").mkdir(parents=True, exist_ok=True)
    rows: dict[str, list[dict]] = {"train": [], "test": []}
    written: dict[str, tuple[str, str]] = {}
    for s in samples:
        if s.city not in written:
            metro_rel = f"metro/{s.city}.json"
            with open(out_dir / metro_rel, "w", encoding="utf-8") as f:
                json.dump(_metro_file(s.metro), f, ensure_ascii=False, indent=1)
            fig_rel = ""
            if s.image:
                fig_rel = f"maps/{s.city}{Path(s.image).suffix or '.png'}"
                if Path(s.image).resolve() != (out_dir / fig_rel).resolve():
                    shutil.copyfile(s.image, out_dir / fig_rel)
            written[s.city] = (fig_rel, metro_rel)
        fig_rel, metro_rel = written[s.city]
        rows["test" if s.split == "test" else "train"].append(sample_to_row(s, fig_rel or None, metro_rel))
    for split, split_rows in rows.items():
        with open(out_dir / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for row in split_rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return {split: len(r) for split, r in rows.items()}


# ---------------------------------------------------------------------------------------------------
# loaders for our export and the released layouts (docs/rewardmap.md §2.3)

_TYPE_ALIASES = {**{q: q for q in QTYPES}, "routeplanning": "planning"}  # after dropping spaces, _ and -, lowercased
_YES = {"1", "yes", "true", "y", "t"}
_NO = {"0", "no", "false", "n", "f"}
_IMAGE_MAGIC = {b"\x89PNG": ".png", b"\xff\xd8\xff": ".jpg", b"GIF8": ".gif", b"RIFF": ".webp", b"BM": ".bmp"}
# fields a loader maps onto Sample; every other field of a row is kept in `Sample.extra`
_KNOWN = {"id", "type", "qtype", "question", "question_short", "question_long", "answer", "station_1", "station_2",
          "line", "choices", "figure", "image", "image_path", "json", "metro", "country", "city", "difficulty_city",
          "map_difficulty", "difficulty_question", "question_difficulty", "question_transfer_count",
          "transfer_count", "routes", "split"}


class _RowError(ValueError):
    def __init__(self, field_name: str, message: str):
        super().__init__(message)
        self.field_name = field_name


def normalise_qtype(value) -> str:
    """`TorF1` / `torf 1` / `Counting3` / `planning` ... -> one of QTYPES."""
    key = re.sub(r"[\s_\-]+", "", str(value)).lower()
    if key not in _TYPE_ALIASES:
        raise _RowError("type", f"unknown question type {value!r} (expected one of {list(TYPE_NAMES.values())})")
    return _TYPE_ALIASES[key]


def normalise_answer(qtype: str, value) -> str:
    """Answers as our rewards compare them: yes/no (torf), A-D (counting1, 0-3 in the released data), integers."""
    if qtype in TORF_QTYPES:
        text = str(value).strip().lower()
        if isinstance(value, float) and value in (0.0, 1.0):
            text = str(int(value))
        if text in _YES:
            return "yes"
        if text in _NO:
            return "no"
        raise _RowError("answer", f"expected yes/no (or 1/0, True/False), got {value!r}")
    if qtype == "counting1":
        text = str(value).strip()
        if isinstance(value, float) and value.is_integer():
            text = str(int(value))
        if text in ("0", "1", "2", "3"):
            return LETTERS[int(text)]
        if text.upper() in tuple(LETTERS):
            return text.upper()
        raise _RowError("answer", f"expected a choice A-D (or 0-3), got {value!r}")
    if qtype in ("counting2", "counting3"):
        if isinstance(value, bool):
            raise _RowError("answer", f"expected an integer, got {value!r}")
        text = str(value).strip()
        if isinstance(value, float) and value.is_integer():
            text = str(int(value))
        if not re.fullmatch(r"\d+", text):
            raise _RowError("answer", f"expected a non-negative integer, got {value!r}")
        return str(int(text))
    if not isinstance(value, str):
        raise _RowError("answer", f"expected the route as text, got {type(value).__name__}")
    return value.strip()


def _resolve(rel: str, roots: list[Path]) -> Path | None:
    p = Path(rel[len("file://"):] if rel.startswith("file://") else rel)
    if p.is_absolute():
        return p if p.exists() else None
    for root in roots:
        if (root / p).exists():
            return (root / p).resolve()
    return None


def _cache_image(raw: bytes, cache_dir: Path) -> str:
    """Write decoded image bytes to `cache_dir/<sha1>.<ext>` (once) and return the path."""
    ext = next((e for magic, e in _IMAGE_MAGIC.items() if raw.startswith(magic)), None)
    if ext is None:
        raise _RowError("figure", "decoded data is not a PNG/JPEG/GIF/WebP/BMP image")
    path = cache_dir / (hashlib.sha1(raw).hexdigest()[:20] + ext)
    if not path.exists():
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(raw)
        tmp.replace(path)
    return str(path)


def _figure(value, roots: list[Path], cache_dir: Path) -> str | None:
    """A figure as a file path: relative paths resolved against the dataset, base64 / bytes cached."""
    if value is None or value == "":
        return None
    if isinstance(value, dict):  # a HuggingFace Image feature stored without decoding
        if value.get("bytes"):
            return _figure(value["bytes"], roots, cache_dir)
        return _figure(value.get("path"), roots, cache_dir)
    if isinstance(value, (bytes, bytearray)):
        return _cache_image(bytes(value), cache_dir)
    if hasattr(value, "save"):  # a PIL image (decoded HuggingFace Image feature)
        import io

        buf = io.BytesIO()
        value.save(buf, format="PNG")
        return _cache_image(buf.getvalue(), cache_dir)
    if not isinstance(value, str):
        raise _RowError("figure", f"expected a path, base64 text or image bytes, got {type(value).__name__}")
    text = value.strip()
    if text.startswith("data:image"):
        text = text.split(",", 1)[-1]
    elif len(text) < 1024:  # short text is a path
        found = _resolve(text, roots)
        if found is not None:
            return str(found)
        if re.search(r"[/\\.]", text):
            raise _RowError("figure", f"image file {text!r} not found (looked in {', '.join(map(str, roots))})")
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise _RowError("figure", "neither an existing image path nor valid base64") from None
    return _cache_image(raw, cache_dir)


def _metro(value, roots: list[Path], cache: dict) -> Metro | None:
    """The `json` field: a path to a metro file (relative to the dataset), JSON text, or the dict itself."""
    if value is None or value == "":
        return None
    try:
        if isinstance(value, dict):
            # a parquet / HuggingFace struct column holds every row's line names, the other cities'
            # lines read back as None: drop them
            return clean_metro({line: st for line, st in value.items() if st is not None})
        if isinstance(value, str) and value.lstrip().startswith("{"):
            return clean_metro(json.loads(value))
    except (ValueError, json.JSONDecodeError) as e:
        raise _RowError("json", str(e)) from None
    if not isinstance(value, str):
        raise _RowError("json", f"expected a path or a dict of line -> stations, got {type(value).__name__}")
    path = _resolve(value.strip(), roots)
    if path is None:
        raise _RowError("json", f"metro file {value!r} not found (looked in {', '.join(map(str, roots))})")
    if path not in cache:
        try:
            cache[path] = load_metro(path)
        except (ValueError, OSError) as e:
            raise _RowError("json", str(e)) from None
    return cache[path]


def _routes(value) -> tuple[list[list[Segment]], list[list[dict]]] | tuple[None, None]:
    """Released `routes` ({plan: [{route_name, departure_stop, arrival_stop, ...}]}) or lists of 3-tuples ->
    (plans as (line, departure, arrival) segments with suffixes stripped, the plans as given: one dict per
    segment, kept unmodified for the official map score)."""
    if value is None or value == "":
        return None, None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise _RowError("routes", "not valid JSON") from None
    plans = list(value.values()) if isinstance(value, dict) else value
    if not isinstance(plans, list):
        raise _RowError("routes", f"expected a dict or list of route plans, got {type(value).__name__}")
    plans = [plan for plan in plans if plan is not None]  # struct column padding (`plan_2` of a 1-plan row)
    out, raw = [], []
    for plan in plans:
        if not isinstance(plan, list):
            raise _RowError("routes", f"a route plan must be a list of segments, got {type(plan).__name__}")
        segs, given = [], []
        for seg in plan:
            if isinstance(seg, dict):
                keys = [("route_name", "Route Name", "line"), ("departure_stop", "Departure Stop", "departure"),
                        ("arrival_stop", "Arrival Stop", "arrival")]
                got = [next((seg[k] for k in ks if k in seg), None) for ks in keys]
            elif isinstance(seg, (list, tuple)) and len(seg) == 3:
                got = list(seg)
            else:
                got = [None]
            if any(not isinstance(g, str) for g in got):
                raise _RowError("routes", f"bad segment {seg!r}: needs route name, departure and arrival stops")
            segs.append((got[0].strip(), strip_suffix(got[1]), strip_suffix(got[2])))
            given.append(dict(seg) if isinstance(seg, dict) else
                         {"route_name": got[0], "departure_stop": got[1], "arrival_stop": got[2]})
        out.append(segs)
        raw.append(given)
    return out, raw


def _first(row: dict, *names):
    return next((row[n] for n in names if n in row and row[n] is not None), None)


def row_to_sample(row: dict, roots: list[Path], cache_dir: Path, metro_cache: dict, default_id: str,
                  split: str = "") -> Sample:
    """One released-layout row -> Sample (raises _RowError naming the bad field)."""
    if not isinstance(row, dict):
        raise _RowError("<row>", f"expected a JSON object, got {type(row).__name__}")
    if _first(row, "type", "qtype") is None:
        raise _RowError("type", "missing")
    qtype = normalise_qtype(_first(row, "type", "qtype"))
    metro = _metro(_first(row, "json", "metro"), roots, metro_cache)
    s1, s2 = (_first(row, f) for f in ("station_1", "station_2"))
    s1 = strip_suffix(str(s1)) if s1 is not None else None
    s2 = strip_suffix(str(s2)) if s2 is not None else None
    question = _first(row, "question", "question_short")
    if not isinstance(question, str) or not question.strip():
        raise _RowError("question", "missing or empty")
    map_difficulty = _first(row, "difficulty_city", "map_difficulty")
    if map_difficulty is None:  # it sets the reward's and the metrics' weights: never guessed
        raise _RowError("difficulty_city", "missing")
    map_difficulty = str(map_difficulty).strip().lower()
    map_difficulty = {"medium": "middle"}.get(map_difficulty, map_difficulty)
    if map_difficulty not in MAP_DIFFICULTIES:
        raise _RowError("difficulty_city", f"expected one of {MAP_DIFFICULTIES}, got {map_difficulty!r}")
    fields = dict(id=str(_first(row, "id") or default_id), qtype=qtype, question=question, metro=metro or {},
                  image=_figure(_first(row, "figure", "image", "image_path"), roots, cache_dir),
                  city=str(row.get("city") or ""), country=str(row.get("country") or ""),
                  map_difficulty=map_difficulty, station_1=s1, station_2=s2, split=split or str(row.get("split") or ""),
                  extra={k: v for k, v in row.items() if k not in _KNOWN})
    if qtype == "torf2":
        line = _first(row, "line")
        if line is None:  # the released rows carry the line only in the question text
            m = re.search(r"is on the line (.+?)\?\s*$", question)
            line = m.group(1) if m else None
        fields["line"] = str(line).strip() if line is not None else None
    if qtype == "counting1":
        choices = _first(row, "choices")
        if choices is None:  # parse "A) 3 \nB) 5 ..." from the question
            found = dict(re.findall(r"\b([ABCD])\)\s*(\d+)", question))
            choices = [found.get(letter) for letter in LETTERS]
        try:
            fields["choices"] = [int(c) for c in choices]
        except (TypeError, ValueError):
            raise _RowError("choices", f"expected four integers (or A) .. D) options in the question), got {choices!r}") from None
        if len(fields["choices"]) != 4:
            raise _RowError("choices", f"expected four choices, got {len(fields['choices'])}")
    if qtype == "planning":
        if metro is None:
            raise _RowError("json", "planning needs the metro data")
        if s1 is None or s2 is None:
            raise _RowError("station_1" if s1 is None else "station_2", "missing")
        routes, plans = _routes(_first(row, "routes"))
        route = best_route(metro, s1, s2)
        if route is None and not routes:
            raise _RowError("station_2", f"no route from {s1!r} to {s2!r} in the metro data")
        route = route if route is not None else routes[0]
        tc = _first(row, "question_transfer_count", "transfer_count")
        try:
            tc = int(tc) if tc is not None else len(route) - 1
        except (TypeError, ValueError):
            raise _RowError("question_transfer_count", f"expected an integer, got {tc!r}") from None
        if tc < 0:
            raise _RowError("question_transfer_count", f"expected a count >= 0, got {tc}")
        qd = str(_first(row, "difficulty_question", "question_difficulty") or question_difficulty(tc)).lower()
        qd = {"middle": "medium"}.get(qd, qd)
        if qd not in QUESTION_DIFFICULTIES:
            raise _RowError("difficulty_question", f"expected one of {QUESTION_DIFFICULTIES}, got {qd!r}")
        answer = _first(row, "answer")
        fields.update(route=route, routes=routes or [route], reference_plans=plans or [route_plan(metro, route)],
                      transfer_count=tc, question_difficulty=qd,
                      question_long=_first(row, "question_long"),
                      answer=normalise_answer(qtype, answer) if answer not in (None, "") else route_text(route))
    else:
        if _first(row, "answer") is None:
            raise _RowError("answer", "missing")
        fields["answer"] = normalise_answer(qtype, row["answer"])
    return Sample(**fields)


def _read_rows(path: Path, split: str | None) -> list[tuple[int, dict]]:
    """(1-based row number, row) pairs from a JSON / JSONL / parquet file."""
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ImportError(f"reading {path} needs the optional package pyarrow: pip install pyarrow") from None
        return list(enumerate(pq.read_table(path).to_pylist(), 1))
    with open(path, encoding="utf-8") as f:
        if path.suffix == ".jsonl":
            rows = []
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append((n, json.loads(line)))
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path}: row {n}: not valid JSON ({e})") from None
            return rows
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
    if isinstance(data, dict):  # {"train": [...], "test": [...]} or {"data": [...]}
        key = split if split in data else "data" if "data" in data else None
        if key is None:
            raise ValueError(f"{path}: expected a list of rows, or a dict with key {split or 'data'!r}")
        data = data[key]
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a list of rows")
    return list(enumerate(data, 1))


def _hf_rows(path: Path, split: str | None) -> list[tuple[str, list[tuple[int, dict]]]]:
    """(split name, rows) per split of a HuggingFace `save_to_disk` folder ("" for a lone Dataset).

    Splits are read one by one, not concatenated: their features may differ (an inline metro struct
    holds only that split's line names) and each sample keeps the split it came from."""
    try:
        import datasets
    except ImportError:
        raise ImportError(f"reading the HuggingFace dataset folder {path} needs the optional package datasets: "
                          "pip install datasets") from None
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if split is not None and split not in ds:
            raise ValueError(f"{path}: no split {split!r} (has {list(ds)})")
        parts = [(split, ds[split])] if split is not None else list(ds.items())
    else:
        parts = [("", ds)]
    out = []
    for name, part in parts:
        for column, feature in part.features.items():  # keep images as bytes / paths, not decoded PIL objects
            if isinstance(feature, datasets.Image):
                part = part.cast_column(column, datasets.Image(decode=False))
        out.append((name, list(enumerate(part.to_list(), 1))))
    return out


def load_samples(path: str | Path, split: str | None = None) -> list[Sample]:
    """Samples from our export or the released layouts (docs/rewardmap.md §2.3).

    `path` is a folder (with `SPLIT.jsonl` / `SPLIT.json` / `SPLIT.parquet` / `data/SPLIT-*.parquet`,
    or a HuggingFace `save_to_disk` folder) or one JSON / JSONL / parquet file; `split` picks
    train / test (None: every split found; for a single file, rows whose `split` field differs are
    dropped). `figure` may be a path relative to the dataset or base64 (decoded once into
    `.figure_cache/` next to the data, or a temp folder when that is read-only); `json` a metro file
    path or the metro dict. Types and answers are normalised (`TorF1` -> torf1, 1/0/True -> yes/no,
    0-3 -> A-D). A bad row raises ValueError naming the file, the 1-based row and the field.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such dataset file or folder")
    root = path if path.is_dir() else path.parent
    sources: list[tuple[Path, str, list[tuple[int, dict]]]] = []
    if path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists()):
        # each split's rows as from `path/SPLIT` (the folder save_to_disk writes): ids SPLIT-N, errors name it
        sources += [(path / sp if sp else path, sp or split or "", rows) for sp, rows in _hf_rows(path, split)]
    elif path.is_dir():
        for sp in [split] if split else ["train", "validation", "test"]:
            files = [path / f"{sp}{ext}" for ext in (".jsonl", ".json", ".parquet")]
            files = [f for f in files if f.exists()] + sorted((path / "data").glob(f"{sp}-*.parquet"))
            sources += [(f, sp, _read_rows(f, sp)) for f in files]
        if not sources:
            raise FileNotFoundError(f"{path}: no {split or 'train/test'} data (.jsonl, .json, .parquet) in this folder")
    else:
        rows = _read_rows(path, split)
        if split:
            rows = [(n, r) for n, r in rows if not isinstance(r, dict) or r.get("split") in (None, "", split)]
        sources.append((path, split or "", rows))
    roots = [root, root.parent, root.parent.parent]
    # decoded base64 figures go next to the data (created only when needed), else to a temp folder
    cache_dir = root / ".figure_cache" if os.access(root, os.W_OK) else Path(tempfile.gettempdir()) / "rewardmap_figures"
    metro_cache: dict = {}
    samples = []
    for file, sp, rows in sources:
        for n, row in rows:
            try:
                samples.append(row_to_sample(row, roots, cache_dir, metro_cache, f"{file.stem}-{n}", sp))
            except _RowError as e:
                raise ValueError(f"{file}: row {n}: field {e.field_name!r}: {e}") from None
    return samples


def load_data(data: str = "", cities: int = SYNTHETIC_CITIES, seed: int = 0, cache_dir: str | Path = CACHE_DIR
              ) -> tuple[list[Sample], list[Sample]]:
    """(train, test) samples: the comma-separated dataset folders `data`, else the synthetic world.

    The synthetic world (`cities` cities from `seed`) is generated once into `cache_dir` and read back
    through `load_samples`, so it goes through the same loader as a released dataset. A folder without a
    test split (ReasonMap-Train) contributes only training samples, with a note."""
    if data:
        train, test = [], []
        for path in data.split(","):
            train += load_samples(path, "train")
            try:
                test += load_samples(path, "test")
            except FileNotFoundError:  # ReasonMap-Train has no test split; evaluation then uses the others'
                print(f"note: {path} has no test split")
        return train, test
    folder = Path(cache_dir) / f"synthetic-c{cities}-s{seed}"
    if not (folder / "test.jsonl").exists():
        print(f"generating the synthetic dataset ({cities} cities) into {folder} (once; reused afterwards)")
        export_dataset(synthetic_dataset(cities, seed, folder), folder)
    return load_samples(folder, "train"), load_samples(folder, "test")


# ---------------------------------------------------------------------------------------------------
# command line


def summary(samples: list[Sample]) -> str:
    """Counts per split and qtype, as a small table."""
    counts = Counter((s.split or "-", s.qtype) for s in samples)
    splits = sorted({sp for sp, _ in counts})
    lines = ["split  " + " ".join(f"{q:>9}" for q in QTYPES) + "     total"]
    for sp in splits:
        row = [counts[(sp, q)] for q in QTYPES]
        lines.append(f"{sp:6} " + " ".join(f"{c:9d}" for c in row) + f" {sum(row):9d}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """The command line: export the synthetic dataset in the released layout, or preview a few maps."""
    ap = argparse.ArgumentParser(description="Export the synthetic transit-map dataset, or preview a few maps.")
    ap.add_argument("--out", default=None, help="output folder (default: data_out, or preview with --preview)")
    ap.add_argument("--cities", type=int, default=30, help="number of synthetic cities")
    ap.add_argument("--seed", type=int, default=0, help="seed: same seed, same dataset and images")
    ap.add_argument("--questions-per-type", type=int, default=20, help="questions per type per city (counting3: 1)")
    ap.add_argument("--test-fraction", type=float, default=0.37, help="fraction of cities held out for test")
    ap.add_argument("--preview", action="store_true", help="write 3 maps (easy/middle/hard) and example questions")
    ap.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    a = ap.parse_args(argv)
    if a.preview:
        out = Path(a.out or "preview")
        samples = synthetic_dataset(3, a.seed, out, questions_per_type=2, test_fraction=a.test_fraction)
        lines = []
        for s in samples:
            lines.append(f"[{s.city} / {s.map_difficulty} / {s.qtype}] {s.image}\n{s.question}\n=> {s.answer}\n")
        (out / "questions.txt").write_text("\n".join(lines), encoding="utf-8")
        print("\n".join(lines[:12]))
        print(f"maps and {len(samples)} example questions written under {out}/ (questions.txt)")
        return
    out = Path(a.out or "data_out")
    t0 = time.time()
    samples = synthetic_dataset(a.cities, a.seed, out, a.questions_per_type, a.test_fraction)
    export_dataset(samples, out)
    print(summary(samples))
    print(f"{a.cities} cities, {len(samples)} questions written to {out}/ in {time.time() - t0:.1f} s")


if __name__ == "__main__":
    cli.run(main)
