"""Loss registry and the one-shot entry points.

    get_loss("eksft", rho=0.2)              -> TokenLoss instance (validated parameters)
    available_losses()                      -> sorted names
    compute_loss(name, logits, ref_logits, labels, seq_ids=None, **params)
                                            -> (loss, metrics): stats -> plan -> compute on ALL rows at once
    eksft_loss(logits, ref_logits, labels, rho=0.2, lambda_entropy=0.05, lambda_kl=0.05)
                                            -> compute_loss("eksft", ...)

``metrics`` = the plan's global diagnostics (python floats) plus the detached loss terms of compute
(tensors). For the micro-batched two-phase use see base.py.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .base import TokenLoss
from .stats import DEFAULT_STATS_CHUNK
from .variants import LOSS_CLASSES

REGISTRY: dict[str, type[TokenLoss]] = {cls.name: cls for cls in LOSS_CLASSES}


def available_losses() -> list[str]:
    """Names accepted by ``get_loss`` (sorted)."""
    return sorted(REGISTRY)


def get_loss(name: str, **params: Any) -> TokenLoss:
    """Instantiate a registered loss; unknown name or bad parameter -> ValueError naming what is wrong."""
    if not isinstance(name, str) or name not in REGISTRY:
        raise ValueError(f"unknown loss {name!r}; known losses: {', '.join(available_losses())}")
    return REGISTRY[name](**params)


def compute_loss(
    name: str | TokenLoss,
    logits: Tensor,
    ref_logits: Tensor | None,
    labels: Tensor,
    seq_ids: Tensor | None = None,
    *,
    generator: torch.Generator | None = None,
    chunk_size: int = DEFAULT_STATS_CHUNK,
    **params: Any,
) -> tuple[Tensor, dict[str, Any]]:
    """stats -> plan -> compute over all rows of ``logits [N, V]`` (rows shifted, label -100 = ignored).

    ``name`` may be a registry name (then ``params`` are its parameters) or a ready ``TokenLoss``.
    Returns (loss: fp32 scalar with grad, metrics: dict of python floats and detached tensors).
    """
    if isinstance(name, TokenLoss):
        if params:
            raise ValueError(f"compute_loss got a TokenLoss instance and extra parameters {sorted(params)}")
        loss_fn = name
    else:
        loss_fn = get_loss(name, **params)
    if loss_fn.needs_ref and ref_logits is None:
        raise ValueError(f"loss {loss_fn.name!r} needs ref_logits (the frozen reference model's logits)")
    stats = loss_fn.stats(logits, ref_logits, labels, chunk_size=chunk_size)
    plan = loss_fn.plan(stats, seq_ids, generator)
    loss, part = loss_fn.compute(
        logits, labels, ref_logits if loss_fn.ref_in_compute else None, plan.token, plan.scalars
    )
    return loss, {**plan.metrics, **part}


def eksft_loss(
    logits: Tensor,
    ref_logits: Tensor,
    labels: Tensor,
    *,
    rho: float = 0.2,
    lambda_entropy: float = 0.05,
    lambda_kl: float = 0.05,
) -> tuple[Tensor, dict[str, Any]]:
    """EKSFT (paper semantics) on ``logits``/``ref_logits [N, V]`` and ``labels [N]``: see ``selective.EKSFT``.

    loss = mean_{t∉M} CE − lambda_entropy · mean_{t∈M} H + lambda_kl · mean_{t∈M} KL(pi_theta||pi_ref),
    M = top-ceil(rho·N) by H ∪ top-ceil(rho·N) by KL. metrics: n_tokens, n_mask_h, n_mask_kl, n_mask, iou,
    ce_unmasked, entropy_mask, kl_mask, entropy_all, kl_all, mask_frac, k, and the loss terms.
    """
    return compute_loss(
        "eksft", logits, ref_logits, labels, rho=rho, lambda_entropy=lambda_entropy, lambda_kl=lambda_kl
    )


__all__ = ["REGISTRY", "available_losses", "compute_loss", "eksft_loss", "get_loss"]
