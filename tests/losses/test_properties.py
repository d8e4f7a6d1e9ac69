"""Properties: finiteness on extreme inputs (hypothesis), edge cases, rho = 0 == sft, fp32 accumulation."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eksft_pipeline.losses import available_losses, compute_loss, eksft_loss, get_loss, token_stats

ALL = available_losses()


@st.composite
def extreme_batches(draw):
    n = draw(st.sampled_from([0, 1, 2, 3, 7]))
    v = draw(st.integers(2, 6))
    kind = draw(st.sampled_from(["pm1e4", "equal_rows", "mixed", "random"]))
    vals = st.sampled_from([-1e4, 1e4, 0.0, 3.0, -7.5])
    if kind == "equal_rows":
        c = draw(vals)
        logits = torch.full((n, v), c)
    elif kind == "pm1e4":
        logits = torch.tensor(draw(st.lists(st.sampled_from([-1e4, 1e4]), min_size=n * v, max_size=n * v)),
                              dtype=torch.float32).reshape(n, v)
    elif kind == "mixed":
        logits = torch.tensor(draw(st.lists(vals, min_size=n * v, max_size=n * v)), dtype=torch.float32).reshape(n, v)
    else:
        logits = torch.tensor(draw(st.lists(st.floats(-1e4, 1e4, width=32), min_size=n * v, max_size=n * v)),
                              dtype=torch.float32).reshape(n, v)
    ref = torch.tensor(draw(st.lists(vals, min_size=n * v, max_size=n * v)), dtype=torch.float32).reshape(n, v)
    labels = torch.tensor(draw(st.lists(st.integers(-1, v - 1), min_size=n, max_size=n)), dtype=torch.long)
    labels[labels < 0] = -100
    rho = draw(st.sampled_from([0.0, 0.2, 0.5, 1.0]))
    return logits, ref, labels, rho


@pytest.mark.parametrize("name", ALL)
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=extreme_batches(), old_shift=st.sampled_from([0.0, 1e4, -1e4]))
def test_no_nan_or_inf_on_extreme_logits(name, batch, old_shift):
    logits, ref, labels, rho = batch
    lf = get_loss(name, rho=rho) if "rho" in get_loss(name).PARAMS else get_loss(name)
    stats = lf.stats(logits, ref, labels)
    plan = lf.plan(stats, torch.arange(labels.numel()) // 2)
    if name == "psft":  # huge / tiny ratios r = exp(±1e4)
        plan.token["old_logp"] = plan.token["old_logp"] + old_shift
    lg = logits.clone().requires_grad_()
    loss, metrics = lf.compute(lg, labels, ref if lf.ref_in_compute else None, plan.token, plan.scalars)
    assert torch.isfinite(loss), (name, loss)
    loss.backward()
    assert torch.isfinite(lg.grad).all(), name
    for k, v in {**plan.metrics, **metrics}.items():
        assert math.isfinite(float(v)), (name, k, v)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("n_rows,labels", [(0, []), (3, [-100, -100, -100])], ids=["N0", "all_ignored"])
def test_empty_batch_is_zero_with_grad_fn(name, n_rows, labels):
    logits = torch.randn(n_rows, 5, requires_grad=True)
    loss, metrics = compute_loss(name, logits, torch.randn(n_rows, 5), torch.tensor(labels, dtype=torch.long),
                                 seq_ids=torch.zeros(n_rows, dtype=torch.long))
    assert loss.item() == 0.0 and loss.grad_fn is not None
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))
    assert metrics["n_tokens"] == 0


def test_single_token_batch():
    logits, ref = torch.tensor([[1.0, 2.0, 0.5]]), torch.tensor([[0.0, 0.0, 3.0]])
    loss, m = eksft_loss(logits, ref, torch.tensor([1]))
    assert m["k"] == 1 and m["n_mask"] == 1 and m["ce_unmasked"] == 0.0  # ceil(0.2) = 1: the token is masked
    assert loss.item() == pytest.approx(-0.05 * m["entropy_mask"] + 0.05 * m["kl_mask"], abs=1e-6)


def test_rho_zero_equals_sft_exactly():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(50, 33, generator=g) * 3
    ref = torch.randn(50, 33, generator=g)
    labels = torch.randint(0, 33, (50,), generator=g)
    labels[7] = -100
    grads = []
    losses = []
    for name, params in (("sft", {}), ("eksft", {"rho": 0.0}), ("eksft_no_kl_reg", {"rho": 0.0}),
                         ("kl_mask_only", {"rho": 0.0}), ("random_mask", {"mask_ratio": 0.0}), ("eksft_no_reg", {"rho": 0.0})):
        lg = logits.clone().requires_grad_()
        loss, _ = compute_loss(name, lg, ref, labels, **params)
        loss.backward()
        losses.append(loss.detach())
        grads.append(lg.grad)
    for loss, grad in zip(losses[1:], grads[1:]):
        assert torch.equal(loss, losses[0])
        assert torch.equal(grad, grads[0])


def test_bf16_inputs_accumulate_in_fp32():
    """bf16 logits: the result is the fp32 computation on the upcast logits (bit for bit), within 1e-5 of a
    float64 reference, where summing in bf16 would be off by ~1e-2."""
    g = torch.Generator().manual_seed(2)
    n, v = 2048, 64
    logits16 = (torch.randn(n, v, generator=g) * 2).bfloat16()
    ref16 = (logits16.float() + torch.randn(n, v, generator=g) * 0.5).bfloat16()
    labels = torch.randint(0, v, (n,), generator=g)
    for name in ("eksft", "sft", "dft", "global_reg", "asft"):
        lg16 = logits16.clone().requires_grad_()
        loss16, _ = compute_loss(name, lg16, ref16, labels)
        loss32, _ = compute_loss(name, logits16.float(), ref16.float(), labels)
        assert loss16.dtype == torch.float32
        assert torch.equal(loss16, loss32), name
        loss64, _ = compute_loss(name, logits16.double(), ref16.double(), labels)
        assert abs(loss16.item() - loss64.item()) <= 1e-5 * max(1.0, abs(loss64.item())), name
        loss16.backward()
        assert lg16.grad.dtype == torch.bfloat16 and torch.isfinite(lg16.grad.float()).all()
    # the naive bf16 sum that fp32 accumulation avoids is visibly worse
    ce = -torch.log_softmax(logits16.double(), -1).gather(1, labels[:, None]).squeeze(1)
    bf16_mean = ce.bfloat16().cumsum(0)[-1].float().item() / n
    assert abs(bf16_mean - ce.mean().item()) > 1e-3
    stats16 = token_stats(logits16, ref16, labels)
    stats32 = token_stats(logits16.float(), ref16.float(), labels)
    assert stats16.entropy.dtype == torch.float32 and torch.equal(stats16.entropy, stats32.entropy)
    assert torch.equal(stats16.kl, stats32.kl)


def test_stats_are_chunk_size_independent():
    g = torch.Generator().manual_seed(3)
    logits, ref = torch.randn(37, 19, generator=g), torch.randn(37, 19, generator=g)
    labels = torch.randint(0, 19, (37,), generator=g)
    a = token_stats(logits, ref, labels, chunk_size=1)
    b = token_stats(logits, ref, labels, chunk_size=1000)
    for f in ("entropy", "logp", "kl", "ref_logp"):
        assert torch.allclose(getattr(a, f), getattr(b, f), atol=1e-6)
    # against plain full-batch torch formulas
    lp, lq = torch.log_softmax(logits.double(), -1), torch.log_softmax(ref.double(), -1)
    assert torch.allclose(a.entropy.double(), -(lp.exp() * lp).sum(-1), atol=1e-5)
    assert torch.allclose(a.kl.double(), (lp.exp() * (lp - lq)).sum(-1), atol=1e-5)
