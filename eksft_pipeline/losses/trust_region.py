"""The trust-region family: baselines that keep the policy near another one -- ``psft`` (PPO's clipped ratio
against the policy at the start of the batch) and ``asft`` (DFT with a KL anchor to the frozen reference).
Notation (CE, H, KL, N, global denominators, empty sets) as in variants.py.
"""

from __future__ import annotations

import math

import torch

from .base import (
    Param,
    Plan,
    TokenLoss,
    base_metrics,
    denom,
    nonneg,
    require_stats,
)
from .stats import valid_and_safe_labels


class ASFT(TokenLoss):
    """Anchored SFT. Source: Zhu et al. 2025, "Anchored Supervised Fine-Tuning", arXiv 2509.23753. DFT plus a
    KL anchor to the frozen reference — note the REVERSE direction KL(pi_ref || pi_theta):
        loss = (1/N) Σ_t [ −sg(pi_theta(y_t)) log pi_theta(y_t) + lambda_kl · Σ_v q_v (log q_v − log p_v) ],
    q = pi_ref(·|t), p = pi_theta(·|t), lambda_kl = 0.1."""

    name = "asft"
    PARAMS = {"lambda_kl": nonneg("weight of KL(pi_ref || pi_theta)", 0.1)}
    needs_ref = True

    @property
    def ref_in_compute(self) -> bool:
        return self.params["lambda_kl"] != 0

    @property
    def selected_fraction(self) -> float:
        """The reverse KL is taken on every row (none when lambda_kl = 0)."""
        return 1.0 if self.params["lambda_kl"] else 0.0

    def compute(self, logits, labels, ref_logits=None, token=None, scalars=None):
        token, scalars = self._check_compute(logits, labels, ref_logits, token, scalars, (), ("n_tokens",))
        valid, y = valid_and_safe_labels(labels)
        w_tok = valid.float() / denom(scalars["n_tokens"])
        logp = torch.log_softmax(logits.float(), -1)  # [n, V]
        lp_y = logp.gather(1, y.unsqueeze(1)).squeeze(1)
        dft_term = (-lp_y * lp_y.detach().exp() * w_tok).sum()
        loss, kl_term = dft_term, dft_term.detach() * 0
        if self.params["lambda_kl"]:
            logq = torch.log_softmax(ref_logits.detach().float(), -1)
            rkl = (logq.exp() * (logq - logp)).sum(-1)  # KL(pi_ref || pi_theta) per row
            kl_term = self.params["lambda_kl"] * (rkl * w_tok).sum()
            loss = loss + kl_term
        return loss, {"dft_term": dft_term.detach(), "kl_term": kl_term.detach(), "loss": loss.detach()}


class PSFT(TokenLoss):
    """Proximal SFT. Source: Zhu et al. 2025, "Proximal Supervised Fine-Tuning", arXiv 2508.17784.
    PPO's clipped surrogate with advantage 1 against the policy at the start of the batch:
        r_t = exp(log pi_theta(y_t) − old_logp_t),  loss = (1/N) Σ_t −min(r_t, clip(r_t, 1−eps_low, 1+eps_high)),
    eps_low = 0.2, eps_high = 0.28; old_logp comes from the pre-pass statistics (detached).
    With advantage 1 the lower clip never binds, so −min(r, clip(r)) = −exp(min(log r, log(1+eps_high))); it is
    evaluated in that form, which has the same value and gradient but cannot overflow for huge ratios.
    NOTE: with a single optimizer step per batch (plan from the same weights) r ≡ 1 and the gradient
    −∇r = −∇log pi_theta(y_t) equals SFT's exactly; PSFT differs only when one batch (its old_logp) is
    reused for several optimizer steps. PSFT's own schedule (its run script: 256 prompts per pi_old,
    mini-batches of 32, i.e. 8 optimizer updates per pi_old) is kept inside the other methods' budget by the SFT
    trainer's ``eksft.pi_old_every`` (8 in recipes/method/psft.yaml: one update per batch, old_logp from the
    weights of every 8th step); ``eksft.updates_per_batch`` (8 in recipes/method/psft_hybrid.yaml) is the hybrid
    variant: old_logp from the pre-pass at the start of the batch, then one update per mini-batch, each with its
    own token-mean denominator (8x the optimizer updates).
    """

    name = "psft"
    PARAMS = {
        "eps_low": Param(0.2, float, lambda v: 0 <= v < 1, "in [0, 1)", "lower clip range"),
        "eps_high": Param(0.28, float, lambda v: v >= 0, ">= 0", "upper clip range"),
    }
    needs_prepass = True

    def plan(self, stats, seq_ids=None, generator=None):
        require_stats(self, stats, "logp")
        return Plan(
            token={"old_logp": stats.logp.clone()},
            scalars={"n_tokens": float(stats.n_tokens)},
            metrics=base_metrics(stats),
        )

    def compute(self, logits, labels, ref_logits=None, token=None, scalars=None):
        token, scalars = self._check_compute(logits, labels, ref_logits, token, scalars, ("old_logp",), ("n_tokens",))
        valid, y = valid_and_safe_labels(labels)
        w_tok = valid.float() / denom(scalars["n_tokens"])
        lp_y = torch.log_softmax(logits.float(), -1).gather(1, y.unsqueeze(1)).squeeze(1)
        log_ratio = torch.where(valid, lp_y - token["old_logp"].float(), torch.zeros_like(lp_y))
        cap = math.log1p(self.params["eps_high"])
        surrogate = torch.exp(torch.clamp(log_ratio, max=cap))
        loss = (-surrogate * w_tok).sum()
        clipped = ((log_ratio > cap) & valid).float()
        return loss, {"loss": loss.detach(), "clip_frac": (clipped * w_tok).sum().detach()}


# this family's registered losses (variants.LOSS_CLASSES collects every family's)
LOSSES: tuple[type[TokenLoss], ...] = (PSFT, ASFT)


__all__ = ["LOSSES", "ASFT", "PSFT"]
