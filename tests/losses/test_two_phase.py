"""The two-phase contract: plan once over the global batch, compute per micro-batch, parts add up.

For every registered loss, summing ``compute`` over disjoint micro-batches (contiguous slices and an
interleaved index split) equals the full-batch loss, and so do the gradients. Also: the data-parallel
all-gather of statistics gives the same plan as one process holding the whole batch.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from eksft_pipeline.losses import TokenStats, all_gather_stats, available_losses, get_loss

N, V = 29, 11


def make_batch(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(N, V, generator=g) * 2).to(dtype)
    ref = (logits.float() + torch.randn(N, V, generator=g)).to(dtype)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[[4, 17]] = -100
    seq_ids = torch.arange(N) // 6
    return logits, ref, labels, seq_ids


def full_and_split(name, splits, **params):
    logits, ref, labels, seq_ids = make_batch()
    lf = get_loss(name, **params)
    plan = lf.plan(lf.stats(logits, ref, labels), seq_ids)
    if name == "psft":  # make the ratios non-trivial (r != 1): the plan's old_logp is perturbed
        plan.token["old_logp"] = plan.token["old_logp"] + torch.linspace(-0.6, 0.6, N)
    ref_c = ref if lf.ref_in_compute else None

    lg_full = logits.clone().requires_grad_()
    full, _ = lf.compute(lg_full, labels, ref_c, plan.token, plan.scalars)
    full.backward()

    lg = logits.clone().requires_grad_()
    total = 0.0
    parts_metrics = []
    for rows in splits:
        sub = plan.select(rows)
        part, m = lf.compute(lg[rows], labels[rows], ref_c[rows] if ref_c is not None else None, sub.token,
                             sub.scalars)
        part.backward()
        total = total + part.detach()
        parts_metrics.append(m)
    return full.detach(), total, lg_full.grad, lg.grad, parts_metrics


CONTIGUOUS = [slice(0, 7), slice(7, 8), slice(8, 20), slice(20, N)]
INTERLEAVED = [torch.arange(0, N, 3), torch.arange(1, N, 3), torch.arange(2, N, 3)]


@pytest.mark.parametrize("name", available_losses())
@pytest.mark.parametrize("splits", [CONTIGUOUS, INTERLEAVED], ids=["contiguous", "interleaved"])
def test_micro_batch_parts_sum_to_full_loss_and_grads(name, splits):
    full, total, g_full, g_split, parts = full_and_split(name, splits)
    assert torch.isfinite(full)
    assert total.item() == pytest.approx(full.item(), abs=1e-6, rel=1e-6)
    assert torch.allclose(g_full, g_split, atol=1e-7, rtol=1e-5)
    # part metrics are additive too
    assert sum(float(m["loss"]) for m in parts) == pytest.approx(full.item(), abs=1e-6, rel=1e-6)


def test_micro_batch_selection_is_global_not_per_micro_batch():
    """A micro-batch holding no top-k token gets no mask, though its own top-k would select some."""
    logits, ref, labels, _ = make_batch()
    lf = get_loss("eksft")
    plan = lf.plan(lf.stats(logits, ref, labels))
    mask = plan.token["mask"]
    local = lf.plan(lf.stats(logits[:7], ref[:7], labels[:7])).token["mask"]
    assert not torch.equal(mask[:7], local)
    assert plan.scalars["n_tokens"] == 27 and plan.scalars["n_mask"] == int(mask.sum())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dp_worker(rank, world, port, splits, out_dir):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        logits, ref, labels, seq_ids = make_batch()
        rows = splits[rank]
        lf = get_loss("eksft")
        local = lf.stats(logits[rows], ref[rows], labels[rows])
        # seq ids restart at 0 on every rank: the gather must keep sequences of different ranks apart
        local_seq = seq_ids[rows] - seq_ids[rows].min()
        g_stats, g_seq, own = all_gather_stats(local, local_seq)
        plan = lf.plan(g_stats).select(own)
        torch.save({"mask": plan.token["mask"], "scalars": plan.scalars, "n_seqs": int(g_seq.unique().numel()),
                    "own": (own.start, own.stop)}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_all_gather_stats_gives_the_global_plan(tmp_path):
    splits = [slice(0, 12), slice(12, N)]  # unequal sizes on the two ranks
    mp.start_processes(_dp_worker, args=(2, _free_port(), splits, str(tmp_path)), nprocs=2, start_method="spawn")
    logits, ref, labels, seq_ids = make_batch()
    lf = get_loss("eksft")
    plan = lf.plan(lf.stats(logits, ref, labels))
    for rank, rows in enumerate(splits):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert torch.equal(got["mask"], plan.token["mask"][rows])
        assert got["scalars"] == plan.scalars
        assert got["own"] == (rows.start, rows.stop)
        # rank 0 holds sequences 0,1 (+ first rows of 1); rank 1 restarts at 0 -> still distinct globally
        assert got["n_seqs"] == len(set(seq_ids[:12].tolist())) + len(set(seq_ids[12:].tolist()))


def test_stats_of_micro_batches_concatenate_to_the_batch_stats():
    logits, ref, labels, _ = make_batch()
    lf = get_loss("eksft")
    whole = lf.stats(logits, ref, labels)
    parts = TokenStats.cat([lf.stats(logits[s], ref[s], labels[s]) for s in CONTIGUOUS])
    for f in ("valid", "entropy", "logp", "kl", "ref_logp"):
        assert torch.allclose(getattr(parts, f).float(), getattr(whole, f).float(), atol=1e-6)
