"""Each loss's declarations (losses/base.py: needs_ref, ref_in_compute, selected_fraction, heads) against what its
training pass does, measured from its gradients (loss_probe.py), and the SFT memory estimate against the same
measurement: the estimate reads the loss object, so no table of loss names can drift from the losses.

The name-keyed table memory.py used to keep failed this test on two losses: it said `entropy_mask_only` has no
reference logits in the training pass (its KL term on M_H needs them: measured True), and it counted 40 % of the rows
with an entropy / KL term for `random_mask` (its default lambdas are 0: measured 0 %).
"""

from __future__ import annotations

import pytest
from loss_probe import N_ROWS, measured_facts

from eksft_pipeline.losses import REGISTRY, LinearTokenLoss, available_losses, get_loss
from eksft_pipeline.verl_ext import memory

SHAPE = memory.ModelShape(vocab=1000, hidden=64, layers=2, intermediate=128, heads=4, kv_heads=2, head_dim=16,
                          tied=False)  # fmt: skip


def param_variants(name: str) -> list[dict]:
    """The defaults, every lambda at 0 and at 0.1, every boolean flipped (alone and with the lambdas at 0.1)."""
    specs = REGISTRY[name].PARAMS
    lambdas = [k for k in specs if k.startswith("lambda")]
    flags = [k for k, s in specs.items() if s.kind is bool]
    some = {k: 0.1 for k in lambdas}
    out = [{}, some] + [{k: 0.0} for k in lambdas]
    for f in flags:
        out += [{f: not specs[f].default}, {**some, f: not specs[f].default}]
    unique = []
    for v in out:
        if v not in unique:
            unique.append(v)
    return unique


CASES = [(n, p) for n in available_losses() for p in param_variants(n)]


@pytest.mark.parametrize("name,params", CASES, ids=[f"{n}-{'-'.join(f'{k}={v}' for k, v in p.items()) or 'defaults'}"
                                                    for n, p in CASES])  # fmt: skip
def test_declared_facts_are_what_the_training_pass_does(name, params):
    loss = get_loss(name, **params)
    got = measured_facts(loss)
    assert loss.selected_fraction == pytest.approx(got["selected_fraction"], abs=0.5 / N_ROWS), got
    assert loss.ref_in_compute == got["ref_in_training_pass"], got
    assert loss.needs_ref == got["needs_ref"], got
    # the memory estimate counts exactly those (its loss_terms are the inputs of its loss-head terms)
    est = memory.sft_estimate(SHAPE, tokens=256, world=1, loss=loss, head="naive")
    assert est.loss_terms["selected_fraction"] == pytest.approx(got["selected_fraction"], abs=0.5 / N_ROWS)
    assert est.loss_terms["ref_in_training_pass"] == got["ref_in_training_pass"]
    assert bool(est.host_terms) == got["needs_ref"]  # the reference model's pinned weights


@pytest.mark.parametrize("name", available_losses())
def test_head_resolution_follows_the_loss_form(name):
    """auto -> fused for the linear form (the fused head computes Σ w_ce·CE + w_h·H + w_kl·KL), naive otherwise; a
    head the loss cannot run on is refused by the one resolver the trainer and the memory estimate share."""
    loss = get_loss(name)
    linear = isinstance(loss, LinearTokenLoss)
    assert loss.resolve_head("auto") == loss.resolve_head(None) == ("fused" if linear else "naive")
    assert loss.resolve_head("naive") == "naive"
    if linear:
        assert loss.resolve_head("fused") == "fused"
    else:
        with pytest.raises(ValueError, match="eksft.head=naive"):
            loss.resolve_head("fused")
    est = memory.sft_estimate(SHAPE, tokens=256, world=1, loss=loss, head="auto")
    assert est.loss_terms["head"] == loss.resolve_head("auto")
