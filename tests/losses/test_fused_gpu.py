"""The fused EKSFT head on CUDA equals the naive loss (values and gradients). Skipped without a GPU."""

from __future__ import annotations

import pytest
import torch

from eksft_pipeline.losses import eksft_loss, fused_eksft_head

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _inputs(n, v, d, dtype, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    h = torch.randn(n, d, generator=g)
    w = torch.randn(v, d, generator=g) * (2.0 / d**0.5)
    hr = h + 0.3 * torch.randn(n, d, generator=g)
    wr = w + 0.02 * torch.randn(v, d, generator=g)
    y = torch.randint(0, v, (n,), generator=g)
    y[::7] = -100
    return [t.to("cuda", dtype if t.is_floating_point() else t.dtype) for t in (h, w, hr, wr)] + [y.cuda()]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_head_equals_naive_on_cuda(dtype):
    h, w, hr, wr, y = _inputs(2048, 32000, 256, dtype)
    h1, w1 = h.clone().requires_grad_(), w.clone().requires_grad_()
    naive, _ = eksft_loss(h1 @ w1.T, (hr @ wr.T).detach(), y)
    naive.backward()
    h2, w2 = h.clone().requires_grad_(), w.clone().requires_grad_()
    fused, _ = fused_eksft_head(h2, w2, hr, wr, y, chunk_size=512)
    fused.backward()
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(fused.float(), naive.float(), **tol)
    torch.testing.assert_close(h2.grad.float(), h1.grad.float(), **tol)
    torch.testing.assert_close(w2.grad.float(), w1.grad.float(), **tol)
