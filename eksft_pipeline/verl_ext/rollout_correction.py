"""verl 0.9.1's rollout correction (``algorithm.rollout_correction``) as named presets, and which of them its V1 trainer
applies.

The rollout engine (vLLM in bf16, or the ``hf_cpu`` server) and the FSDP trainer compute slightly different
log-probabilities for the same tokens; verl's rollout correction (verl/trainer/ppo/rollout_corr_helper.py) reweights
(truncated importance sampling, TIS: ``rollout_is`` + ``rollout_is_threshold``; IcePop: a ``"lower_upper"``
threshold) or masks (rejection sampling: ``rollout_rs`` + ``rollout_rs_threshold``) the policy-gradient terms by the
ratio of the trainer's old log-probs to the rollout's. A preset is one of the classmethods of verl's
``RolloutCorrectionConfig`` (``decoupled_token_is`` = token TIS, ``decoupled_seq_is_rs`` = sequence MIS, ...); the RL
stage's ``rl.rollout_correction: <preset>`` writes its fields into ``algorithm.rollout_correction``.

Which presets run as named on the V1 sync trainer (verl/trainer/ppo/v1/trainer_base.py, read for 0.9.1):

* decoupled mode (``bypass_mode=false``): ``_compute_advantage`` calls ``compute_rollout_correction_and_add_to_batch``
  whenever ``rollout_log_probs`` exist (the recipes set ``rollout.calculate_log_probs=true``): IS weights go to the
  actor's loss (workers/utils/losses.py multiplies ``pg_losses`` by them) and rejection edits ``response_mask``. With
  ``rollout_is`` and ``rollout_rs`` both null (DAPO as published, the default) it only logs the mismatch metrics
  (``rollout_corr/kl``, ``rollout_corr/log_ppl_abs_diff``, ``rollout_corr/chi2_token``, ...).
* bypass mode (``bypass_mode=true``): ``_compute_old_log_prob`` only replaces the old log-probs by the rollout's; the
  actor keeps its own ``policy_loss.loss_mode`` (vanilla PPO clip), and no IS weight, rejection or
  ``rollout_corr/`` metric is computed (the legacy trainer's ``apply_bypass_mode`` is not called by V1). So only
  ``bypass_ppo_clip`` (PPO clip against the rollout policy, no IS, no RS) does what its name says; the other bypass
  presets (REINFORCE loss, IS/RS in the actor) would silently run as ``bypass_ppo_clip`` and are refused.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

from verl.trainer.config.algorithm import RolloutCorrectionConfig

FIELDS = tuple(f.name for f in dataclasses.fields(RolloutCorrectionConfig) if not f.name.startswith("_"))
# verl's own "off" values (its rollout_correction.yaml: metrics only) = DAPO as published
OFF = {"rollout_is": None, "rollout_rs": None, "bypass_mode": False}


def presets() -> dict[str, dict[str, Any]]:
    """Every preset classmethod of verl's ``RolloutCorrectionConfig`` -> its fields."""
    out = {}
    for name, fn in inspect.getmembers(RolloutCorrectionConfig, predicate=inspect.ismethod):
        if name.startswith("_") or name == "from_dict":
            continue
        try:
            cfg = fn()
        except TypeError:  # a classmethod that needs arguments is not a preset
            continue
        if isinstance(cfg, RolloutCorrectionConfig):
            out[name] = {f: getattr(cfg, f) for f in FIELDS}
    return out


def unsupported_reason(block: dict[str, Any]) -> str | None:
    """Why the V1 trainer would not apply ``block`` as configured (None: it would). See the module docstring."""
    if not block.get("bypass_mode"):
        return None
    extra = [f"{k}={block.get(k)!r}" for k in ("rollout_is", "rollout_rs") if block.get(k) is not None]
    if block.get("loss_type", "ppo_clip") != "ppo_clip":
        extra.append(f"loss_type={block.get('loss_type')!r}")
    if not extra:
        return None
    return (f"bypass_mode=true with {', '.join(extra)}: verl 0.9.1's V1 trainer only swaps the old log-probs for the "
            "rollout's in bypass mode and applies no IS weight, rejection or REINFORCE loss there (it would run as "
            "bypass_ppo_clip); use a decoupled_* preset or bypass_ppo_clip")


def preset_block(name: str) -> dict[str, Any]:
    """The ``algorithm.rollout_correction`` fields of preset ``name``; ValueError naming the usable ones."""
    table = presets()
    usable = sorted(n for n, b in table.items() if unsupported_reason(b) is None)
    if name not in table:
        raise ValueError(f"rollout correction preset {name!r} is not one of verl's; usable: {usable}")
    why = unsupported_reason(table[name])
    if why:
        raise ValueError(f"rollout correction preset {name!r}: {why}; usable: {usable}")
    return dict(table[name])
