"""One row of a released dataset -> `metro.Sample` (docs/rewardmap.md §2.3): field names and their variants,
type spellings, answer encodings, figures (paths or base64), metro data (a path or inline), reference plans.

A bad field raises `RowError` naming the field; data.load_samples adds the file and the row number.
"""
from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import json
import re
from pathlib import Path

from transit.metro import (LETTERS, MAP_DIFFICULTIES, QTYPES, QUESTION_DIFFICULTIES, TORF_QTYPES, TYPE_NAMES, Metro, Sample,
                   Segment, best_route, clean_metro, load_metro, question_difficulty, route_plan, route_text,
                   strip_suffix)


_TYPE_ALIASES = {**{q: q for q in QTYPES}, "routeplanning": "planning"}  # after dropping spaces, _ and -, lowercased
_YES = {"1", "yes", "true", "y", "t"}
_NO = {"0", "no", "false", "n", "f"}
_IMAGE_MAGIC = {b"\x89PNG": ".png", b"\xff\xd8\xff": ".jpg", b"GIF8": ".gif", b"RIFF": ".webp", b"BM": ".bmp"}
# fields a loader maps onto Sample; every other field of a row is kept in `Sample.extra`
_KNOWN = {"id", "type", "qtype", "question", "question_short", "question_long", "answer", "station_1", "station_2",
          "line", "choices", "figure", "image", "image_path", "json", "metro", "country", "city", "difficulty_city",
          "map_difficulty", "difficulty_question", "question_difficulty", "question_transfer_count",
          "transfer_count", "routes", "split"}


class RowError(ValueError):
    def __init__(self, field_name: str, message: str):
        super().__init__(message)
        self.field_name = field_name


def normalise_qtype(value) -> str:
    """`TorF1` / `torf 1` / `Counting3` / `planning` ... -> one of QTYPES."""
    key = re.sub(r"[\s_\-]+", "", str(value)).lower()
    if key not in _TYPE_ALIASES:
        raise RowError("type", f"unknown question type {value!r} (expected one of {list(TYPE_NAMES.values())})")
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
        raise RowError("answer", f"expected yes/no (or 1/0, True/False), got {value!r}")
    if qtype == "counting1":
        text = str(value).strip()
        if isinstance(value, float) and value.is_integer():
            text = str(int(value))
        if text in ("0", "1", "2", "3"):
            return LETTERS[int(text)]
        if text.upper() in tuple(LETTERS):
            return text.upper()
        raise RowError("answer", f"expected a choice A-D (or 0-3), got {value!r}")
    if qtype in ("counting2", "counting3"):
        if isinstance(value, bool):
            raise RowError("answer", f"expected an integer, got {value!r}")
        text = str(value).strip()
        if isinstance(value, float) and value.is_integer():
            text = str(int(value))
        if not re.fullmatch(r"\d+", text):
            raise RowError("answer", f"expected a non-negative integer, got {value!r}")
        return str(int(text))
    if not isinstance(value, str):
        raise RowError("answer", f"expected the route as text, got {type(value).__name__}")
    return value.strip()


def _resolve(rel: str, roots: list[Path]) -> Path | None:
    p = Path(rel[len("file://"):] if rel.startswith("file://") else rel)
    if p.is_absolute():
        return p if p.exists() else None
    for root in roots:
        if (root / p).exists():
            return (root / p).resolve()
    return None


@functools.lru_cache(maxsize=4096)
def _image_file(path: str) -> str:
    """`path`, once Pillow has recognised the file as an image (its header only; each file once)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.format  # noqa: B018 (read from the header)
    except (UnidentifiedImageError, OSError) as e:
        raise RowError("figure", f"{path} is not an image file Pillow can read ({type(e).__name__})") from None
    return path


def _cache_image(raw: bytes, cache_dir: Path) -> str:
    """Write decoded image bytes to `cache_dir/<sha1>.<ext>` (once) and return the path."""
    ext = next((e for magic, e in _IMAGE_MAGIC.items() if raw.startswith(magic)), None)
    if ext is None:
        raise RowError("figure", "decoded data is not a PNG/JPEG/GIF/WebP/BMP image")
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
        raise RowError("figure", f"expected a path, base64 text or image bytes, got {type(value).__name__}")
    text = value.strip()
    if text.startswith("data:image"):
        text = text.split(",", 1)[-1]
    elif len(text) < 1024:  # short text is a path
        found = _resolve(text, roots)
        if found is not None:
            return _image_file(str(found))
        if re.search(r"[/\\.]", text):
            raise RowError("figure", f"image file {text!r} not found (looked in {', '.join(map(str, roots))})")
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise RowError("figure", "neither an existing image path nor valid base64") from None
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
        raise RowError("json", str(e)) from None
    if not isinstance(value, str):
        raise RowError("json", f"expected a path or a dict of line -> stations, got {type(value).__name__}")
    path = _resolve(value.strip(), roots)
    if path is None:
        raise RowError("json", f"metro file {value!r} not found (looked in {', '.join(map(str, roots))})")
    if path not in cache:
        try:
            cache[path] = load_metro(path)
        except (ValueError, OSError) as e:
            raise RowError("json", str(e)) from None
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
            raise RowError("routes", "not valid JSON") from None
    plans = list(value.values()) if isinstance(value, dict) else value
    if not isinstance(plans, list):
        raise RowError("routes", f"expected a dict or list of route plans, got {type(value).__name__}")
    plans = [plan for plan in plans if plan is not None]  # struct column padding (`plan_2` of a 1-plan row)
    out, raw = [], []
    for plan in plans:
        if not isinstance(plan, list):
            raise RowError("routes", f"a route plan must be a list of segments, got {type(plan).__name__}")
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
                raise RowError("routes", f"bad segment {seg!r}: needs route name, departure and arrival stops")
            segs.append((got[0].strip(), strip_suffix(got[1]), strip_suffix(got[2])))
            given.append(dict(seg) if isinstance(seg, dict) else
                         {"route_name": got[0], "departure_stop": got[1], "arrival_stop": got[2]})
        out.append(segs)
        raw.append(given)
    return out, raw


def _first(row: dict, *names):
    return next((row[n] for n in names if n in row and row[n] is not None), None)


def _is_planning_row(row: dict) -> bool:
    """A row without a `type`: a ReasonMap benchmark row (all planning questions) has question_short /
    question_long / routes, or both stations and no ReasonMap-Plus `question`."""
    if _first(row, "question_short", "question_long", "routes") is not None:
        return True
    return _first(row, "station_1") is not None and _first(row, "station_2") is not None and \
        _first(row, "question") is None


def row_to_sample(row: dict, roots: list[Path], cache_dir: Path, metro_cache: dict, default_id: str,
                  split: str = "") -> Sample:
    """One released-layout row -> Sample (raises RowError naming the bad field)."""
    if not isinstance(row, dict):
        raise RowError("<row>", f"expected a JSON object, got {type(row).__name__}")
    if _first(row, "type", "qtype") is not None:
        qtype = normalise_qtype(_first(row, "type", "qtype"))
    elif _is_planning_row(row):  # the ReasonMap benchmark's rows carry no type: all are planning questions
        qtype = "planning"
    else:
        raise RowError("type", "missing (and not a planning row: no question_short / question_long / routes, "
                                "nor station_1 + station_2 without a question)")
    metro = _metro(_first(row, "json", "metro"), roots, metro_cache)
    s1, s2 = (_first(row, f) for f in ("station_1", "station_2"))
    s1 = strip_suffix(str(s1)) if s1 is not None else None
    s2 = strip_suffix(str(s2)) if s2 is not None else None
    question = _first(row, "question", "question_short")
    if question is None and qtype == "planning":  # a planning row may carry only the long template
        question = _first(row, "question_long")
    if not isinstance(question, str) or not question.strip():
        raise RowError("question", "missing or empty")
    map_difficulty = _first(row, "difficulty_city", "map_difficulty")
    if map_difficulty is None:  # it sets the reward's and the metrics' weights: never guessed
        raise RowError("difficulty_city", "missing")
    map_difficulty = str(map_difficulty).strip().lower()
    map_difficulty = {"medium": "middle"}.get(map_difficulty, map_difficulty)
    if map_difficulty not in MAP_DIFFICULTIES:
        raise RowError("difficulty_city", f"expected one of {MAP_DIFFICULTIES}, got {map_difficulty!r}")
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
            raise RowError("choices", f"expected four integers (or A) .. D) options in the question), got {choices!r}") from None
        if len(fields["choices"]) != 4:
            raise RowError("choices", f"expected four choices, got {len(fields['choices'])}")
    if qtype == "planning":
        if metro is None:
            raise RowError("json", "planning needs the metro data")
        if s1 is None or s2 is None:
            raise RowError("station_1" if s1 is None else "station_2", "missing")
        routes, plans = _routes(_first(row, "routes"))
        route = best_route(metro, s1, s2)
        if route is None and not routes:
            raise RowError("station_2", f"no route from {s1!r} to {s2!r} in the metro data")
        route = route if route is not None else routes[0]
        tc = _first(row, "question_transfer_count", "transfer_count")
        try:
            tc = int(tc) if tc is not None else len(route) - 1
        except (TypeError, ValueError):
            raise RowError("question_transfer_count", f"expected an integer, got {tc!r}") from None
        if tc < 0:
            raise RowError("question_transfer_count", f"expected a count >= 0, got {tc}")
        qd = str(_first(row, "difficulty_question", "question_difficulty") or question_difficulty(tc)).lower()
        qd = {"middle": "medium"}.get(qd, qd)
        if qd not in QUESTION_DIFFICULTIES:
            raise RowError("difficulty_question", f"expected one of {QUESTION_DIFFICULTIES}, got {qd!r}")
        answer = _first(row, "answer")
        fields.update(route=route, routes=routes or [route], reference_plans=plans or [route_plan(metro, route)],
                      transfer_count=tc, question_difficulty=qd,
                      question_long=_first(row, "question_long"),
                      answer=normalise_answer(qtype, answer) if answer not in (None, "") else route_text(route))
    else:
        if _first(row, "answer") is None:
            raise RowError("answer", "missing")
        fields["answer"] = normalise_answer(qtype, row["answer"])
    return Sample(**fields)
