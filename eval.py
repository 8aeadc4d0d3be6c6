"""Evaluate a policy with the paper's metrics (docs/rewardmap.md §6, the columns of Table 1).

    python eval.py                                          # the tiny model on the synthetic test split
    python eval.py --model runs/default/model --split test  # a trained checkpoint
    python eval.py --model DIR --data /data/ReasonMap --long    # the benchmark's validation split, 11 test cities

Greedy decoding, batched. Prints ReasonMap-Plus weighted accuracy (overall / Count / TorF), planning
weighted accuracy and weighted map score, and per-type accuracy; writes eval.json (metrics and every
response with its reward breakdown; strict JSON, an empty split's accuracy is null) and eval.html (a page
with the map, question, response and reward of a sample of questions; self-contained, opens from disk).
The scorers (`plus_accuracy`, `planning_scores`, `map_score`) are below; the per-response checks they
build on are the training reward's (rewards.py).
"""
from __future__ import annotations

import argparse
import base64
import html
import io
import random
import re
from collections import Counter
import sys
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

from plumbing import cli
import data
import grpo
from scaling.distributed import even_share, gather, world
import model as models
from scaling import lora
import rewards
from transit.metro import COUNT_QTYPES, PLUS_QTYPES, QUESTION_DIFFICULTIES, TORF_QTYPES, Metro, Sample, Segment, question_difficulty, via_stops
from offline.synthetic import WORLDS
from transit.released import official_correct, official_map_score  # the evaluators Table 1 used
from rewards import transfer_count


def generate(policy, samples: list, max_new_tokens: int, batch_size: int = 16, progress: bool = True,
             long: bool = False, planning_max_new_tokens: int | None = None) -> tuple[list[str], list[bool]]:
    """Greedy responses and whether each was cut by its token budget, in input order. Prompts are batched by
    kind (planning questions get `planning_max_new_tokens`, the others `max_new_tokens`) and by prompt length
    (less padding)."""
    if long:  # planning questions in their long form (via stops), the others unchanged
        samples = [Sample(**{**asdict(s), "question": s.question_long}) if s.qtype == "planning" and s.question_long else s
                   for s in samples]
    def budget(s) -> int:
        return (planning_max_new_tokens or max_new_tokens) if s.qtype == "planning" else max_new_tokens

    order = sorted(range(len(samples)), key=lambda i: (budget(samples[i]), len(samples[i].question)))
    if world() > 1:  # [multi-GPU] each rank answers an equal share of each kind (padded with repeats), gathered below
        order = [i for b in sorted({budget(s) for s in samples})
                 for i in even_share([j for j in order if budget(samples[j]) == b])]
    out, truncated = [""] * len(samples), [False] * len(samples)
    bar = tqdm(total=len(order), desc="eval", disable=not progress, dynamic_ncols=True)
    start = 0
    while start < len(order):
        tokens = budget(samples[order[start]])
        idx = [i for i in order[start : start + batch_size] if budget(samples[i]) == tokens]
        rollout = grpo.sample_groups(policy, [samples[i] for i in idx], group_size=1, max_new_tokens=tokens,
                                     temperature=0.0)
        for i, text, done in zip(idx, rollout.texts, rollout.finished.tolist()):
            out[i], truncated[i] = text, not done
        bar.update(len(idx))
        start += len(idx)
    bar.close()
    if world() > 1:
        for answered in gather({i: (out[i], truncated[i]) for i in order}):
            for i, (text, cut) in answered.items():
                out[i], truncated[i] = text, cut
    return out, truncated


def evaluate(policy, samples: list, reward_cfg=None, max_new_tokens: int = 64, planning_max_new_tokens: int | None = None,
             batch_size: int = 16, progress: bool = True, long: bool = False) -> dict:
    """Metrics of the paper's Table 1 on `samples`, plus per-type accuracy, the number of responses cut by
    their token budget (`truncated`: a response that never finished is scored as it stands) and every record."""
    reward_cfg = reward_cfg or rewards.RewardConfig()
    responses, truncated = generate(policy, samples, max_new_tokens, batch_size, progress, long, planning_max_new_tokens)
    summary = metrics_for(samples, responses, long=long)
    summary["truncated"] = sum(truncated)
    summary["records"] = [
        {"id": s.id, "qtype": s.qtype, "map_difficulty": s.map_difficulty,
         "question": s.question_long if long and s.qtype == "planning" and s.question_long else s.question,
         "answer": s.answer, "response": r, "truncated": cut, "image": s.image,
         "reward": asdict(rewards.reward(s, r, reward_cfg))}
        for s, r, cut in zip(samples, responses, truncated)
    ]
    return summary


def metrics_for(samples: list, responses: list[str], long: bool = False) -> dict:
    """Table 1 columns and per-type accuracy from responses already generated.

    `plus` / `planning` / `per_type_accuracy` use the official evaluators' verdicts and map score (released.py,
    quirks included) with the paper's difficulty weights: the numbers to compare with Table 1. `ours` holds
    the same columns by this project's lenient scorers (docs/rewardmap.md §6.3 lists the differences)."""
    plus = [(s, r) for s, r in zip(samples, responses) if s.qtype != "planning"]
    plan = [(s, r) for s, r in zip(samples, responses) if s.qtype == "planning"]
    summary: dict = {"n": len(samples), "ours": {}}
    if plus:
        summary["plus"] = plus_accuracy(*map(list, zip(*plus)))
        summary["ours"]["plus"] = plus_accuracy(*map(list, zip(*plus)), official=False)
    if plan:
        summary["planning"] = planning_scores(*map(list, zip(*plan)), long=long)
        summary["ours"]["planning"] = planning_scores(*map(list, zip(*plan)), long=long, official=False)
    per_type: dict[str, list[float]] = {}  # the official verdicts computed above, not computed again
    verdicts = [(s, ok) for part, key in ((plus, "plus"), (plan, "planning")) if part
                for (s, _), ok in zip(part, summary[key]["correct"])]
    for s, ok in verdicts:
        per_type.setdefault(s.qtype, []).append(float(ok))
    summary["per_type_accuracy"] = {q: sum(v) / len(v) for q, v in sorted(per_type.items())}
    return summary


def answer_priors(train: list, test: list) -> dict[str, dict]:
    """Each question type's answer prior: the training split's most common answer of that type and its accuracy
    on `test`'s questions of that type (exact match with the reference answer). What a model that reads only the
    question type can score: the floor that learning shows above. When several answers tie as the most common,
    `answer` lists them ("3 / 4 / 6"; more than 5: their count) and `accuracy` is their mean (the expected score
    of picking one)."""
    out = {}
    for q in sorted({s.qtype for s in test}):
        counts = Counter(s.answer for s in train if s.qtype == q)
        if not counts:
            continue
        top = sorted(a for a, n in counts.items() if n == max(counts.values()))
        pool = [s for s in test if s.qtype == q]
        out[q] = {"answer": " / ".join(top) if len(top) <= 5 else f"{len(top)} answers seen {max(counts.values())} time(s)",
                  "accuracy": sum(sum(s.answer == a for s in pool) for a in top) / (len(top) * len(pool))}
    return out


# ----------------------------------------------------------------------------------------------------
# The Table 1 scorers (docs/rewardmap.md §6)

REASONMAP_PLUS_WEIGHTS = {"easy": 1.0, "middle": 1.5, "hard": 2.0}
"""ReasonMap-Plus weighted accuracy: weight by map difficulty only."""
REASONMAP_WEIGHTS = {
    ("easy", "easy"): 1.0, ("medium", "easy"): 1.5, ("hard", "easy"): 2.0,
    ("easy", "middle"): 1.5, ("medium", "middle"): 2.0, ("hard", "middle"): 2.5,
    ("easy", "hard"): 2.0, ("medium", "hard"): 2.5, ("hard", "hard"): 3.0,
}  # fmt: skip
"""ReasonMap weighted accuracy / map score: weight by (question difficulty, map difficulty)."""


def _weighted_mean(pairs: list[tuple[float, float]]) -> float:
    """sum(w * x) / sum(w); NaN for no samples (an empty split has no accuracy, not zero)."""
    total = sum(w for w, _ in pairs)
    return sum(w * x for w, x in pairs) / total if total > 0 else float("nan")


def plus_accuracy(samples: list[Sample], responses: list[str], official: bool = True) -> dict:
    """ReasonMap-Plus weighted accuracy (docs/rewardmap.md §6.1), overall and split Count / TorF, plus per type.

    Verdicts: the official ReasonMap-Plus evaluator's (`official_correct`, released.py), or with `official=False`
    this project's lenient rule (rewards.plus_scores). Returns {'weighted_acc', 'count', 'torf', 'acc'
    (unweighted: what the official cal_metrics.py reports), 'per_type': {qtype: weighted acc}, 'n',
    'correct': [bool per sample]}. Planning samples are not allowed here."""
    if len(samples) != len(responses):
        raise ValueError(f"{len(samples)} samples but {len(responses)} responses")
    for s in samples:  # bad data, not a bad response: say which sample
        if s.qtype not in PLUS_QTYPES or s.map_difficulty not in REASONMAP_PLUS_WEIGHTS:
            raise ValueError(f"sample {s.id}: plus_accuracy takes ReasonMap-Plus questions on easy/middle/hard "
                             f"maps, got qtype {s.qtype!r}, map difficulty {s.map_difficulty!r}")
    correct = [official_correct(s, r) if official else rewards.plus_scores(s, r)[1]
               for s, r in zip(samples, responses)]
    rows = [(s.qtype, REASONMAP_PLUS_WEIGHTS[s.map_difficulty], float(c)) for s, c in zip(samples, correct)]
    by = lambda types: _weighted_mean([(w, x) for q, w, x in rows if q in types])  # noqa: E731
    return {
        "weighted_acc": by(PLUS_QTYPES),
        "count": by(COUNT_QTYPES),
        "torf": by(TORF_QTYPES),
        "acc": _weighted_mean([(1.0, x) for _, _, x in rows]),
        "per_type": {q: by((q,)) for q in PLUS_QTYPES if any(r[0] == q for r in rows)},
        "n": len(rows),
        "correct": correct,
    }


def map_score(
    response: str, metro: Metro, stop1: str, stop2: str, references: list[list[Segment]], via: str | None = None
) -> float:
    """ReasonMap's quality score of a route answer (docs/rewardmap.md §6.2), best over the reference plans.

    Per reference: if the first departure and last arrival are right, +1, then for each aligned
    (answer, reference) segment pair +2 same route name (light normalisation), +1 same departure, +1 same
    arrival; long questions add a via-stop term: `via="count"` (template 1, `Number of Via Stops`): per
    pair 4 if exact, else max(0, 4 - 4 * error / reference count) (0 when the reference has none), summed
    and capped at 10; `via="list"` (template 2, `Via Stops`): (10 * IoU + matched count capped at 10) / 2,
    IoU over the pairs with the same route name. Cap at 10 (short) / 20 (long); add 10 / 20 if
    `planning_correct`. Range [0, 20] short, [0, 40] long. As in ReasonMap's code the segment terms only
    count when the endpoints are right; unlike it, `Via Stops` lists are read for every city, not only
    Chinese ones. Reference via stops come from `metro.via_stops` on the metro data.
    """
    if via not in (None, "count", "list"):
        raise ValueError(f"via must be None, 'count' or 'list', got {via!r}")
    cap, bonus = (10.0, 10.0) if via is None else (20.0, 20.0)
    segs = rewards.parse_segments(response)[:rewards.MAX_SEGMENTS]
    correct = rewards.planning_correct(response, metro, stop1, stop2)
    ends_ok = bool(segs) and (
        rewards.normalize_station(segs[0]["dep"]) == rewards.normalize_station(stop1)
        and rewards.normalize_station(segs[-1]["arr"]) == rewards.normalize_station(stop2)
    )
    best = 0.0
    for ref in references or [[]]:
        score = 0.0
        if ends_ok:
            score += 1
            num_score, matched, union, inter = 0.0, 0, set(), set()
            for seg, (line, dep, arr) in zip(segs, ref):
                same_line = rewards.normalize_line(seg["route"]) == rewards.normalize_line(line)
                score += 2 * same_line
                score += rewards.normalize_station(seg["dep"]) == rewards.normalize_station(dep)
                score += rewards.normalize_station(seg["arr"]) == rewards.normalize_station(arr)
                ref_via = {rewards.normalize_station(s) for s in (via_stops(metro, line, dep, arr) or [])}
                if via == "count":
                    m = re.search(r"\d{1,6}", seg.get("num_via", ""))
                    error = abs((int(m.group()) if m else 0) - len(ref_via))
                    num_score += 4 if error == 0 else (max(0.0, 4 - 4 * error / len(ref_via)) if ref_via else 0)
                elif via == "list":
                    said = {rewards.normalize_station(s) for s in seg.get("via", "").split(",")} - {""}
                    matched += len(said & ref_via)
                    if same_line:
                        union |= said | ref_via
                        inter |= said & ref_via
            iou = len(inter) / len(union) if union else 0.0
            score += (10 * iou + min(10, matched)) / 2 + min(10.0, num_score)
        score = min(cap, score) + (bonus if correct else 0.0)
        best = max(best, score)
    return best


def _question_difficulty(sample: Sample, transfers: int) -> str:
    if sample.question_difficulty in QUESTION_DIFFICULTIES:
        return sample.question_difficulty
    return question_difficulty(transfers)


def planning_scores(samples: list[Sample], responses: list[str], long: bool = False, official: bool = True) -> dict:
    """ReasonMap planning metrics (docs/rewardmap.md §6.2) for short (`long=False`) or long answers.

    Verdicts and map score: the official main.py's (`official_correct` / `official_map_score` from released.py, with
    the row's own reference plans), or with `official=False` this project's (`rewards.planning_correct`,
    `map_score`). Returns {'weighted_acc', 'acc', 'weighted_map_score', 'map_score', 'n', 'correct'}
    ('acc' and 'map_score' unweighted: what the official cal_metrics.py reports), weighted by
    `REASONMAP_WEIGHTS[(question difficulty, map difficulty)]` (question difficulty from the sample, else
    0 / 1 / >= 2 transfers = easy / medium / hard). Long answers use the via-stop variant of the sample's
    long template (`Via Stops:` list if it asks for one, else `Number of Via Stops`). Reference plans:
    `sample.routes`, else `[sample.route]`."""
    if len(samples) != len(responses):
        raise ValueError(f"{len(samples)} samples but {len(responses)} responses")
    acc_rows, map_rows, correct = [], [], []
    for s, r in zip(samples, responses):
        s1, s2 = s.station_1 or "", s.station_2 or ""
        w = REASONMAP_WEIGHTS[(_question_difficulty(s, transfer_count(s)), s.map_difficulty)]
        if official:
            ok, score = official_correct(s, r, long), official_map_score(s, r, long)
        else:
            via = None
            if long:
                q = s.question_long or ""
                via = "list" if ("Via Stops:" in q and "Number of Via Stops" not in q) else "count"
            refs = s.routes or ([s.route] if s.route else [])
            ok, score = rewards.planning_correct(r, s.metro, s1, s2), map_score(r, s.metro, s1, s2, refs, via)
        correct.append(ok)
        acc_rows.append((w, float(ok)))
        map_rows.append((w, score))
    return {
        "weighted_acc": _weighted_mean(acc_rows),
        "acc": _weighted_mean([(1.0, x) for _, x in acc_rows]),
        "weighted_map_score": _weighted_mean(map_rows),
        "map_score": _weighted_mean([(1.0, x) for _, x in map_rows]),
        "n": len(samples),
        "correct": correct,
    }


# ----------------------------------------------------------------------------------------------------
# Reports: one line, a table, a self-contained HTML page


def _pct(x: float) -> str:
    """A fraction as a percentage; 'n/a' for an empty split (the scorers return NaN there)."""
    return "n/a" if x != x else f"{100 * x:.1f}%"


def _num(x: float) -> str:
    """A score with two decimals; 'n/a' for an empty split."""
    return "n/a" if x != x else f"{x:.2f}"


NAN = float("nan")


def one_line(summary: dict) -> str:
    """The headline numbers in one line (for logs and progress bars)."""
    parts = []
    if "plus" in summary:
        p = summary["plus"]
        parts.append(f"Plus weighted acc {_pct(p['weighted_acc'])} (Count {_pct(p['count'])}, TorF {_pct(p['torf'])})")
    if "planning" in summary:
        p = summary["planning"]
        parts.append(f"planning weighted acc {_pct(p['weighted_acc'])}, map score {p['weighted_map_score']:.2f}")
    return "; ".join(parts) or "no samples"


def table(summary: dict) -> str:
    """The Table 1 columns (official evaluators, the paper's weights), this project's lenient scorers beside
    them, and per-type accuracy, as a small text table."""
    ours = summary.get("ours", {})
    rows = [("", "official", "ours")]
    if "plus" in summary:
        p, q = summary["plus"], ours.get("plus", {})
        rows += [("ReasonMap-Plus weighted acc", _pct(p["weighted_acc"]), _pct(q.get("weighted_acc", NAN))),
                 ("  Count", _pct(p["count"]), _pct(q.get("count", NAN))),
                 ("  TorF", _pct(p["torf"]), _pct(q.get("torf", NAN))),
                 ("  unweighted acc", _pct(p["acc"]), _pct(q.get("acc", NAN)))]
    if "planning" in summary:
        p, q = summary["planning"], ours.get("planning", {})
        rows += [("Planning weighted acc", _pct(p["weighted_acc"]), _pct(q.get("weighted_acc", NAN))),
                 ("Planning weighted map score", _num(p["weighted_map_score"]), _num(q.get("weighted_map_score", NAN))),
                 ("  unweighted acc", _pct(p["acc"]), _pct(q.get("acc", NAN))),
                 ("  unweighted map score", _num(p["map_score"]), _num(q.get("map_score", NAN)))]
    priors = summary.get("priors", {})
    rows += [(f"accuracy {q}" + (f" (answer prior {_pct(priors[q]['accuracy'])})" if q in priors else ""), _pct(a), "")
             for q, a in summary["per_type_accuracy"].items()]
    width = max(len(k) for k, _, _ in rows)
    return "\n".join(f"{k:<{width}}  {a:>8}  {b:>8}".rstrip() for k, a, b in rows)


def _thumbnail(path: str | None, width: int = 720) -> str:
    """The map as an inline PNG data URI (so the page needs no server and no neighbouring files)."""
    if not path or not Path(path).exists():
        return ""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        if im.width > width:
            im = im.resize((width, round(im.height * width / im.width)), Image.LANCZOS)
        buf = io.BytesIO()
        im.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def write_html(summary: dict, path: Path, n_examples: int = 24, seed: int = 0) -> None:
    """A self-contained page: the headline table, then for a sample of questions the map, question,
    reference answer, response and its reward breakdown."""
    records = summary["records"]
    picked = sorted(random.Random(seed).sample(range(len(records)), min(n_examples, len(records))))
    esc = lambda s: html.escape(str(s))
    cards = []
    for i in picked:
        r = records[i]
        rw = r["reward"]
        ok = "ok" if rw["correctness"] > 0 else "bad"
        img = _thumbnail(r.get("image"))
        cards.append(
            f'<section class="{ok}"><h2>{esc(r["id"])} &middot; {esc(r["qtype"])} &middot; {esc(r["map_difficulty"])} map</h2>'
            + (f'<img src="{img}" alt="map for {esc(r["id"])}">' if img else "<p><i>(no image)</i></p>")
            + f"<h3>Question</h3><pre>{esc(r['question'])}</pre><h3>Reference answer</h3><pre>{esc(r['answer'])}</pre>"
            f"<h3>Response</h3><pre>{esc(r['response'])}</pre>"
            f"<table><tr><th>format</th><th>correctness</th><th>detail</th><th>weight</th><th>total</th></tr>"
            f"<tr><td>{rw['format']:g}</td><td>{rw['correctness']:g}</td><td>{rw['detail']:g}</td>"
            f"<td>{rw['weight']:g}</td><td>{rw['total']:g}</td></tr></table></section>")
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>RewardMap evaluation</title>
<style>body{{font-family:sans-serif;max-width:960px;margin:auto;padding:1em}} pre{{white-space:pre-wrap;background:#f4f4f4;padding:.5em}}
section{{border-left:6px solid #ccc;padding-left:1em;margin:2em 0}} section.ok{{border-color:#2a2}} section.bad{{border-color:#c33}}
img{{max-width:100%;border:1px solid #ddd}} td,th{{padding:2px 10px;text-align:right}}</style></head>
<body><h1>RewardMap evaluation</h1><pre>{esc(table(summary))}</pre>
<p>{len(picked)} of {len(records)} questions shown; green: correct, red: wrong.</p>
{''.join(cards)}
</body></html>
"""
    path.write_text(page, encoding="utf-8")


def world_of(model: str, data_flag: str) -> dict:
    """The synthetic world a model folder was trained on (train.py records --cities, --seed, --world in it), which
    eval.py evaluates unless its flags say otherwise: its held-out cities. Else (a base model, --data): the
    default world."""
    made = models.trained_on(model) or {}
    default = {"cities": data.SYNTHETIC_CITIES, "seed": 0, "world": "default"}
    return default if data_flag or made.get("data") else {k: made.get(k, v) for k, v in default.items()}


def warn_if_other_data(model: str, data_flag: str, cities: int, seed: int, world: str = "default") -> None:
    """A warning when a model trained by train.py on one dataset is evaluated on synthetic data of another
    --cities / --seed / --world (or on synthetic data after training on --data): another world, whose questions it
    may have trained on, so not its held-out test split."""
    made = models.trained_on(model)
    if made is None or data_flag:
        return
    if made["data"] or (made["cities"], made["seed"], made.get("world", "default")) != (cities, seed, world):
        trained = f"--data {made['data']}" if made["data"] else f"the synthetic data of --cities {made['cities']} " \
                                                                 f"--seed {made['seed']} --world {made.get('world', 'default')}"
        print(f"warning: {model} was trained on {trained}; this evaluates the synthetic data of --cities {cities} "
              f"--seed {seed} --world {world}, not its held-out split (its test questions may be among the ones it "
              "trained on): pass the flags it was trained with, or none", file=sys.stderr)


def main(argv: list[str] | None = None) -> dict:
    """The command line: load the split and the model as train.py does, evaluate, write eval.json and eval.html."""
    ap = argparse.ArgumentParser(description="Evaluate a policy with the paper's metrics.",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", default="tiny", help="'tiny' (the untrained embedded model) or a model folder / hub id")
    ap.add_argument("--data", default="", help="dataset folder(s), comma-separated; empty: the synthetic dataset train.py caches")
    ap.add_argument("--split", default="test", choices=("train", "test"),
                    help="test: the evaluation questions (a folder's test split, else its validation split's official "
                         "test cities); train: the training questions")
    ap.add_argument("--cities", type=int, default=None, help="synthetic dataset: number of cities (default: what the "
                    f"model folder was trained on, else {data.SYNTHETIC_CITIES})")
    ap.add_argument("--seed", type=int, default=None, help="synthetic dataset and tiny model seed (default: the model "
                    "folder's, else 0)")
    ap.add_argument("--world", default=None, choices=WORLDS, help="synthetic world (default: the model folder's, else "
                    "default; demo: the learning demo's text-only cities)")
    ap.add_argument("--cache-dir", default=data.CACHE_DIR, help="cache folder (as in train.py)")
    ap.add_argument("--limit", type=int, default=0, help="evaluate at most this many questions (a seeded subset; 0: all)")
    ap.add_argument("--batch-size", type=int, default=16, help="prompts per generation batch")
    ap.add_argument("--max-new-tokens", type=int, default=0, help="response token budget, judgement / counting "
                    "(0: what the model folder was trained with; the tiny model 4; any other model 2048)")
    ap.add_argument("--planning-max-new-tokens", type=int, default=0, help="response token budget, planning "
                    "(0: what the model folder was trained with; the tiny model 48; any other model 2048)")
    ap.add_argument("--long", action="store_true", help="planning questions in the long form (via stops)")
    ap.add_argument("--max-pixels", type=int, default=0, help="image budget in pixels (0: the model folder's own, i.e. "
                    "what it was trained with; for a base checkpoint pass the budget its trained runs used, train.py's --max-pixels)")
    ap.add_argument("--dtype", default="", help="compute dtype: float32 | bfloat16 (empty: bfloat16 on CUDA, float32 on CPU)")
    ap.add_argument("--qlora", action="store_true", help="load the base in 4-bit NF4 (a 24 GB card; bitsandbytes, CUDA only)")
    ap.add_argument("--out", default="", help="folder for eval.json and eval.html (default: the model folder, or runs/eval)")
    ap.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    a = ap.parse_args(argv)
    if a.qlora:  # before any data or model is loaded: a 4-bit base needs a CUDA GPU and bitsandbytes
        lora.check_qlora("cuda" if torch.cuda.is_available() else "cpu")
    for key, value in world_of(a.model, a.data).items():  # what the flags leave unsaid: the folder's own world
        if getattr(a, key) is None:
            setattr(a, key, value)
    train, test = data.load_data(a.data, a.cities, a.seed, a.cache_dir, world=a.world)
    samples = train if a.split == "train" else test
    if a.limit and a.limit < len(samples):
        samples = random.Random(a.seed).sample(samples, a.limit)
    # the tiny model's tokenizer is trained on the training split, exactly as train.py builds it
    policy = models.load_model(a.model, train, seed=a.seed, cache_dir=a.cache_dir, max_pixels=a.max_pixels,
                               dtype=models.compute_dtype(a.dtype), qlora=a.qlora, world=a.world)
    warn_if_other_data(a.model, a.data, a.cities, a.seed, a.world)
    plus_tokens, planning_tokens = models.token_budgets(a.model, a.max_new_tokens, a.planning_max_new_tokens)
    summary = evaluate(policy, samples, max_new_tokens=plus_tokens, planning_max_new_tokens=planning_tokens,
                       batch_size=a.batch_size, long=a.long)
    summary["priors"] = answer_priors(train, samples)
    out = Path(a.out or (a.model if Path(a.model).is_dir() else "runs/eval"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(cli.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    write_html(summary, out / "eval.html")
    print(table(summary))
    print(f"{summary['truncated']} of {summary['n']} responses hit their token budget (scored as they stand)")
    print(f"wrote {out / 'eval.json'} and {out / 'eval.html'}")
    return summary


if __name__ == "__main__":
    cli.run(main)
