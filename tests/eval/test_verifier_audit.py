"""The eval stage's scoring columns and verifier audit, the report's audit section, and benchmark config."""

from __future__ import annotations

from types import SimpleNamespace

import pandas as pd
import pytest

from eksft_pipeline.analysis.verifier_audit import audit_section
from eksft_pipeline.eval.audit import verifier_audit
from eksft_pipeline.eval.stage import benchmark_policies, benchmark_specs, score_samples


def _samples() -> pd.DataFrame:
    box = "<think>work</think> The answer is $\\boxed{{{}}}$."
    rows = [
        ("aime24", "p1", 0, box.format("(C)\\ 375"), "stop", "375"),  # ours right, plain math-verify wrong
        ("aime24", "p1", 1, box.format("375"), "stop", "375"),  # both right
        # truncated, no answer (plain math-verify takes the number it finds in the unfinished thinking)
        ("aime24", "p1", 2, "<think>still thinking about 375 and", "length", "375"),
        ("aime24", "p2", 0, box.format("5"), "stop", "1234"),  # gold breaks the AIME policy
        ("math", "p3", 0, box.format("0.001736"), "stop", "\\frac{1}{576}"),  # plain math-verify right
        ("math", "p3", 1, "no box at all: 7", "stop", "\\frac{1}{576}"),  # no answer, not truncated
    ]
    return pd.DataFrame(rows, columns=["benchmark", "problem_id", "sample_idx", "completion", "finish_reason",
                                       "ground_truth"]).assign(n_tokens=10)


def test_scores_carry_both_verdicts_and_the_audit_counts_them():
    pols = benchmark_policies({"aime24": {"path": "x.parquet", "data_source": "aime"}, "math": {"path": "y.parquet"}})
    assert {b: p.name for b, p in pols.items()} == {"aime24": "aime", "math": "math"}
    scores, stats = score_samples(_samples(), pols)
    assert scores["acc"].tolist() == [True, True, False, False, False, False]
    assert scores["mv_acc"].tolist() == [False, True, True, False, True, False]
    assert scores["reason"].tolist() == ["ok", "ok", "no_answer", "gold_unparseable", "ok", "no_answer"]
    assert scores["policy"].tolist() == ["aime"] * 4 + ["math"] * 2
    assert scores["pred"][0] == "375" and scores["mv_pred"][0] == "(C) 375"
    assert stats["items"] == 6 and stats["by_reason"]["gold_unparseable"] == 1

    audit = verifier_audit(scores, policies={"aime24": "aime", "math": "math"}, max_examples=2)
    a, m = audit["aime24"], audit["math"]
    assert (a["n_samples"], a["no_answer"], a["truncated"], a["truncated_no_answer"]) == (4, 1, 1, 1)
    assert (a["unparseable_golds"], a["unparseable_gold_examples"], a["verifier_failed"]) == (1, ["1234"], 0)
    assert (a["disagree"], a["ours_right_mv_wrong"], a["ours_wrong_mv_right"]) == (2, 1, 1)
    ex = {e["pred"]: e for e in a["examples"]}
    assert set(ex) == {"", "375"} and a["policy"] == "aime"
    assert ex["375"]["gold"] == "375" and ex["375"]["mv_pred"] == "(C) 375" and ex["375"]["acc"]
    assert ex["375"]["completion_tail"].endswith("\\boxed{(C)\\ 375}$.") and ex[""]["mv_acc"]
    assert (m["n_samples"], m["no_answer"], m["truncated"], m["disagree"], m["ours_wrong_mv_right"]) == (2, 1, 0, 1, 1)
    with pytest.raises(ValueError, match="mv_acc"):
        verifier_audit(scores.drop(columns=["mv_acc"]))


def test_report_section_shows_the_audit_next_to_each_model():
    scores, _ = score_samples(_samples(), benchmark_policies({"aime24": {"path": "x"}, "math": {"path": "y"}}))
    audit = verifier_audit(scores, policies={"aime24": "aime", "math": "math"})
    evals = [SimpleNamespace(label="eksft (SFT)", metrics={"verifier_audit": audit}),
             SimpleNamespace(label="sft (SFT)", metrics={})]
    lines, data = audit_section(evals)
    text = "\n".join(lines)
    assert "## Verifier audit" in text and set(data) == {"eksft (SFT)"}
    assert "| eksft (SFT) | aime24 | aime | 4 | 1 (25.0%) | 1 (25.0%) (1) | 1 | 0 | 2 (50.0%): 1 / 1 |" in text
    assert "No audit for sft (SFT)" in text
    assert "gold `375`; ours `375` right; math-verify `(C) 375` wrong" in text
    assert "unparseable golds `1234`" in text
    lines, data = audit_section([SimpleNamespace(label="x", metrics={})])
    assert data == {} and "re-run the eval stage" in "\n".join(lines)


def test_benchmark_entries_are_checked_and_eval_benchmarks_overrides_reach_the_model_block():
    from omegaconf import OmegaConf

    from eksft_pipeline.contract.recipes import compose_pipeline
    from eksft_pipeline.data.schema import DataError

    cfg = compose_pipeline("model=qwen3-8b", "eval.benchmarks.aime24.path=/data/mine.parquet",
                           "+eval.benchmarks.hmmt25.system_prompt=S")
    bench = OmegaConf.to_container(cfg.eval.benchmarks, resolve=True)
    assert bench["aime24"]["path"] == "/data/mine.parquet" and bench["amc"]["path"].endswith("luffy_valid_all.parquet")
    specs = benchmark_specs(bench)  # every key of recipes/benchmarks/paper.yaml is allowed
    assert specs[0] == {"path": "/data/mine.parquet", "format": "parquet", "benchmarks": {"aime24": "aime"},
                        "n_problems": 30}
    assert specs[-1]["system_prompt"] == "S"
    assert {b: p.name for b, p in benchmark_policies(bench).items()} == {
        "aime24": "aime", "aime25": "aime", "amc": "amc", "hmmt25": "math"}
    with pytest.raises(DataError, match="answer_feild"):
        benchmark_specs({**bench, "hmmt25": {**bench["hmmt25"], "answer_feild": "x"}})
    with pytest.raises(ValueError, match="benchmark amc: unknown answer policy 'amc12'"):
        benchmark_policies({**bench, "amc": {**bench["amc"], "policy": "amc12"}})
