"""The soak (tools/soak.py) at its CI size: a small run killed 20 times with SIGKILL at seeded random moments, some
while a checkpoint is being written, resumed each time; its final metrics.jsonl and model/ equal an uninterrupted
run's. ~80 s on 2 busy CPU cores."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_twenty_kills_and_resumes_end_where_an_uninterrupted_run_ends(tmp_path):
    out = tmp_path / "soak"
    done = subprocess.run([sys.executable, "-m", "tools.soak", "--kills", "20", "--seed", "0", "--out", str(out)],
                          cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((out / "soak.json").read_text())
    assert report["same_metrics"] and report["same_weights"] and report["final_status"] == 0
    assert len(report["launches"]) == 20 and report["steps"] == 24
    assert report["during_save"] >= 3, report  # kills that landed while a checkpoint was being written
    # and the kills spread over the run, past the first stage's end (step 8), not all at its start
    assert max(k["from_step"] for k in report["launches"]) >= 8, [k["from_step"] for k in report["launches"]]
