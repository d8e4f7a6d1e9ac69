"""Every loss on tiny hand-built batches (V=4, N=5/6), against formulas written out with the math module."""

from __future__ import annotations

import math

import pytest
import torch
from eksft_mathref import ce, entropy, kl, log_softmax, mean, selective_loss, softmax, topk_stable

from eksft_pipeline.losses import compute_loss, eksft_loss, get_loss

# Row 1 is uniform (largest entropy), row 3 is pushed hardest away from its reference (largest KL),
# rows 0, 1, 4 equal their reference (KL = 0): with k = 1, M_H = {1} and M_KL = {3} differ.
LOGITS = [[2.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0], [3.0, 1.0, 0.0, -1.0],
          [0.5, 0.0, 0.0, 2.0]]
REF = [[2.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0, 1.0, 1.0, 0.0], [-1.0, 0.0, 1.0, 3.0],
       [0.5, 0.0, 0.0, 2.0]]
LABELS = [0, 2, 1, 3, 3]
# Sixth row: same entropy as row 2 (a permutation of it: an exact tie at the k-th entropy, broken at random --
# never by position -- see losses/selection.py) and the second-largest KL, so with k = ceil(0.2 * 6) = 2:
# M_H = {1, 2} or {1, 5}, M_KL = {3, 5}.
LOGITS6 = LOGITS + [[1.0, 0.0, 1.0, 0.0]]
REF6 = REF + [[0.0, 1.0, 0.0, 1.0]]
LABELS6 = LABELS + [0]
N = len(LABELS)


def t(x, dtype=torch.float32):
    return torch.tensor(x, dtype=dtype)


def run(name, logits=LOGITS, ref=REF, labels=LABELS, **kw):
    lg = t(logits).requires_grad_()
    loss, metrics = compute_loss(name, lg, t(ref), torch.tensor(labels), **kw)
    return loss, metrics, lg


def test_reference_case_is_what_the_comments_say():
    hs = [entropy(r) for r in LOGITS]
    kls = [kl(r, q) for r, q in zip(LOGITS, REF)]
    assert topk_stable(hs, 1) == {1} and topk_stable(kls, 1) == {3}
    hs6 = [entropy(r) for r in LOGITS6]
    kls6 = [kl(r, q) for r, q in zip(LOGITS6, REF6)]
    assert math.isclose(hs6[2], hs6[5], rel_tol=1e-12)
    assert topk_stable(hs6, 2) == {1, 2} and topk_stable(kls6, 2) == {3, 5}


def test_eksft_value_and_metrics():
    loss, m, _ = run("eksft")
    expected = selective_loss(LOGITS, REF, LABELS, {1, 3}, 0.05, 0.05)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert loss.dtype == torch.float32
    assert (m["n_tokens"], m["k"], m["n_mask_h"], m["n_mask_kl"], m["n_mask"]) == (5, 1, 1, 1, 2)
    assert m["iou"] == 0.0 and m["mask_frac"] == pytest.approx(0.4)
    assert m["ce_unmasked"] == pytest.approx(mean([ce(LOGITS[i], LABELS[i]) for i in (0, 2, 4)]), abs=1e-6)
    assert m["entropy_mask"] == pytest.approx(mean([entropy(LOGITS[i]) for i in (1, 3)]), abs=1e-6)
    assert m["kl_mask"] == pytest.approx(mean([kl(LOGITS[i], REF[i]) for i in (1, 3)]), abs=1e-6)
    assert m["entropy_all"] == pytest.approx(mean([entropy(r) for r in LOGITS]), abs=1e-6)
    assert m["kl_all"] == pytest.approx(mean([kl(r, q) for r, q in zip(LOGITS, REF)]), abs=1e-6)
    loss2, _ = eksft_loss(t(LOGITS), t(REF), torch.tensor(LABELS))
    assert loss2.item() == loss.item()


def test_eksft_custom_weights():
    loss, _, _ = run("eksft", rho=0.2, lambda_entropy=0.3, lambda_kl=0.7)
    assert loss.item() == pytest.approx(selective_loss(LOGITS, REF, LABELS, {1, 3}, 0.3, 0.7), abs=1e-6)


def test_union_and_ceil_n6_with_entropy_tie():
    lf = get_loss("eksft")
    stats = lf.stats(t(LOGITS6), t(REF6), torch.tensor(LABELS6))
    assert stats.entropy[2] == stats.entropy[5]  # an exact tie in fp32 too
    seen = set()
    for seed in range(20):
        plan = lf.plan(stats, generator=torch.Generator().manual_seed(seed))
        m_h = tuple(plan.token["mask_h"].nonzero().flatten().tolist())
        assert m_h in {(1, 2), (1, 5)} and plan.token["mask_kl"].nonzero().flatten().tolist() == [3, 5]
        seen.add(m_h)
        mask = set(plan.token["mask"].nonzero().flatten().tolist())
        assert mask == set(m_h) | {3, 5}
        m = plan.metrics
        assert (m["k"], m["n_mask_h"], m["n_mask_kl"], m["n_mask"]) == (2, 2, 2, len(mask))
        assert m["iou"] == pytest.approx(len(set(m_h) & {3, 5}) / len(mask))
        lg = t(LOGITS6).requires_grad_()
        loss, _ = lf.compute(lg, torch.tensor(LABELS6), t(REF6), plan.token, plan.scalars)
        assert loss.item() == pytest.approx(selective_loss(LOGITS6, REF6, LABELS6, mask, 0.05, 0.05), abs=1e-6)
    assert seen == {(1, 2), (1, 5)}  # both tied rows get picked: the tie is not broken by position


def test_overlapping_selection_iou():
    # rho = 0.4, N = 5 -> k = 2: M_H = {1, 2}, M_KL = {3, 2}: |∩| = 1, |∪| = 3
    kls = [kl(r, q) for r, q in zip(LOGITS, REF)]
    assert topk_stable(kls, 2) == {2, 3}
    loss, m, _ = run("eksft", rho=0.4)
    assert (m["n_mask_h"], m["n_mask_kl"], m["n_mask"]) == (2, 2, 3)
    assert m["iou"] == pytest.approx(1 / 3)
    assert loss.item() == pytest.approx(selective_loss(LOGITS, REF, LABELS, {1, 2, 3}, 0.05, 0.05), abs=1e-6)


@pytest.mark.parametrize("name,mask,lam_h,lam_kl", [
    ("eksft_no_entropy_reg", {1, 3}, 0.0, 0.05),
    ("eksft_no_kl_reg", {1, 3}, 0.05, 0.0),
    ("eksft_no_reg", {1, 3}, 0.0, 0.0),
    ("entropy_mask_only", {1}, 0.05, 0.05),
    ("kl_mask_only", {3}, 0.05, 0.05),
])
def test_ablations(name, mask, lam_h, lam_kl):
    loss, m, _ = run(name)
    assert m["n_mask"] == len(mask)
    assert loss.item() == pytest.approx(selective_loss(LOGITS, REF, LABELS, mask, lam_h, lam_kl), abs=1e-6)


def test_global_reg():
    loss, _, _ = run("global_reg", lambda_entropy=0.1, lambda_kl=0.2)
    expected = (mean([ce(r, y) for r, y in zip(LOGITS, LABELS)]) - 0.1 * mean([entropy(r) for r in LOGITS])
                + 0.2 * mean([kl(r, q) for r, q in zip(LOGITS, REF)]))
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_random_mask_drops_ten_percent_by_default():
    """Paper App. H: ceil(0.1·N) valid tokens dropped uniformly from the CE, with EKSFT's entropy / KL
    regularisers (lambda 0.05 each) on the dropped tokens; the reference is needed, no pre-pass."""
    lf = get_loss("random_mask", seed=3)
    assert (lf.params["lambda_entropy"], lf.params["lambda_kl"]) == (0.05, 0.05)
    assert (lf.needs_ref, lf.needs_prepass, lf.ref_in_compute) == (True, False, True)
    labels = list(LABELS) * 4  # N = 20 -> |M| = 2
    logits, ref = LOGITS * 4, REF * 4
    stats = lf.stats(t(logits), t(ref), torch.tensor(labels))
    plan = lf.plan(stats)
    mask = set(plan.token["mask"].nonzero().flatten().tolist())
    assert len(mask) == 2 and plan.metrics["mask_frac"] == pytest.approx(0.1)
    loss, terms = lf.compute(t(logits), torch.tensor(labels), t(ref), plan.token, plan.scalars)
    # each term by hand: CE over the kept 18, -0.05·mean H and +0.05·mean KL over the 2 dropped tokens
    ce_kept = mean([ce(logits[i], labels[i]) for i in range(20) if i not in mask])
    ent_m = mean([entropy(logits[i]) for i in mask])
    kl_m = mean([kl(logits[i], ref[i]) for i in mask])
    assert terms["ce_term"].item() == pytest.approx(ce_kept, abs=1e-6)
    assert terms["entropy_term"].item() == pytest.approx(-0.05 * ent_m, abs=1e-6)
    assert terms["kl_term"].item() == pytest.approx(0.05 * kl_m, abs=1e-6)
    assert loss.item() == pytest.approx(ce_kept - 0.05 * ent_m + 0.05 * kl_m, abs=1e-6)
    assert loss.item() == pytest.approx(selective_loss(logits, ref, labels, mask, 0.05, 0.05), abs=1e-6)
    # the KL term needs the reference in compute
    with pytest.raises(ValueError, match="ref_logits"):
        lf.compute(t(logits), torch.tensor(labels), None, plan.token, plan.scalars)
    # ignored rows are never drawn, and ceil: 5 valid tokens -> ceil(0.5) = 1
    lab = torch.tensor(LABELS[:4] + [-100] * 3 + LABELS[4:])
    pad = LOGITS[:4] + [[0.0] * 4] * 3 + LOGITS[4:]
    m = lf.plan(lf.stats(t(pad), t(pad), lab)).token["mask"]
    assert int(m.sum()) == 1 and not m[4:7].any()
    # the size is a parameter; with both lambdas 0 the tokens are simply dropped and no reference is needed
    assert int(get_loss("random_mask", mask_ratio=0.5).plan(stats).token["mask"].sum()) == 10
    plain = get_loss("random_mask", seed=3, lambda_entropy=0.0, lambda_kl=0.0)
    assert (plain.needs_ref, plain.needs_prepass) == (False, False)
    p2 = plain.plan(plain.stats(t(logits), None, torch.tensor(labels)))
    drop = set(p2.token["mask"].nonzero().flatten().tolist())
    loss2, _ = plain.compute(t(logits), torch.tensor(labels), None, p2.token, p2.scalars)
    assert loss2.item() == pytest.approx(mean([ce(logits[i], labels[i]) for i in range(20) if i not in drop]), abs=1e-6)


def test_random_mask_matched_to_eksft_size_formula_and_seed():
    lf = get_loss("random_mask", seed=3, match_eksft_size=True, lambda_entropy=0.05, lambda_kl=0.05)
    assert lf.needs_ref and lf.needs_prepass
    stats = lf.stats(t(LOGITS), t(REF), torch.tensor(LABELS))
    plan = lf.plan(stats)
    mask = set(plan.token["mask"].nonzero().flatten().tolist())
    assert len(mask) == 2  # = |M_H ∪ M_KL| of eksft on this batch
    lg = t(LOGITS).requires_grad_()
    loss, _ = lf.compute(lg, torch.tensor(LABELS), t(REF), plan.token, plan.scalars)
    assert loss.item() == pytest.approx(selective_loss(LOGITS, REF, LABELS, mask, 0.05, 0.05), abs=1e-6)
    # same seed -> same sequence of masks; an explicit generator overrides the loss's own
    again = get_loss("random_mask", seed=3, match_eksft_size=True).plan(stats).token["mask"]
    assert torch.equal(again, plan.token["mask"])
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    assert torch.equal(lf.plan(stats, generator=g1).token["mask"], lf.plan(stats, generator=g2).token["mask"])
    # uniform over tokens: each of the 5 tokens is picked with probability 2/5
    counts = torch.zeros(N)
    for _ in range(500):
        counts += lf.plan(stats).token["mask"].float()
    assert counts.sum() == 1000
    assert ((counts / 500 - 0.4).abs() < 0.1).all(), counts


def test_sft():
    loss, _, _ = run("sft")
    assert loss.item() == pytest.approx(mean([ce(r, y) for r, y in zip(LOGITS, LABELS)]), abs=1e-6)


def test_dft_value_and_stop_gradient():
    loss, _, lg = run("dft")
    p_y = [softmax(r)[y] for r, y in zip(LOGITS, LABELS)]
    assert loss.item() == pytest.approx(mean([p * ce(r, y) for p, r, y in zip(p_y, LOGITS, LABELS)]), abs=1e-6)
    loss.backward()
    # d/dz of -sg(p_y) log p_y = -p_y (onehot - p) / N   (the weight is not differentiated)
    for i, (r, y) in enumerate(zip(LOGITS, LABELS)):
        p = softmax(r)
        want = [-p_y[i] * ((1.0 if v == y else 0.0) - p[v]) / N for v in range(4)]
        assert lg.grad[i].tolist() == pytest.approx(want, abs=1e-6)


def test_asft_reverse_kl():
    ref = REF[:2] + [[0.0, 0.0, 0.0, 3.0]] + REF[3:]  # row 2 vs a peaked reference: KL is asymmetric
    loss, _, _ = run("asft", ref=ref)
    expected = mean([softmax(r)[y] * ce(r, y) + 0.1 * kl(q, r) for r, q, y in zip(LOGITS, ref, LABELS)])
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    forward_kl = mean([softmax(r)[y] * ce(r, y) + 0.1 * kl(r, q) for r, q, y in zip(LOGITS, ref, LABELS)])
    assert abs(expected - forward_kl) > 1e-3  # the direction matters on this batch


def test_iw_sft_sequence_weights():
    seq = [0, 0, 1, 1, 1]
    loss, m, _ = run("iw_sft", seq_ids=torch.tensor(seq))
    lr = [log_softmax(r)[y] - log_softmax(q)[y] for r, q, y in zip(LOGITS, REF, LABELS)]
    w = {s: min(math.exp(mean([lr[i] for i in range(N) if seq[i] == s])), 16.0) for s in (0, 1)}
    expected = sum(w[seq[i]] * ce(LOGITS[i], LABELS[i]) for i in range(N)) / N
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert m["n_seqs"] == 2 and m["iw_single_sequence"] == 0.0
    # clipping at max_weight
    loss_c, m_c, _ = run("iw_sft", seq_ids=torch.tensor(seq), max_weight=0.5)
    wc = {s: min(w[s], 0.5) for s in w}
    assert loss_c.item() == pytest.approx(sum(wc[seq[i]] * ce(LOGITS[i], LABELS[i]) for i in range(N)) / N, rel=1e-6)
    assert m_c["iw_clip_frac"] == pytest.approx(sum(w[s] > 0.5 for s in w) / 2)


def test_iw_sft_without_seq_ids_is_one_sequence():
    with pytest.warns(UserWarning, match="ONE sequence"):
        loss, m, _ = run("iw_sft")
    lr = [log_softmax(r)[y] - log_softmax(q)[y] for r, q, y in zip(LOGITS, REF, LABELS)]
    w = min(math.exp(mean(lr)), 16.0)
    assert loss.item() == pytest.approx(w * mean([ce(r, y) for r, y in zip(LOGITS, LABELS)]), rel=1e-6)
    assert m["iw_single_sequence"] == 1.0 and m["n_seqs"] == 1


def test_psft_clipped_surrogate_value_and_gradient():
    lf = get_loss("psft")
    old = t(LOGITS)
    plan = lf.plan(lf.stats(old, None, torch.tensor(LABELS)))
    # new policy: token 0 gains a lot (r > 1.28, clipped), token 3 loses a lot (r < 0.8), others move a little
    shift = [[3.0, 0, 0, 0], [0, 0, 0.1, 0], [0, 0.05, 0, 0], [0, 0, 0, -2.0], [0, 0, 0, 0]]
    new = [[a + b for a, b in zip(r, s)] for r, s in zip(LOGITS, shift)]
    lg = t(new).requires_grad_()
    loss, m = lf.compute(lg, torch.tensor(LABELS), None, plan.token, plan.scalars)
    r = [softmax(new[i])[LABELS[i]] / softmax(LOGITS[i])[LABELS[i]] for i in range(N)]
    assert r[0] > 1.28 and r[3] < 0.8
    expected = mean([-min(x, min(max(x, 0.8), 1.28)) for x in r])
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert m["clip_frac"].item() == pytest.approx(1 / N)
    loss.backward()
    for i in range(N):
        p = softmax(new[i])
        scale = 0.0 if r[i] > 1.28 else r[i]  # d(-r)/dz = -r (onehot - p) unless clipped
        want = [-scale * ((1.0 if v == LABELS[i] else 0.0) - p[v]) / N for v in range(4)]
        assert lg.grad[i].tolist() == pytest.approx(want, abs=1e-6)


def test_psft_at_the_start_of_the_batch_is_sft():
    loss, _, lg = run("psft")
    assert loss.item() == pytest.approx(-1.0, abs=1e-6)  # r ≡ 1
    loss.backward()
    lg2 = t(LOGITS).requires_grad_()
    compute_loss("sft", lg2, None, torch.tensor(LABELS))[0].backward()
    assert torch.allclose(lg.grad, lg2.grad, atol=1e-7)


def _official_expected(logits, ref, labels, mask_h, mask_kl, lam_h, lam_kl, dynamic=True, union=True):
    n = len(labels)
    cm = (mask_h | mask_kl) if union else (mask_h & mask_kl)
    ent = mean([entropy(logits[i]) / math.log(4) for i in sorted(mask_h)])
    their_kl = [sum(p * (p - lq) for p, lq in zip(softmax(logits[i]), log_softmax(ref[i]))) for i in sorted(mask_kl)]
    klt = mean(their_kl)
    if dynamic:
        lam_h *= 1.05 if ent < 0.5 else 0.95
        lam_kl *= 1.05 if klt > 2.0 else 0.95
    ce_term = mean([ce(logits[i], labels[i]) for i in range(n) if i not in cm])
    return ce_term - lam_h * ent + lam_kl * klt, lam_h, lam_kl


@pytest.mark.parametrize("dynamic", [True, False])
@pytest.mark.parametrize("union", [True, False])
def test_eksft_official(dynamic, union):
    loss, m, _ = run("eksft_official", dynamic_lambda=dynamic, union=union, lambda_entropy=0.2, lambda_kl=0.3)
    expected, lam_h, lam_kl = _official_expected(LOGITS, REF, LABELS, {1}, {3}, 0.2, 0.3, dynamic, union)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert m["k"] == 1  # floor(0.2 * 5)
    assert m["lambda_entropy_eff"] == pytest.approx(lam_h) and m["lambda_kl_eff"] == pytest.approx(lam_kl)
    if dynamic:  # uniform row 1: normalised entropy 1.0 >= 0.5 -> x0.95
        assert lam_h == pytest.approx(0.2 * 0.95)


def test_eksft_official_floor_vs_paper_ceil():
    # N = 6: floor(1.2) = 1 (official) vs ceil(1.2) = 2 (paper); N = 4: floor(0.8) = 0 -> plain CE
    _, m_off, _ = run("eksft_official", logits=LOGITS6, ref=REF6, labels=LABELS6)
    _, m_pap, _ = run("eksft", logits=LOGITS6, ref=REF6, labels=LABELS6)
    assert (m_off["k"], m_pap["k"]) == (1, 2)
    loss4, m4, _ = run("eksft_official", logits=LOGITS[:4], ref=REF[:4], labels=LABELS[:4])
    assert m4["k"] == 0 and m4["n_mask"] == 0 and m4["iou"] == 0.0
    assert loss4.item() == pytest.approx(mean([ce(r, y) for r, y in zip(LOGITS[:4], LABELS[:4])]), abs=1e-6)


def test_masked_token_gradient_is_regulariser_only():
    """On a masked token the gradient has no (onehot - p) CE part: it is exactly
    (-lam_h/|M|) dH/dz + (lam_kl/|M|) dKL/dz with dH/dz = -p (log p + H), dKL/dz = p (log p - log q - KL)."""
    loss, _, lg = run("eksft", lambda_entropy=0.3, lambda_kl=0.7)
    loss.backward()
    for i in (1, 3):
        p, lp, lq = softmax(LOGITS[i]), log_softmax(LOGITS[i]), log_softmax(REF[i])
        h, k = entropy(LOGITS[i]), kl(LOGITS[i], REF[i])
        want = [(-0.3 / 2) * (-p[v] * (lp[v] + h)) + (0.7 / 2) * p[v] * (lp[v] - lq[v] - k) for v in range(4)]
        assert lg.grad[i].tolist() == pytest.approx(want, abs=1e-6)
    for i in (0, 2, 4):  # unmasked: plain CE gradient (onehot - p) * (-1/3)
        p = softmax(LOGITS[i])
        want = [(p[v] - (1.0 if v == LABELS[i] else 0.0)) / 3 for v in range(4)]
        assert lg.grad[i].tolist() == pytest.approx(want, abs=1e-6)


def test_changing_a_masked_label_changes_nothing():
    loss_a, _, lg_a = run("eksft")
    loss_a.backward()
    for new_label in (0, 1, 3):  # row 1 is masked (its label was 2)
        labels = list(LABELS)
        labels[1] = new_label
        loss_b, _, lg_b = run("eksft", labels=labels)
        loss_b.backward()
        assert torch.equal(loss_a.detach(), loss_b.detach())
        assert torch.equal(lg_a.grad, lg_b.grad)
    labels = list(LABELS)
    labels[0] = 1  # row 0 is not masked: its label matters
    loss_c, _, _ = run("eksft", labels=labels)
    assert abs(loss_c.item() - loss_a.item()) > 1e-3


def test_rho_one_masks_everything_ce_term_zero():
    loss, m, _ = run("eksft", rho=1.0)
    assert m["n_mask"] == N and m["ce_unmasked"] == 0.0
    expected = -0.05 * mean([entropy(r) for r in LOGITS]) + 0.05 * mean([kl(r, q) for r, q in zip(LOGITS, REF)])
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_ignored_rows_are_excluded():
    logits = LOGITS + [[9.0, -9.0, 0.0, 0.0]]  # an extra row with label -100: high entropy? no matter, ignored
    ref = REF + [[-9.0, 9.0, 0.0, 0.0]]
    loss, m, lg = run("eksft", logits=logits, ref=ref, labels=LABELS + [-100])
    assert m["n_tokens"] == 5
    assert loss.item() == pytest.approx(selective_loss(LOGITS, REF, LABELS, {1, 3}, 0.05, 0.05), abs=1e-6)
    loss.backward()
    assert torch.equal(lg.grad[5], torch.zeros(4))
