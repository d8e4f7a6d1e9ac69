"""Timed SFT steps inside verl's SFT trainer: the verl side of scripts/bench_sft_step.py's child process.

    torchrun --nproc_per_node=1 scripts/bench_sft_step.py --child eksft-fused ...   (the script launches it)

`timed_sft_steps(config, floor=...)` initialises verl's process group, builds verl 0.9.1's own `SFTTrainer` (the
floor: plain SFT with verl's fused kernels) or `EKSFTTrainer` (sft_trainer.py), wraps the training client's
`train_batch` to time each step (the peak memory is reset before the first and read after each), and stops after
`steps` steps (before verl's end-of-training checkpoint). The script keeps only the model/data assets, the config and the report.
"""

from __future__ import annotations

import time
from typing import Any


class _Done(Exception):
    pass


def keep_lm_head_in_root_unit() -> None:
    """Make verl's own fused kernels run on an untied lm_head (the floor variant only).

    verl 0.9.1's fused forward (models/transformers/dense_common.py) reads `self.lm_head.weight` in the ROOT
    module's forward, but its FSDP2 wrapping (`utils/fsdp_utils._select_fsdp2_wrap_targets`) gives an untied
    lm_head its own unit, so there the weight is a sharded DTensor and the matmul fails ("aten.mm.default got
    mixed torch.Tensor and DTensor"). Keeping lm_head in the root unit (where a tied head lives anyway) is what
    that code path needs; with one process the sharding is trivial, so memory and time are unaffected.
    """
    import verl.utils.fsdp_utils as fsdp_utils

    select = fsdp_utils._select_fsdp2_wrap_targets

    def without_lm_head(model, cls_to_wrap):
        head = model.get_output_embeddings()
        return [m for m in select(model, cls_to_wrap) if m is not head]

    fsdp_utils._select_fsdp2_wrap_targets = without_lm_head


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def _reset_peak(cuda: bool) -> int:
    """Reset the peak-memory counter; return the peak before the reset (model/optimizer/reference initialisation)."""
    import torch

    if cuda:
        torch.cuda.synchronize()
        before = torch.cuda.max_memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        return before
    before = _status_bytes("VmHWM")
    with open("/proc/self/clear_refs", "w") as f:  # "5": reset VmHWM to the current resident set
        f.write("5")
    return before


def timed_sft_steps(config, *, floor: bool, steps: int, cuda: bool) -> dict[str, Any]:
    """Run `steps` SFT steps of `config` (a resolved verl SFT config, warm-up steps included); per step its time and
    tokens, and the peak memory of the steps (reset after initialisation) and of the initialisation.

    floor=True: verl's own `SFTTrainer` (with `keep_lm_head_in_root_unit`); else `EKSFTTrainer`. Peak memory:
    `torch.cuda.max_memory_allocated()` on CUDA, the process's peak resident set (VmHWM) on CPU."""
    import torch
    from verl.utils import tensordict_utils as tu
    from verl.utils.device import auto_set_device
    from verl.utils.distributed import destroy_global_process_group, initialize_global_process_group

    auto_set_device(config)
    initialize_global_process_group()
    times, mems, metrics_seen, init_peak = [], [], [], []
    try:
        if floor:
            from verl.trainer.sft_trainer import SFTTrainer as Trainer

            keep_lm_head_in_root_unit()
        else:
            from eksft_pipeline.verl_ext.sft_trainer import EKSFTTrainer as Trainer
        trainer = Trainer(config=config)
        client = trainer.training_client
        orig = client.train_batch

        def timed(data):
            n_tok = int(data["input_ids"].offsets()[-1])
            if not times:  # after initialisation: from here on the peak is the training steps' own
                init_peak.append(_reset_peak(cuda))
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = orig(data)
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            mems.append(torch.cuda.max_memory_allocated() if cuda else _status_bytes("VmHWM"))
            m = tu.get(out, "metrics") if out is not None else {}
            metrics_seen.append({k: v for k, v in (m or {}).items() if isinstance(v, int | float)} | {"tokens": n_tok})
            if len(times) >= steps:
                raise _Done
            return out

        client.train_batch = timed
        trainer.fit()
    except _Done:
        pass
    finally:
        destroy_global_process_group()
    return {
        "step_times": times,
        "peak_bytes": mems[-1] if mems else None,
        "init_peak_bytes": init_peak[0] if init_peak else None,
        "tokens_per_step": [m["tokens"] for m in metrics_seen],
        "ref_forwards_per_step": [m.get("eksft/ref_forwards_per_step") for m in metrics_seen],
    }


__all__ = ["keep_lm_head_in_root_unit", "timed_sft_steps"]
