"""The reweighting family: plain SFT and the baselines that reweight its per-token cross-entropy (``iw_sft``:
a clipped per-sequence importance weight; ``dft``: the token's own probability). Notation (CE, H, KL, N,
global denominators, empty sets) as in variants.py.
"""

from __future__ import annotations

import math
import warnings

import torch

from .base import (
    LinearTokenLoss,
    Param,
    Plan,
    TokenLoss,
    base_metrics,
    denom,
    require_stats,
)
from .stats import valid_and_safe_labels


class SFT(LinearTokenLoss):
    """Plain supervised fine-tuning: loss = mean_t CE(t) = −(1/N) Σ_t log pi_theta(y_t) (token mean).
    Source: standard maximum-likelihood SFT (the baseline of every paper here)."""

    name = "sft"

    def coefficients(self, token, scalars, valid):
        return valid.float() / denom(scalars["n_tokens"]), None, None


class IWSFT(LinearTokenLoss):
    """Importance-weighted SFT. Source: Qin & Springenberg 2025, "Supervised Fine Tuning on Curated Data is
    Reinforcement Learning (and can be improved)".

    Per sequence s: w_s = clip(exp(mean_{t∈s}[log pi_theta(y_t) − log pi_ref(y_t)]), 0, max_weight)
    (max_weight = 16), computed in the pre-pass and detached (stop-gradient);
        loss = (1/N) Σ_t w_{s(t)} · CE(t)          (token mean over all N valid tokens).
    Needs ``seq_ids`` [N] (globally unique per sequence). WITHOUT seq_ids the whole batch is treated as a
    single sequence (one weight for every token); the plan then warns and reports iw_single_sequence = 1.
    The exp is taken of min(mean log-ratio, log max_weight), which equals the clipped value and cannot
    overflow.
    """

    name = "iw_sft"
    PARAMS = {"max_weight": Param(16.0, float, lambda v: v > 0, "> 0", "upper clip of the sequence weight")}
    TOKEN_KEYS = ("weight",)
    needs_ref = True
    needs_prepass = True
    needs_seq_ids = True

    def plan(self, stats, seq_ids=None, generator=None):
        require_stats(self, stats, "logp", "ref_logp")
        valid, n = stats.valid, stats.n_tokens
        single = seq_ids is None
        if single:
            warnings.warn("iw_sft: no seq_ids given, the whole batch is weighted as ONE sequence", stacklevel=2)
            seq_ids = torch.zeros(stats.n_rows, dtype=torch.long, device=stats.device)
        if seq_ids.shape != (stats.n_rows,):
            raise ValueError(f"iw_sft: seq_ids must have shape ({stats.n_rows},), got {tuple(seq_ids.shape)}")
        weight = torch.zeros(stats.n_rows, dtype=torch.float32, device=stats.device)
        metrics = base_metrics(stats)
        n_seqs = 0
        if n:
            uniq, inv = torch.unique(seq_ids[valid], return_inverse=True)
            n_seqs = int(uniq.numel())
            ratio = (stats.logp - stats.ref_logp)[valid].double()
            sums = torch.zeros(n_seqs, dtype=torch.float64, device=stats.device).index_add_(0, inv, ratio)
            counts = torch.zeros(n_seqs, dtype=torch.float64, device=stats.device).index_add_(
                0, inv, torch.ones_like(ratio)
            )
            mean_lr = sums / counts
            log_cap = math.log(self.params["max_weight"])
            w_seq = torch.exp(torch.clamp(mean_lr, max=log_cap)).float()
            weight[valid] = w_seq[inv]
            metrics.update(
                {
                    "iw_mean": float(w_seq.mean()),
                    "iw_min": float(w_seq.min()),
                    "iw_max": float(w_seq.max()),
                    "iw_clip_frac": float((mean_lr > log_cap).double().mean()),
                }
            )
        metrics.update({"n_seqs": float(n_seqs), "iw_single_sequence": float(single)})
        return Plan(token={"weight": weight}, scalars={"n_tokens": float(n), "n_seqs": float(n_seqs)}, metrics=metrics)

    def coefficients(self, token, scalars, valid):
        return token["weight"].float() * valid.float() / denom(scalars["n_tokens"]), None, None


class DFT(TokenLoss):
    """Dynamic Fine-Tuning. Source: Wu et al. 2025, "On the Generalization of SFT: A Reinforcement Learning
    Perspective with Reward Rectification".  loss = (1/N) Σ_t −sg(pi_theta(y_t)) · log pi_theta(y_t),
    sg = stop-gradient (the token's own probability, from the current forward, detached)."""

    name = "dft"

    def compute(self, logits, labels, ref_logits=None, token=None, scalars=None):
        token, scalars = self._check_compute(logits, labels, ref_logits, token, scalars, (), ("n_tokens",))
        valid, y = valid_and_safe_labels(labels)
        lp_y = torch.log_softmax(logits.float(), -1).gather(1, y.unsqueeze(1)).squeeze(1)
        w = lp_y.detach().exp() * valid.float() / denom(scalars["n_tokens"])
        loss = (-lp_y * w).sum()
        return loss, {"dft_term": loss.detach(), "loss": loss.detach()}


# this family's registered losses (variants.LOSS_CLASSES collects every family's)
LOSSES: tuple[type[TokenLoss], ...] = (SFT, DFT, IWSFT)


__all__ = ["LOSSES", "DFT", "IWSFT", "SFT"]
