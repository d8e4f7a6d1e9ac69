"""Registry, parameter validation, input errors, k rounding and the tie-breaking rule."""

from __future__ import annotations

import pytest
import torch

from eksft_pipeline.losses import (
    REGISTRY,
    TokenStats,
    available_losses,
    ceil_k,
    compute_loss,
    floor_k_official,
    get_loss,
    token_stats,
    topk_mask,
)

EXPECTED = {"eksft", "eksft_no_entropy_reg", "eksft_no_kl_reg", "eksft_no_reg", "entropy_mask_only", "kl_mask_only", "random_mask",
            "global_reg", "sft", "dft", "iw_sft", "psft", "asft", "eksft_official"}


def test_available_losses():
    assert set(available_losses()) == EXPECTED
    assert available_losses() == sorted(available_losses())


def test_unknown_loss_lists_known_names():
    with pytest.raises(ValueError, match="unknown loss 'eksftt'") as e:
        get_loss("eksftt")
    for name in EXPECTED:
        assert name in str(e.value)


@pytest.mark.parametrize("name,params,match", [
    ("eksft", {"rh0": 0.1}, r"unknown parameter\(s\) \['rh0'\].*valid parameters"),
    ("eksft", {"rho": 1.5}, "rho=1.5 must be in \\[0, 1\\]"),
    ("eksft", {"rho": -0.1}, "must be in"),
    ("eksft", {"lambda_kl": -1}, "lambda_kl=-1 must be >= 0"),
    ("eksft", {"rho": "0.2"}, "must be a finite float"),
    ("eksft", {"rho": True}, "must be a finite float"),
    ("eksft", {"lambda_entropy": float("nan")}, "must be a finite float"),
    ("eksft_no_entropy_reg", {"lambda_entropy": 0.1}, "fixed by this variant"),
    ("eksft_no_kl_reg", {"lambda_kl": 0.1}, "fixed by this variant"),
    ("random_mask", {"seed": 1.5}, "must be a finite int"),
    ("random_mask", {"seed": -1}, ">= 0"),
    ("sft", {"rho": 0.2}, "valid parameters: none"),
    ("iw_sft", {"max_weight": 0.0}, "> 0"),
    ("psft", {"eps_low": 1.0}, r"in \[0, 1\)"),
    ("eksft_official", {"union": 1}, "must be a finite bool"),
])
def test_bad_parameters(name, params, match):
    with pytest.raises(ValueError, match=match):
        get_loss(name, **params)


def test_parameters_are_applied():
    lf = get_loss("eksft", rho=1, lambda_entropy=0)
    assert lf.params == {"rho": 1.0, "lambda_entropy": 0.0, "lambda_kl": 0.05}
    assert get_loss("eksft_no_entropy_reg").params["lambda_entropy"] == 0.0


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_loss_documents_formula_and_source(name):
    doc = REGISTRY[name].__doc__ or ""
    assert "loss" in doc and "=" in doc, f"{name}: docstring must give the formula"
    assert "Source:" in doc, f"{name}: docstring must cite its source"


def test_ceil_k_and_floor_k():
    assert ceil_k(0.2, 5) == 1 and ceil_k(0.2, 6) == 2 and ceil_k(0.2, 0) == 0 and ceil_k(0.0, 100) == 0
    assert ceil_k(0.1, 30) == 3  # 0.1 * 30 = 3.0000000000000004 in floats: must not round up to 4
    assert ceil_k(1.0, 7) == 7 and ceil_k(0.2, 1) == 1
    assert floor_k_official(0.2, 6) == 1 and floor_k_official(0.2, 4) == 0 and floor_k_official(0.2, 10) == 2


def test_topk_only_valid_rows_and_rows_above_the_tie_always():
    scores = torch.tensor([1.0, 3.0, 3.0, 2.0, 3.0, 5.0])
    valid = torch.tensor([True, True, True, True, True, False])  # the 5.0 row is ignored
    assert topk_mask(scores, valid, 4).nonzero().flatten().tolist() == [1, 2, 3, 4]  # no tie at the 4th score
    two = topk_mask(scores, valid, 2)
    assert int(two.sum()) == 2 and set(two.nonzero().flatten().tolist()) <= {1, 2, 4}
    assert topk_mask(scores, valid, 0).sum() == 0
    with pytest.raises(ValueError, match="exceeds"):
        topk_mask(scores, valid, 6)


def test_ties_never_select_by_position():
    """Tied scores at the k-th place: every tied row is equally likely, whatever its position; same seed, same mask."""
    n, k, trials = 10, 3, 600
    scores, valid = torch.ones(n), torch.ones(n, dtype=torch.bool)
    counts = torch.zeros(n)
    for seed in range(trials):
        m = topk_mask(scores, valid, k, generator=torch.Generator().manual_seed(seed))
        assert int(m.sum()) == k
        counts += m.float()
    freq = counts / trials
    # each row is selected with probability k/n = 0.3 (binomial sd 0.019 at 600 trials): 5 sd bounds
    assert float(freq.min()) > 0.2 and float(freq.max()) < 0.4, freq.tolist()
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    assert torch.equal(topk_mask(scores, valid, k, generator=g1), topk_mask(scores, valid, k, generator=g2))


def test_zero_scores_are_never_selected_and_step_one_selects_no_kl_tokens():
    """pi_theta == pi_ref (the first step): every KL is exactly 0, so M_KL is empty and M = M_H -- not the first
    k rows of the batch (what a stable sort of the all-zero KLs would give)."""
    torch.manual_seed(0)
    n, v = 40, 7
    logits = torch.randn(n, v) * 2
    labels = torch.randint(0, v, (n,))
    lf = get_loss("eksft", rho=0.2)
    stats = lf.stats(logits, logits.clone(), labels)
    assert float(stats.kl.abs().max()) == 0.0
    plan = lf.plan(stats, generator=torch.Generator().manual_seed(3))
    k = ceil_k(0.2, n)
    assert int(plan.token["mask_kl"].sum()) == 0 and plan.metrics["n_mask_kl"] == 0
    expected_h = torch.zeros(n, dtype=torch.bool)
    expected_h[torch.topk(stats.entropy, k).indices] = True
    assert torch.equal(plan.token["mask"], expected_h) and plan.metrics["n_mask"] == k
    assert plan.metrics["iou"] == 0.0
    # a score <= 0 never enters a top-k, even when fewer than k scores are positive
    scores = torch.tensor([0.0, -1e-9, 0.5, 0.0, 2.0])
    assert topk_mask(scores, torch.ones(5, dtype=torch.bool), 3).nonzero().flatten().tolist() == [2, 4]


def test_official_variant_keeps_k_tokens_at_step_one_chosen_at_random():
    """The authors' torch.topk always returns k rows: at step 1 (all KL = 0) k tied tokens, not the first k."""
    torch.manual_seed(1)
    n, v = 30, 5
    logits = torch.randn(n, v)
    labels = torch.randint(0, v, (n,))
    lf = get_loss("eksft_official", rho=0.2)
    stats = lf.stats(logits, logits.clone(), labels)
    firsts = 0
    for seed in range(30):
        plan = lf.plan(stats, generator=torch.Generator().manual_seed(seed))
        m_kl = plan.token["mask_kl"]
        assert int(m_kl.sum()) == 6  # floor(0.2 * 30)
        firsts += int(m_kl.nonzero().flatten().tolist() == list(range(6)))
    assert firsts == 0


def test_input_errors():
    logits, labels = torch.randn(4, 6), torch.tensor([0, 1, 2, 3])
    with pytest.raises(ValueError, match=r"labels\[2\] = 6 is outside \[0, 6\)"):
        compute_loss("sft", logits, None, torch.tensor([0, 1, 6, 3]))
    with pytest.raises(ValueError, match="labels must be a 1-D tensor with 4 entries"):
        compute_loss("sft", logits, None, labels[:3])
    with pytest.raises(ValueError, match="integer"):
        compute_loss("sft", logits, None, labels.float())
    with pytest.raises(ValueError, match=r"2-D tensor \[N, V\]"):
        compute_loss("sft", logits[None], None, labels)
    with pytest.raises(ValueError, match="needs ref_logits"):
        compute_loss("eksft", logits, None, labels)
    with pytest.raises(ValueError, match="ref_logits must have the shape"):
        compute_loss("eksft", logits, torch.randn(4, 5), labels)
    bad = logits.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="not finite at row 1"):
        compute_loss("eksft", bad, logits, labels)


def test_compute_checks_plan_fields():
    lf = get_loss("eksft")
    logits, labels = torch.randn(4, 6), torch.tensor([0, 1, 2, 3])
    plan = lf.plan(lf.stats(logits, logits, labels))
    with pytest.raises(ValueError, match="missing"):
        lf.compute(logits, labels, logits, {}, plan.scalars)
    with pytest.raises(ValueError, match="missing"):
        lf.compute(logits, labels, logits, plan.token, {})
    with pytest.raises(ValueError, match="has 4 rows but the micro-batch has 2"):
        lf.compute(logits[:2], labels[:2], logits[:2], plan.token, plan.scalars)
    with pytest.raises(ValueError, match="needs ref_logits in compute"):
        lf.compute(logits, labels, None, plan.token, plan.scalars)
    with pytest.raises(ValueError, match="needs token statistics \\['kl'\\]"):
        lf.plan(token_stats(logits, None, labels))
    with pytest.raises(ValueError, match="needs token statistics"):
        get_loss("psft").plan(TokenStats.labels_only(labels, 6))


def test_stats_helpers_roundtrip():
    logits, labels = torch.randn(7, 5), torch.tensor([0, 1, -100, 3, 4, 0, 2])
    st = token_stats(logits, logits + 1.0, labels, chunk_size=2)  # shifting all logits keeps softmax: KL = 0
    assert st.n_tokens == 6 and st.n_rows == 7
    assert torch.allclose(st.kl, torch.zeros(7), atol=1e-6)
    assert st.entropy[2] == 0 and st.logp[2] == 0  # ignored row
    cat = TokenStats.cat([st.select(slice(0, 3)), st.select(slice(3, 7))])
    for f in ("valid", "entropy", "logp", "kl", "ref_logp"):
        assert torch.equal(getattr(cat, f), getattr(st, f))
    with pytest.raises(ValueError, match="present in some parts"):
        TokenStats.cat([st, token_stats(logits, None, labels)])
