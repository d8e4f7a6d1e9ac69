"""Every token loss of the project: EKSFT, its paper ablations, the baselines and the authors'-code variant.

Notation (per valid token t of the batch; rows are shifted, label -100 rows are ignored everywhere):
    CE(t) = -log pi_theta(y_t),  H(t) = full-vocab entropy of pi_theta,  KL(t) = KL(pi_theta || pi_ref),
    N = number of valid tokens in the global batch (the plan's ``n_tokens``).
All means use global denominators from the plan so micro-batch parts add up to the batch loss.
Empty sets contribute 0 (a zero sum over an empty set, never 0/0).
"""

from __future__ import annotations

import math
import warnings
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
from .selection import ceil_k, floor_k_official, iou, masked_mean, random_mask, topk_mask
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
# EKSFT and its ablations: one selective family, differing in which mask M is used.
# ------------------------------------------------------------------------------------------------
class _SelectiveLoss(LinearTokenLoss):
    """loss = mean_{t∉M} CE(t) - lambda_H · mean_{t∈M} H(t) + lambda_KL · mean_{t∈M} KL(t)   (M detached)."""

    PARAMS: ClassVar[dict[str, Param]] = {"rho": RHO, "lambda_entropy": LAMBDA_H, "lambda_kl": LAMBDA_KL}
    TOKEN_KEYS = ("mask",)
    SCALAR_KEYS = ("n_tokens", "n_unmasked", "n_mask")
    needs_ref = True
    needs_prepass = True

    @property
    def ref_in_compute(self) -> bool:
        return self.params["lambda_kl"] != 0

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


class EKSFTNoEntropyReg(EKSFT):
    """Ablation: EKSFT with lambda_H = 0 —
    loss = mean_{t∉M} CE(t) + lambda_KL · mean_{t∈M} KL(t), M = M_H ∪ M_KL as in ``eksft``.
    Source: EKSFT paper, ablations."""

    name = "eksft_no_entropy_reg"
    PARAMS = {"rho": RHO, "lambda_kl": LAMBDA_KL}
    FIXED = {"lambda_entropy": 0.0}


class EKSFTNoKLReg(EKSFT):
    """Ablation: EKSFT with lambda_KL = 0 —
    loss = mean_{t∉M} CE(t) − lambda_H · mean_{t∈M} H(t), M = M_H ∪ M_KL (KL still drives the selection).
    Source: EKSFT paper, ablations."""

    name = "eksft_no_kl_reg"
    PARAMS = {"rho": RHO, "lambda_entropy": LAMBDA_H}
    FIXED = {"lambda_kl": 0.0}


class EKSFTNoReg(EKSFT):
    """Ablation (paper Table 3, "w/o both regularisers"): masking only, lambda_H = lambda_KL = 0 —
    loss = mean_{t∉M} CE(t), M = M_H ∪ M_KL as in ``eksft`` (H and KL still drive the selection, so the
    reference model is still needed). Source: EKSFT paper, Table 3."""

    name = "eksft_no_reg"
    PARAMS = {"rho": RHO}
    FIXED = {"lambda_entropy": 0.0, "lambda_kl": 0.0}


class EntropyMaskOnly(_SelectiveLoss):
    """Ablation: select by entropy only, M = M_H (top ceil(rho·N) by H); regularisers as EKSFT:
    loss = mean_{t∉M_H} CE − lambda_H · mean_{t∈M_H} H + lambda_KL · mean_{t∈M_H} KL.
    Source: EKSFT paper, ablations."""

    name = "entropy_mask_only"

    def _mask(self, m_h, m_kl, valid, generator):
        return m_h


class KLMaskOnly(_SelectiveLoss):
    """Ablation: select by KL only, M = M_KL (top ceil(rho·N) by KL); regularisers as EKSFT:
    loss = mean_{t∉M_KL} CE − lambda_H · mean_{t∈M_KL} H + lambda_KL · mean_{t∈M_KL} KL.
    Source: EKSFT paper, ablations."""

    name = "kl_mask_only"

    def _mask(self, m_h, m_kl, valid, generator):
        return m_kl


class RandomMask(_SelectiveLoss):
    """Ablation (paper App. H): drop a uniformly random ``mask_ratio`` share of the tokens from the CE.

    Over the N valid tokens of the batch: M = ceil(mask_ratio·N) valid tokens drawn uniformly without
    replacement (default mask_ratio = 0.1, the paper's 10%);

        loss = mean_{t∉M} CE(t) − lambda_H · mean_{t∈M} H(t) + lambda_KL · mean_{t∈M} KL(t).

    Defaults lambda_H = lambda_KL = 0.05, EKSFT's: App. H "uniformly drops 10% of tokens from CE supervision
    and applies the same entropy/KL regularization on the dropped tokens", so the random set M gets EKSFT's
    entropy bonus and KL anchor with EKSFT's weights, and the reference model is loaded (``needs_ref``); no
    pre-pass is needed (the mask depends on no statistic). lambda_entropy = lambda_kl = 0 gives the plain
    drop (masking only; no reference then).

    ``match_eksft_size=True`` (ours, the project's earlier variant): |M| = |M_H ∪ M_KL| of ``eksft`` at ``rho``
    on this batch instead of mask_ratio·N (between ceil(rho·N) and 2·ceil(rho·N), about 40% of the tokens at
    rho = 0.2 early in training); the metrics n_mask_h, n_mask_kl and iou then describe that EKSFT selection.

    Randomness: ``plan(..., generator=g)`` if given, else the loss's own ``torch.Generator`` seeded with ``seed``
    at construction (advancing with every plan, so successive batches get different masks and two instances
    with the same seed give the same sequence -- which is how data-parallel ranks agree when each builds the
    global plan). Source: EKSFT paper, Appendix H (random masking).
    """

    name = "random_mask"
    PARAMS = {
        "mask_ratio": unit_interval("fraction of valid tokens dropped uniformly at random (|M| = ceil(ratio·N))", 0.1),
        "lambda_entropy": nonneg("weight of the entropy bonus on the random set (App. H: EKSFT's)", LAMBDA_H.default),
        "lambda_kl": nonneg("weight of the KL(pi_theta || pi_ref) penalty on the random set (App. H: EKSFT's)",
                            LAMBDA_KL.default),
        "match_eksft_size": Param(False, bool, None, "", "|M| = |M_H ∪ M_KL| of eksft at rho instead of mask_ratio·N"),
        "rho": RHO,
        "seed": Param(0, int, lambda v: v >= 0, ">= 0", "seed of the loss's own generator"),
    }

    def __init__(self, **params):
        super().__init__(**params)
        self._generator = torch.Generator().manual_seed(self.params["seed"])

    @property
    def needs_ref(self) -> bool:  # type: ignore[override]
        return bool(self.params["match_eksft_size"] or self.params["lambda_kl"])

    @property
    def needs_prepass(self) -> bool:  # type: ignore[override]
        return bool(self.params["match_eksft_size"])

    def plan(self, stats: TokenStats, seq_ids: Tensor | None = None, generator: torch.Generator | None = None) -> Plan:
        valid, n = stats.valid, stats.n_tokens
        k = m_h = m_kl = None
        if self.params["match_eksft_size"]:
            require_stats(self, stats, "entropy", "logp", "kl")
            k = ceil_k(self.params["rho"], n)
            m_h, m_kl = topk_mask(stats.entropy, valid, k), topk_mask(stats.kl, valid, k)
            size = int((m_h | m_kl).sum())
        else:
            size = ceil_k(self.params["mask_ratio"], n)
        mask = random_mask(valid, size, generator if generator is not None else self._generator)
        n_mask = int(mask.sum())
        metrics = base_metrics(stats) | selection_metrics(stats, mask, k=k, m_h=m_h, m_kl=m_kl)
        return Plan(
            token={"mask": mask},
            scalars={"n_tokens": float(n), "n_unmasked": float(n - n_mask), "n_mask": float(n_mask)},
            metrics=metrics,
        )


class GlobalReg(LinearTokenLoss):
    """Ablation: no selection, the regularisers on every token —
    loss = mean_t CE(t) − lambda_H · mean_t H(t) + lambda_KL · mean_t KL(t) over all N valid tokens.
    Source: EKSFT paper, ablations."""

    name = "global_reg"
    PARAMS = {"lambda_entropy": LAMBDA_H, "lambda_kl": LAMBDA_KL}
    needs_ref = True

    @property
    def ref_in_compute(self) -> bool:
        return self.params["lambda_kl"] != 0

    def coefficients(self, token, scalars, valid):
        w = valid.float() / denom(scalars["n_tokens"])
        lam_h, lam_kl = self.params["lambda_entropy"], self.params["lambda_kl"]
        return w, (w * -lam_h if lam_h else None), (w * lam_kl if lam_kl else None)


# ------------------------------------------------------------------------------------------------
# Baselines
# ------------------------------------------------------------------------------------------------
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


LOSS_CLASSES: tuple[type[TokenLoss], ...] = (
    EKSFT,
    EKSFTNoEntropyReg,
    EKSFTNoKLReg,
    EKSFTNoReg,
    EntropyMaskOnly,
    KLMaskOnly,
    RandomMask,
    GlobalReg,
    SFT,
    DFT,
    IWSFT,
    PSFT,
    ASFT,
    EKSFTOfficial,
)

__all__ = [c.__name__ for c in LOSS_CLASSES] + ["LOSS_CLASSES"]
