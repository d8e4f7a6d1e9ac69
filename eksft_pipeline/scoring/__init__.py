"""Scoring of math completions, shared by the RL reward (verl calls `reward.compute_score`) and eval.

    answer.py           extraction of the final answer from a completion; the status strings
    normalize.py        answer-string rewrites (thousands separators, choice labels, intervals, ...)
    policy.py           the per-benchmark answer policy (aime, amc, math) for the debatable cases
    verify.py           math-verify in the worker processes (`python -P verify.py --serve`)
    pool.py             the killable verifier worker pool
    cache.py            the verdict LRU cache
    stats.py            process-wide counters
    reward.py           the public API: compute_score (verl), score_batch (eval), configure, reward_stats
The labelled corpus the verifier is measured on is a development tool outside the package:
scripts/devtools/verifier_corpus.py (scripts/make_verifier_corpus.py, scripts/bench_reward.py).

Imports neither stage package: RL (through verl's `custom_reward_function.path=pkg://eksft_pipeline.scoring.reward`)
and eval (`score_samples`) both import it.
"""
