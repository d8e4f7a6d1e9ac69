"""The report's verifier audit: the verifier's risk next to the accuracy, per model and benchmark.

Renders the ``verifier_audit`` block the eval stage writes into each ``metrics.json``
(:mod:`eksft_pipeline.eval.audit`): samples without an extractable answer, samples cut at the length limit,
unparseable golds, verifier failures, and the samples where this project's verdict and plain math-verify's
differ, with a few of them shown. An eval that predates the audit is listed as such, not dropped.
"""

from __future__ import annotations

from typing import Any

_CELL_MAX = 80


def _code(s: str, n: int = _CELL_MAX) -> str:
    s = " ".join(str(s).split())
    s = s if len(s) <= n else s[: n - 1] + "…"
    return "`" + s.replace("`", "'").replace("|", "\\|") + "`" if s else "–"


def _pct(k: int, n: int) -> str:
    return f"{k} ({100 * k / n:.1f}%)" if n else str(k)


def audit_section(evals: list[Any], *, max_examples: int = 3) -> tuple[list[str], dict[str, Any]]:
    """Markdown lines of the "Verifier audit" section and its data, from eval results that have
    ``.label`` and ``.metrics`` (``eksft_pipeline.analysis.gather.EvalResult``)."""
    lines = ["## Verifier audit", "",
             "Scores use this project's verifier (`eksft_pipeline.scoring.reward`, answer policy per benchmark). "
             "Next to it, per model and benchmark: samples without an extractable final answer, samples cut at "
             "the length limit, problems whose gold does not parse (or violates the policy), verifier timeouts "
             "and errors, and how often plain math-verify (verl's `math_verify` reward on the whole completion) "
             "disagrees. Every one of these samples is scored wrong by the project's verifier.", "",
             "| model | benchmark | policy | samples | no answer | truncated (of which no answer) | "
             "unparseable golds | verifier failed | disagree: ours right / math-verify right |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    data: dict[str, Any] = {}
    examples: list[str] = []
    without: list[str] = []
    for e in evals:
        audit = (e.metrics or {}).get("verifier_audit")
        if not audit:
            without.append(e.label)
            continue
        data[e.label] = audit
        for bench, a in sorted(audit.items()):
            n = int(a["n_samples"])
            lines.append(
                f"| {e.label} | {bench} | {a.get('policy', 'auto')} | {n} | {_pct(a['no_answer'], n)} | "
                f"{_pct(a['truncated'], n)} ({a['truncated_no_answer']}) | {a['unparseable_golds']} | "
                f"{a['verifier_failed']} | {_pct(a['disagree'], n)}: {a['ours_right_mv_wrong']} / "
                f"{a['ours_wrong_mv_right']} |")
            for ex in a.get("examples", [])[:max_examples]:
                ours = "right" if ex["acc"] else "wrong"
                theirs = "right" if ex["mv_acc"] else "wrong"
                examples.append(
                    f"- {e.label} / {bench}, problem `{ex['problem_id']}` sample {ex['sample_idx']} "
                    f"(x{ex.get('n_like_this', 1)}): gold {_code(ex['gold'])}; ours {_code(ex['pred'])} {ours}; "
                    f"math-verify {_code(ex['mv_pred'])} {theirs}; completion ends {_code(ex['completion_tail'], 160)}")
        for bench, a in sorted(audit.items()):
            if a.get("unparseable_gold_examples"):
                examples.append(f"- {e.label} / {bench}: unparseable golds "
                                + ", ".join(_code(g) for g in a["unparseable_gold_examples"]))
    if not data:
        lines = ["## Verifier audit", "", "_No eval in these run directories carries a verifier audit "
                 "(evals written before it existed: re-run the eval stage with force=true to add it)._", ""]
        return lines, {}
    lines.append("")
    if without:
        lines += [f"_No audit for {', '.join(without)} (evaluated before the audit existed)._", ""]
    if examples:
        lines += ["Disagreements with plain math-verify and unparseable golds (a few per benchmark):", "", *examples, ""]
    return lines, data
