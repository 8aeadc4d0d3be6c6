"""Live dashboards for a training run: `--report-to tensorboard|wandb|none` (docs: README "Flags").

    rep = report.open_reporter("tensorboard", out, config, run_name)   # None for "none"
    report.log_step(rep, row, global_step)          # the numbers of one metrics.jsonl line
    report.log_samples(rep, global_step, records)   # a few responses with their reward parts, as a table
    report.close(rep)

metrics.jsonl stays the record of a run; a reporter only mirrors it where people watch runs. Every function
takes None (no reporter) and then does nothing, so the caller needs no `if`. Only rank 0 reports: under
torchrun the caller opens a reporter on `distributed.is_main()` alone and passes None on the other ranks
(one run, one set of curves). tensorboard and wandb are optional and imported only when asked for, so
importing this module needs neither; a missing one is an ImportError naming the package and its pip command
(the CLI prints it as `error: ...`).
"""
from __future__ import annotations

import importlib
import json
import math
import numbers
from dataclasses import dataclass
from pathlib import Path

KINDS = ("none", "tensorboard", "wandb")


@dataclass
class Reporter:
    """The open backend: a SummaryWriter (tensorboard) or a wandb run, plus the wandb module (for Table)."""

    kind: str
    backend: object
    wandb: object = None


def _need(package: str, *modules: str):
    """Import `modules` (default: the package), turning a missing package into a one-line, fixable error."""
    try:
        return [importlib.import_module(m) for m in (modules or (package,))][-1]
    except ImportError as e:
        raise ImportError(f"--report-to {package} needs the package {package} ({e}): pip install {package}") from None


def open_reporter(kind: str, out_dir: Path, config: dict, run_name: str, resume_step: int | None = None) -> Reporter | None:
    """Start reporting a run to `kind`. tensorboard: event files under out_dir/tensorboard (`tensorboard --logdir
    out_dir`); a resumed run passes `resume_step` (its global step) so the events a killed run wrote past its
    checkpoint are hidden, as train.truncate_metrics does for metrics.jsonl. wandb: project "rewardmap", files
    under out_dir/wandb, mode from WANDB_MODE as usual (offline: no account or network needed)."""
    if kind not in KINDS:
        raise ValueError(f"--report-to must be one of {', '.join(KINDS)}, got {kind!r}")
    if kind == "none":
        return None
    if kind == "tensorboard":
        tb = _need("tensorboard", "tensorboard", "torch.utils.tensorboard")
        writer = tb.SummaryWriter(log_dir=str(Path(out_dir) / "tensorboard"), purge_step=resume_step)
        if not resume_step:  # a resumed run's config is the same (train.check_resume_config); shown once
            writer.add_text("config", _markdown([{"flag": k, "value": v} for k, v in config.items()]), 0)
        return Reporter(kind, writer)
    wandb = _need("wandb")
    try:
        run = wandb.init(project="rewardmap", dir=str(out_dir), config=config, name=run_name)
    except Exception as e:  # no login, no network: the user's to fix, so one line rather than a traceback
        raise ValueError(f"--report-to wandb: wandb.init failed ({e}); `wandb login`, or set WANDB_MODE=offline") from e
    return Reporter(kind, run, wandb)


def scalars(row: dict, prefix: str = "") -> dict[str, float]:
    """The finite numbers of `row`, nested dicts flattened to "a/b" keys (so an eval summary logs as is);
    strings, lists, None and NaN/inf (null in metrics.jsonl) are left out. Keys keep their slashes, which both
    dashboards use as groups ("reward/total" sits under "reward")."""
    out = {}
    for k, v in row.items():
        if isinstance(v, dict):
            out.update(scalars(v, f"{prefix}{k}/"))
        elif isinstance(v, numbers.Real) and math.isfinite(v):
            out[prefix + k] = float(v)
    return out


def log_step(reporter: Reporter | None, row: dict, step: int) -> None:
    """Report the numbers of one step (a metrics.jsonl row) at `step` (the global step: it never goes back
    across stages). tensorboard is flushed each step, so a killed run's curves end where its metrics.jsonl does."""
    if reporter is None:
        return
    values = scalars(row)
    if reporter.kind == "tensorboard":
        for k, v in values.items():
            reporter.backend.add_scalar(k, v, step)
        reporter.backend.flush()
    else:
        reporter.backend.log(values, step=step)


def _cell(value, max_chars: int = 1500) -> str:
    """One markdown table cell: '|' escaped and newlines as <br>, so a response cannot break the table."""
    text = f"{value:.4g}" if isinstance(value, float) else str(value)
    text = text if len(text) <= max_chars else text[:max_chars] + " ..."
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\r", "").replace("\n", "<br>")


def _markdown(records: list[dict]) -> str:
    """`records` (dicts with the same keys) as a markdown table, columns in the first record's order."""
    columns = list(records[0]) if records else []
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(_cell(r.get(c, "")) for c in columns) + " |" for r in records])


def sample_records(samples: list, responses: list[str], reward_fn, group_size: int, n: int = 4) -> list[dict]:
    """What log_samples shows of a GRPO step: the first response to each of the first `n` prompts (response
    i answers samples[i // group_size], as grpo.grpo_step returns them), re-scored by `reward_fn`."""
    records = []
    for sample, text in list(zip(samples, responses[::group_size]))[:n]:
        r = reward_fn(sample, text)
        records.append({"qtype": sample.qtype, "question": sample.question, "answer": sample.answer, "response": text,
                        "total": r.total, "format": r.format, "correctness": r.correctness, "detail": r.detail})
    return records


def log_samples(reporter: Reporter | None, step: int, records: list[dict]) -> None:
    """Report a few sampled responses as a table (reading them is how reward hacking and format drift show
    up): tensorboard text "samples" (a markdown table), wandb Table "samples"."""
    if reporter is None or not records:
        return
    if reporter.kind == "tensorboard":
        reporter.backend.add_text("samples", _markdown(records), step)
        reporter.backend.flush()
    else:
        columns = list(records[0])
        table = reporter.wandb.Table(columns=columns, data=[[r.get(c) for c in columns] for r in records])
        reporter.backend.log({"samples": table}, step=step)


def close(reporter: Reporter | None) -> None:
    """Flush and close the event files, or finish the wandb run (uploads what offline mode kept)."""
    if reporter is None:
        return
    if reporter.kind == "tensorboard":
        reporter.backend.close()
    else:
        reporter.backend.finish()


def plot_curves(metrics_path: Path, png: Path) -> None:
    """Reward components, accuracy and KL per step, with dotted lines at stage boundaries."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(l) for l in metrics_path.read_text().splitlines() if l.strip()]
    if not rows:
        return
    x = [r["global_step"] for r in rows]
    panels = [("reward", ["reward/total", "reward/format", "reward/correctness", "reward/detail"]),
              ("accuracy", ["reward/accuracy", "groups/zero_std_frac"]), ("KL to reference", ["kl"])]
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 8), sharex=True)
    for ax, (title, keys) in zip(axes, panels):
        for k in keys:
            if k in rows[0]:
                ax.plot(x, [r.get(k, math.nan) for r in rows], label=k, lw=1)
        ax.set_title(title, fontsize=10, loc="right")
        ax.legend(fontsize=7, loc="upper left")
        for prev, cur in zip(rows, rows[1:]):
            if cur["stage"] != prev["stage"]:
                ax.axvline(cur["global_step"] - 0.5, color="grey", ls=":")
    for prev, cur in [(None, rows[0])] + list(zip(rows, rows[1:])):
        if prev is None or cur["stage"] != prev["stage"]:
            axes[0].annotate(cur["stage"], (cur["global_step"], 1.0), xycoords=("data", "axes fraction"), fontsize=8, va="bottom")
    axes[-1].set_xlabel("GRPO step")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
