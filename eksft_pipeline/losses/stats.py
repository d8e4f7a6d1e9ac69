"""Per-token statistics of a shifted LM head, computed once, without gradient, in row chunks.

Row ``i`` of ``logits [N, V]`` is the distribution that predicts ``labels[i]`` (rows are already
shifted). Rows whose label is ``IGNORE_INDEX`` (-100: prompt / padding positions) are carried along
so that per-token tensors keep the row layout of the trainer's micro-batches, but they are flagged
``valid=False`` and excluded from every selection, mean and loss; their statistics are 0.

Per valid token t, with z = logits[t], z_ref = ref_logits[t], y = labels[t] (all in fp32):

    logp  = log_softmax(z)              p = exp(logp)
    logq  = log_softmax(z_ref)          (pi_ref, the frozen initial model)
    entropy[t]  = H(t)  = -sum_v p_v logp_v
    kl[t]       = KL(t) = sum_v p_v (logp_v - logq_v)          = KL(pi_theta || pi_ref)
    logp[t]     = logp_y,   ref_logp[t] = logq_y
    prob_sq[t]  = sum_v p_v^2        (only with ``with_prob_sq=True``; used by ``eksft_official``)

Every reduction runs in fp32 whatever the input dtype (bf16 chunks are upcast chunk by chunk).
The extra memory is a few ``chunk_size x V`` fp32 buffers, never ``N x V``.

Data-parallel use: each rank computes ``TokenStats`` for its rows (micro-batch by micro-batch,
then ``TokenStats.cat``), ``all_gather_stats`` concatenates them in rank order, every rank builds the
same plan from the global stats and keeps its own rows with ``Plan.select(own_rows)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
from torch import Tensor

IGNORE_INDEX = -100
DEFAULT_STATS_CHUNK = 1024


def check_rows(logits: Tensor, labels: Tensor, ref_logits: Tensor | None = None, *, what: str = "logits") -> None:
    """Validate the shapes/dtypes shared by every entry point; raise ValueError naming the bad argument."""
    if not isinstance(logits, Tensor) or logits.dim() != 2:
        raise ValueError(
            f"{what} must be a 2-D tensor [N, V] (rows already shifted), got shape "
            f"{tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__}"
        )
    if not logits.is_floating_point():
        raise ValueError(f"{what} must be floating point, got {logits.dtype}")
    if logits.shape[1] < 1:
        raise ValueError(f"{what} has an empty vocabulary dimension")
    check_labels(labels, logits.shape[0], logits.shape[1], logits.device, what=what)
    if ref_logits is not None:
        if not isinstance(ref_logits, Tensor) or ref_logits.shape != logits.shape:
            raise ValueError(
                f"ref_logits must have the shape of {what} {tuple(logits.shape)}, got "
                f"{tuple(ref_logits.shape) if isinstance(ref_logits, Tensor) else type(ref_logits)}"
            )
        if ref_logits.device != logits.device:
            raise ValueError(f"ref_logits are on {ref_logits.device} but {what} on {logits.device}")


def check_labels(labels: Tensor, n_rows: int, vocab: int, device: torch.device, *, what: str = "logits") -> None:
    """labels: long [n_rows] on ``device``, each in [0, vocab) or IGNORE_INDEX; ValueError naming the first bad one."""
    if not isinstance(labels, Tensor) or labels.dim() != 1 or labels.shape[0] != n_rows:
        raise ValueError(
            f"labels must be a 1-D tensor with {n_rows} entries (one per row of {what}), "
            f"got shape {tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__}"
        )
    if labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"labels must be an integer (long) tensor, got {labels.dtype}")
    if labels.device != device:
        raise ValueError(f"labels are on {labels.device} but {what} on {device}")
    if labels.numel():
        bad = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= vocab))
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"labels[{i}] = {int(labels[i])} is outside [0, {vocab}) and is not the ignore index {IGNORE_INDEX}"
            )


def valid_and_safe_labels(labels: Tensor) -> tuple[Tensor, Tensor]:
    """(valid [N] bool, labels with ignored entries replaced by 0 [N] long) — safe for gather."""
    valid = labels != IGNORE_INDEX
    return valid, torch.where(valid, labels, torch.zeros_like(labels)).long()


def rowdot(a: Tensor, b: Tensor) -> Tensor:
    """sum_v a[i, v] * b[i, v] for every row, as a batched BLAS dot: no [n, V] temporary.

    Autocast is switched off here: trainers (verl's FSDP engine) call the loss inside
    `torch.autocast(bf16)`, which would otherwise run this bmm in bf16.
    """
    with torch.autocast(device_type=a.device.type, enabled=False):
        return torch.bmm(a.float().unsqueeze(1), b.float().unsqueeze(2)).view(-1)


class Workspace:
    """Reusable fp32 [rows, V] buffers keyed by name (``get(name, m)`` returns the first m rows, contiguous).

    On CPU every fresh multi-MiB tensor is a new mmap whose pages fault in on first touch (measured here:
    log_softmax into a fresh 512 MiB tensor 0.63 s vs 0.10 s into a reused one), so the chunk loops write
    into the same buffers; on CUDA the caching allocator makes this neutral.
    """

    def __init__(self, rows: int, cols: int, device: torch.device) -> None:
        self.rows, self.cols, self.device = rows, cols, device
        self._bufs: dict[tuple[str, torch.dtype], Tensor] = {}

    def get(self, name: str, m: int, dtype: torch.dtype = torch.float32) -> Tensor:
        if m > self.rows:
            raise ValueError(f"Workspace.get({name!r}): {m} rows requested, capacity {self.rows}")
        key = (name, dtype)
        if key not in self._bufs:
            self._bufs[key] = torch.empty(self.rows, self.cols, dtype=dtype, device=self.device)
        return self._bufs[key][:m]


def rows_fp32(src: Tensor, idx: Tensor, ws: Workspace, name: str) -> Tensor:
    """fp32 copy of ``src[idx]`` in the workspace buffer ``name`` (bf16/fp16 rows are upcast)."""
    out = ws.get(name, idx.numel())
    if src.dtype == torch.float32:
        return torch.index_select(src, 0, idx, out=out)
    return out.copy_(src.index_select(0, idx))


def chunk_stats(
    z: Tensor, zq: Tensor | None, y: Tensor, *, with_prob_sq: bool = False, ws: Workspace | None = None
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """Statistics of one chunk. z, zq: fp32 [c, V] logits (not modified); y: [c] long labels (all in range).
    Returns (entropy, logp_y, kl, ref_logp_y, prob_sq), each [c] fp32. With ``ws`` the [c, V]
    intermediates go to its buffers "logp", "p", "logq" (so z/zq must not live in those).

    Shared by ``token_stats`` (naive path) and the fused head's pass 1 so both select from the same numbers.
    """
    c = z.shape[0]
    logp = torch.log_softmax(z, dim=-1, out=ws.get("logp", c)) if ws else torch.log_softmax(z, dim=-1)
    p = torch.exp(logp, out=ws.get("p", c)) if ws else logp.exp()  # [c, V]
    entropy = -rowdot(p, logp)
    logp_y = logp.gather(1, y.unsqueeze(1)).squeeze(1)
    prob_sq = rowdot(p, p) if with_prob_sq else None
    kl = ref_logp_y = None
    if zq is not None:
        logq = torch.log_softmax(zq, dim=-1, out=ws.get("logq", c)) if ws else torch.log_softmax(zq, dim=-1)
        ref_logp_y = logq.gather(1, y.unsqueeze(1)).squeeze(1)
        # exact form sum p (logp - logq): equal distributions give exactly 0 (no H - CE cancellation)
        diff = torch.sub(logp, logq, out=logq)
        kl = rowdot(p, diff)
    return entropy, logp_y, kl, ref_logp_y, prob_sq


@dataclass
class TokenStats:
    """Detached fp32 per-row statistics of a batch (see module docstring). All tensors are [N].

    ``entropy``/``logp`` are None only for ``labels_only`` stats (losses that need no pre-pass);
    ``kl``/``ref_logp`` are None without a reference model; ``prob_sq`` only when requested.
    """

    valid: Tensor
    vocab_size: int
    entropy: Tensor | None = None
    logp: Tensor | None = None
    kl: Tensor | None = None
    ref_logp: Tensor | None = None
    prob_sq: Tensor | None = None

    _TENSOR_FIELDS = ("valid", "entropy", "logp", "kl", "ref_logp", "prob_sq")

    @property
    def n_rows(self) -> int:
        return int(self.valid.shape[0])

    @property
    def n_tokens(self) -> int:
        """Number of valid (label != -100) rows."""
        return int(self.valid.sum())

    @property
    def device(self) -> torch.device:
        return self.valid.device

    def policy_is_reference(self) -> TokenStats:
        """These stats at a step where pi_theta IS pi_ref (the same weights: the first step of a fresh run whose
        reference is the initial model): KL = 0 and ref_logp = logp exactly, by definition.

        The rule behind it (selection.py, rule 1): a KL computed there is rounding, not signal. In fp32 it is
        exactly 0 anyway; in bf16 the policy (fp32 master weights, bf16 autocast) and the reference (bf16
        weights, bf16 compute) round differently and KL(t) is small but positive on most tokens (measured on a
        random 4-layer Qwen3 on CPU: mean 1.7e-3, max 1.1e-2 nats), so without this M_KL would be the top-k of
        that noise. The trainer logs the KL it measured before setting it to 0 (``kl_all_measured``)."""
        if self.kl is None:
            return self
        same = self.ref_logp is not None and self.logp is not None
        return replace(self, kl=torch.zeros_like(self.kl), ref_logp=self.logp.clone() if same else self.ref_logp)

    @staticmethod
    def labels_only(labels: Tensor, vocab_size: int) -> TokenStats:
        """Stats carrying only the valid-row mask: enough to plan losses with ``needs_prepass == False``."""
        return TokenStats(valid=(labels != IGNORE_INDEX), vocab_size=int(vocab_size))

    def select(self, rows: slice | Tensor) -> TokenStats:
        """The stats of a subset of rows (slice, index tensor or bool mask)."""
        return replace(
            self, **{f: (getattr(self, f)[rows] if getattr(self, f) is not None else None) for f in self._TENSOR_FIELDS}
        )

    def to(self, device: torch.device | str) -> TokenStats:
        return replace(
            self,
            **{f: (getattr(self, f).to(device) if getattr(self, f) is not None else None) for f in self._TENSOR_FIELDS},
        )

    @staticmethod
    def cat(parts: Sequence[TokenStats]) -> TokenStats:
        """Concatenate the stats of consecutive micro-batches (row order is kept)."""
        if not parts:
            raise ValueError("TokenStats.cat needs at least one part")
        vocab = {p.vocab_size for p in parts}
        if len(vocab) != 1:
            raise ValueError(f"TokenStats.cat: parts have different vocab sizes {sorted(vocab)}")
        out = {}
        for f in TokenStats._TENSOR_FIELDS:
            present = [getattr(p, f) is not None for p in parts]
            if all(present):
                out[f] = torch.cat([getattr(p, f) for p in parts])
            elif any(present):
                raise ValueError(f"TokenStats.cat: field {f!r} is present in some parts and missing in others")
            else:
                out[f] = None
        return TokenStats(vocab_size=parts[0].vocab_size, **out)

    def check_finite(self) -> None:
        """Raise ValueError naming the first valid row with a non-finite statistic (inf/NaN logits)."""
        for f in ("entropy", "logp", "kl", "ref_logp", "prob_sq"):
            t = getattr(self, f)
            if t is None or t.numel() == 0:
                continue
            bad = self.valid & ~torch.isfinite(t)
            if bool(bad.any()):
                i = int(bad.nonzero()[0, 0])
                raise ValueError(
                    f"token statistic {f!r} is not finite at row {i} ({float(t[i])}): "
                    "the logits (or ref_logits) of that row contain inf/NaN"
                )


@torch.no_grad()
def token_stats(
    logits: Tensor,
    ref_logits: Tensor | None,
    labels: Tensor,
    *,
    chunk_size: int = DEFAULT_STATS_CHUNK,
    with_prob_sq: bool = False,
) -> TokenStats:
    """Detached fp32 per-token statistics (module docstring) over row chunks of ``chunk_size``.

    Only valid rows are processed (ignored rows get 0). Raises ValueError on bad shapes/labels and on
    non-finite statistics of a valid row.
    """
    check_rows(logits, labels, ref_logits)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    n, vocab = logits.shape
    valid, y = valid_and_safe_labels(labels)
    dev = logits.device
    zeros = lambda: torch.zeros(n, dtype=torch.float32, device=dev)  # noqa: E731
    entropy, logp = zeros(), zeros()
    kl = zeros() if ref_logits is not None else None
    ref_logp = zeros() if ref_logits is not None else None
    prob_sq = zeros() if with_prob_sq else None
    rows = valid.nonzero().squeeze(1)
    ws = Workspace(min(chunk_size, max(rows.numel(), 1)), vocab, dev)
    for s in range(0, rows.numel(), chunk_size):
        idx = rows[s : s + chunk_size]
        z = rows_fp32(logits, idx, ws, "z")  # [c, V]
        zq = rows_fp32(ref_logits, idx, ws, "zq") if ref_logits is not None else None
        h, lp, k, rlp, sq = chunk_stats(z, zq, y[idx], with_prob_sq=with_prob_sq, ws=ws)
        entropy[idx], logp[idx] = h, lp
        if k is not None:
            kl[idx], ref_logp[idx] = k, rlp
        if sq is not None:
            prob_sq[idx] = sq
    stats = TokenStats(
        valid=valid, vocab_size=vocab, entropy=entropy, logp=logp, kl=kl, ref_logp=ref_logp, prob_sq=prob_sq
    )
    stats.check_finite()
    return stats


@dataclass
class GatheredStats:
    """Per-token statistics of the global batch, concatenated in data-parallel rank order."""

    fields: dict[str, Tensor]  # name -> [N] (fp32 or int64)
    counts: list[int]  # tokens per rank, len = dp world size
    rank: int

    @property
    def offset(self) -> int:
        return sum(self.counts[: self.rank])

    @property
    def local_count(self) -> int:
        return self.counts[self.rank]

    def local_slice(self, t: Tensor) -> Tensor:
        """This rank's rows of a global per-token tensor."""
        return t[self.offset : self.offset + self.local_count]


def gather_token_stats(local: dict[str, Tensor], group=None, device: str | torch.device = "cpu") -> GatheredStats:
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

    out: dict[str, Tensor] = {}
    for k in names:
        src = local[k]
        buf = torch.zeros(max_n, dtype=src.dtype, device=device)
        buf[:n_local] = src.to(device)
        parts = [torch.zeros_like(buf) for _ in range(world)]
        dist.all_gather(parts, buf, group=group)
        out[k] = torch.cat([p[:c] for p, c in zip(parts, counts)]).to(src.device)
    return GatheredStats(fields=out, counts=counts, rank=rank)


def all_gather_stats(
    stats: TokenStats, seq_ids: Tensor | None = None, group=None
) -> tuple[TokenStats, Tensor | None, slice]:
    """All-gather the stats of every data-parallel rank (rank order) for a global selection.

    Returns (global stats, global seq_ids or None, the slice of this rank's rows in the global stats).
    Sequence ids are made globally unique by pairing them with the rank (ids need only be unique per rank).
    Every rank then calls ``loss.plan(global_stats, global_seq_ids)`` (deterministic, so all ranks agree)
    and keeps ``plan.select(own_rows)``. The TokenStats face of :func:`gather_token_stats` (the one gather).
    """
    distributed = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank(group) if distributed else 0
    dev = stats.device
    present = [f for f in TokenStats._TENSOR_FIELDS if getattr(stats, f) is not None]
    if distributed and dist.get_world_size(group) > 1:
        # every rank must agree on which fields exist; a mismatch would deadlock, so check it collectively
        flags = torch.tensor([getattr(stats, f) is not None for f in TokenStats._TENSOR_FIELDS], device=dev).long()
        parts = [torch.zeros_like(flags) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, flags, group=group)
        for i, f in enumerate(TokenStats._TENSOR_FIELDS):
            if len({int(x[i]) for x in parts}) != 1:
                raise ValueError(f"all_gather_stats: field {f!r} is present on some ranks only")
    # bool all_gather is not supported by every backend: `valid` travels as uint8
    local = {f: (getattr(stats, f).to(torch.uint8) if f == "valid" else getattr(stats, f)) for f in present}
    if seq_ids is not None:
        if seq_ids.shape != (stats.n_rows,):
            raise ValueError(f"seq_ids must have shape ({stats.n_rows},), got {tuple(seq_ids.shape)}")
        local["_seq_rank"] = torch.full_like(seq_ids.long(), rank)
        local["_seq_id"] = seq_ids.long()
    g = gather_token_stats(local, group=group, device=dev)
    fields = {f: (g.fields[f].bool() if f == "valid" else g.fields[f]) if f in g.fields else None
              for f in TokenStats._TENSOR_FIELDS}
    g_seq = None
    if seq_ids is not None:
        pairs = torch.stack([g.fields["_seq_rank"], g.fields["_seq_id"]], dim=1)
        g_seq = torch.unique(pairs, dim=0, return_inverse=True)[1]
    return TokenStats(vocab_size=stats.vocab_size, **fields), g_seq, slice(g.offset, g.offset + stats.n_rows)


__all__ = [
    "DEFAULT_STATS_CHUNK",
    "IGNORE_INDEX",
    "TokenStats",
    "GatheredStats",
    "Workspace",
    "all_gather_stats",
    "check_labels",
    "check_rows",
    "chunk_stats",
    "gather_token_stats",
    "rowdot",
    "rows_fp32",
    "token_stats",
    "valid_and_safe_labels",
]
