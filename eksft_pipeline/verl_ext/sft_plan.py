"""The SFT trainer's step plan: global-batch token selection across data-parallel ranks (no verl import).

EKSFT selects the top-k tokens by entropy and by KL over *all* valid response tokens of the
global batch (k = ceil(rho * |T|)). verl's trainer only ever sees a rank's share of the batch,
and the loss only a micro-batch of it, so the selection is its own pass:

    pre-pass (no grad)   each rank: per-token stats of its tokens          [n_r] x {H, KL, logp, ...}
    gather_token_stats   all ranks: the global stats in rank order          [N = sum_r n_r]
                         (eksft_pipeline.losses.stats)
    loss.plan(...)       all ranks: the same global plan (masks, weights,   [N] fields + global scalars
                         denominators) -- deterministic, so no broadcast
    local_slice          each rank: its own rows of the plan                [n_r]

Every rank computes the identical plan from identical gathered inputs, so the selection with
R ranks equals the selection computed in one process on the concatenated batch (tested).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def scatter_to_positions(values: torch.Tensor, valid_flat: torch.Tensor, total: int, fill=0) -> torch.Tensor:
    """A [total] tensor with `values` at the valid positions (`fill` elsewhere): the inverse of `t[valid_flat]`."""
    out = torch.full((total,), fill, dtype=values.dtype, device=values.device)
    out[valid_flat] = values
    return out


# --------------------------------------------------------------------------------------------
# the step's plan: selection scope x update (mini-batch) groups
# --------------------------------------------------------------------------------------------

def policy_is_reference(ref_is_initial: bool, optimizer) -> bool:
    """Whether the policy's weights are still the reference's: the reference is the initial model and the
    optimizer has taken no step (torch optimizers create their per-parameter state at the first step; a resumed
    run loads it). Where this holds the trainer sets KL = 0 before selecting (losses/selection.py, rule 1)."""
    if not ref_is_initial or optimizer is None:
        return False
    return not any(len(s) for s in optimizer.state.values())


SCOPES = ("global_batch", "sequence", "micro_batch")
HEADS = ("auto", "fused", "naive")
REF_STORES = ("device", "host")
SCALAR_PREFIX = "scalar:"
UNIT_WEIGHT = "unit_weight"
COEFFS = ("w_ce", "w_h", "w_kl")
DIAGNOSTIC_FIELDS = ("mask_h", "mask_kl")


@dataclass
class StepPlan:
    """What the training pass of one step needs, per valid token of the global batch (rank order).

    linear=True (a `LinearTokenLoss`): `token` holds the per-token weights w_ce, w_h, w_kl of
    Σ w_ce·CE + w_h·H + w_kl·KL, unit weights and denominators already folded in, so the training pass
    is one call of the fused (or naive) linear head per micro-batch whatever the scope.
    linear=False: `token` holds the loss's own plan fields, its scalars per token as `scalar:<name>`
    (constant over a unit) and `unit_weight`; the training pass calls `loss.compute` once per unit.
    Diagnostic masks (mask_h, mask_kl) ride along for dumps and the IoU metrics.
    """

    token: dict[str, torch.Tensor]
    metrics: dict[str, float]
    linear: bool


def _units(seq_ids: torch.Tensor, groups: torch.Tensor, scope: str) -> list[tuple[int, torch.Tensor]]:
    """(group, row indices) of every planning unit: one per update group, or one per sequence of each group."""
    out = []
    for g in torch.unique(groups).tolist():
        rows_g = (groups == g).nonzero().squeeze(1)
        if scope == "sequence":
            sid = seq_ids[rows_g]
            for s in torch.unique(sid).tolist():
                out.append((int(g), rows_g[sid == s]))
        else:
            out.append((int(g), rows_g))
    return out


def aggregate_metrics(parts: list[dict[str, float]]) -> dict[str, float]:
    """Counts (n_*, k) summed, everything else token-weighted (by n_tokens) over the planning units."""
    if len(parts) == 1:
        return dict(parts[0])
    total = sum(p.get("n_tokens", 0.0) for p in parts) or 1.0
    out: dict[str, float] = {}
    for key in {k for p in parts for k in p}:
        if key.startswith("n_") or key == "k":
            out[key] = float(sum(p.get(key, 0.0) for p in parts))
        else:
            out[key] = float(sum(p.get(key, 0.0) * p.get("n_tokens", 0.0) for p in parts) / total)
    return out


def plan_step(
    loss,
    stats,
    *,
    seq_ids: torch.Tensor,
    groups: torch.Tensor | None = None,
    scope: str = "global_batch",
    generator: torch.Generator | None = None,
) -> StepPlan:
    """The plan of one training step over the N gathered valid tokens (`stats.valid` all True).

    scope "global_batch": one plan per update group over all its tokens (the paper; top-k over the global batch).
    scope "sequence": one plan per sequence of each group; each sequence's loss gets weight 1/S_g (S_g sequences
    in the group): the authors' per-call selection with equal weight per sequence.
    `groups` [N]: the update (mini-batch) each token belongs to (`eksft.updates_per_batch`; None = one group):
    each update is planned from its own tokens, with its own denominators.
    Metrics: the units' metrics aggregated (`aggregate_metrics`), plus for selective losses iou_batch (over all
    tokens of the step), iou_seq_mean / iou_seq_count (per sequence, then averaged) and iou (= iou_batch).
    """
    from eksft_pipeline.losses import LinearTokenLoss, iou, iou_per_sequence

    if scope not in ("global_batch", "sequence"):
        raise ValueError(f"plan_step: scope must be 'global_batch' or 'sequence', got {scope!r}")
    n = stats.n_rows
    if groups is None:
        groups = torch.zeros(n, dtype=torch.long)
    linear = isinstance(loss, LinearTokenLoss)
    units = _units(seq_ids, groups, scope)
    per_group_units: dict[int, int] = {}
    for g, _ in units:
        per_group_units[g] = per_group_units.get(g, 0) + 1

    token: dict[str, torch.Tensor] = {}

    def put(name: str, rows: torch.Tensor, values: torch.Tensor) -> None:
        if name not in token:
            token[name] = torch.zeros(n, dtype=values.dtype)
        token[name][rows] = values.to(token[name].dtype).cpu()

    parts = []
    for g, rows in units:
        sub = stats.select(rows)
        plan = loss.plan(sub, seq_ids[rows] if loss.needs_seq_ids else None, generator)
        weight = 1.0 / per_group_units[g] if scope == "sequence" else 1.0
        if linear:
            w = loss.coefficients(plan.token, plan.scalars, sub.valid)
            for name, value in zip(COEFFS, w):
                if value is not None:
                    put(name, rows, value.float() * weight)
            for name in DIAGNOSTIC_FIELDS + ("mask",):
                if name in plan.token:
                    put(name, rows, plan.token[name])
        else:
            for name, value in plan.token.items():
                put(name, rows, value)
            for name, value in plan.scalars.items():
                put(SCALAR_PREFIX + name, rows, torch.full((rows.numel(),), float(value), dtype=torch.float64))
            put(UNIT_WEIGHT, rows, torch.full((rows.numel(),), weight, dtype=torch.float64))
        parts.append({k: float(v) for k, v in plan.metrics.items()})
    metrics = aggregate_metrics(parts) if parts else {}
    metrics["n_units"] = float(len(units))
    if "mask_h" in token and "mask_kl" in token:
        m_h, m_kl = token["mask_h"].bool(), token["mask_kl"].bool()
        metrics["iou_batch"] = metrics["iou"] = iou(m_h, m_kl)
        metrics["iou_seq_mean"], count = iou_per_sequence(m_h, m_kl, seq_ids)
        metrics["iou_seq_count"] = float(count)
    if linear:
        for name in COEFFS:  # absent terms: explicit zeros keep every rank's field set identical
            token.setdefault(name, torch.zeros(n, dtype=torch.float32))
    return StepPlan(token=token, metrics=metrics, linear=linear)


EKSFT_DEFAULTS = {
    "loss": "eksft",
    "loss_params": {},
    "selection_scope": "global_batch",
    "head": "auto",
    "updates_per_batch": 1,
    "pi_old_every": 1,
    "ref_hidden_store": "device",
    "chunk_size": None,
    "ref_model_path": None,
    "ref_model_dtype": None,
    "dump_dir": None,
}


def complete_eksft_block(block: dict | None) -> dict:
    """The `eksft:` block of the verl SFT config with its defaults filled in (recipes/verl/sft.yaml documents them)."""
    out = dict(block or {})
    for key, value in EKSFT_DEFAULTS.items():
        out.setdefault(key, dict(value) if isinstance(value, dict) else value)
    return out


def validate_sft_block(vc, loss) -> None:
    """`check_eksft_block` on a composed verl SFT config (OmegaConf) and the loss object the sft stage built from
    it: the stage calls it before the trainer starts."""
    from omegaconf import OmegaConf

    block = complete_eksft_block(OmegaConf.to_container(vc.get("eksft") or {}, resolve=True))
    check_eksft_block(
        block,
        loss=loss,
        micro_batch_size_per_gpu=int(vc.data.micro_batch_size_per_gpu),
        use_dynamic_bsz=bool(vc.data.use_dynamic_bsz),
        ulysses_sequence_parallel_size=int(vc.engine.get("ulysses_sequence_parallel_size", 1) or 1),
    )


def check_eksft_block(
    block: dict, *, loss, micro_batch_size_per_gpu: int, use_dynamic_bsz: bool, ulysses_sequence_parallel_size: int = 1
) -> None:
    """Reject `eksft:` settings the trainer cannot honour, naming the fix (called before training starts)."""
    scope = block["selection_scope"]
    if scope not in SCOPES:
        raise ValueError(f"eksft.selection_scope must be one of {list(SCOPES)}, got {scope!r}")
    sp = ulysses_sequence_parallel_size
    if not isinstance(sp, int) or isinstance(sp, bool) or sp < 1:
        raise ValueError(f"engine.ulysses_sequence_parallel_size must be an integer >= 1, got {sp!r}")
    if sp > 1 and scope == "micro_batch":
        raise ValueError(
            f"eksft.selection_scope=micro_batch plans each micro-batch where its rows are, but with "
            f"engine.ulysses_sequence_parallel_size={sp} no rank holds a whole micro-batch: use global_batch or sequence"
        )
    if block["head"] not in HEADS:
        raise ValueError(f"eksft.head must be one of {list(HEADS)}, got {block['head']!r}")
    loss.resolve_head(block["head"])  # a head the loss cannot run on (fused for a non-linear loss) is refused
    if block["ref_hidden_store"] not in REF_STORES:
        raise ValueError(f"eksft.ref_hidden_store must be one of {list(REF_STORES)}, got {block['ref_hidden_store']!r}")
    u = block["updates_per_batch"]
    if not isinstance(u, int) or isinstance(u, bool) or u < 1:
        raise ValueError(f"eksft.updates_per_batch must be an integer >= 1, got {u!r}")
    if scope == "micro_batch" and u > 1:
        raise ValueError("eksft.updates_per_batch > 1 needs selection_scope global_batch or sequence")
    e = block["pi_old_every"]
    if not isinstance(e, int) or isinstance(e, bool) or e < 1:
        raise ValueError(f"eksft.pi_old_every must be an integer >= 1, got {e!r}")
    if e > 1 and u > 1:
        raise ValueError(f"eksft.pi_old_every={e} and eksft.updates_per_batch={u}: two schedules for the pre-pass "
                         "statistics; use one (psft: pi_old_every, psft_hybrid: updates_per_batch)")
    if e > 1 and not loss.needs_prepass:
        raise ValueError(f"eksft.pi_old_every={e}: loss {loss.name!r} takes no pre-pass statistics (no pi_old)")
    if getattr(loss, "selection_scope", "global") == "sequence":
        one_per_call = scope == "sequence" or (
            scope == "micro_batch" and not use_dynamic_bsz and int(micro_batch_size_per_gpu) == 1
        )
        if not one_per_call:
            what = (
                "the whole global batch"
                if scope == "global_batch"
                else (
                    "a micro-batch that verl packs from several sequences "
                    f"(data.use_dynamic_bsz={use_dynamic_bsz}, data.micro_batch_size_per_gpu={micro_batch_size_per_gpu})"
                )
            )
            raise ValueError(
                f"loss {loss.name!r} selects per sequence, as the authors' code does (one sequence per call); with "
                f"eksft.selection_scope={scope} it would treat {what} as one sequence. Use "
                "eksft.selection_scope=sequence (recipes/method/eksft_official.yaml)"
            )
