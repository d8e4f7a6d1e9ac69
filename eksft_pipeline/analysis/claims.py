"""The paper's qualitative claims about EKSFT vs SFT, checked on this run's numbers (measured, not assumed).

Compared: the `eksft` and `sft` methods (their recipe defaults, i.e. the stage tags `eksft` and `sft`) when both
were run into the gathered run directories. Each claim gets the numbers it rests on and a verdict:

1. Entropy kept after SFT: mean next-token entropy on identical reference solutions (teacher forced, the
   report's case-study examples) and the policy entropy DAPO logs at its first step (`actor/entropy`, on the
   SFT model's own rollouts) -- EKSFT above SFT.
2. Less parameter drift: relative L2 change of the weights vs the reference model (fp32 and bf16, paper App. C)
   and the fraction of weights changed by more than 1e-3 -- EKSFT below SFT.
3. pass@k at large k not below SFT: pass@n (n = samples drawn; "any of n correct") of the SFT and SFT→RL models,
   mean over benchmarks, with a paired bootstrap CI of EKSFT − SFT over problems.
4. Headline: pass@1 of EKSFT vs SFT (SFT and SFT→RL), paired CI.

Verdicts: "holds" / "does not hold" on the point estimate; for the pass@k comparisons, "holds" when the
difference is >= 0, "within noise" when it is below 0 but the 95% CI includes 0, "does not hold" otherwise.
"""

from __future__ import annotations

from typing import Any

from eksft_pipeline.analysis.compare import paired_diff
from eksft_pipeline.analysis.gather import RunData

A, B = "eksft", "sft"


def _eval(data: RunData, init: str, target: str):
    return next((e for e in data.evals if e.init == init and e.target == target), None)


def _per_problem(e, passn: bool) -> dict[str, dict[str, float]] | None:
    out = {}
    for b, m in e.benchmarks.items():
        acc = m.get("per_problem_acc")
        if acc is None:
            return None
        out[b] = {p: float(a > 0) for p, a in acc.items()} if passn else dict(acc)
    return out


def _cmp_verdict(diff: float, lo: float) -> str:
    if diff >= 0:
        return "holds"
    return "within noise" if lo <= 0 else "does not hold"


def qualitative_claims(data: RunData, entropy: dict[str, float] | None = None, *, n_boot: int = 1000,
                       seed: int = 0) -> tuple[list[str], list[dict[str, Any]]]:
    """(markdown lines, rows) of the claims table; empty when `eksft` and `sft` were not both run."""
    if A not in data.method_cfg or B not in data.method_cfg:
        return [], []
    rows: list[dict[str, Any]] = []

    def add(claim, measure, a, b, verdict, detail=""):
        rows.append({"claim": claim, "measure": measure, A: a, B: b, "verdict": verdict, "detail": detail})

    # 1. entropy
    entropy = entropy or {}
    ea, eb = entropy.get(f"{A} (SFT)"), entropy.get(f"{B} (SFT)")
    if ea is not None and eb is not None:
        add("EKSFT keeps more entropy than SFT", "mean token entropy on reference solutions (nats)", ea, eb,
            "holds" if ea > eb else "does not hold")
    ra, rb = data.rl_metrics.get(A), data.rl_metrics.get(B)
    if ra and rb:
        ka, kb = ra[min(ra)].get("actor/entropy"), rb[min(rb)].get("actor/entropy")
        if ka is not None and kb is not None:
            add("EKSFT keeps more entropy than SFT", "DAPO step-1 policy entropy on own rollouts (nats)", ka, kb,
                "holds" if ka > kb else "does not hold")
    # 2. drift
    da, db = data.drift.get(A), data.drift.get(B)
    if da and db:
        for prec in ("fp32", "bf16"):
            oa = (da.get("by_precision") or {}).get(prec) or (da["overall"] if prec == "fp32" else None)
            ob = (db.get("by_precision") or {}).get(prec) or (db["overall"] if prec == "fp32" else None)
            if oa is None or ob is None:
                continue
            add("EKSFT drifts less than SFT", f"relative L2 change of the weights ({prec})", oa["rel_norm"],
                ob["rel_norm"], "holds" if oa["rel_norm"] < ob["rel_norm"] else "does not hold")
            fa, fb = oa["frac_over"].get("0.001"), ob["frac_over"].get("0.001")
            if fa is not None and fb is not None:
                add("EKSFT drifts less than SFT", f"fraction of weights with relative change > 1e-3 ({prec})", fa, fb,
                    "holds" if fa < fb else "does not hold")
    # 3-4. pass@k at large k, pass@1
    for target, label in (("sft", "SFT"), ("rl", "SFT→RL")):
        xa, xb = _eval(data, A, target), _eval(data, B, target)
        if xa is None or xb is None:
            continue
        for passn, claim in ((True, "pass@k at large k not below SFT"), (False, "EKSFT pass@1 not below SFT")):
            pa, pb = _per_problem(xa, passn), _per_problem(xb, passn)
            if pa is None or pb is None:
                continue
            try:
                res = paired_diff(pb, pa, n_boot=n_boot, seed=seed)  # EKSFT - SFT
            except ValueError:
                continue
            n = min(int(m["n_samples"]) for m in xa.benchmarks.values())
            ma = sum(sum(v.values()) / len(v) for v in pa.values()) / len(pa)
            mb = sum(sum(v.values()) / len(v) for v in pb.values()) / len(pb)
            lo, hi = res["ci95"]
            add(claim, f"{'pass@' + str(n) if passn else 'pass@1'} of the {label} models (mean over benchmarks)",
                ma, mb, _cmp_verdict(res["diff"], lo),
                f"Δ = {100 * res['diff']:+.1f} points, 95% CI [{100 * lo:+.1f}, {100 * hi:+.1f}]")
    if not rows:
        return [], []
    lines = [f"| claim | measure | {A} | {B} | verdict | paired Δ (EKSFT − SFT) |", "|---|---|---:|---:|---|---|"]
    for r in rows:
        lines.append(f"| {r['claim']} | {r['measure']} | {r[A]:.4g} | {r[B]:.4g} | {r['verdict']} | "
                     f"{r['detail'] or '–'} |")
    return lines, rows
