"""The loss head inside verl's FSDP engine: hidden states and the lm_head weight, never `[N, V]` logits.

How verl 0.9.1 does it for its own fused kernels (`model.use_fused_kernels=True`,
verl/models/transformers/dense_common.py `forward_with_torch_backend`): the HF model's forward is
replaced by one that runs the decoder (`self.model(...)`), hands `hidden_states` and
`self.lm_head.weight` to a chunked fused linear head, and returns per-token tensors that the engine's
`prepare_model_outputs` reads instead of logits. This module does the same for the losses of
`eksft_pipeline.losses`, with three differences forced by FSDP2 and by the reference model:

- The head runs INSIDE `lm_head`'s own forward (`lm_head(hidden, eksft_head=fn)` calls
  `fn(hidden, self.weight)`). verl's FSDP2 wrapping gives an untied `lm_head` (Qwen3-4B/8B) its own
  FSDP unit, so only there is its weight unsharded, and only a call of that module runs the FSDP
  hooks that all-gather the weight and reduce-scatter its gradient. (verl's own fused forward reads
  `self.lm_head.weight` from the root forward; with an untied lm_head under FSDP2 that is a sharded
  DTensor.) A tied lm_head is a root parameter and unsharded during the root forward either way.
- The per-token outputs go through `prepare_model_outputs` unchanged (a wrapper recognises the
  head's dict and nests it by the micro-batch's offsets), so verl's micro-batching, dynamic batch
  sizes, gradient accumulation and the `loss_function(model_output=..., data=...)` call are verl's.
- The frozen reference model runs ONCE per step (`RefSide.forward_batch`): its final hidden states
  for the valid (response) rows are kept (`RefHiddenStore`, `[n_valid, d]` in the model dtype, on the
  device by default) together with a copy of its lm_head weight `[V, d]` taken the first time (the
  reference is frozen). The selection pre-pass and every training micro-batch rebuild the reference
  logits chunk by chunk from them, so no second reference forward and no stored reference logits.

Memory of the fused path beyond the plain model (what a per-GPU estimator should add), d = hidden size,
V = vocabulary, b = bytes of the model dtype (2 for bf16), c = chunk rows (CUDA 4096, CPU ~16M / V):
  per token of a micro-batch: grad_hidden [n, d] (b each, saved by the head's forward for its backward),
    the reference rows of the micro-batch [n, d] (b each, rebuilt from the store), ~6 fp32 per-token fields;
  per step: the reference hidden store [n_valid, d] (b each; the rank's response rows, pruned after the plan
    to the rows with a KL weight -- EKSFT: |M| <= 2k, about 20-40 % of them);
  fixed: the reference lm_head copy [V, d] (b each) and the fp32 grad_weight accumulator [V, d] (4 each);
  per chunk: policy and reference logits [c, V] and the gradient block [c, V] (CUDA compiled path: bf16
    logits + fp32/bf16 gradient, about c·V·(2b + 4 + b)); the eager path about five fp32 [c, V] buffers.
No [N, V] tensor exists for the policy or the reference; the naive head holds verl's [n, V] logits, their
fp32 log-softmax and gradient, and the [n, V] reference logits per micro-batch.

Shapes: a micro-batch of B sequences packed to nnz rows (`use_remove_padding`: the model sees
[1, nnz (+pad)], else [B, L] padded); row i predicts token i+1 of its sequence; the last row of each
sequence predicts nothing (see `valid_rows`). With Ulysses sequence parallelism of size s each rank of the SP
group sees [1, ceil(nnz / s)] rows (`RowSlice`): the head's per-token terms above count those rows only, the
per-token outputs are gathered over the group afterwards, and the reference hidden store holds the whole
data-parallel rank's rows on every rank of the group (gathered after the reference forward).
"""

from __future__ import annotations

import types
from contextlib import nullcontext

import torch

HEAD_KEY = "eksft_head_outputs"
SEQ_INDEX = "eksft_seq_index"


# --------------------------------------------------------------------------------------------
# rows of a packed micro-batch
# --------------------------------------------------------------------------------------------


def valid_rows(batch) -> torch.Tensor:
    """Bool [nnz]: row i (packed) predicts a response token of ITS OWN sequence.

    verl's `sft_loss` rolls the packed loss mask by -1 over the whole micro-batch; here the roll is per
    sequence (the last row of every sequence is invalid). The two agree whenever a sequence starts with a
    prompt token (every chat-template SFT row), and this form does not depend on which sequences verl
    packs next to each other, so the pre-pass and the training pass see the same rows.
    """
    lm = batch["loss_mask"]
    flat = lm.values() if lm.is_nested else lm.reshape(-1)
    valid = torch.roll(flat, shifts=-1, dims=0).bool()
    ends = batch["input_ids"].offsets()[1:] - 1
    valid[ends.to(valid.device)] = False
    return valid


def labels_of(batch) -> torch.Tensor:
    """Next-token labels [nnz] of a packed micro-batch (row i -> token i+1; the wrap rows are invalid anyway)."""
    ids = batch["input_ids"]
    flat = ids.values() if ids.is_nested else ids.reshape(-1)
    return torch.roll(flat, shifts=-1, dims=0)


def seq_lengths(batch) -> torch.Tensor:
    return batch["input_ids"].offsets().diff()


def sp_world() -> tuple[int, int]:
    """(size, rank) of the Ulysses sequence-parallel group verl's engine has set for this pass ((1, 0) without SP)."""
    from verl.utils.ulysses import get_ulysses_sequence_parallel_rank, get_ulysses_sequence_parallel_world_size

    size = get_ulysses_sequence_parallel_world_size()
    return size, (get_ulysses_sequence_parallel_rank() if size > 1 else 0)


class RowSlice:
    """This rank's rows of a micro-batch's packed sequence.

    Without sequence parallelism: all `nnz` rows. With Ulysses SP of size s (verl's `prepare_model_inputs`:
    `ulysses_pad_and_slice_inputs`), the packed sequence is padded at its tail to a multiple of s and rank r holds
    rows [r*n, (r+1)*n) of it, n = (nnz + pad) / s; rows >= nnz are verl's padding (invalid for every loss).
    `take(t)` cuts this rank's rows out of any per-row tensor of the whole micro-batch, so every token of the
    micro-batch is seen by exactly one rank of the SP group.
    """

    def __init__(self, start: int, n: int, nnz: int, sp: int = 1):
        self.start, self.n, self.nnz, self.sp = start, n, nnz, sp

    @property
    def pad(self) -> int:
        return self.n * self.sp - self.nnz

    def take(self, t: torch.Tensor, fill=0) -> torch.Tensor:
        """Rows [start, start + n) of a per-row tensor `t` [nnz, ...], `fill` on the padding rows."""
        if t.shape[0] != self.nnz:
            raise RuntimeError(f"row slice: a per-row tensor of {t.shape[0]} rows for a micro-batch of {self.nnz}")
        if self.sp == 1:
            return t
        end = min(self.start + self.n, self.nnz)
        part = t[min(self.start, self.nnz) : end]
        missing = self.n - part.shape[0]
        if missing:
            part = torch.cat([part, torch.full((missing, *t.shape[1:]), fill, dtype=t.dtype, device=t.device)])
        return part


def row_slice(batch, n_rows: int) -> RowSlice:
    """The `RowSlice` of a model output holding `n_rows` rows of the packed micro-batch `batch` on this rank."""
    nnz = int(batch["input_ids"].offsets()[-1])
    sp, rank = sp_world()
    if sp == 1:
        if n_rows != nnz:
            raise RuntimeError(
                f"the model returned {n_rows} rows for a micro-batch of {nnz} tokens: static padding "
                "(pad_to_length) is not supported by the selective loss"
            )
        return RowSlice(0, nnz, nnz)
    pad = n_rows * sp - nnz
    if not 0 <= pad < sp:
        raise RuntimeError(
            f"sequence parallelism {sp}: {n_rows} rows per rank for a micro-batch of {nnz} tokens (expected "
            f"ceil({nnz}/{sp})); static padding (pad_to_length) is not supported by the selective loss"
        )
    return RowSlice(rank * n_rows, n_rows, nnz, sp)


def pack_rows(x: torch.Tensor, batch, output_args: dict) -> tuple[torch.Tensor, RowSlice]:
    """Model output rows -> (this rank's rows [n, ...] in packed order, their `RowSlice`).

    Packed inputs (`use_remove_padding`): [1, T, ...] with T = nnz, or with Ulysses SP this rank's share of the
    padded sequence (all of it kept: `RowSlice` says which rows are padding). Padded inputs: [B, L, ...] -> the
    first len_b rows of every sequence.
    """
    if "input_ids_rmpad_rolled" in output_args and x.shape[0] == 1:
        x = x.squeeze(0)
        sp, _ = sp_world()
        if sp == 1:
            pad = int(output_args.get("pad_size", 0) or 0)
            if pad:
                x = x[: x.shape[0] - pad]
    else:  # padded path: [B, L, ...] -> the first len_b rows of every sequence
        x = torch.cat([x[i, :n] for i, n in enumerate(seq_lengths(batch).tolist())], dim=0)
    return x, row_slice(batch, x.shape[0])


def autocast_off(device: torch.device):
    """The head manages its own precision (fp32 reductions, model-dtype matmuls): no engine autocast inside it."""
    if device.type in ("cuda", "cpu"):
        return torch.autocast(device_type=device.type, enabled=False)
    return nullcontext()


# --------------------------------------------------------------------------------------------
# the policy: a fused head inside verl's forward_step
# --------------------------------------------------------------------------------------------


def _lm_head_forward(self, x, eksft_head=None):
    """`lm_head.forward` with one extra keyword: `eksft_head(x, weight)` replaces `x @ weight.T`."""
    if eksft_head is None:
        return torch.nn.functional.linear(x, self.weight, getattr(self, "bias", None))
    return eksft_head(x, self.weight)


def _install_lm_head(module) -> None:
    lm_head = module.get_output_embeddings()
    if lm_head is None or not hasattr(lm_head, "weight"):
        raise ValueError(f"{type(module).__name__} has no output embedding (lm_head) for the fused head")
    if getattr(lm_head, "bias", None) is not None:
        raise ValueError("the fused head assumes an lm_head without bias (Qwen3, Llama); this model has one")
    if not getattr(lm_head, "_eksft_head_installed", False):
        lm_head.forward = types.MethodType(_lm_head_forward, lm_head)
        lm_head._eksft_head_installed = True


def _policy_forward(self, *args, eksft_head=None, **kwargs):
    """The HF model's forward, or -- given `eksft_head` -- decoder + our head, returning {HEAD_KEY: per-token dict}."""
    if eksft_head is None:
        return self._eksft_orig_forward(*args, **kwargs)
    kwargs.pop("use_cache", None)
    out = self.model(*args, use_cache=False, **kwargs)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]  # [1, T, d] or [B, L, d]
    per_token = self.get_output_embeddings()(hidden, eksft_head=eksft_head)
    return {HEAD_KEY: per_token}


def install_policy_head(engine, make_head) -> None:
    """Route verl's FSDP engine through the fused head whenever `make_head(micro_batch, output_args)` returns one.

    `make_head` returns None (plain HF forward, logits as usual) or `fn(hidden [n, d], weight [V, d], rows)
    -> dict of [n] per-token tensors` over this rank's rows (`rows`: their `RowSlice`; all nnz rows without
    sequence parallelism); the engine's `prepare_model_outputs` then gathers them over the SP group (as verl
    gathers its log-probs), nests the dict by the micro-batch offsets and `forward_step` hands it to the loss
    function as `model_output`.
    """
    module = engine.module
    if getattr(module, "_eksft_orig_forward", None) is None:
        module._eksft_orig_forward = module.forward
        module.forward = types.MethodType(_policy_forward, module)
    _install_lm_head(module)
    if getattr(engine, "_eksft_head_installed", False):  # reset() after a re-initialisation: wrap once
        return
    engine._eksft_head_installed = True

    orig_inputs = engine.prepare_model_inputs
    orig_outputs = engine.prepare_model_outputs

    def prepare_model_inputs(micro_batch):
        model_inputs, output_args = orig_inputs(micro_batch=micro_batch)
        fn = make_head(micro_batch, output_args)
        if fn is not None:
            model_inputs["eksft_head"] = _PackedHead(fn, micro_batch, output_args)
        return model_inputs, output_args

    def prepare_model_outputs(output, output_args, micro_batch, logits_processor_func):
        if isinstance(output, dict) and HEAD_KEY in output:
            cu = micro_batch["input_ids"].offsets()
            out = {}
            for k, v in output[HEAD_KEY].items():
                if getattr(engine, "use_ulysses_sp", False):
                    # this rank's rows -> the whole micro-batch, as verl does for its log-probs (the gather's
                    # backward hands every rank the gradient of its own rows, scaled by the SP size)
                    v = engine._gather_and_unpad_packed(v, int(output_args.get("pad_size", 0) or 0))
                out[k] = torch.nested.nested_tensor_from_jagged(v, cu)
            return out
        return orig_outputs(
            output=output, output_args=output_args, micro_batch=micro_batch, logits_processor_func=logits_processor_func
        )

    engine.prepare_model_inputs = prepare_model_inputs
    engine.prepare_model_outputs = prepare_model_outputs


class _PackedHead:
    """The callable `lm_head` receives: packs the model's rows, then runs the loss's head on [nnz, d]."""

    def __init__(self, fn, micro_batch, output_args):
        self.fn, self.micro_batch, self.output_args = fn, micro_batch, output_args

    def __call__(self, x: torch.Tensor, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        hidden, rows = pack_rows(x, self.micro_batch, self.output_args)
        if hidden.dtype != weight.dtype:
            hidden = hidden.to(weight.dtype)
        with autocast_off(hidden.device):
            return self.fn(hidden, weight, rows)


# --------------------------------------------------------------------------------------------
# the reference: one forward per step, hidden states kept
# --------------------------------------------------------------------------------------------


def _gather_index(starts: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """concat(arange(s, s + c) for s, c in zip(starts, counts)) without a Python loop."""
    total = int(counts.sum())
    if total == 0:
        return torch.zeros(0, dtype=torch.long)
    base = torch.repeat_interleave(starts - (torch.cumsum(counts, 0) - counts), counts)
    return base + torch.arange(total)


class RefHiddenStore:
    """Reference final hidden states of this rank's valid rows, `[n_valid, d]`, for one step.

    Rows are laid out sequence by sequence in the batch's original order (the order of the pre-pass
    statistics and the plan's local slice), addressed by the per-sequence index `eksft_seq_index` that
    travels with every micro-batch, so verl may split and reorder micro-batches differently in each pass.
    `where="host"` keeps them in (pinned, on CUDA) host memory and copies each micro-batch's rows to the
    device when used; `"device"` keeps them on the device. `keep(mask)` drops the rows the training pass
    will not read (after the plan: rows with a zero KL weight).
    """

    def __init__(self, counts: torch.Tensor, d: int, dtype: torch.dtype, device: torch.device, where: str):
        self.counts = counts.long().cpu()  # [B] valid rows per sequence
        self.starts = torch.cumsum(self.counts, 0) - self.counts
        n = int(self.counts.sum())
        pin = where == "host" and device.type == "cuda"
        self.device = device
        self.rows = torch.empty(n, d, dtype=dtype, device=device if where == "device" else "cpu", pin_memory=pin)
        self.slot: torch.Tensor | None = None  # after keep(): row -> compact slot, -1 = dropped

    @property
    def nbytes(self) -> int:
        return self.rows.numel() * self.rows.element_size()

    def _index(self, seq_index: torch.Tensor) -> torch.Tensor:
        seq_index = seq_index.long().cpu()
        return _gather_index(self.starts[seq_index], self.counts[seq_index])

    def put(self, seq_index: torch.Tensor, rows: torch.Tensor) -> None:
        """Store the valid rows [n, d] of the sequences `seq_index` (in that order)."""
        idx = self._index(seq_index)
        if idx.numel() != rows.shape[0]:
            raise RuntimeError(f"reference store: {rows.shape[0]} rows for sequences holding {idx.numel()}")
        self.rows.index_copy_(0, idx.to(self.rows.device), rows.detach().to(self.rows.device, self.rows.dtype))

    def get(self, seq_index: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """[nnz, d] on the device: the stored rows at the valid positions, zeros elsewhere (and where dropped)."""
        idx = self._index(seq_index)
        out = torch.zeros(valid.shape[0], self.rows.shape[1], dtype=self.rows.dtype, device=self.device)
        if self.slot is not None:
            slot = self.slot[idx]
            present = slot >= 0
            vals = torch.zeros(idx.numel(), self.rows.shape[1], dtype=self.rows.dtype, device=self.device)
            if bool(present.any()):
                vals[present.to(self.device)] = self.rows[slot[present].to(self.rows.device)].to(
                    self.device, non_blocking=True
                )
        else:
            vals = self.rows[idx.to(self.rows.device)].to(self.device, non_blocking=True)
        out[valid.to(self.device)] = vals
        return out

    def keep(self, mask: torch.Tensor) -> None:
        """Keep only the rows where `mask` [n_valid] is True (frees the rest)."""
        mask = mask.bool().cpu()
        if mask.shape[0] != self.rows.shape[0]:
            raise RuntimeError(f"reference store: keep mask of {mask.shape[0]} rows for {self.rows.shape[0]}")
        slot = torch.full((mask.shape[0],), -1, dtype=torch.long)
        slot[mask] = torch.arange(int(mask.sum()))
        self.rows = self.rows[mask.to(self.rows.device)].contiguous()
        if self.rows.device.type == "cpu" and self.device.type == "cuda":
            self.rows = self.rows.pin_memory()
        self.slot = slot


def _ref_forward(self, *args, eksft_hidden_only=False, **kwargs):
    """The reference model's forward; with `eksft_hidden_only` the decoder's final hidden states only."""
    if not eksft_hidden_only:
        return self._eksft_orig_forward(*args, **kwargs)
    kwargs.pop("use_cache", None)
    out = self.model(*args, use_cache=False, **kwargs)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    side = self._eksft_ref_side
    if side.weight is None:
        # the frozen lm_head weight, copied once, through lm_head's own forward (FSDP unshards it there)
        self.get_output_embeddings()(hidden[..., :0, :], eksft_head=side._capture)
    return hidden


class RefSide:
    """The frozen reference model of the selective loss (a forward-only verl engine).

    `forward_batch(data)` is the step's only reference forward; then `hidden(mb, valid)` / `logits(mb, valid)`
    serve any later pass. `tokens_forwarded` counts every token that went through the reference model, so the
    trainer logs how many reference forwards a step really made (`eksft/ref_forwards_per_step`).
    """

    def __init__(self, engine, where: str = "device"):
        self.engine = engine
        self.where = where
        self.weight: torch.Tensor | None = None
        self.store: RefHiddenStore | None = None
        self.tokens_forwarded = 0
        module = engine.module
        if getattr(module, "_eksft_orig_forward", None) is None:
            module._eksft_orig_forward = module.forward
            module.forward = types.MethodType(_ref_forward, module)
        module._eksft_ref_side = self
        _install_lm_head(module)

    def _capture(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        w = weight.full_tensor() if hasattr(weight, "full_tensor") else weight
        self.weight = w.detach().clone()
        return x.new_zeros(())

    @property
    def weight_nbytes(self) -> int:
        return 0 if self.weight is None else self.weight.numel() * self.weight.element_size()

    @torch.no_grad()
    def forward_batch(self, data) -> None:
        """One reference forward over this rank's batch (verl's micro-batching), keeping the valid rows' hidden states."""
        from verl.utils.device import get_device_id, get_device_name
        from verl.workers.engine.utils import prepare_micro_batches

        engine = self.engine
        counts = torch.tensor(
            [int(v.sum()) for v in torch.split(valid_rows(data).cpu(), seq_lengths(data).cpu().tolist())],
            dtype=torch.long,
        )
        micro_batches, _ = prepare_micro_batches(
            data=data, dp_group=engine.get_data_parallel_group(), same_micro_num_in_dp=True
        )
        dtype = getattr(engine, "_autocast_dtype", torch.bfloat16)
        autocast = (
            nullcontext() if dtype == torch.float32 else torch.autocast(device_type=get_device_name(), dtype=dtype)
        )
        self.store = None
        with engine.eval_mode():
            for mb in micro_batches:
                mb = mb.to(get_device_id())
                model_inputs, output_args = engine.prepare_model_inputs(micro_batch=mb)
                with autocast:
                    out = engine.module(**model_inputs, use_cache=False, eksft_hidden_only=True)
                hidden, rows = pack_rows(out, mb, output_args)  # [n, d]: this rank's rows
                self.tokens_forwarded += rows.nnz
                if rows.sp > 1:  # Ulysses SP: every rank of the group keeps the whole micro-batch's rows
                    from verl.utils.ulysses import gather_outputs_and_unpad

                    hidden = gather_outputs_and_unpad(
                        hidden, gather_dim=0, unpad_dim=0, padding_size=rows.pad, group=engine.ulysses_parallel_group
                    )
                if self.store is None:
                    store_dtype = self.weight.dtype if self.weight is not None else hidden.dtype
                    self.store = RefHiddenStore(counts, hidden.shape[1], store_dtype, hidden.device, self.where)
                self.store.put(mb[SEQ_INDEX], hidden[valid_rows(mb).to(hidden.device)])

    def hidden(self, mb, valid: torch.Tensor) -> torch.Tensor:
        """Reference hidden states [nnz, d] of a micro-batch (zeros on rows not stored)."""
        if self.store is None:
            raise RuntimeError("the reference hidden states of this step are missing (forward_batch was not run)")
        return self.store.get(mb[SEQ_INDEX], valid)

    def clear(self) -> None:
        self.store = None
