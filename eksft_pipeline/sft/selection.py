"""Global-batch token selection across data-parallel ranks (no verl import).

EKSFT selects the top-k tokens by entropy and by KL over *all* valid response tokens of the
global batch (k = ceil(rho * |T|)). verl's trainer only ever sees a rank's share of the batch,
and the loss only a micro-batch of it, so the selection is its own pass:

    pre-pass (no grad)   each rank: per-token stats of its tokens          [n_r] x {H, KL, logp, ...}
    gather_token_stats   all ranks: the global stats in rank order          [N = sum_r n_r]
    loss.plan(...)       all ranks: the same global plan (masks, weights,   [N] fields + global scalars
                         denominators) -- deterministic, so no broadcast
    local_slice          each rank: its own rows of the plan                [n_r]

Every rank computes the identical plan from identical gathered inputs, so the selection with
R ranks equals the selection computed in one process on the concatenated batch (tested).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class GatheredStats:
    """Per-token statistics of the global batch, concatenated in data-parallel rank order."""

    fields: dict[str, torch.Tensor]  # name -> [N] (fp32 or int64)
    counts: list[int]  # tokens per rank, len = dp world size
    rank: int

    @property
    def offset(self) -> int:
        return sum(self.counts[: self.rank])

    @property
    def local_count(self) -> int:
        return self.counts[self.rank]

    def local_slice(self, t: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a global per-token tensor."""
        return t[self.offset : self.offset + self.local_count]


def gather_token_stats(local: dict[str, torch.Tensor], group=None, device: str | torch.device = "cpu") -> GatheredStats:
    """All-gather variable-length per-token tensors (all the same length n_r on a rank).

    Uses padded `all_gather` of fixed-size buffers (works with gloo and nccl); falls back to the
    identity when torch.distributed is not initialised or the group has one member.
    """
    names = sorted(local)
    lengths = {int(local[k].shape[0]) for k in names}
    if len(lengths) > 1:
        raise ValueError(
            f"per-token stats must share one length on a rank, got {dict((k, local[k].shape) for k in names)}"
        )
    n_local = lengths.pop() if lengths else 0

    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size(group) == 1:
        return GatheredStats(fields={k: local[k] for k in names}, counts=[n_local], rank=0)

    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    n = torch.tensor([n_local], dtype=torch.long, device=device)
    all_n = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(all_n, n, group=group)
    counts = [int(x.item()) for x in all_n]
    max_n = max(counts) if counts else 0

    out: dict[str, torch.Tensor] = {}
    for k in names:
        src = local[k]
        buf = torch.zeros(max_n, dtype=src.dtype, device=device)
        buf[:n_local] = src.to(device)
        parts = [torch.zeros_like(buf) for _ in range(world)]
        dist.all_gather(parts, buf, group=group)
        out[k] = torch.cat([p[:c] for p, c in zip(parts, counts)]).to(src.device)
    return GatheredStats(fields=out, counts=counts, rank=rank)


def flatten_valid(nested: torch.Tensor, valid_flat: torch.Tensor) -> torch.Tensor:
    """Values of a jagged [bsz, j] tensor at the valid positions, in batch order -> [n]."""
    return nested.values()[valid_flat]


def scatter_to_positions(values: torch.Tensor, valid_flat: torch.Tensor, total: int, fill=0) -> torch.Tensor:
    """Inverse of `flatten_valid`: a [total] tensor with `values` at the valid positions."""
    out = torch.full((total,), fill, dtype=values.dtype, device=values.device)
    out[valid_flat] = values
    return out
