"""The masked / selective family: EKSFT (paper semantics) and the authors'-code variant ``eksft_official``.

The shared pieces of every selective loss live here too: the hyper-parameters ``RHO``, ``LAMBDA_H``, ``LAMBDA_KL``,
``selection_metrics`` (what a selective loss logs about its mask) and ``_SelectiveLoss`` (mean CE off the mask,
entropy bonus and KL anchor on it), which the ablations (ablations.py) specialise. Notation (CE, H, KL, N,
global denominators, empty sets) as in variants.py.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import ClassVar

import torch
from torch import Tensor

from .base import (
    LinearTokenLoss,
    Param,
    Plan,
    TokenLoss,
    base_metrics,
    denom,
    nonneg,
    require_stats,
    unit_interval,
)
from .selection import ceil_k, floor_k_official, iou, masked_mean, topk_mask
from .stats import TokenStats, valid_and_safe_labels

RHO = unit_interval("fraction of valid tokens selected by EACH criterion (k = ceil(rho * N))", 0.2)
LAMBDA_H = nonneg("weight of the entropy bonus on the selected tokens", 0.05)
LAMBDA_KL = nonneg("weight of the KL(pi_theta || pi_ref) penalty on the selected tokens", 0.05)


def selection_metrics(stats: TokenStats, mask: Tensor, *, k: int | None = None, m_h: Tensor | None = None,
                      m_kl: Tensor | None = None) -> dict[str, float]:
    """What every selective loss logs about its mask M (the same keys for EKSFT, its ablations, random_mask and
    official): k and the two top-k masks' sizes and IoU (when given), |M| and |M|/|T|, then the mean CE over the
    unmasked tokens and the mean H and KL over M (each where the stats hold it)."""
    valid, n = stats.valid, stats.n_tokens
    n_mask = int(mask.sum())
    out: dict[str, float] = {}
    if k is not None:
        out["k"] = float(k)
    if m_h is not None and m_kl is not None:
        out.update({"n_mask_h": float(int(m_h.sum())), "n_mask_kl": float(int(m_kl.sum())), "iou": iou(m_h, m_kl)})
    out.update({"n_mask": float(n_mask), "mask_frac": n_mask / n if n else 0.0})
    if stats.logp is not None:
        out["ce_unmasked"] = masked_mean(-stats.logp, valid & ~mask)
    if stats.entropy is not None:
        out["entropy_mask"] = masked_mean(stats.entropy, mask)
    if stats.kl is not None:
        out["kl_mask"] = masked_mean(stats.kl, mask)
    return out


# ------------------------------------------------------------------------------------------------
# EKSFT and its ablations: one selective family, differing in which mask M is used (ablations.py).
# ------------------------------------------------------------------------------------------------
class _SelectiveLoss(LinearTokenLoss):
    """loss = mean_{t∉M} CE(t) - lambda_H · mean_{t∈M} H(t) + lambda_KL · mean_{t∈M} KL(t)   (M detached)."""

    PARAMS: ClassVar[dict[str, Param]] = {"rho": RHO, "lambda_entropy": LAMBDA_H, "lambda_kl": LAMBDA_KL}
    TOKEN_KEYS = ("mask",)
    SCALAR_KEYS = ("n_tokens", "n_unmasked", "n_mask")
    needs_ref = True
    needs_prepass = True

    MASK_SETS: ClassVar[int] = 2  # top-ceil(rho·N) sets united in M (M_H ∪ M_KL), for selected_fraction

    @property
    def ref_in_compute(self) -> bool:
        return self.params["lambda_kl"] != 0

    @property
    def selected_fraction(self) -> float:
        """|M| <= MASK_SETS·ceil(rho·N) rows carry the H / KL terms; none when both lambdas are 0."""
        if not (self.params["lambda_entropy"] or self.params["lambda_kl"]):
            return 0.0
        return min(1.0, self.MASK_SETS * self.params["rho"])

    def _mask(self, m_h: Tensor, m_kl: Tensor, valid: Tensor, generator: torch.Generator | None) -> Tensor:
        raise NotImplementedError

    def plan(self, stats: TokenStats, seq_ids: Tensor | None = None, generator: torch.Generator | None = None) -> Plan:
        require_stats(self, stats, "entropy", "logp", "kl")
        valid, n = stats.valid, stats.n_tokens
        k = ceil_k(self.params["rho"], n)
        m_h = topk_mask(stats.entropy, valid, k, generator=generator)
        m_kl = topk_mask(stats.kl, valid, k, generator=generator)
        mask = self._mask(m_h, m_kl, valid, generator)
        n_mask = int(mask.sum())
        n_unmasked = n - n_mask
        metrics = base_metrics(stats) | selection_metrics(stats, mask, k=k, m_h=m_h, m_kl=m_kl)
        return Plan(
            # mask_h / mask_kl are diagnostics (IoU per sequence, dumps); compute() reads only `mask`
            token={"mask": mask, "mask_h": m_h, "mask_kl": m_kl},
            scalars={"n_tokens": float(n), "n_unmasked": float(n_unmasked), "n_mask": float(n_mask)},
            metrics=metrics,
        )

    def coefficients(self, token: Mapping[str, Tensor], scalars: Mapping[str, float], valid: Tensor):
        mask = token["mask"].bool() & valid
        w_ce = (valid & ~mask).float() / denom(scalars["n_unmasked"])
        reg = mask.float() / denom(scalars["n_mask"])
        lam_h, lam_kl = self.params["lambda_entropy"], self.params["lambda_kl"]
        return w_ce, (reg * -lam_h if lam_h else None), (reg * lam_kl if lam_kl else None)


class EKSFT(_SelectiveLoss):
    """EKSFT, paper semantics (the project default).

    Over the N valid tokens of the global batch: k = ceil(rho·N); M_H = top-k tokens by entropy H(t);
    M_KL = top-k tokens by KL(pi_theta || pi_ref)(t) with pi_ref the frozen initial model; M = M_H ∪ M_KL
    (selection detached; ties and zero scores follow the rule in selection.py: a token with KL = 0 or H = 0 is
    never selected -- so M_KL is empty at the first step, where pi_theta = pi_ref -- and ties at the k-th
    score are broken at random, never by position);

        loss = mean_{t∉M} CE(t) − lambda_H · mean_{t∈M} H(t) + lambda_KL · mean_{t∈M} KL(t).

    Masked tokens get no cross-entropy (no pull towards their label); they only feel the entropy bonus
    and the KL anchor. Defaults rho = 0.2, lambda_H = lambda_KL = 0.05. rho = 0 gives exactly ``sft``.
    Source: EKSFT paper (Entropy-KL Selective Fine-Tuning); authors' code github.com/MINE-USTC/EKSFT
    (whose departures from the paper live in ``eksft_official``).
    """

    name = "eksft"

    def _mask(self, m_h, m_kl, valid, generator):
        return m_h | m_kl


# ------------------------------------------------------------------------------------------------
# The authors' public implementation
# ------------------------------------------------------------------------------------------------
class EKSFTOfficial(TokenLoss):
    """EKSFT as the authors' public code computes it. Source: github.com/MINE-USTC/EKSFT,
    src/llamafactory/train/eksft/trainer.py, ``EKSFTSeq2SeqTrainer.compute_loss`` (read for this project).

    Intended use: ``selection_scope = "sequence"`` — call ``plan`` on the rows of ONE sequence and ``compute`` on
    the same rows, then average the sequences' losses with equal weight: their ``compute_loss`` runs per device
    per gradient-accumulation step, and their released script uses per_device_train_batch_size = 1, so each
    call sees one sequence, and the HF Trainer's accumulation / DDP averaging weighs every sequence equally.
    The SFT trainer (eksft_pipeline/sft) runs it that way and refuses a configuration that would hand the loss
    several packed sequences as one.

        loss = mean_{t∉M} CE(t) − lambda_H' · mean_{t∈M_H} H(t)/log V
                                + lambda_KL' · mean_{t∈M_KL} Σ_v p_v (p_v − log q_v)

    Departures from the paper (``eksft``), point by point:
      1. Selection per micro-batch, not over the global batch, and k = floor(rho·n) (``int(n * rho)``), not
         ceil — a micro-batch with fewer than 1/rho tokens selects nothing and is plain CE.
      2. The entropy bonus is normalised by log V and averaged over M_H only (not over M).
      3. The "KL" term is their code as written: ``log_diff = probs - log_probs_ref`` (probabilities, not
         log-probabilities, minus the reference log-probs), i.e. Σ_v p_v (p_v − log q_v) = Σ_v p_v² + CE(p, q),
         which is not a KL divergence (it is not 0 at p = q); averaged over M_KL only.
      4. Dynamic lambdas (``dynamic_lambda=True``): per call, lambda_H' = lambda_H·1.05 if the entropy term
         < target_entropy (0.5) else ·0.95, lambda_KL' = lambda_KL·1.05 if the KL term > target_kl (2.0)
         else ·0.95 (their defaults; the factor is not carried over between steps). Computed in ``plan``
         from the pre-pass statistics of the micro-batch.
      5. CE is excluded on M_H ∪ M_KL (``union=True``, what their released script passes; their argument
         default is the intersection, ``union=False`` reproduces it).
    Their code details NOT reproduced (said here so nobody relies on them):
      - Label shift: they select on unshifted label positions, so the high-entropy distribution at position q
        removes the CE of token y_q (predicted from q−1), one row earlier than the selected row, and the
        candidate set runs from the first response position to the last (the prediction after the final
        token) instead of over the predicting rows. Here rows are already shifted: the selected row's own CE
        is removed. Reproducing it would need the row after each sequence's last token, which the
        [N, V] interface does not carry.
      - They compute in the model dtype (bf16) with ``log(probs + 1e-12)`` and denominators ``count + 1e-12``;
        here exact fp32 log-softmax and exact counts (empty sets contribute 0).
      - With k = 0 their IoU logging divides by zero (ZeroDivisionError); here iou = 0.
      - If every token is masked their CE is 0/0 = NaN; here the CE term is 0.
      - Ties: torch.topk (unspecified order) there; a seeded random choice among the tied tokens here
        (selection.py), exactly k tokens per call as theirs (zero scores included, e.g. every KL at step 1).
    """

    name = "eksft_official"
    PARAMS = {
        "rho": RHO,
        "lambda_entropy": LAMBDA_H,
        "lambda_kl": LAMBDA_KL,
        "union": Param(True, bool, None, "", "exclude CE on M_H ∪ M_KL (True) or M_H ∩ M_KL (False)"),
        "dynamic_lambda": Param(True, bool, None, "", "apply their per-step ×1.05 / ×0.95 lambda factors"),
        "target_entropy": Param(0.5, float, None, "", "their eksft_target_entropy"),
        "target_kl": Param(2.0, float, None, "", "their eksft_target_kl"),
    }
    needs_ref = True
    needs_prepass = True
    selection_scope = "sequence"
    stats_options = {"with_prob_sq": True}
    TOKEN_KEYS = ("mask", "mask_h", "mask_kl")
    SCALAR_KEYS = ("n_unmasked", "n_mask_h", "n_mask_kl", "lambda_entropy_eff", "lambda_kl_eff", "log_vocab")

    @property
    def ref_in_compute(self) -> bool:
        return self.params["lambda_kl"] != 0

    @property
    def selected_fraction(self) -> float:
        """H on M_H, their KL term on M_KL, floor(rho·n) rows each (a zero lambda stays zero when dynamic)."""
        sets = bool(self.params["lambda_entropy"]) + bool(self.params["lambda_kl"])
        return min(1.0, sets * self.params["rho"])

    def plan(self, stats, seq_ids=None, generator=None):
        require_stats(self, stats, "entropy", "logp", "kl", "prob_sq")
        if stats.vocab_size < 2:
            raise ValueError("eksft_official normalises the entropy by log V and needs a vocabulary of >= 2 tokens")
        valid, n = stats.valid, stats.n_tokens
        k = floor_k_official(self.params["rho"], n)
        # their torch.topk always returns k rows, zero scores included; ties at random (selection.py)
        m_h = topk_mask(stats.entropy, valid, k, generator=generator, select_nonpositive=True)
        m_kl = topk_mask(stats.kl, valid, k, generator=generator, select_nonpositive=True)
        mask = (m_h | m_kl) if self.params["union"] else (m_h & m_kl)
        log_v = math.log(stats.vocab_size)
        ent_term = masked_mean(stats.entropy / log_v, m_h)
        # their "KL" term per token: Σ p (p − log q) = Σ p² + H + KL
        kl_term = masked_mean(stats.prob_sq + stats.entropy + stats.kl, m_kl)
        lam_h, lam_kl = self.params["lambda_entropy"], self.params["lambda_kl"]
        if self.params["dynamic_lambda"]:
            lam_h *= 1.05 if ent_term < self.params["target_entropy"] else 0.95
            lam_kl *= 1.05 if kl_term > self.params["target_kl"] else 0.95
        n_mask = int(mask.sum())
        metrics = base_metrics(stats) | selection_metrics(stats, mask, k=k, m_h=m_h, m_kl=m_kl)
        metrics.update(
            {
                "entropy_term_official": ent_term,
                "kl_term_official": kl_term,
                "lambda_entropy_eff": lam_h,
                "lambda_kl_eff": lam_kl,
            }
        )
        return Plan(
            token={"mask": mask, "mask_h": m_h, "mask_kl": m_kl},
            scalars={
                "n_tokens": float(n),
                "n_unmasked": float(n - n_mask),
                "n_mask_h": float(int(m_h.sum())),
                "n_mask_kl": float(int(m_kl.sum())),
                "lambda_entropy_eff": lam_h,
                "lambda_kl_eff": lam_kl,
                "log_vocab": log_v,
            },
            metrics=metrics,
        )

    def compute(self, logits, labels, ref_logits=None, token=None, scalars=None):
        token, scalars = self._check_compute(
            logits, labels, ref_logits, token, scalars, self.TOKEN_KEYS, self.SCALAR_KEYS
        )
        valid, y = valid_and_safe_labels(labels)
        logp = torch.log_softmax(logits.float(), -1)  # [n, V]
        lp_y = logp.gather(1, y.unsqueeze(1)).squeeze(1)
        keep = valid & ~token["mask"].bool()
        ce_term = (-lp_y * keep.float()).sum() / denom(scalars["n_unmasked"])
        loss = ce_term
        zero = ce_term.detach() * 0
        ent_term = kl_term = zero
        rows_h = (token["mask_h"].bool() & valid).nonzero().squeeze(1)
        if scalars["lambda_entropy_eff"] and rows_h.numel():
            lp = logp.index_select(0, rows_h)
            h_norm = -(lp.exp() * lp).sum(-1) / scalars["log_vocab"]
            ent_term = -scalars["lambda_entropy_eff"] * h_norm.sum() / denom(scalars["n_mask_h"])
            loss = loss + ent_term
        rows_kl = (token["mask_kl"].bool() & valid).nonzero().squeeze(1)
        if scalars["lambda_kl_eff"] and rows_kl.numel():
            p = logp.index_select(0, rows_kl).exp()
            logq = torch.log_softmax(ref_logits.detach().index_select(0, rows_kl).float(), -1)
            their_kl = (p * (p - logq)).sum(-1)  # sic: probs − log_probs_ref, as in their code
            kl_term = scalars["lambda_kl_eff"] * their_kl.sum() / denom(scalars["n_mask_kl"])
            loss = loss + kl_term
        return loss, {
            "ce_term": ce_term.detach(),
            "entropy_term": ent_term.detach(),
            "kl_term": kl_term.detach(),
            "loss": loss.detach(),
        }


# this family's registered losses (variants.LOSS_CLASSES collects every family's)
LOSSES: tuple[type[TokenLoss], ...] = (EKSFT, EKSFTOfficial)


__all__ = ["LOSSES", "EKSFT", "EKSFTOfficial", "LAMBDA_H", "LAMBDA_KL", "RHO", "selection_metrics"]
