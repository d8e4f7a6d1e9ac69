"""EKSFT (and every loss of `eksft_pipeline.losses`) inside verl 0.9.1's own SFT trainer.

verl's `SFTTrainer` hard-codes `sft_loss`, which only ever sees label log-probs, and has no
reference model. This module keeps verl's trainer, engine, data pipeline, checkpointing, resume
and logging, and changes three things by subclassing (no verl file is patched):

1. `EKSFTTrainer._build_engine` builds a `SelectiveTrainingWorker` instead of verl's
   `TrainingWorker`, plus (when the loss needs it) a frozen reference `TrainingWorker` whose
   engine is `forward_only` -- the initial model, sharded by FSDP like the policy, in the
   engine's dtype (bf16 on GPU).
2. Full logits reach our loss through verl's distillation hook: with the non-tensor flags
   `distillation_use_topk=True, distillation_only=True` the FSDP engine's `prepare_model_outputs`
   hands each micro-batch's `[nnz, V]` logits to `loss_function(student_logits=..., data=...)`
   and stores the per-token tensors it returns in `model_output`; the engine then calls the same
   callable as `loss_function(model_output=..., data=...)`. `SelectiveLossHook` is that callable.
   Inside it, the reference logits of the same micro-batch come from the reference engine's own
   `prepare_model_inputs` + module forward (no grad), so packing/temperature handling is verl's.
3. The selection pass (paper semantics, `selection_scope=global_batch`): before each training
   step the worker runs a no-grad forward of policy and reference over its whole local batch
   (`engine.infer_batch` with the hook in "stats" mode), gathers per-token H, KL, log p across
   data-parallel ranks, computes the loss's plan (M_H, M_KL, M, denominators) over the GLOBAL
   batch on every rank, and carries the plan into the batch as jagged per-token tensors
   (`eksft_plan_<field>`) plus a dict of global scalars. The training pass then computes each
   micro-batch's share of the loss with global denominators, times dp_size (FSDP averages
   gradients over data-parallel ranks, exactly as verl's `sft_loss` compensates).

Cost: per step two policy forwards, two reference forwards and one backward (about 2x plain SFT).
`selection_scope=micro_batch` (the authors' public code) skips the pre-pass: each micro-batch
selects its own top-k and its loss is weighted by its share of the global valid tokens.

Limits (clear errors, not silent): Ulysses sequence parallelism > 1 and `use_fused_kernels`
are rejected, because both hide the full logits this loss needs; temperature must be 1.
"""

from __future__ import annotations

import logging
import time
from copy import deepcopy
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from verl.trainer.sft_trainer import SFTTrainer
from verl.utils import tensordict_utils as tu
from verl.workers.engine_workers import TrainingWorker

from eksft_pipeline.losses import IGNORE_INDEX, TokenStats, get_loss
from eksft_pipeline.sft.selection import gather_token_stats, scatter_to_positions

logger = logging.getLogger(__name__)

PLAN_PREFIX = "eksft_plan_"
STAT_PREFIX = "eksft_stat_"
LOSS_KEY = "eksft_loss_part"
MODE_KEY = "eksft_mode"
SCALARS_KEY = "eksft_scalars"
DTYPES_KEY = "eksft_dtypes"
_DTYPES = {"bool": torch.bool, "float32": torch.float32, "int64": torch.int64, "float64": torch.float64}


# --------------------------------------------------------------------------------------------
# micro-batch helpers
# --------------------------------------------------------------------------------------------


def _labels_and_valid(micro_batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Shifted labels [nnz] and the response-token mask [nnz] of a packed micro-batch.

    Row i of the packed logits predicts token i+1, so labels = roll(input_ids, -1) and the loss
    mask is rolled the same way -- identical to verl's `sft_loss`. The wrap-around rows land on
    the first token of the next sequence, which is a prompt token (mask 0).
    """
    input_ids = micro_batch["input_ids"]
    loss_mask = micro_batch["loss_mask"]
    ids = input_ids.values() if input_ids.is_nested else input_ids.reshape(-1)
    lm = loss_mask.values() if loss_mask.is_nested else loss_mask.reshape(-1)
    labels = torch.roll(ids, shifts=-1, dims=0)
    valid = torch.roll(lm, shifts=-1, dims=0).bool()
    return labels, valid


def _ref_logits(ref_engine, micro_batch) -> torch.Tensor:
    """Reference logits [nnz, V] for a packed micro-batch, through verl's own input preparation."""
    model_inputs, output_args = ref_engine.prepare_model_inputs(micro_batch=micro_batch)
    with torch.no_grad():
        out = ref_engine.module(**model_inputs, use_cache=False)
    logits = out.logits
    if hasattr(logits, "full_tensor"):  # DTensor under tensor parallel
        logits = logits.full_tensor()
    if (
        logits.dim() == 3
        and logits.shape[0] == 1
        and "input_ids_rmpad_rolled" in output_args
        and "temperature_rmpad" in output_args
    ):
        logits = logits.squeeze(0)
        pad = output_args.get("pad_size", 0) or 0
        if pad:
            logits = logits[: logits.shape[0] - pad]
        return logits
    # padded path: [bsz, max_len, V] -> packed rows in batch order
    lengths = micro_batch["input_ids"].offsets().diff().tolist()
    return torch.cat([logits[i, :n] for i, n in enumerate(lengths)], dim=0)


class SelectiveLossHook:
    """The callable verl's FSDP engine receives as `loss_function` (see module docstring).

    Called twice per micro-batch by `FSDPEngineWithLMHead.forward_step`:
      1. `hook(student_logits=[1, nnz, V], data=micro_batch)` -> dict of [1, nnz] tensors
      2. `hook(model_output=..., data=micro_batch, dp_group=...)` -> (loss, metrics)
    The non-tensor key `eksft_mode` of the batch says which pass this is: "stats" (no-grad
    pre-pass: per-token H, KL, log p) or "train".
    """

    def __init__(self, loss, ref_engine_getter, *, selection_scope: str, seed: int):
        self.loss = loss
        self._ref_engine_getter = ref_engine_getter
        self.selection_scope = selection_scope
        self.seed = seed
        self.step = 0
        self.vocab_size: int | None = None
        self.micro_metrics: list[dict[str, float]] = []

    # verl calls us with keyword arguments only
    def __call__(self, student_logits=None, data=None, model_output=None, dp_group=None, **_):
        if student_logits is not None:
            return self._process_logits(student_logits, data)
        return self._loss(model_output, data)

    # -- pass 1 of forward_step: logits -> per-token tensors ----------------------------------
    def _process_logits(self, student_logits: torch.Tensor, mb) -> dict[str, torch.Tensor]:
        logits = student_logits.squeeze(0)  # [nnz, V], rows in packed order
        nnz = logits.shape[0]
        self.vocab_size = int(logits.shape[-1])
        labels, valid = _labels_and_valid(mb)
        if labels.shape[0] != nnz:
            raise RuntimeError(
                f"packed logits have {nnz} rows but the micro-batch has {labels.shape[0]} tokens; "
                "static padding (pad_to_length) and sequence parallelism are not supported by the selective loss"
            )
        valid = valid.to(logits.device)
        # prompt rows (and the wrap-around row of each sequence) are ignored rows for the loss library
        labels = torch.where(valid, labels.to(logits.device), torch.full_like(labels.to(logits.device), IGNORE_INDEX))
        mode = tu.get_non_tensor_data(mb, MODE_KEY, "train")
        per_micro = self.selection_scope == "micro_batch"
        need_ref = self.loss.needs_ref if (mode == "stats" or per_micro) else self.loss.ref_in_compute
        ref_engine = self._ref_engine_getter() if need_ref else None
        if need_ref and ref_engine is None:
            raise RuntimeError(f"loss {self.loss.name!r} needs the reference model, but none was built")
        ref_logits = _ref_logits(ref_engine, mb) if need_ref else None

        if mode == "stats":
            stats = self.loss.stats(logits, ref_logits, labels)
            return {STAT_PREFIX + k: v.float().unsqueeze(0) for k, v in _stats_fields(stats).items()}

        if per_micro:
            # the authors' code: top-k within this micro-batch, loss normalised within it; weight the
            # micro-batch by its share of the global valid tokens so the sum over micro-batches and ranks
            # is a token-weighted mean (one micro-batch == the global case)
            stats = self.loss.stats(logits, ref_logits, labels)
            plan = self.loss.plan(stats, seq_ids=_seq_ids(mb).to(logits.device), generator=self._generator(extra=nnz))
            token, scalars = plan.token, dict(plan.scalars)
            self.micro_metrics.append(dict(plan.metrics))
            share = float(valid.sum().item()) / max(float(mb["batch_num_tokens"]), 1.0)
        else:
            dtypes = tu.get_non_tensor_data(mb, DTYPES_KEY, {}) or {}
            token = {}
            for key in mb.keys():
                if isinstance(key, str) and key.startswith(PLAN_PREFIX):
                    t = mb[key]
                    name = key[len(PLAN_PREFIX) :]
                    v = (t.values() if t.is_nested else t.reshape(-1)).to(logits.device)
                    token[name] = v.to(_DTYPES[dtypes.get(name, "float32")])
            scalars = tu.get_non_tensor_data(mb, SCALARS_KEY, None)
            if scalars is None:
                raise RuntimeError("the selective loss needs its plan, but the batch carries none")
            scalars = dict(scalars)
            share = 1.0
        loss_part, _ = self.loss.compute(
            logits, labels, ref_logits if self.loss.ref_in_compute else None, token, scalars
        )
        dp_size = float(mb["dp_size"])
        loss_part = loss_part * (share * dp_size)
        # verl expects per-token tensors here; the micro-batch's loss share rides on row 0
        # (the sum over rows is what the second call below returns as the loss).
        carrier = torch.zeros(nnz, dtype=loss_part.dtype, device=logits.device)
        carrier = carrier.index_put((torch.zeros(1, dtype=torch.long, device=logits.device),), loss_part.reshape(1))
        return {LOSS_KEY: carrier.unsqueeze(0)}

    # -- pass 2 of forward_step: model_output -> (loss, metrics) -----------------------------
    def _loss(self, model_output, mb):
        mode = tu.get_non_tensor_data(mb, MODE_KEY, "train")
        if mode == "stats":
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


_STAT_FIELDS = ("entropy", "logp", "kl", "ref_logp", "prob_sq")


def _stats_fields(stats: TokenStats) -> dict[str, torch.Tensor]:
    """The per-row statistics present in `stats` (row-aligned, 0 on ignored rows)."""
    return {f: getattr(stats, f) for f in _STAT_FIELDS if getattr(stats, f) is not None}


def _seq_ids(batch) -> torch.Tensor:
    """Sequence index of every packed row [nnz] (local to the batch)."""
    lengths = batch["input_ids"].offsets().diff()
    return torch.repeat_interleave(torch.arange(lengths.numel()), lengths.cpu())


# --------------------------------------------------------------------------------------------
# worker
# --------------------------------------------------------------------------------------------


class SelectiveTrainingWorker(TrainingWorker):
    """verl's `TrainingWorker` with the global selection pass in front of `train_batch`."""

    def __init__(
        self,
        config,
        *,
        loss,
        ref_config=None,
        selection_scope="global_batch",
        seed=0,
        metrics_prefix="eksft/",
        dump_dir: str | None = None,
    ):
        super().__init__(config=config)
        self.dump_dir = dump_dir
        self.loss_obj = loss
        self.selection_scope = selection_scope
        self.metrics_prefix = metrics_prefix
        self.ref_worker = TrainingWorker(config=ref_config) if ref_config is not None else None
        self.hook = SelectiveLossHook(
            loss,
            lambda: self.ref_worker.engine if self.ref_worker is not None else None,
            selection_scope=selection_scope,
            seed=seed,
        )
        self.set_loss_fn(self.hook)
        self.last_plan_metrics: dict[str, float] = {}

    def reset(self):
        super().reset()
        if self.ref_worker is not None:
            self.ref_worker.reset()

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

    def _attach_plan(self, data, plan, gathered, valid: torch.Tensor) -> None:
        """This rank's rows of the global plan -> jagged per-token fields + global scalars in `data`."""
        nnz = valid.numel()
        offsets = data["input_ids"].offsets().cpu()
        dtypes = {}
        for name, value in plan.token.items():
            dtypes[name] = str(value.dtype).replace("torch.", "")
            if dtypes[name] not in _DTYPES:
                raise TypeError(f"plan field {name!r} has unsupported dtype {value.dtype}")
            mine = gathered.local_slice(value.cpu()).to(torch.float32)
            full = scatter_to_positions(mine, valid, nnz)
            data[PLAN_PREFIX + name] = torch.nested.nested_tensor_from_jagged(full, offsets)
        tu.assign_non_tensor(
            data,
            **{SCALARS_KEY: {k: float(v) for k, v in plan.scalars.items()}, DTYPES_KEY: dtypes},
        )

    @torch.no_grad()
    def selection_pass(self, data) -> dict[str, float]:
        """No-grad pre-pass -> global plan -> plan fields written into `data`. Returns plan metrics."""
        self._engine_defaults(data)
        tu.assign_non_tensor(data, distillation_use_topk=True, distillation_only=True, **{MODE_KEY: "stats"})
        with self.engine.eval_mode():
            out = self.engine.infer_batch(data, loss_function=self.hook)
        model_output = out["model_output"]

        _, valid = _labels_and_valid(data)
        valid = valid.cpu()
        bsz = data["input_ids"].shape[0]
        dp_rank = self.engine.get_data_parallel_rank()
        local = {}
        for key, nested in model_output.items():
            if key.startswith(STAT_PREFIX):
                local[key[len(STAT_PREFIX) :]] = nested.values().float().cpu()[valid]
        # sequence ids unique over the global batch: every rank holds `bsz` sequences
        local["seq_id"] = (_seq_ids(data) + dp_rank * bsz)[valid]
        gathered = gather_token_stats(local, group=self.engine.get_data_parallel_group(), device=self._comm_device())
        f = gathered.fields
        n_global = int(f["seq_id"].numel())
        stats = TokenStats(
            valid=torch.ones(n_global, dtype=torch.bool),
            vocab_size=self._vocab_size(),
            **{k: f[k] for k in _STAT_FIELDS if k in f},
        )
        plan = self.loss_obj.plan(stats, seq_ids=f["seq_id"], generator=self.hook._generator())
        self._attach_plan(data, plan, gathered, valid)
        if self.dump_dir:
            self._dump(data, valid, local, plan, gathered)
        return {k: float(v) for k, v in plan.metrics.items()}

    def _dump(self, data, valid: torch.Tensor, local: dict, plan, gathered) -> None:
        """`eksft.dump_dir`: this rank's tokens of this step's selection, for offline checks.

        One file per (step, rank): per valid token the key of its sequence (a hash of the token ids, the
        same on every rank and run), its position among the sequence's valid tokens, the statistics the
        selection saw and this rank's slice of the plan's token fields; plus the plan's metrics.
        """
        ids = data["input_ids"]
        flat = ids.values() if ids.is_nested else ids.reshape(-1)
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
            "stats": {k: v for k, v in local.items() if k != "seq_id"},
            "plan": {k: gathered.local_slice(v.cpu()) for k, v in plan.token.items()},
            "metrics": {k: float(v) for k, v in plan.metrics.items()},
        }
        rank = dist.get_rank() if dist.is_initialized() else 0
        path = Path(self.dump_dir) / f"step{self.hook.step:05d}_rank{rank}.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(out, path)

    def count_plan(self, data) -> dict[str, float]:
        """Losses without a pre-pass: the plan only needs the global number of valid tokens."""
        _, valid = _labels_and_valid(data)
        valid = valid.cpu()
        local = {"one": torch.ones(int(valid.sum()), dtype=torch.float32)}
        gathered = gather_token_stats(local, group=self.engine.get_data_parallel_group(), device=self._comm_device())
        n_global = int(gathered.fields["one"].numel())
        plan = self.loss_obj.plan(TokenStats(valid=torch.ones(n_global, dtype=torch.bool), vocab_size=self._vocab_size()))
        self._attach_plan(data, plan, gathered, valid)
        return {k: float(v) for k, v in plan.metrics.items()}

    def _comm_device(self):
        group = self.engine.get_data_parallel_group()
        if dist.is_initialized() and dist.get_backend(group) == "gloo":
            return "cpu"
        return self.device_name

    def train_batch(self, data):
        t0 = time.perf_counter()
        self.hook.step += 1
        self.hook.micro_metrics = []
        plan_metrics: dict[str, float] = {}
        if self.selection_scope == "global_batch":
            plan_metrics = self.selection_pass(data) if self.loss_obj.needs_prepass else self.count_plan(data)
        self._engine_defaults(data)
        tu.assign_non_tensor(data, distillation_use_topk=True, distillation_only=True, **{MODE_KEY: "train"})
        output = super().train_batch(data)
        elapsed = time.perf_counter() - t0
        if self.selection_scope == "micro_batch" and self.hook.micro_metrics:
            plan_metrics = _weighted_mean(self.hook.micro_metrics)
        self.last_plan_metrics = plan_metrics
        if output is not None:
            metrics = tu.get(output, "metrics")
            for k, v in plan_metrics.items():
                metrics[self.metrics_prefix + k] = v
            lm = data["loss_mask"]
            n_tokens = int((lm.values() if lm.is_nested else lm).sum().item())
            world = dist.get_world_size() if dist.is_initialized() else 1
            metrics["perf/response_tokens_per_s"] = n_tokens * world / max(elapsed, 1e-9)
            metrics["perf/step_time_s"] = elapsed
        return output


def _weighted_mean(parts: list[dict[str, float]]) -> dict[str, float]:
    """Token-weighted mean of per-micro-batch plan metrics (counts are summed)."""
    total = sum(p.get("n_tokens", 0.0) for p in parts) or 1.0
    out: dict[str, float] = {}
    for key in {k for p in parts for k in p}:
        if key.startswith("n_") or key == "k":
            out[key] = float(sum(p.get(key, 0.0) for p in parts))
        else:
            out[key] = float(sum(p.get(key, 0.0) * p.get("n_tokens", 0.0) for p in parts) / total)
    return out


# --------------------------------------------------------------------------------------------
# trainer
# --------------------------------------------------------------------------------------------


def selective_config(config) -> dict[str, Any]:
    """The project's `eksft:` block of the verl SFT config, with defaults."""
    block = OmegaConf.to_container(config.get("eksft", {}) or {}, resolve=True)
    block.setdefault("loss", "eksft")
    block.setdefault("loss_params", {})
    block.setdefault("selection_scope", "global_batch")
    block.setdefault("ref_model_path", None)
    block.setdefault("ref_model_dtype", None)
    block.setdefault("dump_dir", None)
    if block["selection_scope"] not in ("global_batch", "micro_batch"):
        raise ValueError(
            f"eksft.selection_scope must be 'global_batch' or 'micro_batch', got {block['selection_scope']!r}"
        )
    return block


class EKSFTTrainer(SFTTrainer):
    """verl `SFTTrainer` whose loss is any `eksft_pipeline.losses` loss (see module docstring)."""

    def _build_ckpt_handler(self):
        """verl's handler, with an epoch-boundary resume fix.

        verl 0.9.1 restores the StatefulDataLoader state saved with the checkpoint. A checkpoint taken at the
        end of an epoch (every `save_freq=after_each_epoch` checkpoint) holds an *exhausted* iterator, so after
        resuming, `fit` starts the next epoch on a loader that yields nothing, and every remaining epoch is
        silently skipped (seen here: killed after step 3 of 6, the re-run logged no step and exported step 3).
        At an epoch boundary the position inside the epoch is 0 anyway, so the state is not loaded: `fit`'s
        `set_epoch(epoch)` gives the next epoch's order. Mid-epoch checkpoints load it as verl does.
        """
        from verl.utils.checkpoint.checkpoint_handler import extract_step

        super()._build_ckpt_handler()
        handler = self.ckpt_handler
        load_state = handler._load_dataloader_state
        steps_per_epoch = int(self.steps_per_epoch)

        def _load_dataloader_state(checkpoint_path: str):
            step = extract_step(checkpoint_path)
            if step is not None and steps_per_epoch > 0 and step % steps_per_epoch == 0:
                logger.warning(
                    "resuming at an epoch boundary (step %s, %s steps per epoch): starting the next epoch with a "
                    "fresh dataloader iterator instead of the saved, exhausted one",
                    step,
                    steps_per_epoch,
                )
                return
            load_state(checkpoint_path)

        handler._load_dataloader_state = _load_dataloader_state

    def _build_engine(self):
        from verl.workers.engine_workers import TrainingWorkerConfig

        block = selective_config(self.config)
        self.eksft_block = block
        loss = get_loss(block["loss"], **(block["loss_params"] or {}))
        self.loss_obj = loss

        if self.model_config.get("use_fused_kernels", False):
            raise ValueError("model.use_fused_kernels=True never materialises logits; the selective loss needs them")
        if int(self.engine_config.ulysses_sequence_parallel_size) > 1:
            raise ValueError("engine.ulysses_sequence_parallel_size > 1 is not supported by the selective loss")

        config = TrainingWorkerConfig(
            model_type="language_model",
            model_config=self.model_config,
            engine_config=self.engine_config,
            optimizer_config=self.optimizer_config,
            checkpoint_config=self.checkpoint_config,
            profiler_config=self.profiler_config,
        )
        ref_config = None
        if loss.needs_ref:
            if block["ref_model_path"]:
                from verl.utils.config import omega_conf_to_dataclass

                node = OmegaConf.merge(self.config.model, {"path": str(block["ref_model_path"])})
                ref_model_config = omega_conf_to_dataclass(node)
            else:
                ref_model_config = deepcopy(self.model_config)
            ref_engine_config = deepcopy(self.engine_config)
            ref_engine_config.forward_only = True
            if block["ref_model_dtype"]:  # storage dtype of the (CPU-offloaded) reference weights, e.g. bf16
                import dataclasses

                ref_engine_config = dataclasses.replace(ref_engine_config, model_dtype=str(block["ref_model_dtype"]))
            ref_config = TrainingWorkerConfig(
                model_type="language_model",
                model_config=ref_model_config,
                engine_config=ref_engine_config,
                optimizer_config=None,
                checkpoint_config=deepcopy(self.checkpoint_config),
                profiler_config=self.profiler_config,
            )
        from eksft_pipeline.pipeline import cpu_platform

        if ref_config is not None and cpu_platform.is_active():
            cpu_platform.patch_fsdp2_offload_pinning()
        seed = int(self.config.trainer.get("seed", 1))
        self.training_client = SelectiveTrainingWorker(
            config,
            loss=loss,
            ref_config=ref_config,
            selection_scope=block["selection_scope"],
            seed=seed,
            dump_dir=block.get("dump_dir"),
        )
        self.loss_fn = self.training_client.hook
        self.engine = self.training_client.engine
