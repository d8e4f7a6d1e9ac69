"""The embedded CPU default end to end: `python -m eksft_pipeline` (what `make reproduce MODEL=tiny` runs).

assets -> split -> EKSFT through verl -> handoff -> DAPO through verl's main_ppo -> eval -> report, in a
fresh run directory, on this machine's CPU. Asserts that every stage completed, wrote its files, and
that the report carries every stage's numbers.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[1]
STAGES = ["assets", "split", "sft/eksft", "handoff/eksft", "rl/eksft", "eval/eksft", "report"]


def test_tiny_pipeline_end_to_end(tiny_run):
    """The run itself is the session fixture `tiny_run` (tests/conftest.py), shared with the fault-injection suite."""
    run_dir, cmd, text, wall = tiny_run.run_dir, list(tiny_run.cmd), tiny_run.log, tiny_run.wall_s
    assert tiny_run.returncode == 0, text[-5000:]
    print(f"\n[e2e] tiny pipeline: {wall:.0f}s")

    manifest = json.loads((run_dir / "manifest.json").read_text())["stages"]
    for key in STAGES:
        assert manifest[key]["status"] == "complete", (key, manifest.get(key))
    s = {k: manifest[k]["summary"] for k in STAGES}
    assert s["split"]["n_sft"] == 300 and s["split"]["n_rl"] > 1000
    assert s["sft/eksft"]["steps"] > 0 and s["sft/eksft"]["drift_rel_norm"] > 0
    assert all(s["handoff/eksft"][c] for c in ("weights", "template", "eos", "context"))
    assert s["rl/eksft"]["steps"] == 4 and "score_mean_last" in s["rl/eksft"]
    assert set(s["eval/eksft"]) >= {"sft", "rl"}

    out = {k: v["path"] for k, v in manifest["rl/eksft"]["outputs"].items()}
    assert out["hf_model"] == "rl/eksft/hf_model"  # recorded relative to the run dir
    assert (run_dir / out["hf_model"] / "model.safetensors").is_file()
    # the console shows the pipeline's lines and training progress, not verl's config dump
    assert "step 4/4" in text and len(text.splitlines()) < 200, len(text.splitlines())
    for target in ("sft", "rl"):
        d = run_dir / "eval" / "eksft" / target
        assert (d / "samples.parquet").is_file() and (d / "scores.parquet").is_file()
        m = json.loads((d / "metrics.json").read_text())
        assert set(m["benchmarks"]) == {"tiny_add", "tiny_linear"}
        assert set(m["verifier_audit"]) == {"tiny_add", "tiny_linear"}  # the verifier audit (issue 15)

    report = run_dir / "report" / "report.md"
    md = report.read_text()
    assert f"report: {report}" in text.splitlines()[-1]
    for needle in ("Table 1: avg@n = pass@1", "eksft (SFT)", "eksft (SFT→RL)", "![pass@k](pass_at_k.png)",
                   "![drift](drift.png)", "IoU(M_H, M_KL)", "![rl curves](rl_curves.png)",
                   "token_probs.png", "## Verifier audit"):
        assert needle in md, needle
    for key in STAGES[:-1]:
        assert f"| {key} | complete |" in md, key
    for f in ("table_pass1.csv", "table_passk.csv", "pass_at_k.png", "drift.png", "sft_curves.png",
              "rl_curves.png", "case_study/token_probs.html", "report.json"):
        assert (run_dir / "report" / f).stat().st_size > 0, f

    # a second invocation skips every complete stage (tiny_run is shared: this changes nothing in it)
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0
    for key in STAGES:
        assert f"{key}: complete, skipped" in again.stdout, key
