"""scripts/probe_tool_twin.py: the tool-use twin's plain-PyTorch SFT probe runs on a real tool split, and bad input
is one line. The findings it produced are in README "Tool use", the CPU twin."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "probe_tool_twin.py"


def test_missing_split_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path)], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode != 0
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "sft_train.parquet is missing" in err[0] and "tool split" in err[0], proc.stderr


@pytest.mark.slow
def test_probe_trains_and_scores_every_category(complete_tiny_run, tmp_path):
    """A tool split of the tiny assets (built by the shared run), 4 probe steps: the loss falls and every category
    of the twin's BFCL-layout eval is scored by BFCL's checker."""
    run_dir = tmp_path / "tu"
    subprocess.run([sys.executable, "-m", "eksft_pipeline", "task=tool_use", "stage=split", f"run_dir={run_dir}",
                    "task.data.tiny.n_train=64", "task.data.tiny.n_eval_per_category=2"], cwd=REPO, check=True,
                   capture_output=True)  # fmt: skip
    proc = subprocess.run([sys.executable, str(SCRIPT), str(run_dir / "split"), "--steps", "4", "--batch", "4",
                           "--eval-per-category", "2", "--prompt", "bare"], capture_output=True, text=True, cwd=REPO,
                          timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    losses = [float(x) for x in re.findall(r"\[probe\] step \d+ loss ([0-9.]+)", proc.stdout)]
    assert len(losses) == 2 and losses[-1] < losses[0], proc.stdout  # steps 0 and 3
    summary = re.search(r"\[probe\] correct: (.*) \(", proc.stdout).group(1)
    got = dict(re.findall(r"(\w+) (\d+/\d+)", summary))
    assert set(got) == {"live_simple", "live_multiple", "live_parallel", "live_parallel_multiple", "irrelevance"}
    assert all(v.endswith("/2") for v in got.values()), summary
