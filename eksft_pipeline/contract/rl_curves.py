"""What the DAPO metrics file says about the benchmark curves and the rollout-vs-trainer mismatch (no verl import;
shared by the RL stage and the report, which do not import each other).

Read by the RL stage (its manifest summary) and the report (analysis/plots.py, analysis/stage.py) from the
`metrics.json` the stage writes (step -> verl's logged metrics).

verl's validation (verl/trainer/ppo/v1/trainer_base.py `_validate` -> `_val_metrics_update`) logs, per data_source,
`val-core/<data_source>/acc/mean@<n>`: the mean over problems of each problem's accuracy over its n samples, i.e.
the pass@1 estimate avg@n of the eval stage; the RL stage writes the benchmark name as data_source.
"""

from __future__ import annotations

import re

VAL_KEY = re.compile(r"^val-(?:core|aux)/(?P<bench>.+)/acc/mean@(?P<n>\d+)$")

# the rollout-vs-trainer log-prob mismatch (verl: rollout_corr_helper.compute_offpolicy_metrics and, with
# rollout.calculate_log_probs, utils/debug/metrics.calculate_debug_metrics), and what the correction did
MISMATCH_PANELS = (
    ("rollout_corr/kl", "KL(π_rollout ‖ π_old), per token"),
    ("rollout_corr/k3_kl", "k3 KL estimate"),
    ("rollout_corr/log_ppl_abs_diff", "|log PPL_rollout − log PPL_old|"),
    ("rollout_corr/chi2_token", "χ² (token)"),
    ("training/rollout_probs_diff_mean", "mean |p_rollout − p_old|"),
    ("training/rollout_probs_diff_max", "max |p_rollout − p_old|"),
    ("rollout_corr/rollout_is_mean", "mean IS weight (correction on)"),
    ("rollout_corr/rollout_is_ratio_fraction_high", "IS weights truncated (fraction)"),
    ("rollout_corr/rollout_rs_masked_fraction", "tokens rejected (fraction)"),
)


def val_curves(metrics: dict[int, dict]) -> dict[str, dict[int, float]]:
    """benchmark -> {step: pass@1} from verl's validation metrics. Step 0 is the model before the first DAPO step."""
    out: dict[str, dict[int, float]] = {}
    for step, m in sorted(metrics.items(), key=lambda kv: int(kv[0])):
        for k, v in m.items():
            hit = VAL_KEY.match(k)
            if hit and v is not None:
                out.setdefault(hit["bench"], {})[int(step)] = float(v)
    return out


def val_n(metrics: dict[int, dict]) -> int | None:
    """Samples per problem of the validation (the `@<n>` of its keys), None if it never ran."""
    ns = {int(h["n"]) for m in metrics.values() for k in m if (h := VAL_KEY.match(k))}
    return max(ns) if ns else None


def val_points(metrics: dict[int, dict]) -> list[int]:
    """The steps at which verl's validation logged a benchmark pass@1."""
    return sorted({s for c in val_curves(metrics).values() for s in c})


def expected_val_points(total_steps: int, every: int, before: bool = True) -> list[int]:
    """verl's V1 trainer validates before training (step 0, `val_before_train`), at every `every`-th step and at
    the last step (verl/trainer/ppo/v1/trainer_base.py, fit)."""
    pts = {s for s in range(1, total_steps + 1) if s % every == 0} | {total_steps}
    return sorted(pts | ({0} if before else set()))


def mismatch_keys(metrics: dict[int, dict]) -> list[tuple[str, str]]:
    """The (key, title) pairs of MISMATCH_PANELS that the run logged."""
    have = {k for m in metrics.values() for k in m}
    return [(k, t) for k, t in MISMATCH_PANELS if k in have]
