"""Verifier audit of one evaluated model: what the accuracy numbers rest on, per benchmark.

Computed by the eval stage from its ``scores.parquet`` (columns ``benchmark``, ``problem_id``, ``sample_idx``,
``completion``, ``finish_reason``, ``ground_truth``, ``acc``, ``pred``, ``reason`` from the project's reward,
and ``mv_acc``, ``mv_pred``, ``mv_reason`` from plain math-verify, see :mod:`eksft_pipeline.scoring.verify`) and
stored in ``metrics.json`` under ``verifier_audit``; the report renders it next to the accuracy
(:mod:`eksft_pipeline.analysis.verifier_audit`). Per benchmark:

    n_samples                 scored completions
    no_answer                 samples without an extractable final answer (no box, empty or unclosed box,
                              over-long / over-deep answers)
    truncated                 samples cut at the length limit (finish_reason == "length")
    truncated_no_answer       ... of which had no answer
    unparseable_golds         problems whose gold does not parse or violates the benchmark's answer policy
    verifier_failed           samples whose check timed out or errored (scored wrong, counted here)
    disagree                  samples where the project's verdict and plain math-verify's differ,
    ours_right_mv_wrong       ... split by direction
    ours_wrong_mv_right
    examples                  up to ``max_examples`` disagreements (gold, both extracted answers, the end
                              of the completion), most frequent answer pairs first
"""

from __future__ import annotations

from typing import Any

import pandas as pd

NO_ANSWER_REASONS = ("no_answer", "pred_too_long", "pred_too_deep")
FAILED_REASONS = ("timeout", "error")


def _examples(d: pd.DataFrame, max_examples: int, tail_chars: int) -> list[dict[str, Any]]:
    if d.empty:
        return []
    # one example per distinct (gold, pred, mv_pred), the most frequent first, then in a stable order
    keyed = d.assign(_key=list(zip(d["ground_truth"].astype(str), d["pred"].astype(str), d["mv_pred"].astype(str))))
    counts = keyed["_key"].value_counts()
    order = sorted(counts.index, key=lambda k: (-counts[k], k))
    out = []
    for key in order[:max_examples]:
        row = keyed[keyed["_key"] == key].sort_values(["problem_id", "sample_idx"]).iloc[0]
        text = str(row["completion"])
        out.append({
            "problem_id": str(row["problem_id"]),
            "sample_idx": int(row["sample_idx"]),
            "gold": str(row["ground_truth"]),
            "pred": str(row["pred"]),
            "mv_pred": str(row["mv_pred"]),
            "acc": bool(row["acc"]),
            "mv_acc": bool(row["mv_acc"]),
            "n_like_this": int(counts[key]),
            "completion_tail": text[-tail_chars:],
        })
    return out


def verifier_audit(scores: pd.DataFrame, *, policies: dict[str, str] | None = None, max_examples: int = 3,
                   tail_chars: int = 240) -> dict[str, dict[str, Any]]:
    """Per-benchmark audit (see module docstring); ``policies``: benchmark -> answer policy name, recorded."""
    need = {"benchmark", "problem_id", "sample_idx", "completion", "finish_reason", "ground_truth", "acc", "pred",
            "reason", "mv_acc", "mv_pred"}
    missing = sorted(need - set(scores.columns))
    if missing:
        raise ValueError(f"verifier_audit: scores lack column(s) {missing}")
    out: dict[str, dict[str, Any]] = {}
    for bench, d in scores.groupby("benchmark", sort=True):
        no_ans = d["reason"].isin(NO_ANSWER_REASONS)
        trunc = d["finish_reason"].astype(str) == "length"
        gold_bad = d[d["reason"] == "gold_unparseable"]
        acc, mv = d["acc"].astype(bool), d["mv_acc"].astype(bool)
        dis = d[acc != mv]
        out[str(bench)] = {
            "policy": (policies or {}).get(str(bench), "auto"),
            "n_samples": int(len(d)),
            "no_answer": int(no_ans.sum()),
            "truncated": int(trunc.sum()),
            "truncated_no_answer": int((trunc & no_ans).sum()),
            "unparseable_golds": int(gold_bad["problem_id"].nunique()),
            "unparseable_gold_examples": sorted(gold_bad["ground_truth"].astype(str).unique().tolist())[:3],
            "verifier_failed": int(d["reason"].isin(FAILED_REASONS).sum()),
            "disagree": int(len(dis)),
            "ours_right_mv_wrong": int((acc & ~mv).sum()),
            "ours_wrong_mv_right": int((~acc & mv).sum()),
            "examples": _examples(dis, max_examples, tail_chars),
        }
    return out
