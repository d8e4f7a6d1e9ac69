"""Timed SFT steps inside verl's SFT trainer: the verl side of scripts/bench_sft_step.py's child process.

    torchrun --nproc_per_node=1 scripts/bench_sft_step.py --child eksft-fused ...   (the script launches it)

`timed_sft_steps(config, floor=...)` initialises verl's process group, builds verl 0.9.1's own `SFTTrainer` (the
floor: plain SFT with verl's fused kernels) or `EKSFTTrainer` (sft_trainer.py), wraps the training client's
`train_batch` to time each step and read the peak memory after it, and stops after `steps` steps (before verl's
end-of-training checkpoint). The script keeps only the model/data assets, the config and the report.
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


def timed_sft_steps(config, *, floor: bool, steps: int, cuda: bool) -> dict[str, Any]:
    """Run `steps` SFT steps of `config` (a resolved verl SFT config); step times, peak memory, tokens per step.

    floor=True: verl's own `SFTTrainer` (with `keep_lm_head_in_root_unit`); else `EKSFTTrainer`. Peak memory:
    `torch.cuda.max_memory_allocated()` on CUDA, the process's peak resident set (ru_maxrss) on CPU."""
    import resource

    import torch
    from verl.utils import tensordict_utils as tu
    from verl.utils.device import auto_set_device
    from verl.utils.distributed import destroy_global_process_group, initialize_global_process_group

    auto_set_device(config)
    initialize_global_process_group()
    times, mems, metrics_seen = [], [], []
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
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = orig(data)
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            mems.append(torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
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
        "tokens_per_step": [m["tokens"] for m in metrics_seen],
        "ref_forwards_per_step": [m.get("eksft/ref_forwards_per_step") for m in metrics_seen],
    }


__all__ = ["keep_lm_head_in_root_unit", "timed_sft_steps"]
