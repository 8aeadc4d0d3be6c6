"""Write docs/flags.md, the table of train.py's flags (their defaults and help), from TrainConfig itself.

    python -m tools.flags_table          # after changing a field of TrainConfig, RewardConfig or GRPOConfig
"""
from pathlib import Path

import train
from plumbing import flags

HEADER = """# train.py's flags

Every field of `train.TrainConfig` (with the reward's, `rewards.RewardConfig`, and one GRPO step's,
`grpo.GRPOConfig`) is a flag; this table is generated from them (`python -m tools.flags_table`), as is
`python train.py --help`. Booleans take `--x` / `--no-x`. Presets (`--preset paper|released`) and the tiny model's
defaults (`train.TINY_DEFAULTS`) change some defaults; a flag given on the command line always wins.

| flag | default | what it does |
|---|---|---|
"""


def main() -> None:
    rows = [f"| `{name}` | {default} | {help_.replace('|', '/')} |" for name, default, help_ in flags.table(train.TrainConfig)]
    path = Path(__file__).resolve().parents[1] / "docs" / "flags.md"
    path.write_text(HEADER + "\n".join(rows) + "\n")
    print(f"wrote {path} ({len(rows)} flags)")


if __name__ == "__main__":
    main()
