"""Fused, memory-efficient LM head for EKSFT (and every loss of the form Σ w_ce·CE + w_h·H + w_kl·KL).

The naive path materialises ``logits = hidden @ weight.T`` [N, V] (plus the reference logits, the fp32
log-softmax kept for backward and the [N, V] gradient). Here no [N, V] tensor ever exists: everything runs
over row chunks of ``chunk_size`` and needs O(chunk_size × V) extra memory (a handful of fp32 buffers,
reused across chunks) besides the [N, d] / [V, d] gradients themselves.

Pass 1 (no grad) ``fused_stats``: per chunk, z = h @ W^T and z_ref = h_ref @ W_ref^T, then the same
``chunk_stats`` the naive ``token_stats`` uses -> TokenStats (entropy, KL, log p(y), ...).
Selection: ``loss.plan(stats)`` — the very code of the naive path (top-k, union, denominators).
Pass 2 ``fused_compute``: a ``torch.autograd.Function`` whose forward walks the chunks once more, computes
the loss AND its gradients w.r.t. ``hidden`` and ``weight`` (as Liger's fused linear cross-entropy does),
and whose backward only scales the stored gradients by the incoming grad_output. The reference side
(``ref_hidden``, ``ref_weight``) is frozen: it gets no gradient and must not require one.

Gradient of one row t w.r.t. its logits z (p = softmax(z), q = softmax(z_ref), e_y = one-hot label):
    d[w_ce·CE + w_h·H + w_kl·KL]/dz = p ⊙ (a + b·log p − w_kl·log q) − w_ce·e_y,
    a = w_ce − w_h·H − w_kl·KL,  b = w_kl − w_h,
(from dCE/dz = p − e_y, dH/dz = −p ⊙ (log p + H), dKL/dz = p ⊙ (log p − log q − KL)); then
grad_hidden[t] = g_t @ W and grad_weight += g^T @ h per chunk (fp32 accumulation of grad_weight).
H and KL are recomputed from the CURRENT weights in pass 2 (the plan's statistics may be stale when a
trainer reuses one plan for several optimizer steps); the reference logits are recomputed only for rows
with w_kl != 0 (the selected ~20–40 % for EKSFT), rows with all-zero weights (label -100) are skipped.

Entry points:
    fused_eksft_head(hidden, weight, ref_hidden, ref_weight, labels, rho=0.2, lambda_entropy=0.05,
                     lambda_kl=0.05, chunk_size=...)                       -> (loss, metrics)
    fused_token_loss(name, hidden, weight, ref_hidden, ref_weight, labels, seq_ids=None, **params)
    fused_stats(loss, hidden, weight, ref_hidden, ref_weight, labels)      -> TokenStats      (pass 1)
    fused_compute(loss, hidden, weight, labels, ref_hidden, ref_weight, token, scalars)
                                                                           -> (loss_part, metrics) (pass 2)
``fused_compute`` takes an externally made plan (``mask`` and the global denominators), so a trainer that
did the global selection calls it per micro-batch; parts add up like ``TokenLoss.compute``'s.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from .base import LinearTokenLoss, Plan, TokenLoss
from .registry import get_loss
from .stats import TokenStats, Workspace, check_labels, chunk_stats, rowdot, valid_and_safe_labels

DEFAULT_CHUNK = 512  # rows per chunk on CPU at V <= 32768: 512 × V fp32 = 64 MiB per buffer (scripts/bench_loss.py)
# Off CUDA the chunk is sized by elements, not rows: a handful of fp32 [chunk, V] buffers is the head's whole
# working set, so at Qwen3's V = 151,936 the default is 110 rows (64 MiB per buffer), not 512 (297 MiB each).
CPU_CHUNK_ELEMENTS = DEFAULT_CHUNK * 32768
# rows per chunk on CUDA. Measured on an H100 (docs/benchmarks.md; N=16384, V=151936, d=4096, bf16):
# 1024 -> 2.27x Liger's fused CE time, 2048 -> 2.07x, 4096 -> 1.98x at +8.5 GiB (23% of the naive head's peak);
# fewer, larger chunks amortise the per-chunk [V, d] grad_weight accumulation.
CUDA_DEFAULT_CHUNK = 4096


def default_chunk(vocab_size: int, device: torch.device | str) -> int:
    """Rows per chunk when none is given: CUDA_DEFAULT_CHUNK on CUDA, else CPU_CHUNK_ELEMENTS // V (<= 512)."""
    if torch.device(device).type == "cuda":
        return CUDA_DEFAULT_CHUNK
    return max(1, min(DEFAULT_CHUNK, CPU_CHUNK_ELEMENTS // max(int(vocab_size), 1)))


def resolve_chunk(chunk_size: int | None, t: Tensor, vocab_size: int | None = None) -> int:
    """`chunk_size`, or the device's default for this vocabulary (``default_chunk``)."""
    if chunk_size is None:
        chunk_size = default_chunk(vocab_size or 32768, t.device)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return int(chunk_size)


def _check_head(
    hidden: Tensor, weight: Tensor, ref_hidden: Tensor | None, ref_weight: Tensor | None, labels: Tensor, need_ref: bool
) -> None:
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"hidden [N, d] and weight [V, d] must agree on d, got {tuple(hidden.shape)} and {tuple(weight.shape)}"
        )
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must have the same dtype")
    if not hidden.is_floating_point():
        raise ValueError(f"hidden must be floating point, got {hidden.dtype}")
    check_labels(labels, hidden.shape[0], weight.shape[0], hidden.device, what="hidden")
    if need_ref and (ref_hidden is None or ref_weight is None):
        raise ValueError("this loss needs the reference head: pass ref_hidden [N, d_ref] and ref_weight [V, d_ref]")
    if ref_hidden is not None or ref_weight is not None:
        if ref_hidden is None or ref_weight is None:
            raise ValueError("pass both ref_hidden and ref_weight, or neither")
        if (
            ref_hidden.dim() != 2
            or ref_weight.dim() != 2
            or ref_hidden.shape[0] != hidden.shape[0]
            or ref_weight.shape[0] != weight.shape[0]
            or ref_hidden.shape[1] != ref_weight.shape[1]
        ):
            raise ValueError(
                f"ref_hidden {tuple(ref_hidden.shape)} / ref_weight {tuple(ref_weight.shape)} must be "
                f"[{hidden.shape[0]}, d_ref] / [{weight.shape[0]}, d_ref]"
            )
        if ref_hidden.dtype != ref_weight.dtype:
            raise ValueError(f"ref_hidden ({ref_hidden.dtype}) and ref_weight ({ref_weight.dtype}) differ in dtype")
        if ref_hidden.requires_grad or ref_weight.requires_grad:
            raise ValueError(
                "the reference head is frozen and gets no gradient: pass ref_hidden/ref_weight "
                "detached (e.g. computed under torch.no_grad())"
            )


# ----------------------------------------------------------------------------------------------- CUDA fast path
# On CUDA with a bf16/fp16 head, the per-chunk softmax / entropy / KL / gradient algebra is one
# torch.compile'd function per pass (Inductor fuses it into a few Triton kernels reading the low-precision
# logits directly) instead of a chain of separate fp32 kernels over [chunk, V] buffers. Same formulas, fp32
# math; set EKSFT_FUSED_COMPILE=0 to force the eager path. CPU and fp32 heads always use the eager path.


def _stats_math(z: Tensor, zq: Tensor | None, y: Tensor, with_prob_sq: bool):
    """chunk_stats' formulas on low-precision logits, fp32 math: (entropy, logp_y, kl, ref_logp_y, prob_sq)."""
    logp = torch.log_softmax(z.float(), dim=-1)
    p = logp.exp()
    entropy = -(p * logp).sum(-1)
    logp_y = logp.gather(1, y.unsqueeze(1)).squeeze(1)
    prob_sq = (p * p).sum(-1) if with_prob_sq else None
    kl = ref_logp_y = None
    if zq is not None:
        logq = torch.log_softmax(zq.float(), dim=-1)
        ref_logp_y = logq.gather(1, y.unsqueeze(1)).squeeze(1)
        kl = (p * (logp - logq)).sum(-1)
    return entropy, logp_y, kl, ref_logp_y, prob_sq


def _grad_math(z: Tensor, zq: Tensor | None, y: Tensor, wce: Tensor, wh: Tensor, wkl: Tensor, out_dtype: torch.dtype):
    """Pass-2 algebra of one chunk (see the module docstring): (g [m, V] in out_dtype, ce, entropy, kl terms)."""
    logp = torch.log_softmax(z.float(), dim=-1)
    p = logp.exp()
    lp_y = logp.gather(1, y.unsqueeze(1)).squeeze(1)
    ent = -(p * logp).sum(-1)
    a = wce - wh * ent
    b = wkl - wh
    if zq is not None:
        logq = torch.log_softmax(zq.float(), dim=-1)
        kl = (p * (logp - logq)).sum(-1)
        a = a - wkl * kl
        g = p * (a.unsqueeze(1) + b.unsqueeze(1) * logp - wkl.unsqueeze(1) * logq)
        kl_term = (wkl * kl).sum()
    else:
        g = p * (a.unsqueeze(1) + b.unsqueeze(1) * logp)
        kl_term = torch.zeros((), device=z.device)
    g = g.scatter_add(1, y.unsqueeze(1), -wce.unsqueeze(1))
    return g.to(out_dtype), (-lp_y * wce).sum(), (wh * ent).sum(), kl_term


_COMPILED: dict[str, Any] = {}


def _compiled(name: str):
    if name not in _COMPILED:
        fn = {"stats": _stats_math, "grad": _grad_math}[name]
        _COMPILED[name] = torch.compile(fn, dynamic=True)
    return _COMPILED[name]


def _use_compiled(weight: Tensor) -> bool:
    import os

    return weight.is_cuda and weight.dtype != torch.float32 and os.environ.get("EKSFT_FUSED_COMPILE", "1") != "0"


def _logits_fp32(h: Tensor, weight: Tensor, ws: Workspace, name: str) -> Tensor:
    """fp32 [m, V] logits h @ weight.T written into workspace buffer ``name`` (bf16 matmul, then upcast)."""
    out = ws.get(name, h.shape[0])
    if weight.dtype == torch.float32:
        return torch.mm(h, weight.t(), out=out)
    return out.copy_(torch.mm(h, weight.t(), out=ws.get(name + "_lowp", h.shape[0], weight.dtype)))


@torch.no_grad()
def fused_stats(
    loss: TokenLoss | None,
    hidden: Tensor,
    weight: Tensor,
    ref_hidden: Tensor | None,
    ref_weight: Tensor | None,
    labels: Tensor,
    *,
    chunk_size: int | None = None,
    with_prob_sq: bool | None = None,
) -> TokenStats:
    """Pass 1: ``token_stats`` of ``hidden @ weight.T`` (and the reference head) without materialising them."""
    need_ref = bool(loss is not None and loss.needs_ref)
    _check_head(hidden, weight, ref_hidden, ref_weight, labels, need_ref)
    chunk_size = resolve_chunk(chunk_size, hidden, weight.shape[0])
    if with_prob_sq is None:
        with_prob_sq = bool(loss is not None and loss.stats_options.get("with_prob_sq", False))
    n, vocab = hidden.shape[0], weight.shape[0]
    use_ref = ref_hidden is not None
    valid, y = valid_and_safe_labels(labels)
    dev = hidden.device
    zeros = lambda: torch.zeros(n, dtype=torch.float32, device=dev)  # noqa: E731
    entropy, logp = zeros(), zeros()
    kl, ref_logp = (zeros(), zeros()) if use_ref else (None, None)
    prob_sq = zeros() if with_prob_sq else None
    rows = valid.nonzero().squeeze(1)
    fast = _use_compiled(weight)
    ws = Workspace(min(chunk_size, max(rows.numel(), 1)), vocab, dev)
    for s in range(0, rows.numel(), chunk_size):
        idx = rows[s : s + chunk_size]
        if fast:
            z = hidden.index_select(0, idx) @ weight.t()  # [m, V] bf16, read directly by the compiled math
            zq = ref_hidden.index_select(0, idx) @ ref_weight.t() if use_ref else None
            h, lp, k, rlp, sq = _compiled("stats")(z, zq, y[idx], with_prob_sq)
        else:
            z = _logits_fp32(hidden.index_select(0, idx), weight, ws, "z")
            zq = _logits_fp32(ref_hidden.index_select(0, idx), ref_weight, ws, "zq") if use_ref else None
            h, lp, k, rlp, sq = chunk_stats(z, zq, y[idx], with_prob_sq=with_prob_sq, ws=ws)
        entropy[idx], logp[idx] = h, lp
        if use_ref:
            kl[idx], ref_logp[idx] = k, rlp
        if sq is not None:
            prob_sq[idx] = sq
    stats = TokenStats(
        valid=valid, vocab_size=vocab, entropy=entropy, logp=logp, kl=kl, ref_logp=ref_logp, prob_sq=prob_sq
    )
    stats.check_finite()
    return stats


def _pass2(hidden, weight, ref_hidden, ref_weight, y, w_ce, w_h, w_kl, chunk_size, need_gh, need_gw):
    """Loss terms (ce, entropy, kl) and, if asked, grad_hidden [N, d] / grad_weight [V, d] (fp32).

    Rows are processed in two streams so no chunk needs gathers/scatters of [*, V] rows: rows with a
    regulariser (w_h or w_kl != 0: the EKSFT mask) and CE-only rows; rows with all-zero weights are skipped.
    """
    n, d = hidden.shape
    vocab = weight.shape[0]
    dev = hidden.device
    reg = (w_h != 0) | (w_kl != 0)  # rows that need H (and KL) with gradient
    reg_rows = reg.nonzero().squeeze(1)
    ce_rows = ((w_ce != 0) & ~reg).nonzero().squeeze(1)
    grad_h = torch.zeros(n, d, dtype=hidden.dtype, device=dev) if need_gh else None
    grad_w = torch.zeros(vocab, d, dtype=torch.float32, device=dev) if need_gw else None
    terms = torch.zeros(3, dtype=torch.float64, device=dev)  # ce, entropy, kl contributions
    ws = Workspace(min(chunk_size, max(reg_rows.numel(), ce_rows.numel(), 1)), vocab, dev)
    chunks = [(reg_rows[s : s + chunk_size], True) for s in range(0, reg_rows.numel(), chunk_size)]
    chunks += [(ce_rows[s : s + chunk_size], False) for s in range(0, ce_rows.numel(), chunk_size)]
    fast = _use_compiled(weight)
    for idx, with_reg in chunks:
        m = idx.numel()
        h = hidden.index_select(0, idx)  # [m, d]
        yc, wce = y[idx], w_ce[idx]
        if fast:
            wh, wkl = (w_h[idx], w_kl[idx]) if with_reg else (torch.zeros_like(wce), torch.zeros_like(wce))
            zq = ref_hidden.index_select(0, idx) @ ref_weight.t() if with_reg and bool((wkl != 0).any()) else None
            g_low, t_ce, t_h, t_kl = _compiled("grad")(h @ weight.t(), zq, yc, wce, wh, wkl, weight.dtype)
            terms += torch.stack([t_ce, t_h, t_kl]).double()
            if need_gh:
                grad_h.index_copy_(0, idx, g_low @ weight)
            if need_gw:
                grad_w.add_(g_low.t() @ h)
            continue
        z = _logits_fp32(h, weight, ws, "z")  # [m, V]
        logp = torch.log_softmax(z, dim=-1, out=ws.get("logp", m))
        lp_y = logp.gather(1, yc.unsqueeze(1)).squeeze(1)
        p = torch.exp(logp, out=ws.get("p", m))
        terms[0] += (-lp_y * wce).sum().double()
        if with_reg:
            wh, wkl = w_h[idx], w_kl[idx]
            ent = -rowdot(p, logp)
            terms[1] += (wh * ent).sum().double()
            a = wce - wh * ent
            b = wkl - wh
            if bool((wkl != 0).any()):
                zq = _logits_fp32(ref_hidden.index_select(0, idx), ref_weight, ws, "zq")
                logq = torch.log_softmax(zq, dim=-1, out=ws.get("logq", m))
                kl = rowdot(p, torch.sub(logp, logq, out=ws.get("z", m)))  # z is free again
                terms[2] += (wkl * kl).sum().double()
                a = a - wkl * kl
                # g = p ⊙ (a + b·logp − w_kl·logq), built in place in the logq buffer
                g = logq.mul_(-wkl.unsqueeze(1)).addcmul_(logp, b.unsqueeze(1)).add_(a.unsqueeze(1)).mul_(p)
            else:
                g = logp.mul_(b.unsqueeze(1)).add_(a.unsqueeze(1)).mul_(p)
        else:
            g = p.mul_(wce.unsqueeze(1))  # CE part p·w_ce, in place of p  [m, V]
        if not (need_gh or need_gw):
            continue
        g.scatter_add_(1, yc.unsqueeze(1), -wce.unsqueeze(1))  # − w_ce · one-hot(label)
        if weight.dtype == torch.float32:
            if need_gh:
                grad_h.index_copy_(0, idx, g @ weight)
            if need_gw:
                grad_w.addmm_(g.t(), h)
        else:
            g_low = g.to(weight.dtype)
            if need_gh:
                grad_h.index_copy_(0, idx, g_low @ weight)
            if need_gw:
                grad_w.add_(g_low.t() @ h)
    return terms, grad_h, grad_w


class _FusedLinearHead(torch.autograd.Function):
    """Forward: loss + precomputed grads (chunked). Backward: grads × grad_output. Ref side gets None."""

    @staticmethod
    def forward(ctx, hidden, weight, ref_hidden, ref_weight, y, w_ce, w_h, w_kl, chunk_size, need_gh, need_gw):
        terms, grad_h, grad_w = _pass2(
            hidden, weight, ref_hidden, ref_weight, y, w_ce, w_h, w_kl, chunk_size, need_gh, need_gw
        )
        ctx.save_for_backward(
            grad_h if grad_h is not None else hidden.new_empty(0), grad_w if grad_w is not None else weight.new_empty(0)
        )
        ctx.has = (grad_h is not None, grad_w is not None)
        ctx.weight_dtype = weight.dtype
        terms32 = terms.float()
        loss = terms32.sum()  # fp32 scalar
        ctx.mark_non_differentiable(terms32)
        return loss, terms32

    @staticmethod
    def backward(ctx, grad_loss, _grad_terms):
        grad_h, grad_w = ctx.saved_tensors
        # the usual case is loss.backward() with grad 1: hand the stored grads over without an extra [V, d] copy
        unit = bool(grad_loss == 1)
        gh = gw = None
        if ctx.has[0] and ctx.needs_input_grad[0]:
            gh = grad_h if unit else grad_h * grad_loss.to(grad_h.dtype)
        if ctx.has[1] and ctx.needs_input_grad[1]:
            gw = (grad_w if unit else grad_w * grad_loss).to(ctx.weight_dtype)
        return gh, gw, None, None, None, None, None, None, None, None, None


def fused_linear_loss(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    ref_hidden: Tensor | None,
    ref_weight: Tensor | None,
    w_ce: Tensor,
    w_h: Tensor | None,
    w_kl: Tensor | None,
    *,
    chunk_size: int | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Σ_t w_ce·CE + w_h·H + w_kl·KL of the head ``hidden @ weight.T`` (weights detached, [N] each) — pass 2."""
    chunk_size = resolve_chunk(chunk_size, hidden, weight.shape[0])
    n = hidden.shape[0]
    for nm, w in (("w_ce", w_ce), ("w_h", w_h), ("w_kl", w_kl)):
        if w is not None and w.shape != (n,):
            raise ValueError(f"{nm} must have shape ({n},), got {tuple(w.shape)}")
    has_kl = w_kl is not None and bool((w_kl != 0).any())
    _check_head(hidden, weight, ref_hidden, ref_weight, labels, has_kl)
    _, y = valid_and_safe_labels(labels)
    z32 = torch.zeros(n, dtype=torch.float32, device=hidden.device)
    w_ce = w_ce.detach().float()
    w_h = w_h.detach().float() if w_h is not None else z32
    w_kl = w_kl.detach().float() if w_kl is not None else z32
    grad_on = torch.is_grad_enabled()
    need_gh = grad_on and hidden.requires_grad
    need_gw = grad_on and weight.requires_grad
    loss, terms = _FusedLinearHead.apply(
        hidden, weight, ref_hidden, ref_weight, y, w_ce, w_h, w_kl, chunk_size, need_gh, need_gw
    )
    return loss, {"ce_term": terms[0], "entropy_term": terms[1], "kl_term": terms[2], "loss": loss.detach()}


def _as_linear(loss: TokenLoss | str) -> LinearTokenLoss:
    loss = get_loss(loss) if isinstance(loss, str) else loss
    if not isinstance(loss, LinearTokenLoss):
        raise ValueError(
            f"the fused head supports losses of the form Σ w_ce·CE + w_h·H + w_kl·KL "
            f"(eksft and its ablations, global_reg, sft, iw_sft); {loss.name!r} is not one of them"
        )
    return loss


def fused_compute(
    loss: TokenLoss | str,
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    ref_hidden: Tensor | None,
    ref_weight: Tensor | None,
    token: Mapping[str, Tensor],
    scalars: Mapping[str, float],
    *,
    chunk_size: int | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Pass 2 with an externally given plan (e.g. ``plan.select(rows).token`` and ``plan.scalars`` of a
    global selection): the fused equivalent of ``loss.compute(hidden @ weight.T, labels, ref_logits, ...)``."""
    loss = _as_linear(loss)
    token = dict(token)
    missing = [k for k in loss.TOKEN_KEYS if k not in token] + [k for k in loss.SCALAR_KEYS if k not in scalars]
    if missing:
        raise ValueError(f"loss {loss.name!r}: fused_compute needs plan fields {missing}")
    for k in loss.TOKEN_KEYS:
        if token[k].shape[:1] != labels.shape[:1]:
            raise ValueError(f"plan token field {k!r} has {token[k].shape[0]} rows, the micro-batch {labels.shape[0]}")
    valid, _ = valid_and_safe_labels(labels)
    w_ce, w_h, w_kl = loss.coefficients(token, scalars, valid)
    return fused_linear_loss(
        hidden,
        weight,
        labels,
        ref_hidden if loss.ref_in_compute else None,
        ref_weight if loss.ref_in_compute else None,
        w_ce,
        w_h,
        w_kl,
        chunk_size=chunk_size,
    )


def fused_token_loss(
    name: str | TokenLoss,
    hidden: Tensor,
    weight: Tensor,
    ref_hidden: Tensor | None,
    ref_weight: Tensor | None,
    labels: Tensor,
    seq_ids: Tensor | None = None,
    *,
    generator: torch.Generator | None = None,
    chunk_size: int | None = None,
    **params: Any,
) -> tuple[Tensor, dict[str, Any]]:
    """Fused ``compute_loss``: pass 1 (only if the loss needs a pre-pass) -> plan -> pass 2."""
    loss = _as_linear(get_loss(name, **params) if isinstance(name, str) else name)
    if loss.needs_prepass:
        stats = fused_stats(loss, hidden, weight, ref_hidden, ref_weight, labels, chunk_size=chunk_size)
    else:
        stats = TokenStats.labels_only(labels, weight.shape[0])
    plan = loss.plan(stats, seq_ids, generator)
    out, part = fused_compute(
        loss, hidden, weight, labels, ref_hidden, ref_weight, plan.token, plan.scalars, chunk_size=chunk_size
    )
    return out, {**plan.metrics, **part}


def fused_eksft_head(
    hidden: Tensor,
    weight: Tensor,
    ref_hidden: Tensor | None,
    ref_weight: Tensor | None,
    labels: Tensor,
    *,
    rho: float = 0.2,
    lambda_entropy: float = 0.05,
    lambda_kl: float = 0.05,
    chunk_size: int | None = None,
) -> tuple[Tensor, dict[str, Any]]:
    """EKSFT (paper semantics, = ``eksft_loss(hidden @ weight.T, ref_hidden @ ref_weight.T, labels)``) without
    materialising the logits. rho = 0 is SFT: pass 1 is skipped (no selection to make), the reference head
    may be None, and the metrics hold the counts and the loss terms only (no entropy_all / kl_all)."""
    loss = get_loss("eksft", rho=rho, lambda_entropy=lambda_entropy, lambda_kl=lambda_kl)
    if rho > 0:
        return fused_token_loss(loss, hidden, weight, ref_hidden, ref_weight, labels, chunk_size=chunk_size)
    n = int((labels != -100).sum())
    plan = Plan(
        token={"mask": torch.zeros(labels.shape[0], dtype=torch.bool, device=labels.device)},
        scalars={"n_tokens": float(n), "n_unmasked": float(n), "n_mask": 0.0},
        metrics={
            "n_tokens": float(n),
            "k": 0.0,
            "n_mask_h": 0.0,
            "n_mask_kl": 0.0,
            "n_mask": 0.0,
            "iou": 0.0,
            "mask_frac": 0.0,
            "entropy_mask": 0.0,
            "kl_mask": 0.0,
        },
    )
    out, part = fused_compute(loss, hidden, weight, labels, None, None, plan.token, plan.scalars, chunk_size=chunk_size)
    return out, {**plan.metrics, "ce_unmasked": float(part["ce_term"]), **part}


__all__ = ["CPU_CHUNK_ELEMENTS", "CUDA_DEFAULT_CHUNK", "DEFAULT_CHUNK", "default_chunk", "fused_compute", "fused_eksft_head", "fused_linear_loss", "fused_stats", "fused_token_loss"]
