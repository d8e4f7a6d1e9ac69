"""The fused head equals the naive path (logits = hidden @ weight.T) in value and gradients."""

from __future__ import annotations

import pytest
import torch

from eksft_pipeline.losses import (
    LinearTokenLoss,
    available_losses,
    compute_loss,
    eksft_loss,
    fused_compute,
    fused_eksft_head,
    fused_stats,
    fused_token_loss,
    get_loss,
    token_stats,
)

LINEAR = [n for n in available_losses() if isinstance(get_loss(n), LinearTokenLoss)]


def make_head(n=45, v=40, d=12, d_ref=9, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(n, d, generator=g)).to(dtype).requires_grad_()
    weight = (torch.randn(v, d, generator=g) * 0.6).to(dtype).requires_grad_()
    ref_hidden = torch.randn(n, d_ref, generator=g).to(dtype)
    ref_weight = (torch.randn(v, d_ref, generator=g) * 0.6).to(dtype)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[[2, 30]] = -100
    seq_ids = torch.arange(n) // 7
    return hidden, weight, ref_hidden, ref_weight, labels, seq_ids


def naive(name, hidden, weight, ref_hidden, ref_weight, labels, seq_ids=None, **params):
    loss, m = compute_loss(name, hidden @ weight.T, (ref_hidden @ ref_weight.T).detach(), labels, seq_ids, **params)
    gh, gw = torch.autograd.grad(loss, [hidden, weight])
    return loss.detach(), gh, gw, m


def test_linear_loss_list_is_what_the_fused_head_claims():
    assert set(LINEAR) == {"eksft", "eksft_no_entropy_reg", "eksft_no_kl_reg", "eksft_no_reg", "entropy_mask_only", "kl_mask_only",
                           "random_mask", "global_reg", "sft", "iw_sft"}


@pytest.mark.parametrize("name", LINEAR)
@pytest.mark.parametrize("chunk_size", [1, 8, 1000])
def test_fused_equals_naive(name, chunk_size):
    h, w, rh, rw, y, seq = make_head()
    l0, gh0, gw0, m0 = naive(name, h, w, rh, rw, y, seq)
    l1, m1 = fused_token_loss(name, h, w, rh, rw, y, seq, chunk_size=chunk_size)
    gh1, gw1 = torch.autograd.grad(l1, [h, w])
    assert l1.item() == pytest.approx(l0.item(), abs=1e-5, rel=1e-6)
    assert torch.allclose(gh1, gh0, atol=1e-6, rtol=1e-4)
    assert torch.allclose(gw1, gw0, atol=1e-6, rtol=1e-4)
    for k in ("n_mask", "iou", "n_tokens"):
        if k in m0:
            assert m1[k] == m0[k]


@pytest.mark.parametrize("rho,lam_h,lam_kl", [(0.2, 0.05, 0.05), (0.35, 0.5, 0.9), (1.0, 0.1, 0.0), (0.0, 0.05, 0.05)])
def test_fused_eksft_head_equals_eksft_loss(rho, lam_h, lam_kl):
    h, w, rh, rw, y, _ = make_head(seed=1)
    loss0, m0 = eksft_loss(h @ w.T, (rh @ rw.T).detach(), y, rho=rho, lambda_entropy=lam_h, lambda_kl=lam_kl)
    gh0, gw0 = torch.autograd.grad(loss0, [h, w])
    loss1, m1 = fused_eksft_head(h, w, rh, rw, y, rho=rho, lambda_entropy=lam_h, lambda_kl=lam_kl, chunk_size=16)
    gh1, gw1 = torch.autograd.grad(loss1, [h, w])
    assert loss1.item() == pytest.approx(loss0.item(), abs=1e-5, rel=1e-6)
    assert torch.allclose(gh1, gh0, atol=1e-6, rtol=1e-4) and torch.allclose(gw1, gw0, atol=1e-6, rtol=1e-4)
    for k in ("n_tokens", "n_mask", "n_mask_h", "n_mask_kl", "iou", "mask_frac"):
        assert m1[k] == pytest.approx(m0[k]), k
    assert m1["ce_unmasked"] == pytest.approx(m0["ce_unmasked"], abs=1e-5)


def test_fused_sft_needs_no_reference_and_equals_plain_ce():
    h, w, _, _, y, _ = make_head(seed=2)
    loss1, _ = fused_eksft_head(h, w, None, None, y, rho=0.0, chunk_size=10)
    gh1, gw1 = torch.autograd.grad(loss1, [h, w])
    ce = torch.nn.functional.cross_entropy(h @ w.T, y, ignore_index=-100)
    gh0, gw0 = torch.autograd.grad(ce, [h, w])
    assert loss1.item() == pytest.approx(ce.item(), abs=1e-6)
    assert torch.allclose(gh1, gh0, atol=1e-7, rtol=1e-5) and torch.allclose(gw1, gw0, atol=1e-7, rtol=1e-5)


def test_fused_stats_equal_token_stats():
    h, w, rh, rw, y, _ = make_head(seed=3)
    a = fused_stats(get_loss("eksft"), h, w, rh, rw, y, chunk_size=7)
    b = token_stats((h @ w.T).detach(), rh @ rw.T, y)
    for f in ("valid", "entropy", "logp", "kl", "ref_logp"):
        assert torch.allclose(getattr(a, f).float(), getattr(b, f).float(), atol=1e-5), f


def test_fused_compute_with_external_plan_per_micro_batch():
    """A trainer that planned globally calls the fused pass 2 per micro-batch; parts add up to the whole."""
    h, w, rh, rw, y, _ = make_head(seed=4)
    lf = get_loss("eksft", rho=0.3)
    plan = lf.plan(token_stats((h @ w.T).detach(), rh @ rw.T, y))
    wf = w.detach().clone().requires_grad_()  # gets the fused parts' gradients
    total, gh_parts = 0.0, []
    for rows in (slice(0, 10), slice(10, 11), slice(11, 45)):
        sub = plan.select(rows)
        hr = h.detach()[rows].requires_grad_()
        part, _ = fused_compute(lf, hr, wf, y[rows], rh[rows], rw, sub.token, sub.scalars, chunk_size=4)
        part.backward()
        total += part.item()
        gh_parts.append(hr.grad)
    full, _ = eksft_loss(h @ w.T, rh @ rw.T, y, rho=0.3)
    gh, gw = torch.autograd.grad(full, [h, w])
    assert total == pytest.approx(full.item(), abs=1e-5)
    assert torch.allclose(torch.cat(gh_parts), gh, atol=1e-6, rtol=1e-4)
    assert torch.allclose(wf.grad, gw, atol=1e-6, rtol=1e-4)


def test_fused_bf16_against_fp32_reference():
    h, w, rh, rw, y, _ = make_head(n=64, v=48, d=16, seed=5)
    loss32, _ = eksft_loss(h @ w.T, (rh @ rw.T).detach(), y)
    gh32, gw32 = torch.autograd.grad(loss32, [h, w])
    h16 = h.detach().bfloat16().requires_grad_()
    w16 = w.detach().bfloat16().requires_grad_()
    loss16, m16 = fused_eksft_head(h16, w16, rh.bfloat16(), rw.bfloat16(), y, chunk_size=16)
    assert loss16.dtype == torch.float32
    gh16, gw16 = torch.autograd.grad(loss16, [h16, w16])
    assert gh16.dtype == torch.bfloat16 and gw16.dtype == torch.bfloat16
    assert loss16.item() == pytest.approx(loss32.item(), rel=2e-2)
    rel = lambda a, b: ((a.float() - b).norm() / b.norm()).item()  # noqa: E731
    assert rel(gh16, gh32) < 3e-2 and rel(gw16, gw32) < 3e-2
    # and the bf16 fused head equals the bf16 naive head (same bf16 logits, fp32 math) more tightly
    loss_n, _ = eksft_loss(h16 @ w16.T, (rh.bfloat16() @ rw.bfloat16().T), y)
    assert loss16.item() == pytest.approx(loss_n.item(), rel=1e-3)


def test_fused_no_grad_mode_and_frozen_weight():
    h, w, rh, rw, y, _ = make_head(seed=6)
    with torch.no_grad():
        loss, _ = fused_eksft_head(h, w, rh, rw, y)
    ref, _ = eksft_loss((h @ w.T).detach(), rh @ rw.T, y)
    assert loss.item() == pytest.approx(ref.item(), abs=1e-5) and loss.grad_fn is None
    w_frozen = w.detach()
    loss, _ = fused_eksft_head(h, w_frozen, rh, rw, y)
    (gh,) = torch.autograd.grad(loss, [h])
    loss0, _ = eksft_loss(h @ w_frozen.T, rh @ rw.T, y)
    (gh0,) = torch.autograd.grad(loss0, [h])
    assert torch.allclose(gh, gh0, atol=1e-6, rtol=1e-4)


def test_fused_backward_scales_with_grad_output():
    h, w, rh, rw, y, _ = make_head(seed=7)
    loss, _ = fused_eksft_head(h, w, rh, rw, y)
    (3.0 * loss).backward()
    gh3 = h.grad.clone()
    h.grad = None
    loss, _ = fused_eksft_head(h, w, rh, rw, y)
    loss.backward()
    assert torch.allclose(gh3, 3 * h.grad, atol=1e-7, rtol=1e-6)


def test_fused_errors():
    h, w, rh, rw, y, _ = make_head(seed=8)
    with pytest.raises(ValueError, match="frozen"):
        fused_eksft_head(h, w, rh.requires_grad_(), rw, y)
    with pytest.raises(ValueError, match="needs the reference head"):
        fused_eksft_head(h, w, None, None, y)
    with pytest.raises(ValueError, match="is not one of them"):
        fused_token_loss("dft", h, w, None, None, y)
    with pytest.raises(ValueError, match="must agree on d"):
        fused_eksft_head(h, w[:, :5], rh.detach(), rw, y)
    with pytest.raises(ValueError, match=r"labels\[0\] = 40"):
        fused_eksft_head(h, w, rh.detach(), rw, torch.full_like(y, 40))


def test_default_chunk_is_sized_by_elements_off_cuda():
    """CPU: ~16M elements per [chunk, V] buffer (64 MiB fp32), so Qwen3's V = 151,936 gets 110 rows, not 512."""
    from eksft_pipeline.losses.fused import CUDA_DEFAULT_CHUNK, DEFAULT_CHUNK, default_chunk

    assert default_chunk(32768, "cpu") == DEFAULT_CHUNK == 512
    assert default_chunk(151936, "cpu") == 110
    assert default_chunk(1000, "cpu") == 512 and default_chunk(10**9, "cpu") == 1
    assert default_chunk(151936, "cuda") == CUDA_DEFAULT_CHUNK
