"""What a loss's training pass actually does, measured from its gradients (helper of test_loss_facts.py and
test_adding_a_method.py): the rows with an entropy / KL term and whether the reference logits change anything.

The batch is built so that every selective loss reaches its worst case: the first half of the rows are flat (high
entropy) with a reference close to the policy (small KL), the second half peaked (low entropy) with an unrelated
reference (large KL), so the top-k by H and the top-k by KL never overlap.
"""

from __future__ import annotations

import torch

N_ROWS, VOCAB = 40, 16  # rho = 0.2 and mask_ratio = 0.1 give whole k = 8 and 4


def probe_batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    half = N_ROWS // 2
    flat = torch.randn(half, VOCAB, generator=g, dtype=torch.float64) * 0.7
    peaked = torch.randn(half, VOCAB, generator=g, dtype=torch.float64) * 5.0
    logits = torch.cat([flat, peaked])
    ref = torch.cat([flat + 0.3 * torch.randn(half, VOCAB, generator=g, dtype=torch.float64),
                     torch.randn(half, VOCAB, generator=g, dtype=torch.float64) * 5.0])  # fmt: skip
    labels = torch.randint(0, VOCAB, (N_ROWS,), generator=g)
    other_ref = ref + torch.randn(N_ROWS, VOCAB, generator=g, dtype=torch.float64)
    return logits.float(), ref.float(), labels, other_ref.float()


def _grad(loss, logits, labels, ref, plan):
    z = logits.clone().requires_grad_()
    part, _ = loss.compute(z, labels, ref if loss.ref_in_compute else None, plan.token, plan.scalars)
    (g,) = torch.autograd.grad(part, z)
    return part.detach(), g


def _plan(loss, logits, ref, labels):
    stats = loss.stats(logits, ref if loss.needs_ref else None, labels)
    seq_ids = torch.arange(N_ROWS) // 10
    return loss.plan(stats, seq_ids if loss.needs_seq_ids else None, torch.Generator().manual_seed(0))


def _same_plan(a, b) -> bool:
    return (a.token.keys() == b.token.keys() and all(torch.equal(a.token[k], b.token[k]) for k in a.token)
            and a.scalars == b.scalars and a.metrics == b.metrics)  # fmt: skip


def measured_facts(loss) -> dict[str, float | bool]:
    """selected_fraction: share of rows whose logits gradient is not of the CE form c·(p - e_y) (an entropy or KL
    term acts there); ref_in_training_pass: replacing the reference logits changes the loss or its gradient;
    needs_ref: replacing them changes the plan or the training pass (a loss that says it needs no reference gets
    none, and must work without it)."""
    logits, ref, labels, other_ref = probe_batch()
    plan = _plan(loss, logits, ref, labels)
    part, g = _grad(loss, logits, labels, ref, plan)
    p = torch.softmax(logits.double(), -1)
    ce_dir = p - torch.nn.functional.one_hot(labels, VOCAB).double()
    g = g.double()
    c = (g * ce_dir).sum(-1, keepdim=True) / (ce_dir * ce_dir).sum(-1, keepdim=True)
    residual = (g - c * ce_dir).norm(dim=-1)
    scale = g.norm(dim=-1)
    other = scale > 1e-12
    distributional = other & (residual > 1e-4 * scale)
    used = False
    if loss.ref_in_compute:
        part2, g2 = _grad(loss, logits, labels, other_ref, plan)
        used = not (torch.allclose(part, part2, rtol=0, atol=1e-7) and torch.allclose(g, g2.double(), rtol=0, atol=1e-9))
    needs_ref = used or (loss.needs_ref and not _same_plan(plan, _plan(loss, logits, other_ref, labels)))
    return {"selected_fraction": float(distributional.double().mean()), "ref_in_training_pass": used,
            "needs_ref": needs_ref}  # fmt: skip
