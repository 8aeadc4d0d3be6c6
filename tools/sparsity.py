"""How often does a GRPO group get no gradient? The sparse-reward problem the detail reward fixes, in numbers.

    python -m tools.sparsity                      # G = 4, 8, 16 x p_correct = 0, 0.05, 0.2 (about 20 s)
    python -m tools.sparsity --groups 8 --p-correct 0.05 --detail-variant released

A group whose G rewards are all equal has zero advantage for every response (docs/rewardmap.md §4.1), so
it contributes nothing to the update. This script simulates a weak policy answering planning questions on
synthetic cities (the right route with probability p_correct, unparseable text with probability
p_garbage, else the right route with one or two typical mistakes) and prints the share of such groups
with the 0/1-style reward (format + correctness) and with the detail reward added (docs/rewardmap.md §3).
"""
from __future__ import annotations

import argparse
import random
from dataclasses import replace

from plumbing import cli
from offline.maps import generate_metro
from transit.metro import MAP_DIFFICULTIES, Metro, Sample, Segment, best_route, route_text
from rewards import RewardConfig, reward

CORRUPTIONS = ("wrong_line", "wrong_stop", "broken_transfer", "extra_segment", "missing_segment", "direct")


def corrupt_route(metro: Metro, route: list[Segment], kind: str, rng: random.Random) -> list[Segment]:
    """One typical model mistake applied to a route (for the analysis): a segment on a wrong line, a wrong
    stop, a broken transfer, an extra segment at the end, a dropped segment, or a direct one-line answer."""
    route = list(route)
    stations = sorted({s for names in metro.values() for s in names})
    i = rng.randrange(len(route))
    line, dep, arr = route[i]
    if kind == "wrong_line":
        route[i] = (rng.choice([x for x in metro if x != line] or ["Line 999"]), dep, arr)
    elif kind == "wrong_stop" or (kind in ("broken_transfer", "missing_segment") and len(route) < 2):
        new = rng.choice([s for s in stations if s not in (dep, arr)] or ["Nowhere"])
        route[i] = (line, new, arr) if rng.random() < 0.5 else (line, dep, new)
    elif kind == "broken_transfer":
        j = rng.randrange(1, len(route))
        route[j] = (route[j][0], rng.choice([s for s in stations if s != route[j][1]]), route[j][2])
    elif kind == "extra_segment":
        last_line, _, end = route[-1]
        route.append((last_line, end, rng.choice([s for s in metro[last_line] if s != end] or ["Nowhere"])))
    elif kind == "missing_segment":
        del route[i]
    elif kind == "direct":
        route = [(rng.choice(list(metro)), route[0][1], route[-1][2])]
    else:
        raise ValueError(f"unknown corruption {kind!r}")
    return route


def analysis_cities(n_seeds: int) -> list[tuple[str, Metro]]:
    """(map difficulty, metro data) of `n_seeds` synthetic cities per difficulty (maps.generate_metro)."""
    return [(d, generate_metro(seed, d)) for seed in range(n_seeds) for d in MAP_DIFFICULTIES]


def analyze(groups=(4, 8, 16), p_correct=(0.0, 0.05, 0.2), p_garbage=0.05, n_seeds=4, questions=25,
            repeats=4, seed=0, cfg: RewardConfig = RewardConfig()) -> list[dict]:  # fmt: skip
    """Simulate a weak policy on planning questions and count GRPO groups whose rewards are all equal
    (zero variance, hence zero advantage and no gradient) with and without the detail reward.

    Each response is the optimal route with probability p_correct, unparseable text with probability
    p_garbage, else the optimal route with one or two random `CORRUPTIONS` (a few of which are still valid
    routes, e.g. a parallel line holding both stops: ReasonMap's check does not ask for optimality)."""
    rng = random.Random(seed)
    cities = analysis_cities(n_seeds)
    source = f"synthetic cities (seeds 0-{n_seeds - 1} x easy/middle/hard)"
    sparse_cfg = replace(cfg, detail_reward=False)
    samples = []
    for difficulty, metro in cities:
        names = sorted({s for line in metro.values() for s in line})
        for k in range(questions):
            s1, s2 = rng.sample(names, 2)
            route = best_route(metro, s1, s2)
            if route:
                samples.append(Sample(id=f"q{len(samples)}", qtype="planning", question="", answer=route_text(route),
                                      image=None, metro=metro, map_difficulty=difficulty, station_1=s1, station_2=s2,
                                      transfer_count=len(route) - 1, route=route))  # fmt: skip
    rows = []
    for g in groups:
        for p in p_correct:
            flat = {"sparse": 0, "dense": 0}
            n = 0
            for sample in samples:
                for _ in range(repeats):
                    responses = []
                    for _ in range(g):
                        u = rng.random()
                        if u < p:
                            route = sample.route
                        elif u < p + p_garbage:
                            responses.append("I think you should take the metro.")
                            continue
                        else:
                            route = sample.route
                            for _ in range(rng.choice((1, 2))):
                                route = corrupt_route(sample.metro, route, rng.choice(CORRUPTIONS), rng)
                        responses.append(route_text(route))
                    for name, c in (("sparse", sparse_cfg), ("dense", cfg)):
                        totals = [reward(sample, r, c).total for r in responses]
                        flat[name] += max(totals) - min(totals) < 1e-9
                    n += 1
            rows.append({"G": g, "p_correct": p, "groups": n, "zero_var_sparse": flat["sparse"] / n,
                         "zero_var_dense": flat["dense"] / n})  # fmt: skip
    print(f"{len(samples)} planning questions on {source}; {repeats} groups per question and setting;")
    print(f"p_garbage={p_garbage}; detail variant '{cfg.detail_variant}', alpha={cfg.alpha}, "
          f"format_score={cfg.format_score}, correct_score={cfg.correct_score}")  # fmt: skip
    print("share of groups with zero reward variance (no gradient):")
    print(f"{'G':>3} {'p_correct':>9} {'groups':>6} {'format+correct':>15} {'+ detail':>9}")
    for r in rows:
        print(f"{r['G']:>3} {r['p_correct']:>9.2f} {r['groups']:>6} {r['zero_var_sparse']:>15.1%} "
              f"{r['zero_var_dense']:>9.1%}")  # fmt: skip
    return rows


def main(argv=None) -> list[dict]:
    """The command line: print the zero-variance table for the given group sizes and success rates."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--groups", type=int, nargs="+", default=[4, 8, 16], help="group sizes G")
    ap.add_argument("--p-correct", type=float, nargs="+", default=[0.0, 0.05, 0.2])
    ap.add_argument("--p-garbage", type=float, default=0.05, help="share of unparseable responses")
    ap.add_argument("--seeds", type=int, default=4, help="synthetic cities per difficulty")
    ap.add_argument("--questions", type=int, default=25, help="questions per city")
    ap.add_argument("--detail-variant", choices=("paper", "released"), default="paper")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    args = ap.parse_args(argv)
    return analyze(tuple(args.groups), tuple(args.p_correct), args.p_garbage, args.seeds, args.questions,
                   seed=args.seed, cfg=RewardConfig(detail_variant=args.detail_variant))


if __name__ == "__main__":
    cli.run(main)
