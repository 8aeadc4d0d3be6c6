"""What every run needs and nobody reads for the method: command-line errors and strict JSON (cli.py), flags
generated from config dataclasses (flags.py), checkpoints and resume (checkpoints.py), dashboards and curves (report.py)."""
