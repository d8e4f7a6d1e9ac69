"""The SFT trainer's step plan without verl: selection scopes, update groups, IoU metrics, the reference
hidden-state store and the configuration checks (eksft_pipeline/verl_ext/sft_plan.py, head.py)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from eksft_pipeline.losses import IGNORE_INDEX, TokenStats, compute_loss, get_loss, token_stats
from eksft_pipeline.verl_ext.sft_head import RefHiddenStore, valid_rows
from eksft_pipeline.verl_ext.sft_plan import (
    SCALAR_PREFIX,
    UNIT_WEIGHT,
    check_eksft_block,
    complete_eksft_block,
    plan_step,
)


def _batch(lengths=(9, 14, 6, 11), v=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = sum(lengths)
    logits = torch.randn(n, v, generator=g) * 2
    ref = logits + 0.7 * torch.randn(n, v, generator=g)
    labels = torch.randint(0, v, (n,), generator=g)
    seq = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    return logits, ref, labels, seq


def _linear_value(logits, ref, labels, token):
    """Σ w_ce·CE + w_h·H + w_kl·KL from the plan's per-token weights (independent of the loss classes)."""
    logp = torch.log_softmax(logits.double(), -1)
    logq = torch.log_softmax(ref.double(), -1)
    p = logp.exp()
    ce = -logp.gather(1, labels[:, None]).squeeze(1)
    h = -(p * logp).sum(-1)
    kl = (p * (logp - logq)).sum(-1)
    return float((token["w_ce"].double() * ce + token["w_h"].double() * h + token["w_kl"].double() * kl).sum())


@pytest.mark.parametrize("name", ["eksft", "kl_mask_only", "iw_sft", "sft"])
def test_sequence_scope_is_the_mean_of_per_sequence_losses(name):
    logits, ref, labels, seq = _batch()
    loss = get_loss(name)
    stats = loss.stats(logits, ref, labels)
    plan = plan_step(loss, stats, seq_ids=seq, scope="sequence", generator=torch.Generator().manual_seed(0))
    assert plan.linear and plan.metrics["n_units"] == 4
    per_seq = []
    for s in range(4):
        rows = seq == s
        val, _ = compute_loss(loss, logits[rows], ref[rows], labels[rows], seq_ids=seq[rows],
                              generator=torch.Generator().manual_seed(0))
        per_seq.append(float(val))
    assert _linear_value(logits, ref, labels, plan.token) == pytest.approx(sum(per_seq) / 4, rel=1e-6)
    if name == "eksft":  # top-k inside every sequence: k_s = ceil(0.2 n_s) entropy picks per sequence
        for s, n_s in enumerate((9, 14, 6, 11)):
            rows = seq == s
            m_h = plan.token["mask_h"][rows]
            assert int(m_h.sum()) == math.ceil(0.2 * n_s)
            top = torch.topk(stats.entropy[rows], math.ceil(0.2 * n_s)).indices
            assert bool(m_h[top].all())


def test_global_scope_equals_the_loss_over_the_whole_batch():
    logits, ref, labels, seq = _batch()
    loss = get_loss("eksft")
    stats = loss.stats(logits, ref, labels)
    plan = plan_step(loss, stats, seq_ids=seq, scope="global_batch", generator=torch.Generator().manual_seed(1))
    val, m = compute_loss(loss, logits, ref, labels, generator=torch.Generator().manual_seed(1))
    assert _linear_value(logits, ref, labels, plan.token) == pytest.approx(float(val), rel=1e-6)
    assert plan.metrics["iou"] == plan.metrics["iou_batch"] == pytest.approx(m["iou"])
    # per sequence, then averaged (the authors' way), over the sequences where a token is selected
    ious = []
    for s in range(4):
        a, b = plan.token["mask_h"][seq == s].bool(), plan.token["mask_kl"][seq == s].bool()
        if int((a | b).sum()):
            ious.append(int((a & b).sum()) / int((a | b).sum()))
    assert plan.metrics["iou_seq_mean"] == pytest.approx(sum(ious) / len(ious))
    assert plan.metrics["iou_seq_count"] == len(ious)


def test_update_groups_are_planned_from_their_own_tokens():
    """updates_per_batch: each update's plan uses only its tokens and its own denominators."""
    logits, ref, labels, seq = _batch(lengths=(9, 14, 6, 11, 8, 7))
    groups = torch.div(seq, 2, rounding_mode="floor")  # 3 updates of 2 sequences
    for name in ("sft", "eksft"):
        loss = get_loss(name)
        stats = loss.stats(logits, ref, labels)
        plan = plan_step(loss, stats, seq_ids=seq, groups=groups, generator=torch.Generator().manual_seed(2))
        for g in range(3):
            rows = groups == g
            val, _ = compute_loss(loss, logits[rows], ref[rows], labels[rows], generator=torch.Generator().manual_seed(2))
            part = {k: v[rows] for k, v in plan.token.items()}
            assert _linear_value(logits[rows], ref[rows], labels[rows], part) == pytest.approx(float(val), rel=1e-6)
        if name == "sft":
            for g in range(3):
                assert float(plan.token["w_ce"][groups == g].sum()) == pytest.approx(1.0)


def test_psft_plan_keeps_pi_old_and_per_update_denominators():
    logits, ref, labels, seq = _batch(lengths=(5, 7, 6, 4))
    loss = get_loss("psft")
    stats = loss.stats(logits, None, labels)
    groups = (seq >= 2).long()
    plan = plan_step(loss, stats, seq_ids=seq, groups=groups)
    assert not plan.linear
    assert torch.equal(plan.token["old_logp"], stats.logp)
    assert plan.token[SCALAR_PREFIX + "n_tokens"].tolist() == [12.0] * 12 + [10.0] * 10
    assert set(plan.token[UNIT_WEIGHT].tolist()) == {1.0}


def test_official_sequence_plan_carries_per_sequence_scalars_and_equal_weights():
    logits, ref, labels, seq = _batch()
    loss = get_loss("eksft_official")
    stats = loss.stats(logits, ref, labels)
    plan = plan_step(loss, stats, seq_ids=seq, scope="sequence", generator=torch.Generator().manual_seed(0))
    total = 0.0
    for s in range(4):
        rows = (seq == s).nonzero().squeeze(1)
        first = int(rows[0])
        scalars = {k[len(SCALAR_PREFIX):]: float(v[first]) for k, v in plan.token.items() if k.startswith(SCALAR_PREFIX)}
        assert scalars["n_tokens"] == rows.numel()
        assert float(plan.token[UNIT_WEIGHT][first]) == 0.25
        fields = {k: plan.token[k][rows] for k in ("mask", "mask_h", "mask_kl")}
        assert int(fields["mask_h"].sum()) == int(0.2 * rows.numel())  # the authors' floor, per sequence
        part, _ = loss.compute(logits[rows], labels[rows], ref[rows], fields, scalars)
        sub = loss.plan(token_stats(logits[rows], ref[rows], labels[rows], with_prob_sq=True))
        assert scalars["lambda_entropy_eff"] == sub.scalars["lambda_entropy_eff"]  # dynamic lambda per sequence
        total += 0.25 * float(part)
    # no ties here (every KL > 0): the per-sequence plan is unique, so the library's one-shot loss per sequence agrees
    expected = sum(float(compute_loss(loss, logits[seq == s], ref[seq == s], labels[seq == s])[0]) for s in range(4)) / 4
    assert total == pytest.approx(expected, rel=1e-6)


def test_valid_rows_roll_within_each_sequence():
    from tensordict import TensorDict

    ids = [torch.tensor([5, 6, 7, 8]), torch.tensor([1, 2, 3])]
    lm = [torch.tensor([0, 0, 1, 1]), torch.tensor([1, 1, 1])]  # the 2nd starts with a response token
    td = TensorDict({"input_ids": torch.nested.as_nested_tensor(ids, layout=torch.jagged),
                     "loss_mask": torch.nested.as_nested_tensor(lm, layout=torch.jagged)}, batch_size=2)
    # row 3 (last of seq 0) never predicts the next sequence's first token; row 6 (last of seq 1) is invalid
    assert valid_rows(td).tolist() == [False, True, True, False, True, True, False]


@pytest.mark.parametrize("where", ["device", "host"])
def test_ref_hidden_store_serves_any_micro_batch_order_and_prunes(where):
    counts = torch.tensor([3, 0, 2, 4])
    d = 5
    rows = torch.arange(9 * d, dtype=torch.float32).reshape(9, d)  # rows of seqs 0, 2, 3 in batch order
    store = RefHiddenStore(counts, d, torch.float32, torch.device("cpu"), where)
    store.put(torch.tensor([3, 0]), torch.cat([rows[5:9], rows[0:3]]))  # a micro-batch in another order
    store.put(torch.tensor([1, 2]), rows[3:5])
    valid = torch.tensor([True, True, False, True, True, True, True, False])  # seq 2 (2 valid + 1), seq 3 (4 + 1)
    got = store.get(torch.tensor([2, 3]), valid)
    assert torch.equal(got[valid], rows[3:9]) and float(got[~valid].abs().sum()) == 0
    assert store.nbytes == 9 * d * 4
    store.keep(torch.tensor([True, False, False, True, False, True, False, False, True]))
    got = store.get(torch.tensor([2, 3]), valid)
    expect = torch.zeros(6, d)
    expect[0], expect[2], expect[5] = rows[3], rows[5], rows[8]
    assert torch.equal(got[valid], expect) and store.nbytes == 4 * d * 4


def _block(**kw):
    return complete_eksft_block(kw)


def test_config_errors_name_the_fix():
    official = get_loss("eksft_official")
    check_eksft_block(_block(selection_scope="sequence"), loss=official, micro_batch_size_per_gpu=4, use_dynamic_bsz=True)
    check_eksft_block(_block(selection_scope="micro_batch"), loss=official, micro_batch_size_per_gpu=1,
                      use_dynamic_bsz=False)  # one sequence per micro-batch: the authors' setting
    with pytest.raises(ValueError, match="packs from several sequences.*use_dynamic_bsz=True.*selection_scope=sequence"):
        check_eksft_block(_block(selection_scope="micro_batch"), loss=official, micro_batch_size_per_gpu=1,
                          use_dynamic_bsz=True)
    with pytest.raises(ValueError, match="whole global batch as one sequence"):
        check_eksft_block(_block(), loss=official, micro_batch_size_per_gpu=1, use_dynamic_bsz=False)
    with pytest.raises(ValueError, match="eksft.head=naive"):
        check_eksft_block(_block(head="fused"), loss=get_loss("psft"), micro_batch_size_per_gpu=1, use_dynamic_bsz=True)
    with pytest.raises(ValueError, match="pi_old_every must be an integer >= 1"):
        check_eksft_block(_block(pi_old_every=0), loss=get_loss("psft"), micro_batch_size_per_gpu=1,
                          use_dynamic_bsz=True)
    with pytest.raises(ValueError, match="updates_per_batch must be an integer >= 1"):
        check_eksft_block(_block(updates_per_batch=0), loss=get_loss("sft"), micro_batch_size_per_gpu=1,
                          use_dynamic_bsz=True)
    with pytest.raises(ValueError, match="selection_scope must be one of"):
        check_eksft_block(_block(selection_scope="batch"), loss=get_loss("sft"), micro_batch_size_per_gpu=1,
                          use_dynamic_bsz=True)


def test_recipes_give_psft_its_schedule_and_official_its_scope(tmp_path):
    from eksft_pipeline.contract.manifest import Manifest
    from eksft_pipeline.contract.recipes import compose_pipeline
    from eksft_pipeline.contract.stage_api import StageContext
    from eksft_pipeline.sft.stage import SFTStage

    def vc_for(*ov):
        cfg = compose_pipeline("stage=sft", f"run_dir={tmp_path}", *ov)
        ctx = StageContext(cfg=cfg, run_dir=Path(tmp_path), manifest=Manifest(tmp_path), key="sft/x", dry_run=True)
        return SFTStage().verl_config(ctx)

    # psft: the others' budget (one update per batch), pi_old refreshed every 8 updates; the hybrid: 8 per batch
    psft, hybrid = vc_for("method=psft").eksft, vc_for("method=psft_hybrid").eksft
    assert (psft.updates_per_batch, psft.pi_old_every, psft.loss) == (1, 8, "psft")
    assert (hybrid.updates_per_batch, hybrid.pi_old_every, hybrid.loss) == (8, 1, "psft")
    assert vc_for("method=eksft").eksft.pi_old_every == 1
    with pytest.raises(ValueError, match="two schedules"):
        vc_for("method=psft", "+method.updates_per_batch=2")
    with pytest.raises(ValueError, match="takes no pre-pass statistics"):
        vc_for("method=sft", "+method.pi_old_every=2")
    assert vc_for("method=eksft_official").eksft.selection_scope == "sequence"
    assert vc_for("method=eksft").eksft.head == "auto"
    with pytest.raises(ValueError, match="selection_scope=sequence"):
        vc_for("method=eksft_official", "method.selection_scope=micro_batch")


def test_ignore_index_rows_stay_out_of_every_plan():
    logits, ref, labels, seq = _batch()
    labels[::3] = IGNORE_INDEX
    loss = get_loss("eksft")
    full = loss.stats(logits, ref, labels)
    keep = full.valid
    stats = TokenStats(valid=torch.ones(int(keep.sum()), dtype=torch.bool), vocab_size=full.vocab_size,
                       entropy=full.entropy[keep], logp=full.logp[keep], kl=full.kl[keep], ref_logp=full.ref_logp[keep])
    plan = plan_step(loss, stats, seq_ids=seq[keep], scope="sequence")
    assert plan.token["w_ce"].numel() == int(keep.sum())


def test_policy_is_reference_until_the_first_optimizer_step():
    """The trainer's step-1 rule (losses/selection.py, rule 1): the policy is the reference while the reference is
    the initial model and the optimizer has taken no step (a resumed run has optimizer state: not the reference)."""
    from eksft_pipeline.verl_ext.sft_plan import policy_is_reference

    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([w], lr=0.1)
    assert policy_is_reference(True, opt)
    assert not policy_is_reference(False, opt)  # eksft.ref_model_path names another model
    assert not policy_is_reference(True, None)
    (w ** 2).sum().backward()
    opt.step()
    assert not policy_is_reference(True, opt)
    resumed = torch.optim.AdamW([torch.nn.Parameter(torch.ones(3))], lr=0.1)
    resumed.load_state_dict(opt.state_dict())
    assert not policy_is_reference(True, resumed)


def test_sequence_parallelism_refuses_the_micro_batch_scope():
    eksft = get_loss("eksft")
    check_eksft_block(_block(), loss=eksft, micro_batch_size_per_gpu=1, use_dynamic_bsz=True,
                      ulysses_sequence_parallel_size=2)
    with pytest.raises(ValueError, match="no rank holds a whole micro-batch: use global_batch or sequence"):
        check_eksft_block(_block(selection_scope="micro_batch"), loss=eksft, micro_batch_size_per_gpu=1,
                          use_dynamic_bsz=True, ulysses_sequence_parallel_size=2)
    with pytest.raises(ValueError, match="ulysses_sequence_parallel_size must be an integer >= 1"):
        check_eksft_block(_block(), loss=eksft, micro_batch_size_per_gpu=1, use_dynamic_bsz=True,
                          ulysses_sequence_parallel_size=0)


def test_row_slices_of_the_sp_group_cover_every_row_once():
    """verl pads a packed micro-batch of nnz rows to a multiple of s and gives rank r rows [r n, (r+1) n): the
    slices of the s ranks, padding dropped, are the micro-batch in order; padding rows take the fill value."""
    from eksft_pipeline.verl_ext.sft_head import RowSlice

    nnz, s = 11, 4
    n = -(-nnz // s)
    t = torch.arange(nnz) * 10
    parts = [RowSlice(r * n, n, nnz, s).take(t, fill=-1) for r in range(s)]
    assert all(p.shape == (n,) for p in parts)
    flat = torch.cat(parts)
    assert torch.equal(flat[:nnz], t) and flat[nnz:].tolist() == [-1] * (n * s - nnz)
    assert RowSlice(3 * n, n, nnz, s).pad == 1
    assert torch.equal(RowSlice(0, nnz, nnz).take(t), t)  # no SP: all rows
    with pytest.raises(RuntimeError, match="per-row tensor of 10 rows"):
        RowSlice(0, n, nnz, s).take(t[:10])


def test_cpu_varlen_attention_is_causal_attention_per_packed_sequence():
    """The CPU kernel behind verl's Ulysses all-to-all (verl_ext/cpu_attention.py): packed sequences (position_ids
    restart at 0) attend causally within themselves only, with grouped kv heads."""
    from eksft_pipeline.verl_ext.cpu_attention import varlen_attention

    g = torch.Generator().manual_seed(0)
    lengths, hq, hk, d = (5, 3, 7), 4, 2, 8
    s = sum(lengths)
    q, k, v = (torch.randn(1, s, h, d, generator=g) for h in (hq, hk, hk))
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    out = varlen_attention(q, k, v, None, s, True, position_ids=pos, softmax_scale=0.3)
    start = 0
    for n in lengths:
        qs, ks, vs = (t[0, start : start + n].transpose(0, 1) for t in (q, k, v))  # [h, n, d]
        ks, vs = ks.repeat_interleave(hq // hk, 0), vs.repeat_interleave(hq // hk, 0)
        att = (qs @ ks.transpose(1, 2) * 0.3).masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
        expect = (att.softmax(-1) @ vs).transpose(0, 1)
        torch.testing.assert_close(out[0, start : start + n], expect, rtol=1e-5, atol=1e-6)
        start += n
