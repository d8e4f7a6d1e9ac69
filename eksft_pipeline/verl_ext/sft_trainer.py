"""EKSFT (and every loss of `eksft_pipeline.losses`) inside verl 0.9.1's own SFT trainer.

    python -m eksft_pipeline.verl_ext.sft_ray --config-path=<run_dir>/sft/eksft --config-name=verl_sft
        # written and launched by `stage=sft`: verl's Ray SFT trainer, a worker group of SelectiveTrainingWorker
        # (sft_ray.py) over any number of nodes; EKSFTTrainer below is the one-process trainer of the benchmark

verl's `SFTTrainer` hard-codes `sft_loss`, which only ever sees label log-probs, and has no reference
model. This module keeps verl's trainer, engine, data pipeline, checkpointing, resume and logging, and
changes what one `train_batch` does (subclasses only, no verl file is patched). Per step, on every rank:

1. Reference pass (losses with a reference): ONE forward of the frozen reference engine over the
   rank's batch; its final hidden states of the response rows are kept (`head.RefSide`, on the device
   by default, `eksft.ref_hidden_store=host` for pinned host memory) with a copy of its lm_head weight.
2. Selection pre-pass (losses that need statistics: EKSFT, its ablations, iw_sft, psft): a no-grad
   forward of the policy (`engine.infer_batch`), per-token H, KL(pi_theta||pi_ref), log p, all-gathered
   over the data-parallel ranks (`losses.stats.gather_token_stats`), and the plan of the GLOBAL batch
   (`sft_plan.plan_step`: top-k, masks, denominators -> per-token weights) computed identically on every
   rank; each rank carries its rows of the plan in the batch as jagged per-token fields.
3. Training pass: verl's `train_batch` (micro-batches, gradient accumulation, clipping, optimizer, lr
   scheduler); our loss gets each micro-batch's share of the global loss (global denominators, times
   dp_size because FSDP averages gradients over ranks, as verl's `sft_loss` compensates).

The loss head (`eksft.head`): `fused` (default for every loss of the form Σ w_ce·CE + w_h·H + w_kl·KL:
eksft, its ablations, global_reg, sft, iw_sft) computes pass 2 and 3 from hidden states and the lm_head
weight with `losses/fused.py` -- no [N, V] tensor for the policy or the reference (head.py shows how
the engine hands them over). `naive` (the reference implementation, and what dft, asft, psft and
eksft_official need) receives verl's full logits through its distillation hook (`distillation_use_topk`
/ `distillation_only`: `prepare_model_outputs` calls `loss_function(student_logits=[1, nnz, V])` and stores
the per-token tensors returned) and rebuilds the reference logits from the stored hidden states.

Selection scope (`eksft.selection_scope`): `global_batch` (the paper: top-k over all valid tokens of the
global batch), `sequence` (the authors' code: top-k per sequence, each sequence's loss averaged with
equal weight -- eksft_official's recipe), `micro_batch` (per micro-batch as verl packs it; a departure
from both, kept for comparison; its loss is weighted by the micro-batch's share of the global tokens).

Updates per batch (`eksft.updates_per_batch`, psft_hybrid: 8): the pre-pass statistics (e.g. PSFT's pi_old
log-probs) are taken once at the start of the batch, then the batch is split into that many
mini-batches, each planned over its own tokens and given its own optimizer update (verl's
`train_mini_batch` pattern: the lr scheduler advances once per trainer step) -- u times the optimizer updates
of the other methods at the same learning rate.

pi_old every k steps (`eksft.pi_old_every`, psft: 8): one update per batch, as every other method (the same
optimizer-step budget and schedule), with the pre-pass statistics taken from the weights of every k-th step:
the policy's (local, sharded) parameters are copied at that step, and at the steps in between the pre-pass runs
on that copy (copied in for the no-grad forward, the current weights copied back before the training pass).
PSFT's own schedule is 8 updates per pi_old (its run script: 256 prompts per pi_old, mini-batches of 32). Cost:
one more copy of the local parameter shards (and a transient one during the pre-pass). A resumed run starts a
new cycle at its first step (the copy is not checkpointed).

Ulysses sequence parallelism (`engine.ulysses_sequence_parallel_size` = s > 1, verl's own: `prepare_model_inputs`
pads every packed micro-batch to a multiple of s and gives rank r of the SP group rows [r*n, (r+1)*n); attention
all-to-alls inside the model). Every rank of an SP group holds the same data-parallel rank's batch, and each token
is seen by exactly one rank of the group (`sft_head.RowSlice`):
- fused / naive head: each rank computes per-token statistics and its loss share on its own rows only (labels,
  validity, plan fields and reference rows cut from the whole micro-batch's by the same slice); the per-token
  outputs are gathered over the group as verl gathers its log-probs (`_gather_and_unpad_packed`, whose backward
  scales by s and so offsets FSDP's mean over the dp x s ranks);
- reference pass: each rank of the group keeps the whole data-parallel rank's reference hidden rows (gathered after
  the forward), so the training pass finds its rows whatever verl's micro-batching;
- global top-k: the gathered statistics hold the data-parallel rank's tokens once; `gather_token_stats` then runs
  over the data-parallel group (one rank per SP position), so every token of the global batch counts once;
- loss terms (metrics) are summed over all dp x s ranks (each holds its rows' shares); dumps are written by SP rank
  0 only, one per data-parallel rank.
Every registered loss's `compute` is a sum over rows with the plan's global denominators, so a sequence cut by the
slice needs nothing more. Tested on CPU (gloo all-to-all; `attn_implementation=eksft_cpu_varlen`,
verl_ext/cpu_attention.py): SP=2 equals SP=1 (tests/sft/test_verl_sft_sp.py).

Cost per step: one reference forward, two policy forwards (pre-pass, training) and one backward; the
metrics `eksft/ref_forwards_per_step` (tokens through the reference / tokens in the batch) and
`perf/eksft_*_s` record it. Limits (clear errors): selection_scope=micro_batch with sequence parallelism (no rank
holds a whole micro-batch), static padding (`engine.pad_to_length`), verl's own `use_fused_kernels`,
temperature != 1.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from copy import deepcopy
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from verl.trainer.sft_trainer import SFTTrainer
from verl.utils import tensordict_utils as tu
from verl.workers.engine_workers import TrainingWorker

from eksft_pipeline.losses import IGNORE_INDEX, LinearTokenLoss, TokenStats, get_loss
from eksft_pipeline.losses.base import linear_compute
from eksft_pipeline.losses.fused import fused_linear_loss, fused_stats
from eksft_pipeline.losses.stats import gather_token_stats
from eksft_pipeline.verl_ext.sft_head import (
    SEQ_INDEX,
    RefSide,
    RowSlice,
    autocast_off,
    install_policy_head,
    labels_of,
    row_slice,
    valid_rows,
)
from eksft_pipeline.verl_ext.sft_plan import (
    COEFFS,
    SCALAR_PREFIX,
    UNIT_WEIGHT,
    aggregate_metrics,
    check_eksft_block,
    complete_eksft_block,
    plan_step,
    policy_is_reference,
    scatter_to_positions,
)

logger = logging.getLogger(__name__)

PLAN_PREFIX = "eksft_plan_"
STAT_PREFIX = "eksft_stat_"
LOSS_KEY = "eksft_loss_part"
MODE_KEY = "eksft_mode"
DTYPES_KEY = "eksft_dtypes"
_DTYPES = {"bool": torch.bool, "float32": torch.float32, "int64": torch.int64, "float64": torch.float64}
_STAT_FIELDS = ("entropy", "logp", "kl", "ref_logp", "prob_sq")


def _stats_fields(stats: TokenStats) -> dict[str, torch.Tensor]:
    """The per-row statistics present in `stats` (row-aligned, 0 on ignored rows)."""
    return {f: getattr(stats, f) for f in _STAT_FIELDS if getattr(stats, f) is not None}


def _seq_ids(batch) -> torch.Tensor:
    """Sequence index of every packed row [nnz] (position of the sequence in `batch`)."""
    lengths = batch["input_ids"].offsets().diff()
    return torch.repeat_interleave(torch.arange(lengths.numel()), lengths.cpu())


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.values() if t.is_nested else t.reshape(-1)


# --------------------------------------------------------------------------------------------
# the loss function verl's engine calls
# --------------------------------------------------------------------------------------------


class SelectiveLossHook:
    """The `loss_function` verl's FSDP engine receives, plus the fused head it routes the model through.

    Per micro-batch, `forward_step` calls it twice:
      1. per-token tensors: naive head -> `hook(student_logits=[1, nnz, V], data=mb)` (verl's distillation hook);
         fused head -> `head_for(mb)(hidden [nnz, d], weight [V, d])` from inside lm_head (head.py);
      2. `hook(model_output=..., data=mb, dp_group=...)` -> (loss, metrics).
    The batch's non-tensor `eksft_mode` says which pass runs: "stats" (no-grad pre-pass: per-token H, KL,
    log p, ...) or "train" (the loss share of the micro-batch, on row 0 of a per-token carrier).
    """

    def __init__(self, loss, *, fused: bool, selection_scope: str, seed: int, chunk_size: int | None = None):
        self.loss = loss
        self.fused = fused
        self.linear = isinstance(loss, LinearTokenLoss)
        self.selection_scope = selection_scope
        self.seed = seed
        self.chunk_size = chunk_size
        self.ref: RefSide | None = None
        self.step = 0
        # this step's policy is still the reference (sft_plan.policy_is_reference): its KL is 0 by definition
        self.kl_is_zero = False
        self.vocab_size: int | None = None
        self.micro_metrics: list[dict[str, float]] = []
        self.term_sums: dict[str, float] = {}

    # verl calls us with keyword arguments only
    def __call__(self, student_logits=None, data=None, model_output=None, dp_group=None, **_):
        if student_logits is not None:
            out = self._naive(student_logits.squeeze(0), data)
            return {k: v.unsqueeze(0) for k, v in out.items()}
        return self._loss(model_output, data)

    def head_for(self, mb, output_args):
        """The fused head for this micro-batch (head.install_policy_head asks), or None for verl's plain forward."""
        if not self.fused or tu.get_non_tensor_data(mb, MODE_KEY, None) not in ("stats", "train"):
            return None
        return lambda hidden, weight, rows: self._fused(hidden, weight, mb, rows)

    # -- shared -------------------------------------------------------------------------------
    def _rows(self, mb, device, rows: RowSlice) -> tuple[torch.Tensor, torch.Tensor]:
        """(labels with IGNORE_INDEX on invalid rows [n], valid [n]) of this rank's rows, on `device`.

        Labels come from the whole micro-batch's packed ids (row i -> token i+1 of its own sequence), so a
        sequence cut by the Ulysses slice keeps its true next token at the cut.
        """
        valid = rows.take(valid_rows(mb), fill=False).to(device)
        labels = rows.take(labels_of(mb)).to(device)
        return torch.where(valid, labels, torch.full_like(labels, IGNORE_INDEX)), valid

    def _mode(self, mb) -> str:
        return tu.get_non_tensor_data(mb, MODE_KEY, "train")

    def _ref_needed(self, mode: str) -> bool:
        if mode == "stats" or self.selection_scope == "micro_batch":
            return self.loss.needs_ref
        return self.loss.ref_in_compute

    def _plan_fields(self, mb, device, rows: RowSlice) -> dict[str, torch.Tensor]:
        dtypes = tu.get_non_tensor_data(mb, DTYPES_KEY, {}) or {}
        out = {}
        for key in mb.keys():
            if isinstance(key, str) and key.startswith(PLAN_PREFIX):
                name = key[len(PLAN_PREFIX) :]
                out[name] = rows.take(_flat(mb[key])).to(device).to(_DTYPES[dtypes.get(name, "float32")])
        if not out:
            raise RuntimeError("the selective loss needs its plan, but the batch carries none")
        return out

    def _micro_plan(self, stats: TokenStats, mb, valid: torch.Tensor):
        """selection_scope=micro_batch: plan this micro-batch alone; weight = its share of the batch's tokens."""
        seq = _seq_ids(mb).to(valid.device)
        if self.kl_is_zero and stats.kl is not None:  # pi_theta IS pi_ref (losses/selection.py, rule 1)
            stats = stats.policy_is_reference()
        plan = self.loss.plan(stats, seq_ids=seq, generator=self._generator(extra=valid.numel()))
        self.micro_metrics.append({k: float(v) for k, v in plan.metrics.items()})
        share = float(valid.sum().item()) / max(float(mb["batch_num_tokens"]), 1.0)
        return plan, share

    def _carrier(self, part: torch.Tensor, nnz: int, mb) -> dict[str, torch.Tensor]:
        """verl wants per-token tensors: the micro-batch's loss share (times dp_size) rides on row 0.

        With Ulysses SP `part` is this rank's rows' share and `nnz` its row count; the engine gathers the carriers
        over the SP group (a row 0 in verl's padding holds a share of 0: padding rows are never valid), so the loss
        is the sum of the shares and the gather's backward (x SP size) offsets FSDP's mean over dp x sp ranks."""
        part = part * float(mb["dp_size"])
        carrier = torch.zeros(nnz, dtype=part.dtype, device=part.device)
        carrier = carrier.index_put((torch.zeros(1, dtype=torch.long, device=part.device),), part.reshape(1))
        return {LOSS_KEY: carrier}

    def _add_terms(self, terms: dict, scale: float) -> None:
        for k, v in terms.items():
            if k == "loss" or not isinstance(v, torch.Tensor | float | int):
                continue
            self.term_sums[k] = self.term_sums.get(k, 0.0) + float(v) * scale

    # -- naive head: full logits from verl ------------------------------------------------------
    def _naive(self, logits: torch.Tensor, mb) -> dict[str, torch.Tensor]:
        nnz = logits.shape[0]
        self.vocab_size = int(logits.shape[-1])
        rows = row_slice(mb, nnz)  # verl hands this rank's rows (all of them without sequence parallelism)
        labels, valid = self._rows(mb, logits.device, rows)
        mode = self._mode(mb)
        micro = self.selection_scope == "micro_batch"
        token = self._plan_fields(mb, logits.device, rows) if mode == "train" and not micro else {}
        need_ref = self._ref_needed(mode)
        if need_ref and mode == "train" and self.linear and not micro:
            need_ref = bool((token["w_kl"] != 0).any())  # reference rows only where the KL term has weight
        ref_logits = self._ref_logits(mb, rows) if need_ref else None
        if mode == "stats":
            stats = self.loss.stats(logits, ref_logits, labels)
            return {STAT_PREFIX + k: v.float() for k, v in _stats_fields(stats).items()}
        if self.selection_scope == "micro_batch":
            plan, share = self._micro_plan(self.loss.stats(logits, ref_logits, labels), mb, valid)
            part, terms = self.loss.compute(
                logits, labels, ref_logits if self.loss.ref_in_compute else None, plan.token, plan.scalars
            )
            self._add_terms(terms, share)
            return self._carrier(part * share, nnz, mb)
        if self.linear:
            w_ce, w_h, w_kl = (token[k] for k in COEFFS)
            y = torch.where(valid, labels, torch.zeros_like(labels))
            part, terms = linear_compute(logits, y, ref_logits, w_ce, w_h, w_kl)
            self._add_terms(terms, 1.0)
            return self._carrier(part, nnz, mb)
        return self._carrier(self._units_compute(logits, labels, ref_logits, token, mb, rows), nnz, mb)

    def _ref_hidden(self, mb, rows: RowSlice) -> torch.Tensor:
        """Reference hidden states [n, d] of this rank's rows (zeros where not stored or padding)."""
        if self.ref is None:
            raise RuntimeError(f"loss {self.loss.name!r} needs the reference model, but none was built")
        return rows.take(self.ref.hidden(mb, valid_rows(mb)))

    def _ref_logits(self, mb, rows: RowSlice) -> torch.Tensor:
        h = self._ref_hidden(mb, rows)
        with autocast_off(h.device):
            return h @ self.ref.weight.t()

    def _units_compute(self, logits, labels, ref_logits, token, mb, rows: RowSlice) -> torch.Tensor:
        """Non-linear losses: `loss.compute` once per planning unit (the whole micro-batch, or each sequence).

        Every registered loss's `compute` is a sum over rows with the plan's global denominators, so with Ulysses
        SP each rank computes it on its rows of each unit (a sequence cut by the slice is split between ranks)."""
        scalar_keys = [k for k in token if k.startswith(SCALAR_PREFIX)]
        fields = {k: v for k, v in token.items() if not k.startswith(SCALAR_PREFIX) and k != UNIT_WEIGHT}
        if self.selection_scope == "sequence":
            seq = rows.take(_seq_ids(mb), fill=-1).tolist()  # sequences are contiguous in the packed rows
            bounds = [i for i in range(1, len(seq)) if seq[i] != seq[i - 1]]
            units = [slice(a, b) for a, b in zip([0, *bounds], [*bounds, len(seq)])]
        else:
            units = [slice(0, logits.shape[0])]
        total = logits[:0].float().sum()  # 0 with a grad_fn, so a micro-batch without response tokens still backprops
        valid = labels != IGNORE_INDEX
        for rows in units:
            v = valid[rows]
            if not bool(v.any()):
                continue
            first = int(v.nonzero()[0, 0]) + rows.start
            scalars = {k[len(SCALAR_PREFIX) :]: float(token[k][first]) for k in scalar_keys}
            weight = float(token[UNIT_WEIGHT][first])
            part, terms = self.loss.compute(
                logits[rows],
                labels[rows],
                ref_logits[rows] if (ref_logits is not None and self.loss.ref_in_compute) else None,
                {k: f[rows] for k, f in fields.items()},
                scalars,
            )
            self._add_terms(terms, weight)
            total = total + part * weight
        return total

    # -- fused head: hidden states and the lm_head weight ---------------------------------------
    def _fused(self, hidden: torch.Tensor, weight: torch.Tensor, mb, rows: RowSlice) -> dict[str, torch.Tensor]:
        nnz = hidden.shape[0]  # this rank's rows (all of the micro-batch without sequence parallelism)
        self.vocab_size = int(weight.shape[0])
        labels, valid = self._rows(mb, hidden.device, rows)
        mode = self._mode(mb)
        ref_h = self._ref_hidden(mb, rows) if (self.ref is not None and self._ref_needed(mode)) else None
        ref_w = self.ref.weight if ref_h is not None else None
        if mode == "stats":
            stats = fused_stats(self.loss, hidden.detach(), weight.detach(), ref_h, ref_w, labels, chunk_size=self.chunk_size)
            return {STAT_PREFIX + k: v.float() for k, v in _stats_fields(stats).items()}
        if self.selection_scope == "micro_batch":
            stats = fused_stats(self.loss, hidden.detach(), weight.detach(), ref_h, ref_w, labels, chunk_size=self.chunk_size)
            plan, share = self._micro_plan(stats, mb, valid)
            w_ce, w_h, w_kl = self.loss.coefficients(plan.token, plan.scalars, valid)
            w_ce = w_ce * share
            w_h = w_h * share if w_h is not None else None
            w_kl = w_kl * share if w_kl is not None else None
        else:
            token = self._plan_fields(mb, hidden.device, rows)
            w_ce, w_h, w_kl = (token[k] for k in COEFFS)
            share = 1.0
        has_kl = w_kl is not None and bool((w_kl != 0).any())
        part, terms = fused_linear_loss(
            hidden,
            weight,
            labels,
            ref_h if has_kl else None,
            ref_w if has_kl else None,
            w_ce,
            w_h,
            w_kl,
            chunk_size=self.chunk_size,
        )
        self._add_terms(terms, 1.0)
        return self._carrier(part, nnz, mb)

    # -- pass 2 of forward_step: model_output -> (loss, metrics) -----------------------------
    def _loss(self, model_output, mb):
        if self._mode(mb) == "stats":
            return torch.zeros((), device=_device_of(model_output)), {}
        part = model_output[LOSS_KEY]
        part = part.values() if part.is_nested else part
        return part.sum(), {}

    def _generator(self, extra: int = 0) -> torch.Generator:
        g = torch.Generator()
        g.manual_seed((self.seed * 1_000_003 + self.step * 7919 + extra) % (2**63 - 1))
        return g


def _device_of(model_output) -> torch.device:
    for v in model_output.values():
        if isinstance(v, torch.Tensor):
            return v.device
    return torch.device("cpu")


# --------------------------------------------------------------------------------------------
# worker
# --------------------------------------------------------------------------------------------


class SelectiveTrainingWorker(TrainingWorker):
    """verl's `TrainingWorker` with the reference pass, the global selection and the update schedule in
    front of `train_batch` (module docstring)."""

    def __init__(
        self,
        config,
        *,
        loss,
        ref_config=None,
        selection_scope="global_batch",
        head="fused",
        updates_per_batch=1,
        ref_hidden_store="device",
        chunk_size=None,
        seed=0,
        metrics_prefix="eksft/",
        dump_dir: str | None = None,
        ref_is_initial: bool = False,
        pi_old_every: int = 1,
    ):
        from eksft_pipeline.verl_ext import cpu_attention

        cpu_attention.register()  # attn_implementation=eksft_cpu_varlen: Ulysses SP on CPU (before any model is built)
        super().__init__(config=config)
        # the reference is the policy's initial model (eksft.ref_model_path null or the same path): at a step
        # before any optimizer update the two are the same weights (policy_is_reference)
        self.ref_is_initial = bool(ref_is_initial)
        self.pi_old_every = int(pi_old_every)
        self._pi_old: list[torch.Tensor] | None = None  # copy of the local parameter shards at the last refresh
        self._pi_old_step = 0
        self.dump_dir = dump_dir
        self.loss_obj = loss
        self.selection_scope = selection_scope
        self.updates_per_batch = int(updates_per_batch)
        self.metrics_prefix = metrics_prefix
        self.fused = head == "fused"
        self.ref_worker = TrainingWorker(config=ref_config) if ref_config is not None else None
        self.ref_hidden_store = ref_hidden_store
        self.hook = SelectiveLossHook(
            loss, fused=self.fused, selection_scope=selection_scope, seed=seed, chunk_size=chunk_size
        )
        self.set_loss_fn(self.hook)
        self.last_plan_metrics: dict[str, float] = {}
        self._update = 0

    def reset(self):
        super().reset()
        if self.ref_worker is not None:
            self.ref_worker.reset()
            self.hook.ref = RefSide(self.ref_worker.engine, where=self.ref_hidden_store)
        if self.fused:
            if str(self.engine_config.strategy) != "fsdp2":
                raise ValueError(
                    f"eksft.head=fused runs inside FSDP2's lm_head unit; engine.strategy={self.engine_config.strategy} "
                    "is not supported: set engine.strategy=fsdp2 or eksft.head=naive"
                )
            install_policy_head(self.engine, self.hook.head_for)
        if self.dump_dir:
            self._install_grad_dump()

    def _engine_defaults(self, data):
        defaults = dict(
            use_remove_padding=self.model_config.get("use_remove_padding", False),
            use_dynamic_bsz=self.engine_config.use_dynamic_bsz,
            max_token_len_per_gpu=self.engine_config.max_token_len_per_gpu,
            micro_batch_size_per_gpu=self.engine_config.micro_batch_size_per_gpu,
            use_fused_kernels=self.engine_config.use_fused_kernels,
        )
        for key, val in defaults.items():
            if key not in data.keys():
                tu.assign_non_tensor(data, **{key: val})

    def _vocab_size(self) -> int:
        if self.hook.vocab_size is not None:
            return self.hook.vocab_size
        return int(self.model_config.hf_config.vocab_size)

    def _set_mode(self, data, mode: str) -> None:
        tu.assign_non_tensor(data, **{MODE_KEY: mode})
        if not self.fused:  # the naive head receives verl's full logits through its distillation hook
            tu.assign_non_tensor(data, distillation_use_topk=True, distillation_only=True)

    def _comm_device(self):
        group = self.engine.get_data_parallel_group()
        if dist.is_initialized() and dist.get_backend(group) == "gloo":
            return "cpu"
        return self.device_name

    # -- the step -------------------------------------------------------------------------------
    @torch.no_grad()
    def _statistics(self, data, valid: torch.Tensor) -> dict[str, torch.Tensor]:
        """Pre-pass: per-token statistics of this rank's valid rows (batch order) from a no-grad policy forward."""
        self._set_mode(data, "stats")
        with self.engine.eval_mode():
            out = self.engine.infer_batch(data, loss_function=self.hook)
        local = {}
        for key, nested in out["model_output"].items():
            if key.startswith(STAT_PREFIX):
                local[key[len(STAT_PREFIX) :]] = nested.values().float().cpu()[valid]
        return local

    def _plan(self, data, valid: torch.Tensor, groups_seq: torch.Tensor):
        """Statistics (if the loss needs them) -> all-gather -> the global plan -> this rank's rows into `data`."""
        t0 = time.perf_counter()
        age = None
        if not self.loss_obj.needs_prepass:
            local = {}
        elif self.pi_old_every > 1:
            with self._pi_old_weights() as age:
                local = self._statistics(data, valid)
        else:
            local = self._statistics(data, valid)
        t_stats = time.perf_counter() - t0
        bsz = data["input_ids"].shape[0]
        dp_rank = self.engine.get_data_parallel_rank()
        seq = _seq_ids(data)
        local["seq_id"] = (seq + dp_rank * bsz)[valid]  # unique over the global batch: every rank holds bsz
        local["group"] = groups_seq[seq][valid]
        gathered = gather_token_stats(local, group=self.engine.get_data_parallel_group(), device=self._comm_device())
        f = gathered.fields
        n_global = int(f["seq_id"].numel())
        stats = TokenStats(
            valid=torch.ones(n_global, dtype=torch.bool),
            vocab_size=self._vocab_size(),
            **{k: f[k] for k in _STAT_FIELDS if k in f},
        )
        measured = None
        if stats.kl is not None and self.hook.kl_is_zero:
            # pi_theta IS pi_ref here: KL = 0 by definition, whatever rounding computed (losses/selection.py, rule 1)
            measured = float(stats.kl.mean()) if n_global else 0.0
            stats = stats.policy_is_reference()
        plan = plan_step(
            self.loss_obj,
            stats,
            seq_ids=f["seq_id"],
            groups=f["group"],
            scope=self.selection_scope,
            generator=self.hook._generator(),
        )
        if measured is not None:
            plan.metrics["kl_all_measured"] = measured
        if age is not None:
            plan.metrics["pi_old_age"] = float(age)
        self._attach_plan(data, plan.token, gathered, valid)
        if self.hook.ref is not None and self.hook.ref.store is not None and plan.linear:
            # the training pass reads reference rows only where the KL weight is non-zero (EKSFT: the mask)
            self.hook.ref.store.keep(gathered.local_slice(plan.token["w_kl"]) != 0)
        if self.dump_dir:
            self._dump(data, valid, local, plan, gathered)
        return plan, t_stats

    @contextmanager
    def _pi_old_weights(self):
        """The pre-pass on pi_old (eksft.pi_old_every): at a refresh step copy the policy's parameters and run on
        them as they are; in between, copy the saved ones in for the pre-pass and the current ones back after.
        Yields the number of steps since the refresh (0 at one)."""
        params = [p for p in self.engine.module.parameters()]
        step = self.hook.step
        if self._pi_old is None or step - self._pi_old_step >= self.pi_old_every:
            with torch.no_grad():
                self._pi_old = [p.detach().clone() for p in params]
            self._pi_old_step = step
            yield 0
            return
        with torch.no_grad():
            current = [p.detach().clone() for p in params]
            for p, old in zip(params, self._pi_old):
                p.detach().copy_(old)
        try:
            yield step - self._pi_old_step
        finally:
            with torch.no_grad():
                for p, cur in zip(params, current):
                    p.detach().copy_(cur)

    def _attach_plan(self, data, token: dict[str, torch.Tensor], gathered, valid: torch.Tensor) -> None:
        """This rank's rows of the global plan -> jagged per-token fields of `data` (0 on invalid rows)."""
        nnz = valid.numel()
        offsets = data["input_ids"].offsets().cpu()
        dtypes = {}
        for name, value in token.items():
            dtypes[name] = str(value.dtype).replace("torch.", "")
            if dtypes[name] not in _DTYPES:
                raise TypeError(f"plan field {name!r} has unsupported dtype {value.dtype}")
            carry = torch.float64 if value.dtype == torch.float64 else torch.float32
            mine = gathered.local_slice(value.cpu()).to(carry)
            data[PLAN_PREFIX + name] = torch.nested.nested_tensor_from_jagged(
                scatter_to_positions(mine, valid, nnz), offsets
            )
        tu.assign_non_tensor(data, **{DTYPES_KEY: dtypes})

    def train_batch(self, data):
        t0 = time.perf_counter()
        self.hook.step += 1
        self.hook.micro_metrics = []
        self.hook.kl_is_zero = policy_is_reference(self.ref_is_initial, getattr(self.engine, "optimizer", None))
        self._engine_defaults(data)
        bsz = int(data["input_ids"].shape[0])
        u = self.updates_per_batch
        if bsz % u:
            raise ValueError(
                f"eksft.updates_per_batch={u} must divide the per-rank batch of {bsz} sequences "
                "(data.train_batch_size / data-parallel size)"
            )
        data[SEQ_INDEX] = torch.arange(bsz)
        valid = valid_rows(data).cpu()
        groups_seq = torch.arange(bsz) // (bsz // u)  # update (mini-batch) of every local sequence
        ref = self.hook.ref
        t_ref = t_stats = 0.0
        ref_tokens0 = ref.tokens_forwarded if ref is not None else 0
        if ref is not None:
            t1 = time.perf_counter()
            ref.forward_batch(data)
            t_ref = time.perf_counter() - t1
        plan_metrics: dict[str, float] = {}
        if self.selection_scope != "micro_batch":
            plan, t_stats = self._plan(data, valid, groups_seq)
            plan_metrics = plan.metrics
        self._set_mode(data, "train")

        t2 = time.perf_counter()
        outputs, term_sums = [], []
        lr_flag = bool(tu.get(data, key="update_lr_scheduler", default=False))
        for j in range(u):
            mini = data if u == 1 else self._mini_batch(data, groups_seq == j, last=(j == u - 1), lr_flag=lr_flag)
            self._update = j
            self.hook.term_sums = {}
            outputs.append(super().train_batch(mini))
            term_sums.append(self._reduce_terms(self.hook.term_sums))
        t_train = time.perf_counter() - t2
        if ref is not None:
            ref.clear()
        elapsed = time.perf_counter() - t0

        if self.selection_scope == "micro_batch" and self.hook.micro_metrics:
            plan_metrics = aggregate_metrics(self.hook.micro_metrics)
        self.last_plan_metrics = plan_metrics
        output = _merge_outputs(outputs)
        if output is not None:
            metrics = tu.get(output, "metrics")
            p = self.metrics_prefix
            for k, v in plan_metrics.items():
                metrics[p + k] = v
            for k in sorted({k for t in term_sums for k in t}):
                vals = [t.get(k, 0.0) for t in term_sums]
                metrics[p + k] = sum(vals) / len(vals)
                if u > 1:
                    metrics[p + k + "_last"] = vals[-1]
            if u > 1:
                metrics[p + "updates"] = float(u)
            n_tokens = int(_flat(data["loss_mask"]).sum().item())
            n_rows = int(data["input_ids"].offsets()[-1])
            world = self.engine.get_data_parallel_size() if dist.is_initialized() else 1
            if ref is not None:
                metrics[p + "ref_forwards_per_step"] = (ref.tokens_forwarded - ref_tokens0) / max(n_rows, 1)
                metrics["perf/eksft_ref_lm_head_gb"] = ref.weight_nbytes / 1024**3
            prepass = self.loss_obj.needs_prepass and self.selection_scope != "micro_batch"
            metrics[p + "policy_forwards_per_step"] = 2.0 if prepass else 1.0
            metrics["perf/response_tokens_per_s"] = n_tokens * world / max(elapsed, 1e-9)
            metrics["perf/step_time_s"] = elapsed
            metrics["perf/eksft_ref_s"] = t_ref
            metrics["perf/eksft_prepass_s"] = t_stats
            metrics["perf/eksft_train_s"] = t_train
        return output

    def _mini_batch(self, data, rows: torch.Tensor, *, last: bool, lr_flag: bool):
        """One update's sequences (verl's `train_mini_batch` pattern: lr scheduler only after the last)."""
        from tensordict.tensorclass import NonTensorData

        mini = tu.index_select_tensor_dict(data, rows.nonzero().squeeze(1))
        lengths = mini["input_ids"].offsets().diff().tolist()
        group = self.engine.get_data_parallel_group()
        world = dist.get_world_size(group) if dist.is_initialized() else 1
        if world > 1:
            parts = [None] * world
            dist.all_gather_object(parts, lengths, group)
            lengths = [x for p in parts for x in p]
        tu.assign_non_tensor(mini, global_token_num=NonTensorData(lengths), update_lr_scheduler=last and lr_flag)
        return mini

    def _sp_size(self) -> int:
        return int(getattr(self.engine, "ulysses_sequence_parallel_size", 1) or 1)

    def _reduce_terms(self, sums: dict[str, float]) -> dict[str, float]:
        """Sum the loss terms of one update over ranks (each rank holds its micro-batches' shares of the global mean).

        Over the data-parallel ranks, and with Ulysses SP over every rank (dp x sp: each rank's terms cover its own
        rows of the sequence). Gathered as objects: a rank whose micro-batches held no response token may have
        computed no term at all.
        """
        group = self.engine.get_data_parallel_group() if self._sp_size() == 1 else dist.group.WORLD
        if not (dist.is_initialized() and dist.get_world_size(group) > 1):
            return dict(sums)
        parts = [None] * dist.get_world_size(group)
        dist.all_gather_object(parts, dict(sums), group)
        out: dict[str, float] = {}
        for part in parts:
            for k, v in part.items():
                out[k] = out.get(k, 0.0) + v
        return out

    # -- debugging / tests --------------------------------------------------------------------
    def _dump(self, data, valid: torch.Tensor, local: dict, plan, gathered) -> None:
        """`eksft.dump_dir`: this rank's tokens of this step's selection, for offline checks.

        One file per (step, data-parallel rank): per valid token the key of its sequence (a hash of the token ids, the
        same on every rank and run), its position among the sequence's valid tokens, the statistics the
        selection saw and this rank's slice of the plan's token fields; plus the plan's metrics.
        """
        ids = data["input_ids"]
        flat = _flat(ids)
        seq = _seq_ids(data)
        seq_key = torch.tensor([hash(tuple(x.tolist())) for x in ids.unbind()], dtype=torch.int64)
        tok_seq = seq[valid]
        pos = torch.zeros_like(tok_seq)
        for s_ in tok_seq.unique():
            sel = tok_seq == s_
            pos[sel] = torch.arange(int(sel.sum()))
        out = {
            "seq_key": seq_key[tok_seq],
            "pos": pos,
            "label": torch.roll(flat.cpu(), -1)[valid],
            "stats": {k: v for k, v in local.items() if k not in ("seq_id", "group")},
            "group": local["group"],
            "plan": {k: gathered.local_slice(v.cpu()) for k, v in plan.token.items()},
            "metrics": {k: float(v) for k, v in plan.metrics.items()},
            # the rank's sequences, so a check can recompute everything from the dump alone
            "seq_of_token": tok_seq,
            "sequences": [x.cpu() for x in ids.unbind()],
            "loss_masks": [x.cpu() for x in data["loss_mask"].unbind()],
        }
        if not self.engine.is_mp_src_rank_with_outputs():
            return  # Ulysses SP: every rank of the group holds the same data-parallel rank's tokens; one writes them
        rank = self.engine.get_data_parallel_rank() if dist.is_initialized() else 0
        path = Path(self.dump_dir) / f"step{self.hook.step:05d}_rank{rank}.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(out, path)

    def _install_grad_dump(self) -> None:
        """`eksft.dump_dir`: every update's full gradients (before clipping) to grads_step<s>_update<u>.pt (rank 0)."""
        engine = self.engine
        orig = engine.optimizer_step

        def optimizer_step():
            grads = {}
            for name, p in engine.module.named_parameters():
                if p.grad is not None:
                    g = p.grad
                    grads[name] = (g.full_tensor() if hasattr(g, "full_tensor") else g).detach().float().cpu()
            if not dist.is_initialized() or dist.get_rank() == 0:
                path = Path(self.dump_dir) / f"grads_step{self.hook.step:05d}_update{self._update}.pt"
                path.parent.mkdir(parents=True, exist_ok=True)
                torch.save(grads, path)
            return orig()

        engine.optimizer_step = optimizer_step


def _merge_outputs(outputs: list):
    """One trainer step's output from its updates: numeric metrics averaged, grad_norm first/last kept, lr = last."""
    if len(outputs) == 1 or outputs[-1] is None:
        return outputs[-1]
    ms = [tu.get(o, "metrics") for o in outputs]
    merged = dict(ms[-1])
    for key in {k for m in ms for k in m}:
        vals = [m[key] for m in ms if key in m]
        if key != "lr" and all(isinstance(v, int | float) and not isinstance(v, bool) for v in vals):
            merged[key] = float(sum(vals) / len(vals))
    for key in ("grad_norm", "loss"):
        vals = [m[key] for m in ms if isinstance(m.get(key), int | float)]
        if vals:
            merged[f"eksft/{key}_first"], merged[f"eksft/{key}_last"] = float(vals[0]), float(vals[-1])
            merged["eksft/" + key + "_max"] = float(max(vals))
    out = outputs[-1]
    tu.assign_non_tensor(out, metrics=merged)
    return out


# --------------------------------------------------------------------------------------------
# trainer
# --------------------------------------------------------------------------------------------


def selective_config(config) -> dict[str, Any]:
    """The project's `eksft:` block of the verl SFT config, with defaults (see recipes/verl/sft.yaml)."""
    return complete_eksft_block(OmegaConf.to_container(config.get("eksft", {}) or {}, resolve=True))


def worker_configs(trainer):
    """What the selective trainer's workers are built from, checked once for both launchers (`EKSFTTrainer` here,
    `EKSFTRayTrainer` in sft_ray.py): ``(eksft block, loss, head, policy TrainingWorkerConfig, reference
    TrainingWorkerConfig or None)``. ``trainer`` is a verl SFT trainer after its configs are built (`config`,
    `model_config`, `engine_config`, `optimizer_config`, `checkpoint_config`, `profiler_config`)."""
    from verl.workers.engine_workers import TrainingWorkerConfig

    block = selective_config(trainer.config)
    loss = get_loss(block["loss"], **(block["loss_params"] or {}))
    check_eksft_block(
        block,
        loss=loss,
        micro_batch_size_per_gpu=int(trainer.config.data.micro_batch_size_per_gpu),
        use_dynamic_bsz=bool(trainer.config.data.use_dynamic_bsz),
        ulysses_sequence_parallel_size=int(trainer.engine_config.ulysses_sequence_parallel_size),
    )
    head = loss.resolve_head(block["head"])  # auto -> the loss's first head (fused for the linear form)

    if trainer.model_config.get("use_fused_kernels", False):
        raise ValueError(
            "model.use_fused_kernels=True replaces the model's forward with verl's PPO head (log-probs only); "
            "the selective loss brings its own fused head (eksft.head=fused): set model.use_fused_kernels=false"
        )
    sp = int(trainer.engine_config.ulysses_sequence_parallel_size)
    if sp > 1 and not trainer.model_config.get("use_remove_padding", False):
        raise ValueError(
            f"engine.ulysses_sequence_parallel_size={sp} slices the packed sequence: set model.use_remove_padding=true"
        )

    config = TrainingWorkerConfig(
        model_type="language_model",
        model_config=trainer.model_config,
        engine_config=trainer.engine_config,
        optimizer_config=trainer.optimizer_config,
        checkpoint_config=trainer.checkpoint_config,
        profiler_config=trainer.profiler_config,
    )
    ref_config = None
    if loss.needs_ref:
        if block["ref_model_path"]:
            from verl.utils.config import omega_conf_to_dataclass

            node = OmegaConf.merge(trainer.config.model, {"path": str(block["ref_model_path"])})
            ref_model_config = omega_conf_to_dataclass(node)
        else:
            ref_model_config = deepcopy(trainer.model_config)
        ref_engine_config = deepcopy(trainer.engine_config)
        ref_engine_config.forward_only = True
        if block["ref_model_dtype"]:  # storage dtype of the (CPU-offloaded) reference weights, e.g. bf16
            import dataclasses

            ref_engine_config = dataclasses.replace(ref_engine_config, model_dtype=str(block["ref_model_dtype"]))
        ref_config = TrainingWorkerConfig(
            model_type="language_model",
            model_config=ref_model_config,
            engine_config=ref_engine_config,
            optimizer_config=None,
            checkpoint_config=deepcopy(trainer.checkpoint_config),
            profiler_config=trainer.profiler_config,
        )
    return block, loss, head, config, ref_config


def fix_epoch_boundary_resume(handler, steps_per_epoch: int) -> None:
    """verl 0.9.1 restores the StatefulDataLoader state saved with the checkpoint. A checkpoint taken at the end of
    an epoch (every `save_freq=after_each_epoch` checkpoint) holds an *exhausted* iterator, so after resuming, `fit`
    starts the next epoch on a loader that yields nothing, and every remaining epoch is silently skipped (seen here:
    killed after step 3 of 6, the re-run logged no step and exported step 3). At an epoch boundary the position
    inside the epoch is 0 anyway, so the state is not loaded: `fit`'s `set_epoch(epoch)` gives the next epoch's
    order. Mid-epoch checkpoints load it as verl does. (Both trainers: this one and verl_ext/sft_ray.py's.)"""
    from verl.utils.checkpoint.checkpoint_handler import extract_step

    load_state = handler._load_dataloader_state

    def _load_dataloader_state(checkpoint_path: str):
        step = extract_step(checkpoint_path)
        if step is not None and steps_per_epoch > 0 and step % steps_per_epoch == 0:
            logger.warning("resuming at an epoch boundary (step %s, %s steps per epoch): starting the next epoch "
                           "with a fresh dataloader iterator instead of the saved, exhausted one", step, steps_per_epoch)
            return
        load_state(checkpoint_path)

    handler._load_dataloader_state = _load_dataloader_state


def resumed_at_last_step(trainer) -> bool:
    """True when the checkpoint resumed from is already the last step (`trainer.total_training_steps`).

    verl 0.9.1's `fit` only tests `global_step >= total_training_steps` *after* a step: resumed at the last step
    with `total_training_steps` below `total_epochs x steps_per_epoch`, it trains one step more than asked (seen
    here: a 4-step run killed after saving step 4 logged a step 5 on its re-run). Nothing is left to train then,
    and the checkpoint of that step is the run's result."""
    done, total = int(trainer.resume_global_step or 0), int(trainer.total_training_steps)
    if done >= total:
        logger.warning("resumed at step %s of %s: nothing left to train", done, total)
        return True
    return False


class EKSFTTrainer(SFTTrainer):
    """verl `SFTTrainer` whose loss is any `eksft_pipeline.losses` loss (see module docstring)."""

    def _build_ckpt_handler(self):
        super()._build_ckpt_handler()
        fix_epoch_boundary_resume(self.ckpt_handler, int(self.steps_per_epoch))

    def fit(self):
        if not resumed_at_last_step(self):
            super().fit()

    def _init_engine(self):
        u = int(self.eksft_block["updates_per_batch"])
        if self.train_batch_size_per_dp % u:
            raise ValueError(
                f"eksft.updates_per_batch={u} must divide the per-rank batch of {self.train_batch_size_per_dp} "
                f"sequences (data.train_batch_size={self.global_batch_size} over the data-parallel ranks)"
            )
        super()._init_engine()

    def _build_engine(self):
        block, loss, head, config, ref_config = worker_configs(self)
        self.eksft_block, self.loss_obj, self.eksft_head = block, loss, head
        from eksft_pipeline.verl_ext import cpu_platform

        if ref_config is not None and cpu_platform.is_active():
            cpu_platform.patch_fsdp2_offload_pinning()
        seed = int(self.config.trainer.get("seed", 1))
        self.training_client = SelectiveTrainingWorker(
            config,
            loss=loss,
            ref_config=ref_config,
            selection_scope=block["selection_scope"],
            head=head,
            updates_per_batch=int(block["updates_per_batch"]),
            ref_hidden_store=block["ref_hidden_store"],
            chunk_size=block["chunk_size"],
            seed=seed,
            dump_dir=block.get("dump_dir"),
            ref_is_initial=not block["ref_model_path"] or str(block["ref_model_path"]) == str(self.config.model.path),
            pi_old_every=int(block["pi_old_every"]),
        )
        self.loss_fn = self.training_client.hook
        self.engine = self.training_client.engine


__all__ = ["EKSFTTrainer", "SelectiveLossHook", "SelectiveTrainingWorker", "selective_config", "worker_configs"]
