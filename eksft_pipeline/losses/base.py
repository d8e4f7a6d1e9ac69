"""The two-phase token-loss interface shared by every loss (EKSFT, its ablations and the baselines).

A trainer that sees the global batch only in micro-batches (verl) uses a loss in two phases:

1. Pre-pass, no gradient, over the WHOLE global batch (all micro-batches, all data-parallel ranks):
       stats = loss.stats(logits, ref_logits, labels)          # per micro-batch, then TokenStats.cat
       stats, seq_ids, own = all_gather_stats(stats, seq_ids)  # across ranks (stats.py)
       plan  = loss.plan(stats, seq_ids).select(own)           # selection + global denominators, ONCE
   ``loss.needs_prepass`` says whether this is needed; when it is False, ``loss.plan`` only needs the
   valid-row count and ``TokenStats.labels_only(labels, V)`` is enough.
2. Training pass, per micro-batch with rows ``r`` (slice) of the plan:
       part, m = loss.compute(logits_r, labels_r, ref_logits_r, plan.select(r).token, plan.scalars)
       part.backward()
   Contract (tested for every loss): summing ``part`` over disjoint micro-batches covering the batch
   gives the full-batch loss and the same gradients, because every term is a per-token sum divided by a
   global denominator from ``plan.scalars``. ``m`` holds detached, likewise additive, loss terms.

``compute_loss`` in registry.py runs stats -> plan -> compute on all rows at once.

Rows are shifted (row i of logits predicts labels[i]); label -100 marks ignored rows (see stats.py).
All reductions accumulate in fp32 even for bf16 logits (the rows are upcast before log_softmax).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from .selection import masked_mean
from .stats import DEFAULT_STATS_CHUNK, TokenStats, check_rows, token_stats, valid_and_safe_labels


@dataclass
class Plan:
    """What the pre-pass decides for a batch.

    token:   per-row detached tensors [N] (e.g. ``mask``, ``weight``, ``old_logp``); slice with ``select``.
    scalars: global python floats (denominators such as ``n_tokens``, ``n_unmasked``, ``n_mask``).
    metrics: global diagnostics (python floats), e.g. ``n_mask``, ``iou``, ``mask_frac``.
    """

    token: dict[str, Tensor] = field(default_factory=dict)
    scalars: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)

    def select(self, rows: slice | Tensor) -> Plan:
        """The plan restricted to some rows (a micro-batch): token fields sliced, scalars/metrics kept global."""
        return Plan(
            token={k: v[rows] for k, v in self.token.items()}, scalars=dict(self.scalars), metrics=dict(self.metrics)
        )

    def to(self, device: torch.device | str) -> Plan:
        return Plan(
            token={k: v.to(device) for k, v in self.token.items()},
            scalars=dict(self.scalars),
            metrics=dict(self.metrics),
        )


@dataclass(frozen=True)
class Param:
    """A loss hyper-parameter: default, python type and an admissible-range check with its wording."""

    default: Any
    kind: type
    check: Callable[[Any], bool] | None = None
    rule: str = ""
    doc: str = ""


def nonneg(doc: str, default: float) -> Param:
    return Param(default, float, lambda v: v >= 0, ">= 0", doc)


def unit_interval(doc: str, default: float) -> Param:
    return Param(default, float, lambda v: 0 <= v <= 1, "in [0, 1]", doc)


def _coerce(loss_name: str, key: str, spec: Param, value: Any) -> Any:
    kind, given = spec.kind, value
    ok = False
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        value = float(value) if ok else value
    if not ok:
        raise ValueError(f"loss {loss_name!r}: parameter {key}={value!r} must be a finite {kind.__name__}")
    if spec.check is not None and not spec.check(value):
        raise ValueError(f"loss {loss_name!r}: parameter {key}={given!r} must be {spec.rule}")
    return value


class TokenLoss:
    """Base class. Subclasses set the class attributes below, ``PARAMS``, and implement plan/compute.

    needs_ref:       the loss uses the frozen reference model (in the pre-pass statistics and/or in compute);
                     ``stats`` then requires ``ref_logits``.
    needs_prepass:   the loss needs global statistics before the training pass (selection, old log-probs,
                     sequence weights); if False, ``plan`` only counts valid tokens.
    needs_seq_ids:   ``plan`` uses sequence ids (iw_sft).
    selection_scope: the unit a plan is meant for: "global" (the whole global batch, the paper) or "sequence"
                     (one sequence, losses averaged with equal weight per sequence: eksft_official).
    stats_options:   extra keyword arguments ``stats`` passes to ``token_stats``.
    heads:           the loss heads that can compute it, the default first (``resolve_head``): "fused"
                     (losses/fused.py: hidden states + lm_head weight, no [N, V] tensor; only the linear form)
                     and "naive" (full [N, V] logits).
    ``ref_in_compute`` (property): ``compute`` needs ``ref_logits`` of the micro-batch rows.
    ``selected_fraction`` (property): the worst-case share of a batch's rows with an entropy or KL term in
    ``compute``, from the loss's own parameters.
    These are the facts the trainer (verl_ext/sft_trainer.py) and the memory model (verl_ext/memory.py) read;
    neither keeps its own table of them.
    """

    name: ClassVar[str] = ""
    PARAMS: ClassVar[dict[str, Param]] = {}
    FIXED: ClassVar[dict[str, Any]] = {}  # parameters a variant pins (passing them is an error)
    needs_ref: ClassVar[bool] = False
    needs_prepass: ClassVar[bool] = False
    needs_seq_ids: ClassVar[bool] = False
    selection_scope: ClassVar[str] = "global"
    stats_options: ClassVar[dict[str, Any]] = {}
    heads: ClassVar[tuple[str, ...]] = ("naive",)

    def __init__(self, **params: Any) -> None:
        unknown = sorted(set(params) - set(self.PARAMS))
        if unknown:
            pinned = [k for k in unknown if k in self.FIXED]
            if pinned:
                raise ValueError(
                    f"loss {self.name!r}: parameter(s) {pinned} are fixed by this variant "
                    f"({', '.join(f'{k}={self.FIXED[k]!r}' for k in pinned)})"
                )
            raise ValueError(
                f"loss {self.name!r}: unknown parameter(s) {unknown}; valid parameters: {sorted(self.PARAMS) or 'none'}"
            )
        self.params: dict[str, Any] = {k: spec.default for k, spec in self.PARAMS.items()}
        for k, v in params.items():
            self.params[k] = _coerce(self.name, k, self.PARAMS[k], v)
        self.params.update(self.FIXED)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.params.items())})"

    @property
    def ref_in_compute(self) -> bool:
        return False

    @property
    def selected_fraction(self) -> float:
        """Worst-case share of the valid rows whose training-pass term uses the full distribution beyond
        log p(y): an entropy term (H) or a KL term. The memory model sizes the loss head's row-wise buffers
        from it (verl_ext/memory.py: loss_head_peak). 0 for a loss without such a term."""
        return 0.0

    def resolve_head(self, requested: str | None = "auto") -> str:
        """The loss head to run: "auto" (or None) -> the first of ``heads``; a named head must be one of them.
        The one place the trainer (verl_ext/sft_trainer.py) and the SFT stage's memory estimate resolve it."""
        head = str(requested or "auto")
        if head == "auto":
            return self.heads[0]
        if head not in self.heads:
            why = ("is not of the form Σ w_ce·CE + w_h·H + w_kl·KL the fused head computes" if head == "fused"
                   else f"runs on the {' or '.join(self.heads)} head")  # fmt: skip
            raise ValueError(f"eksft.head={head}: loss {self.name!r} {why}; use eksft.head={self.heads[0]} (or auto)")
        return head

    # ---- phase 1 ---------------------------------------------------------------------------------
    def stats(
        self, logits: Tensor, ref_logits: Tensor | None, labels: Tensor, *, chunk_size: int = DEFAULT_STATS_CHUNK
    ) -> TokenStats:
        """``token_stats`` with what this loss needs (ref logits only if ``needs_ref``)."""
        if self.needs_ref and ref_logits is None:
            raise ValueError(f"loss {self.name!r} needs ref_logits (the frozen reference model's logits)")
        return token_stats(
            logits.detach(),
            ref_logits.detach() if (self.needs_ref and ref_logits is not None) else None,
            labels,
            chunk_size=chunk_size,
            **self.stats_options,
        )

    def plan(self, stats: TokenStats, seq_ids: Tensor | None = None, generator: torch.Generator | None = None) -> Plan:
        """Default plan (no selection): global token count and, when available, mean entropy / KL."""
        return Plan(scalars={"n_tokens": float(stats.n_tokens)}, metrics=base_metrics(stats))

    # ---- phase 2 ---------------------------------------------------------------------------------
    def compute(
        self,
        logits: Tensor,
        labels: Tensor,
        ref_logits: Tensor | None = None,
        token: Mapping[str, Tensor] | None = None,
        scalars: Mapping[str, float] | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        raise NotImplementedError

    def _check_compute(
        self,
        logits: Tensor,
        labels: Tensor,
        ref_logits: Tensor | None,
        token: Mapping[str, Tensor] | None,
        scalars: Mapping[str, float] | None,
        token_keys: tuple[str, ...],
        scalar_keys: tuple[str, ...],
    ) -> tuple[dict, dict]:
        check_rows(logits, labels, ref_logits)
        if self.ref_in_compute and ref_logits is None:
            raise ValueError(f"loss {self.name!r} (params {self.params}) needs ref_logits in compute()")
        token = dict(token or {})
        scalars = dict(scalars or {})
        missing_t = [k for k in token_keys if k not in token]
        missing_s = [k for k in scalar_keys if k not in scalars]
        if missing_t or missing_s:
            raise ValueError(
                f"loss {self.name!r}: compute() needs plan token fields {list(token_keys)} and scalars "
                f"{list(scalar_keys)}; missing {missing_t + missing_s} (pass plan.select(rows).token "
                "and plan.scalars from this loss's plan())"
            )
        for k in token_keys:
            if token[k].shape[:1] != labels.shape[:1]:
                raise ValueError(
                    f"loss {self.name!r}: plan token field {k!r} has {token[k].shape[0]} rows but "
                    f"the micro-batch has {labels.shape[0]}"
                )
        return token, scalars


def base_metrics(stats: TokenStats) -> dict[str, float]:
    """n_tokens and, where the stats have them, entropy_all / kl_all (means over valid tokens)."""
    out = {"n_tokens": float(stats.n_tokens)}
    if stats.entropy is not None:
        out["entropy_all"] = masked_mean(stats.entropy, stats.valid)
    if stats.kl is not None:
        out["kl_all"] = masked_mean(stats.kl, stats.valid)
    return out


def require_stats(loss: TokenLoss, stats: TokenStats, *fields: str) -> None:
    missing = [f for f in fields if getattr(stats, f) is None]
    if missing:
        raise ValueError(
            f"loss {loss.name!r}: plan() needs token statistics {missing}; compute them with "
            f"loss.stats(logits, ref_logits, labels) (reference logits are required for kl/ref_logp)"
        )


def denom(x: float) -> float:
    """Denominator guard: an empty set contributes a zero sum, so dividing by 1 keeps it 0 (never NaN)."""
    return x if x > 0 else 1.0


class LinearTokenLoss(TokenLoss):
    """Losses of the form  sum_t w_ce[t]·CE(t) + w_h[t]·H(t) + w_kl[t]·KL(t)  with detached weights.

    CE(t) = -log pi_theta(y_t); H and KL as in stats.py. The weights come from the plan (masks, global
    denominators, sequence weights) through ``coefficients``, so the same numbers drive the naive
    ``compute`` here and the fused head (fused.py). H and KL are evaluated (with gradient) only on rows
    with a non-zero weight, the reference rows only where w_kl != 0.
    """

    TOKEN_KEYS: ClassVar[tuple[str, ...]] = ()
    SCALAR_KEYS: ClassVar[tuple[str, ...]] = ("n_tokens",)
    heads: ClassVar[tuple[str, ...]] = ("fused", "naive")

    def coefficients(
        self, token: Mapping[str, Tensor], scalars: Mapping[str, float], valid: Tensor
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """(w_ce, w_h, w_kl), each fp32 [n] or None for an absent term; zero on invalid rows."""
        raise NotImplementedError

    def compute(self, logits, labels, ref_logits=None, token=None, scalars=None):
        token, scalars = self._check_compute(
            logits, labels, ref_logits, token, scalars, self.TOKEN_KEYS, self.SCALAR_KEYS
        )
        valid, y = valid_and_safe_labels(labels)
        w_ce, w_h, w_kl = self.coefficients(token, scalars, valid)
        return linear_compute(logits, y, ref_logits, w_ce, w_h, w_kl)


def linear_compute(
    logits: Tensor, y: Tensor, ref_logits: Tensor | None, w_ce: Tensor, w_h: Tensor | None, w_kl: Tensor | None
) -> tuple[Tensor, dict[str, Tensor]]:
    """Autograd (naive) evaluation of sum_t w_ce·CE + w_h·H + w_kl·KL over the given rows, in fp32."""
    logp = torch.log_softmax(logits.float(), dim=-1)  # [n, V] fp32
    lp_y = logp.gather(1, y.unsqueeze(1)).squeeze(1)  # [n]
    ce_term = (-lp_y * w_ce).sum()
    loss = ce_term
    metrics = {"ce_term": ce_term.detach()}
    zero = ce_term.detach() * 0
    need = None
    if w_h is not None:
        need = w_h != 0
    if w_kl is not None:
        need = (w_kl != 0) if need is None else need | (w_kl != 0)
    rows = need.nonzero().squeeze(1) if need is not None else None
    ent_term = kl_term = zero
    if rows is not None and rows.numel() > 0:
        lpr = logp.index_select(0, rows)  # [m, V]
        pr = lpr.exp()
        if w_h is not None:
            ent = -(pr * lpr).sum(-1)
            ent_term = (w_h.index_select(0, rows) * ent).sum()
            loss = loss + ent_term
        if w_kl is not None and bool((w_kl != 0).any()):
            if ref_logits is None:
                raise ValueError("this loss has a KL term (w_kl != 0) and needs ref_logits in compute()")
            lq = torch.log_softmax(ref_logits.detach().index_select(0, rows).float(), dim=-1)
            kl = (pr * (lpr - lq)).sum(-1)
            kl_term = (w_kl.index_select(0, rows) * kl).sum()
            loss = loss + kl_term
    metrics["entropy_term"] = ent_term.detach()
    metrics["kl_term"] = kl_term.detach()
    metrics["loss"] = loss.detach()
    return loss, metrics


__all__ = [
    "LinearTokenLoss",
    "Param",
    "Plan",
    "TokenLoss",
    "base_metrics",
    "denom",
    "linear_compute",
    "nonneg",
    "require_stats",
    "unit_interval",
]
