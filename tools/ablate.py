"""The paper's ablation rows on the tiny synthetic world: short stages, several seeds, one table and one plot.

    python -m tools.ablate                                   # 5 rows x 3 seeds, 20 steps per stage (~21 min, 2-core CPU)
    python -m tools.ablate --rows rl-baseline rewardmap --seeds 0 1 2 3 4
    python -m tools.ablate --max-steps-per-stage 0           # full stages (one pass over the data; ~4 min a run)
    python -m tools.ablate --cities 3 --batch-size 4         # any other flag goes to train.py, the same for every run

Rows (name: the train.py flags that make it; `--rows` takes the short names):

    rl-baseline       RL baseline           --curriculum none --no-detail-reward --no-difficulty-weight
    detail-reward     + detail reward       --curriculum none
    curriculum        + curriculum          --no-detail-reward
    rewardmap         RewardMap             (train.py's defaults: fine curriculum, detail reward)
    dynamic-sampling  dynamic sampling instead of the detail reward   --no-detail-reward --dynamic-sampling
    sft               SFT                   --stage sft --sft 200         (not run by default: --rows sft sft-rl rewardmap)
    sft-rl            SFT -> RL             --sft 200 --curriculum none   (the authors' SFT + RL: their loader shuffles)

Every (row, seed) is one `train.main([...])` in this process, into `--out/<row>/seed-<s>/`, then its final
model is evaluated once more; the numbers of a finished run go to `result.json` there, and a later call skips
runs that have one (so an ablation can be stopped and continued; a run cut short resumes from its latest
checkpoint, or starts over with --overwrite if it had none). `--seed` seeds everything in train.py, the synthetic world included: each seed is another world
(generated once into `--cache-dir`), another initial model and other samples; the rows of one seed share them.

Equal training for every row: `--max-steps-per-stage S` caps each stage of the three-stage (fine) curriculum
at S GRPO steps; a row without a curriculum (`--curriculum none`, one stage of every question type) gets
3 x S steps in its one stage, so every row takes the same number of GRPO steps (S = 0: one pass over the
data, which is the same set of prompts either way).

The table (`--out/ablation.md`), mean ± sample standard deviation (n - 1) over the seeds in every cell:

- one line per curriculum stage (judgement, counting, planning) for the rows that have one, and a last line
  per row, "whole run", for every row;
- `steps`: GRPO steps (of the stage / of the run);
- `training reward`: mean `reward/total` over those steps (metrics.jsonl). Not comparable between rows with
  and without the detail reward: it adds its own term (and the difficulty weight scales the total);
- `zero-var groups`: mean `groups/zero_std_frac` over those steps, the share of GRPO groups whose rewards are
  all equal (zero advantage: no gradient). Under dynamic sampling it is the trained batch's share, after the
  equal groups were traded for others;
- `TorF` / `Count` / `planning` / `map score`: held-out accuracy by the official evaluators with the paper's
  difficulty weights (eval.py's ReasonMap-Plus TorF and Count, planning weighted accuracy, weighted map
  score). On a stage's line: train.py's end-of-stage evaluation on held-out questions of that stage's kinds
  (so judgement gives TorF only, counting Count only); on the whole-run line: the final model on one held-out
  sample of every kind, the same questions for every row of a seed (`--eval-samples` of the test split,
  drawn as train.py draws its held-out samples). A mean over fewer seeds than the row has (a kind missing
  from some seeds' samples) says so: `(n=k)`.

The plot (`--out/ablation.png`): training reward, training accuracy (`reward/accuracy`) and the zero-variance
share per GRPO step, each row's mean over seeds (a moving average over the last 5 steps of the same stage) with a
band of ± one standard deviation, dotted lines at the curriculum's stage boundaries.
"""
from __future__ import annotations

import argparse
import json
import math
import shlex
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from plumbing import cli
import curriculum
import data
import eval as evaluation
import model as models
import train
from plumbing import checkpoints
from transit.metro import QTYPES

ROWS: dict[str, tuple[str, list[str]]] = {
    "rl-baseline": ("RL baseline", ["--curriculum", "none", "--no-detail-reward", "--no-difficulty-weight"]),
    "detail-reward": ("+ detail reward", ["--curriculum", "none"]),
    "curriculum": ("+ curriculum", ["--no-detail-reward"]),
    "rewardmap": ("RewardMap", []),
    "dynamic-sampling": ("dynamic sampling instead of the detail reward", ["--no-detail-reward", "--dynamic-sampling"]),
    "sft": ("SFT", ["--stage", "sft", "--sft", "200"]),
    "sft-rl": ("SFT -> RL", ["--sft", "200", "--curriculum", "none"]),
}
"""short name -> (the paper's row name, train.py flags). SFT and SFT -> RL are the paper's comparison (the authors'
SFT, then RL from the SFT model, whose shuffled loader has no curriculum): here 200 SFT steps at the run's --lr."""
DEFAULT_ROWS = ("rl-baseline", "detail-reward", "curriculum", "rewardmap", "dynamic-sampling")

FROM_SCRATCH = ["--sft", "0", "--sft-drill", "0", "--replay", "0", "--lr", "2e-3"]
"""Every row starts GRPO from the random tiny model, without train.py's tiny defaults (train.TINY_DEFAULTS: a
supervised cold start, a lower lr, replay): the rows compare what the rewards and the curriculum give a policy
that knows nothing yet, and each stage's held-out accuracy is taken at the stage's end, before any forgetting.
Extra flags (e.g. `--sft 800`) override these."""

OWN_FLAGS = ("--seed", "--out", "--resume", "--stage", "--max-steps-per-stage", "--eval-samples", "--cache-dir",
             "--curriculum", "--no-detail-reward", "--no-difficulty-weight", "--dynamic-sampling")
"""train.py flags that ablate.py sets itself (per run or per row): not accepted as extra flags."""

FULL_STAGES = len(curriculum.stage_names("fine"))
KINDS = ("torf", "count", "planning", "map_score")  # the accuracy columns, in table order
RESULT = "result.json"


# ------------------------------------------------------------------------------------------- one run

def train_argv(row: str, seed: int, steps_per_stage: int, eval_samples: int, extra: list[str]) -> list[str]:
    """The train.py flags of one (row, seed), without --out / --cache-dir (which do not change the run)."""
    flags = FROM_SCRATCH + ROWS[row][1] + list(extra)
    stages = len(curriculum.stage_names(train.parse_args(flags + ["--seed", str(seed)]).curriculum))
    steps = math.ceil(steps_per_stage * FULL_STAGES / stages)  # the same number of GRPO steps for every row
    return flags + ["--seed", str(seed), "--max-steps-per-stage", str(steps), "--eval-samples", str(eval_samples)]


def accuracies(summary: dict) -> dict:
    """The accuracy columns of an eval summary (train.py's eval_<stage>.json or `evaluation.evaluate`);
    None where the sample had no question of that kind."""
    plus, plan = summary.get("plus") or {}, summary.get("planning") or {}
    return {"torf": plus.get("torf"), "count": plus.get("count"), "planning": plan.get("weighted_acc"),
            "map_score": plan.get("weighted_map_score")}


def mean_of(rows: list[dict], key: str):
    vals = [r[key] for r in rows if r.get(key) is not None]
    return sum(vals) / len(vals) if vals else None


def summarise_run(folder: Path, stage_names: list[str]) -> dict:
    """Per stage and over the whole run: GRPO steps, mean training reward, zero-variance share, prompts drawn
    by dynamic sampling (metrics.jsonl), and the end-of-stage evaluation (eval_<stage>.json)."""
    metrics = folder / "metrics.jsonl"  # none for the SFT row (--stage sft: no GRPO step)
    log = [json.loads(l) for l in metrics.read_text().splitlines() if l.strip()] if metrics.exists() else []

    def part(rows: list[dict]) -> dict:
        return {"steps": len(rows), "reward": mean_of(rows, "reward/total"),
                "zero_var": mean_of(rows, "groups/zero_std_frac"), "accuracy": mean_of(rows, "reward/accuracy"),
                "drawn": mean_of(rows, "sampling/drawn")}

    stages = {}
    for name in stage_names:
        ev = folder / f"eval_{name}.json"
        stages[name] = {**part([r for r in log if r["stage"] == name]),
                        "eval": accuracies(json.loads(ev.read_text())) if ev.exists() else None}
    return {"stages": stages, "whole_run": part(log),
            "curve": [{k: r.get(k) for k in ("global_step", "stage", "reward/total", "reward/accuracy",
                                             "groups/zero_std_frac")} for r in log]}


def final_eval(cfg: train.TrainConfig, folder: Path) -> dict:
    """The final model of a run on a held-out sample of every question kind: `cfg.eval_samples` questions of
    the test split drawn as train.py draws its end-of-stage samples, so every row of a seed gets the same ones."""
    train_samples, test = data.load_data(cfg.data, cfg.cities, cfg.seed, cfg.cache_dir, world=cfg.world)
    probe = train.held_out(test, set(QTYPES), cfg.eval_samples, cfg.seed)
    policy = models.load_model(str(folder / "model"), train_samples, cfg.seed, cfg.cache_dir, cfg.max_pixels,
                               dtype=models.compute_dtype(cfg.dtype), world=cfg.world)
    summary = evaluation.evaluate(policy, probe, cfg, *train.budgets(cfg), progress=False)
    return {**accuracies(summary), "n": summary["n"], "per_type": summary["per_type_accuracy"],
            "ids": [s.id for s in probe]}


def run_one(row: str, seed: int, argv: list[str], folder: Path, cache_dir: str) -> dict:
    """Train one (row, seed) into `folder` (resuming a run cut short), evaluate its final model, write result.json."""
    done = folder / RESULT
    if done.exists():
        result = json.loads(done.read_text())
        if result["argv"] != argv:
            raise ValueError(f"{done} was made with other flags ({shlex.join(result['argv'])}; now {shlex.join(argv)}): "
                             "use another --out, or delete that folder")
        print(f"[{row} seed {seed}] done earlier, skipped ({done})")
        return result
    full = argv + ["--out", str(folder), "--cache-dir", cache_dir]
    if checkpoints.latest_checkpoint(folder) is not None:
        full.append("--resume")  # train.py refuses if the checkpoint's run had other settings
    elif folder.exists():
        full.append("--overwrite")  # a run cut short before its first checkpoint: nothing to continue
    print(f"[{row} seed {seed}] python train.py {shlex.join(full)}", flush=True)
    t0 = time.time()
    cfg = train.parse_args(full)
    train.train(cfg)
    final = final_eval(cfg, folder)
    result = {"row": row, "name": ROWS[row][0], "seed": seed, "argv": argv, "seconds": round(time.time() - t0, 1),
              **summarise_run(folder, [] if cfg.stage == "sft" else curriculum.stage_names(cfg.curriculum)),
              "final": final}
    tmp = done.with_suffix(".tmp")
    tmp.write_text(cli.dumps(result, indent=1) + "\n")
    tmp.replace(done)  # written last and atomically: its presence means the run is complete
    return result


# -------------------------------------------------------------------------------------- aggregation

def mean_std(values: list) -> tuple[float, float, int] | None:
    """(mean, sample standard deviation (n - 1; 0 for one value), n) over the non-missing values; None if none."""
    vals = [v for v in values if v is not None]
    if not vals:
        return None
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0), len(vals)


def cell(values: list, percent: bool = False) -> str:
    """'mean ± std' over seeds (percentages with one decimal, else two decimals); '–' for nothing measured."""
    ms = mean_std(values)
    if ms is None:
        return "–"
    m, s, n = ms
    text = f"{100 * m:.1f} ± {100 * s:.1f}" if percent else f"{m:.2f} ± {s:.2f}"
    return text + (f" (n={n})" if n < len(values) else "")


COLUMNS = ["ablation", "stage", "steps", "training reward", "zero-var groups", "TorF", "Count", "planning", "map score"]


def table(results: dict[str, list[dict]]) -> str:
    """The markdown table: for each row its stages (if it has several), then its whole run / final model."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]

    def line(name: str, stage: str, parts: list[dict], evals: list[dict | None], bold: bool = False) -> str:
        acc = [cell([(e or {}).get(k) for e in evals], percent=k != "map_score") for k in KINDS]
        steps = sorted({p["steps"] for p in parts})
        cells = [name, stage, "/".join(map(str, steps)), cell([p["reward"] for p in parts]),
                 cell([p["zero_var"] for p in parts]), *acc]
        if bold:
            cells[1] = f"**{cells[1]}**"
        return "| " + " | ".join(cells) + " |"

    for row, runs in results.items():
        name = ROWS[row][0]
        stage_names = list(runs[0]["stages"])
        if len(stage_names) > 1:
            for st in stage_names:
                lines.append(line(name, st, [r["stages"][st] for r in runs], [r["stages"][st]["eval"] for r in runs]))
        whole = ("whole run, final model" if len(stage_names) > 1 else
                 f"whole run ({stage_names[0]}), final model" if stage_names else "whole run (SFT alone), final model")
        lines.append(line(name, whole, [r["whole_run"] for r in runs], [r["final"] for r in runs], bold=True))
    return "\n".join(lines)


def plot(results: dict[str, list[dict]], png: Path, window: int = 5) -> None:
    """Training reward, training accuracy and zero-variance share per step: mean over seeds of a moving average,
    ± one standard deviation; dotted lines where a curriculum's stage ends."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("reward/total", "training reward"), ("reward/accuracy", "training accuracy"),
            ("groups/zero_std_frac", "share of zero-variance groups")]
    fig, axes = plt.subplots(len(keys), 1, figsize=(9, 9), sharex=True)
    boundaries = set()
    for row, runs in results.items():
        for prev, cur in zip(runs[0]["curve"], runs[0]["curve"][1:]):
            if cur["stage"] != prev["stage"]:
                boundaries.add(cur["global_step"] - 0.5)
        n = min(len(r["curve"]) for r in runs)
        if n == 0:
            continue
        x = [p["global_step"] for p in runs[0]["curve"][:n]]
        for ax, (key, _) in zip(axes, keys):
            smooth = []
            for r in runs:
                pts = r["curve"][:n]
                ys = [p[key] if p[key] is not None else math.nan for p in pts]
                first, smoothed = 0, []  # the window stays inside the step's stage
                for i in range(n):
                    first = i if i and pts[i]["stage"] != pts[i - 1]["stage"] else first
                    smoothed.append(statistics.fmean(ys[max(first, i - window + 1): i + 1]))
                smooth.append(smoothed)
            mean = [statistics.fmean(col) for col in zip(*smooth)]
            std = [statistics.stdev(col) if len(col) > 1 else 0.0 for col in zip(*smooth)]
            ax.plot(x, mean, lw=1.3, label=f"{ROWS[row][0]} ({len(runs)} seeds)")
            ax.fill_between(x, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], alpha=0.2)
    for ax, (_, title) in zip(axes, keys):
        for b in sorted(boundaries):
            ax.axvline(b, color="grey", ls=":")
        ax.set_title(f"{title} (moving average over {window} steps within a stage; mean ± std over seeds)", fontsize=9, loc="right")
    axes[0].legend(fontsize=7, loc="best")
    axes[-1].set_xlabel("GRPO step")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------- the CLI

class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help: the module docstring as written (it defines the table's columns), and each flag's default."""


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    ap = argparse.ArgumentParser(description=__doc__, allow_abbrev=False, formatter_class=_HelpFormatter,
                                 epilog="Any other flag is passed to train.py for every run (e.g. --cities 3 --batch-size 4).")
    ap.add_argument("--rows", nargs="+", default=list(DEFAULT_ROWS), choices=list(ROWS),
                    help="the ablation rows to run (sft, sft-rl: the paper's SFT comparison)")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds, one run per row and seed")
    ap.add_argument("--max-steps-per-stage", type=int, default=20,
                    help="GRPO steps per curriculum stage (a one-stage row gets 3x this in its stage; 0: one pass)")
    ap.add_argument("--eval-samples", type=int, default=120,
                    help="held-out questions per evaluation: train.py's end-of-stage ones and the final model's")
    ap.add_argument("--out", default="runs/ablate", help="output folder: <row>/seed-<s>/ per run, ablation.md, ablation.png")
    ap.add_argument("--cache-dir", default=data.CACHE_DIR, help="synthetic worlds and tiny models (as in train.py)")
    ap.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    args, extra = ap.parse_known_args(argv)
    for flag in extra:
        if flag.split("=")[0] in OWN_FLAGS:
            raise ValueError(f"{flag.split('=')[0]} is set by ablate.py for each run (see python -m tools.ablate --help)")
    if args.max_steps_per_stage < 0 or args.eval_samples < 0:
        raise ValueError("--max-steps-per-stage and --eval-samples must be >= 0")
    if len(set(args.seeds)) != len(args.seeds):
        raise ValueError(f"--seeds has repeats: {args.seeds}")
    train.parse_args(extra)  # a bad extra flag stops here, before any run
    return args, extra


def main(argv: list[str] | None = None) -> dict[str, list[dict]]:
    """Run (or skip, when finished earlier) every (row, seed); write ablation.md and ablation.png. Returns
    {row: [each seed's result.json]}."""
    args, extra = parse_args(argv)
    given = sys.argv[1:] if argv is None else list(argv)
    out = Path(args.out)
    t0 = time.time()
    results: dict[str, list[dict]] = {}
    for row in args.rows:
        for seed in args.seeds:
            targv = train_argv(row, seed, args.max_steps_per_stage, args.eval_samples, extra)
            result = run_one(row, seed, targv, out / row / f"seed-{seed}", args.cache_dir)
            results.setdefault(row, []).append(result)
    elapsed = time.time() - t0
    runs_time = sum(r["seconds"] for runs in results.values() for r in runs)
    md = "\n".join([
        f"# RewardMap ablation ({len(args.rows)} rows x {len(args.seeds)} seeds: {', '.join(map(str, args.seeds))})",
        "",
        f"Command: `{' '.join(['python -m tools.ablate'] + ([shlex.join(given)] if given else []))}`",
        (f"Date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}. This call: {elapsed / 60:.1f} min; "
         f"the runs' own training and evaluation: {runs_time / 60:.1f} min."),
        "",
        ("Mean ± sample standard deviation over seeds. Stage lines: means over that stage's GRPO steps and the "
         "end-of-stage evaluation on its question kinds; **whole run** lines: means over every step and the final "
         "model on the same held-out sample of every kind (see `python -m tools.ablate --help` / the docstring of ablate.py)."),
        "",
        table(results),
        "",
    ])
    out.mkdir(parents=True, exist_ok=True)
    (out / "ablation.md").write_text(md)
    plot(results, out / "ablation.png")
    print(md)
    print(f"wrote {out / 'ablation.md'} and {out / 'ablation.png'}")
    return results


if __name__ == "__main__":
    cli.run(main)
