"""task=tool_use end to end on CPU (the CPU twin of the paper's App. I experiment), part of `make test`.

`python -m eksft_pipeline task=tool_use method=sft` in a fresh run directory: assets -> tool split (the generated
twin in ACEBench's layout; the run tokenizer gets <tool_call> / </tool_call> and the twin's tool-format strings as
added tokens) -> SFT through verl as a Ray job (the tiny recipe's `model.task_sft.tool_use`) -> BFCL-layout eval of
the base and SFT models scored by BFCL's own AST checker -> Tables 10-11 report. Asserts every stage completed and
wrote its files, and that SFT raised BFCL live with the report's paired bootstrap CI above zero (issue 25; README
"Tool use", the CPU twin).

Cost on 2 idle cores: ~6 minutes (SFT ~2 s a step of 16 rows of ~160 tokens, eval of base and SFT ~1.5 minutes);
the assets are the maths end-to-end run's (built once). EKSFT_TEST_TOOL_RUN=<run_dir> checks a finished run instead.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tool_run(tmp_path_factory):
    reuse = os.environ.get("EKSFT_TEST_TOOL_RUN")
    if reuse and (Path(reuse) / "manifest.json").is_file():
        return Path(reuse)
    run_dir = tmp_path_factory.mktemp("tool_e2e") / "run"
    log = run_dir.parent / "pipeline.log"
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, "-m", "eksft_pipeline", "task=tool_use", "method=sft",
                               f"run_dir={run_dir}"], cwd=REPO, stdout=f, stderr=subprocess.STDOUT, timeout=1800,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})  # fmt: skip
    if proc.returncode != 0:
        pytest.fail(f"task=tool_use run failed (exit {proc.returncode}):\n{log.read_text()[-3000:]}")
    return run_dir


def test_stages_complete_and_files(tool_run):
    stages = json.loads((tool_run / "manifest.json").read_text())["stages"]
    for key in ("assets", "split", "sft/sft", "eval/sft", "report"):
        assert stages[key]["status"] == "complete", key
    assert "rl/sft" not in stages and "handoff/sft" not in stages  # no RL in this task
    # the tiny tokenizer got Qwen3's <tool_call> / </tool_call> and the twin's format strings as added tokens;
    # the SFT model carries them
    from eksft_pipeline.data.tool_use.format import TWIN_FORMAT_TOKENS

    assert stages["split"]["summary"]["added_tokens"] == ["<tool_call>", "</tool_call>"]
    assert stages["split"]["summary"]["format_tokens"] == len(TWIN_FORMAT_TOKENS)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tool_run / "sft" / "sft" / "hf_model")
    assert len(tok("<tool_call></tool_call>").input_ids) == 2 and len(tok('{"name": "').input_ids) == 1
    rep = json.loads((tool_run / "split" / "split_report.json").read_text())
    assert rep["task"] == "tool_use" and rep["n_sft"] + rep["n_unused"] + rep["n_dropped"] == rep["n_input"]
    for t in ("base", "sft"):
        met = json.loads((tool_run / "eval" / "sft" / t / "metrics.json").read_text())
        assert set(met["bfcl"]["categories"]) == {"live_simple", "live_multiple", "live_parallel",
                                                  "live_parallel_multiple", "irrelevance", "live_irrelevance"}
    for f in ("report.md", "table10.csv", "table11.csv", "rates.csv", "moved.csv"):
        assert (tool_run / "report" / f).is_file(), f


def test_sft_raises_bfcl_live_with_a_ci_above_zero(tool_run):
    """SFT measurably learnt the twin's tool calls: the report's paired bootstrap CI of BFCL live (SFT minus base,
    the same held-out entries; report.json "moved") lies above zero, and the SFT model's calls parse."""
    rep = json.loads((tool_run / "report" / "report.json").read_text())
    mv = {r["Method"]: r for r in rep["moved"]}
    assert "sft" in mv, f"no base -> sft comparison in the report: {rep['moved']}"
    r = mv["sft"]
    base, sft = (json.loads((tool_run / "eval" / "sft" / t / "metrics.json").read_text())["bfcl"] for t in ("base", "sft"))
    msg = (f"BFCL live {base['live_overall']['score']:.1f} -> {sft['live_overall']['score']:.1f} "
           f"({base['live_overall']['n']} entries), moved {r['BFCL live']}; SFT rates {sft['rates']}")
    print(f"\n[e2e] tool use: {msg}")
    assert r["BFCL live ci_low"] > 0, f"SFT did not measurably raise BFCL live: {msg}"
    assert sft["rates"]["parse_failure"] < 50, msg
