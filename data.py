"""The released dataset layouts, both ways, and the one loader that train.py and eval.py share.

- `export_dataset` writes samples in the released datasets' field names (docs/rewardmap.md §2.3):
  `train.jsonl` / `test.jsonl`, `maps/`, `metro/`.
- `load_samples` reads our export and the released layouts (JSON / JSONL, parquet, HuggingFace
  `save_to_disk`; figures as paths or base64; metro data as a path or inline); a bad row raises an error
  naming the file, the row and the field.
- `load_data` gives (train, test): the `--data` folders, or the synthetic world generated once into a cache.
- `TEST_CITIES` / `official_test_subset`: the 11 cities the official ReasonMap evaluation reports on.

The released datasets, as the authors' code reads them (github.com/fscdc/ReasonMap `main.py`, `main_plus.py`,
`cal_metrics.py`; github.com/fscdc/RewardMap `utils/download_dataset.py`, `verl/utils/rl_dataset.py`):

- ReasonMap (`FSCCS/ReasonMap`): one `validation` split of planning questions, all 30 cities; rows have no
  `type` field (question_short / question_long / station_1 / station_2 / routes, `figure` base64, `json` the
  metro dict). The reported numbers (cal_metrics.py) average the 11 `TEST_CITIES` only.
- ReasonMap-Plus (`FSCCS/ReasonMap-Plus`): `train` and `test` (the 11 test cities) of the five Plus types.
- ReasonMap-Train (`FSCCS/ReasonMap-Train`): `train` only: ReasonMap-Plus's training questions again, plus the
  planning questions (`type` = planning). Loading it together with ReasonMap-Plus repeats those questions:
  `load_data` keeps the first copy.

    python data.py --out data_out --cities 30 --seed 0    # export the synthetic dataset
    python data.py --preview                              # 3 maps + example questions in preview/
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path

from plumbing import cli
from transit.metro import (LETTERS, QTYPES, TORF_QTYPES, TYPE_NAMES, Metro, Sample,
                   route_plan, station_lines)
from transit.released import TEST_CITIES  # the 11 cities the official evaluation reports on
from transit.rows import RowError, row_to_sample
from offline.synthetic import DEMO_VERSION, synthetic_dataset

SPLITS = ("train", "validation", "test")  # the split names a dataset folder may hold (files or DatasetDict keys)
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
    without a split go to train; samples of split `validation` go to `validation.jsonl` (written only when
    there are some). Returns the number of rows per split written.
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
        split = s.split if s.split in SPLITS else "train"
        rows.setdefault(split, []).append(sample_to_row(s, fig_rel or None, metro_rel))
    for split, split_rows in rows.items():
        with open(out_dir / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for row in split_rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return {split: len(r) for split, r in rows.items()}


# ---------------------------------------------------------------------------------------------------
# reading the released layouts (one row -> Sample is rows.py's job)


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


def _is_hf_folder(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists())


def _split_files(path: Path, split: str) -> list[Path]:
    """A plain folder's files of one split: SPLIT.jsonl / .json / .parquet, then data/SPLIT-*.parquet shards."""
    files = [path / f"{split}{ext}" for ext in (".jsonl", ".json", ".parquet")]
    return [f for f in files if f.exists()] + sorted((path / "data").glob(f"{split}-*.parquet"))


def dataset_splits(path: str | Path) -> list[str]:
    """The splits a dataset path holds, without reading its rows.

    A plain folder: those of `SPLITS` (train / validation / test) with files; a HuggingFace DatasetDict
    folder: its split names (`dataset_dict.json`); a single file or a lone saved Dataset: `[""]` (one
    unsplit set of rows). FileNotFoundError when the path does not exist."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such dataset file or folder")
    if (path / "dataset_dict.json").exists():
        try:
            splits = json.loads((path / "dataset_dict.json").read_text(encoding="utf-8"))["splits"]
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path / 'dataset_dict.json'}: not a HuggingFace DatasetDict description ({e})") from None
        return [str(sp) for sp in splits]
    if not path.is_dir() or (path / "state.json").exists():
        return [""]
    return [sp for sp in SPLITS if _split_files(path, sp)]


def load_samples(path: str | Path, split: str | None = None, cities: tuple[str, ...] | list[str] | None = None
                 ) -> list[Sample]:
    """Samples from our export or the released layouts (docs/rewardmap.md §2.3).

    `path` is a folder (with `SPLIT.jsonl` / `SPLIT.json` / `SPLIT.parquet` / `data/SPLIT-*.parquet`,
    or a HuggingFace `save_to_disk` folder) or one JSON / JSONL / parquet file; `split` picks
    train / validation / test (the ReasonMap benchmark is published as `validation` only; None: every
    split found; for a single file, rows whose `split` field differs are dropped). `cities` keeps only
    rows whose `city` is one of them (exact spelling, as the official scripts compare it): e.g.
    `load_samples(path, "validation", TEST_CITIES)` is the set cal_metrics.py reports on. Rows are
    filtered before they are read, so a bad row of another city is not reported.

    `figure` may be a path relative to the dataset (or to the folder one or two levels up, as RewardMap's
    `./maps/...`) or base64 (decoded once into `.figure_cache/` next to the data, or a temp folder when
    that is read-only); `json` a metro file path or the metro dict. A row without `type` is a planning
    question when it looks like a ReasonMap benchmark row. Types and answers are normalised (`TorF1` ->
    torf1, 1/0/True -> yes/no, 0-3 -> A-D). A bad row raises ValueError naming the file, the 1-based row
    and the field.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such dataset file or folder")
    root = path if path.is_dir() else path.parent
    sources: list[tuple[Path, str, list[tuple[int, dict]]]] = []
    if _is_hf_folder(path):
        # each split's rows as from `path/SPLIT` (the folder save_to_disk writes): ids SPLIT-N, errors name it
        sources += [(path / sp if sp else path, sp or split or "", rows) for sp, rows in _hf_rows(path, split)]
    elif path.is_dir():
        for sp in [split] if split else list(SPLITS):
            sources += [(f, sp, _read_rows(f, sp)) for f in _split_files(path, sp)]
        if not sources:
            raise FileNotFoundError(f"{path}: no {split or '/'.join(SPLITS)} data (.jsonl, .json, .parquet) "
                                    "in this folder")
    else:
        rows = _read_rows(path, split)
        if split:
            rows = [(n, r) for n, r in rows if not isinstance(r, dict) or r.get("split") in (None, "", split)]
        sources.append((path, split or "", rows))
    if cities is not None:
        keep = {str(c) for c in cities}
        sources = [(f, sp, [(n, r) for n, r in rows if not isinstance(r, dict) or str(r.get("city") or "") in keep])
                   for f, sp, rows in sources]
    roots = [root, root.parent, root.parent.parent]
    # decoded base64 figures go next to the data (created only when needed), else to a temp folder
    cache_dir = root / ".figure_cache" if os.access(root, os.W_OK) else Path(tempfile.gettempdir()) / "rewardmap_figures"
    metro_cache: dict = {}
    samples = []
    for file, sp, rows in sources:
        for n, row in rows:
            try:
                samples.append(row_to_sample(row, roots, cache_dir, metro_cache, f"{file.stem}-{n}", sp))
            except RowError as e:
                raise ValueError(f"{file}: row {n}: field {e.field_name!r}: {e}") from None
    return samples


def official_test_subset(samples: list[Sample], cities: tuple[str, ...] = TEST_CITIES) -> list[Sample]:
    """The samples of the official evaluation cities, in order.

    What ReasonMap's cal_metrics.py averages: main.py answers every row of the benchmark's `validation`
    split (30 cities), then the metrics keep the results of `TEST_CITIES` only (by the `city` field, exact
    spelling). ReasonMap-Plus's `test` split already holds just these cities (main_plus.py takes it whole)."""
    keep = set(cities)
    return [s for s in samples if s.city in keep]


def question_key(s: Sample) -> tuple:
    """What makes two rows the same question: city, type, question text and stations."""
    return (s.city, s.qtype, s.question.strip(), s.station_1, s.station_2)


def _folder_splits(path: str, eval_cities: tuple[str, ...] | None) -> tuple[list[Sample], list[Sample]]:
    """(train, evaluation) samples of one `--data` path, with a note for each split it lacks or replaces."""
    splits = dataset_splits(path)
    if splits == [""]:  # one file or a lone saved Dataset: rows pick their split by a `split` field, if any
        return load_samples(path, "train"), load_samples(path, "test")
    if not splits:
        raise FileNotFoundError(f"{path}: no {'/'.join(SPLITS)} data (.jsonl, .json, .parquet) in this folder")
    train = load_samples(path, "train") if "train" in splits else []
    if "train" not in splits:
        print(f"note: {path} has no train split (evaluation data only)")
    if "test" in splits:
        return train, load_samples(path, "test")
    if "validation" not in splits:  # ReasonMap-Train: training data only
        print(f"note: {path} has no test or validation split (training data only)")
        return train, []
    held_out = load_samples(path, "validation")
    subset = official_test_subset(held_out, eval_cities) if eval_cities is not None else held_out
    if eval_cities is not None and subset:
        print(f"note: {path} has no test split: evaluating its validation split, official test cities only "
              f"(cal_metrics.py): {len(subset)} of {len(held_out)} questions")
        return train, subset
    print(f"note: {path} has no test split: evaluating its validation split ({len(held_out)} questions)")
    return train, held_out


def load_data(data: str = "", cities: int = SYNTHETIC_CITIES, seed: int = 0, cache_dir: str | Path = CACHE_DIR,
              eval_cities: tuple[str, ...] | None = TEST_CITIES, world: str = "default"
              ) -> tuple[list[Sample], list[Sample]]:
    """(train, test) samples: the comma-separated dataset folders `data`, else the synthetic world.

    Each folder gives its `train` split (a note when it has none) and, for evaluation, its `test` split;
    a folder without `test` falls back to `validation` (the ReasonMap benchmark's only split), keeping the
    `eval_cities` (default `TEST_CITIES`, what cal_metrics.py reports; None or no row of those cities:
    the whole split) and printing which split it used; a folder with neither (ReasonMap-Train) gives
    training data only. A single file gives its rows to both, or by their `split` field.

    Duplicates: ReasonMap-Train repeats ReasonMap-Plus's training questions, so
    `--data ReasonMap-Plus,ReasonMap-Train` would load them twice and train on them twice as often. A
    question whose `question_key` (city, type, question text, stations) was already loaded from an earlier
    folder in the same split is dropped, the first copy kept; one note line gives the count. Repeats
    within one folder are left alone (that is the dataset as published). A note also counts evaluation
    questions that appear among the training questions.

    The synthetic world (`cities` cities from `seed`; `world` "demo": the learning demo's small text-only cities,
    offline/synthetic.py) is generated once into `cache_dir` and read back through `load_samples`, so it goes
    through the same loader as a released dataset."""
    if data:
        train: list[Sample] = []
        test: list[Sample] = []
        seen: dict[str, set] = {"train": set(), "test": set()}
        dropped = {"train": 0, "test": 0}
        for path in data.split(","):
            parts = dict(zip(("train", "test"), _folder_splits(path, eval_cities)))
            for name, out in (("train", train), ("test", test)):
                keys = [question_key(s) for s in parts[name]]
                out += [s for s, k in zip(parts[name], keys) if k not in seen[name]]
                dropped[name] += sum(k in seen[name] for k in keys)
                seen[name].update(keys)
        if sum(dropped.values()):
            print(f"note: dropped {sum(dropped.values())} duplicate questions (same city, type, question and "
                  f"stations as one loaded from an earlier --data folder, e.g. ReasonMap-Train repeating "
                  f"ReasonMap-Plus): train {dropped['train']}, test {dropped['test']}")
        leaked = sum(question_key(s) in seen["train"] for s in test)
        if leaked:
            print(f"note: {leaked} of the {len(test)} evaluation questions also appear in the training data")
        return train, test
    folder = Path(cache_dir) / f"synthetic-{f'demo{DEMO_VERSION}-' if world == 'demo' else ''}c{cities}-s{seed}"
    if not (folder / "test.jsonl").exists():
        print(f"generating the synthetic dataset ({cities} cities{', the demo world' if world == 'demo' else ''}) "
              f"into {folder} (once; reused afterwards)")
        export_dataset(synthetic_dataset(cities, seed, folder, world=world), folder)
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
