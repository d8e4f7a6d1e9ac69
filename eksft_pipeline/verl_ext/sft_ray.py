"""The SFT stage's trainer: verl 0.9.1's Ray SFT trainer (`verl/trainer/sft_trainer_ray.py`) with the selective loss.

    python -m eksft_pipeline.verl_ext.sft_ray --config-path=<run_dir>/sft/eksft --config-name=verl_sft
                                                                  # written and launched by `stage=sft`

One driver process (this module's `main`, the stage's subprocess) holds the dataloader, the checkpoint handler
(dataloader state, `latest_checkpointed_iteration.txt`) and the tracker, exactly as verl's Ray SFT trainer does; it
builds a `RayWorkerGroup` of `RaySelectiveTrainingWorker`s over a `RayResourcePool` of `trainer.n_gpus_per_node`
ranks on each of `trainer.nnodes` nodes. Each worker is `SelectiveTrainingWorker` (sft_trainer.py: reference pass,
selection pre-pass, global top-k over every data-parallel rank, fused head, metrics) with verl's `register` dispatch
on the methods it overrides, so the driver's `train_batch(global batch)` is split over the ranks by verl's own
`make_nd_compute_dataproto_dispatch_fn` (after verl's `balance_batch` partitioning) and the ranks' outputs are
collected back. Checkpointing, resume (`resume_mode=auto`), logging and the lr schedule stay verl's.

Ray (`ray_kwargs.ray_init` of the verl config, set by the stage): a local Ray started here (its own `_temp_dir`,
`num_gpus` = ranks on the cpu platform, where the GPUs are logical) or an existing cluster (`address: auto`,
`cluster.ray_address`); `runtime_env.env_vars` carries the stage's environment to every worker (a raylet of
another node does not inherit this process's environment). The resource pool's bundles hold one CPU and one GPU
each (`max_colocate_count=1`: this job has one worker group; verl's default of 10 asks for 10 logical CPUs per rank,
which a 2-core machine, or an 8-GPU node with fewer than 80 CPUs, never has).

Departures from verl's `sft_trainer_ray.py`: the dataloader uses `data.num_workers` (verl hard-codes 8 worker
processes there, 8 torch imports on a small machine); the epoch-boundary resume fix of `EKSFTTrainer`
(an exhausted dataloader state is not restored); `updates_per_batch` is checked against the per-rank batch.
"""

from __future__ import annotations

import logging
import os

import ray
from omegaconf import OmegaConf
from verl.single_controller.base.decorator import Dispatch, make_nd_compute_dataproto_dispatch_fn, register
from verl.trainer.sft_trainer_ray import SFTTrainer as RaySFTTrainer

from eksft_pipeline.verl_ext.sft_trainer import (
    SelectiveTrainingWorker,
    fix_epoch_boundary_resume,
    resumed_at_last_step,
    worker_configs,
)

logger = logging.getLogger(__name__)


class RaySelectiveTrainingWorker(SelectiveTrainingWorker):
    """`SelectiveTrainingWorker` as a Ray actor: built from the `eksft:` block (the loss object is built in the
    worker), with verl's dispatch registered on the methods it overrides."""

    def __init__(self, config, *, block: dict, ref_config=None, seed: int = 1, ref_is_initial: bool = True):
        from eksft_pipeline.losses import get_loss
        from eksft_pipeline.verl_ext import cpu_platform

        loss = get_loss(block["loss"], **(block["loss_params"] or {}))
        if ref_config is not None and cpu_platform.is_active():
            cpu_platform.patch_fsdp2_offload_pinning()  # the reference's forced CPU offload pins memory (as EKSFTTrainer)
        super().__init__(
            config,
            loss=loss,
            ref_config=ref_config,
            selection_scope=block["selection_scope"],
            head=loss.resolve_head(block["head"]),
            updates_per_batch=int(block["updates_per_batch"]),
            ref_hidden_store=block["ref_hidden_store"],
            chunk_size=block["chunk_size"],
            seed=seed,
            dump_dir=block.get("dump_dir"),
            ref_is_initial=ref_is_initial,
            pi_old_every=int(block["pi_old_every"]),
        )

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def set_step(self, step: int) -> None:
        """The trainer step the next `train_batch` follows (a resumed run: verl's checkpoint step), so the step
        counter -- the dumps' names, the planning seeds, pi_old's schedule -- continues where the killed run was."""
        self.hook.step = int(step)

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def reset(self):
        return SelectiveTrainingWorker.reset(self)

    @register(dispatch_mode=make_nd_compute_dataproto_dispatch_fn(mesh_name="train"), blocking=False)
    def train_batch(self, data):
        return SelectiveTrainingWorker.train_batch(self, data)


class EKSFTRayTrainer(RaySFTTrainer):
    """verl's Ray `SFTTrainer` whose workers run the selective loss (module docstring)."""

    def __init__(self, config):
        super().__init__(config)
        self.training_client.set_step(int(self.resume_global_step or 0))

    def _build_dataloader(self):
        super()._build_dataloader()
        from torchdata.stateful_dataloader import StatefulDataLoader

        n = int(self.config.data.get("num_workers", 0) or 0)
        self.train_dataloader = StatefulDataLoader(
            dataset=self.train_dataset, batch_size=self.train_batch_size_per_dp, sampler=self.train_sampler,
            collate_fn=self.collate_fn, num_workers=n, pin_memory=False, drop_last=True,
        )  # fmt: skip
        self.val_dataloader = None  # the stage trains without a validation set (data.val_files: null)

    def _build_ckpt_handler(self):
        super()._build_ckpt_handler()
        fix_epoch_boundary_resume(self.ckpt_handler, int(self.steps_per_epoch))

    def fit(self):
        if not resumed_at_last_step(self):
            super().fit()

    def _build_engine(self):
        from verl.single_controller.ray import RayClassWithInitArgs, RayResourcePool, RayWorkerGroup

        block, _loss, _head, config, ref_config = worker_configs(self)  # the checks of the one-process trainer too
        n_per_node, nnodes = int(self.config.trainer.n_gpus_per_node), int(self.config.trainer.nnodes)
        dp = n_per_node * nnodes // max(int(self.engine_config.ulysses_sequence_parallel_size), 1)
        u = int(block["updates_per_batch"])
        if self.global_batch_size % dp or (self.global_batch_size // dp) % u:
            raise ValueError(f"data.train_batch_size={self.global_batch_size} must split into {dp} data-parallel "
                             f"ranks of a whole number of sequences divisible by eksft.updates_per_batch={u}")
        device = str(self.config.trainer.device)
        self.resource_pool = RayResourcePool(process_on_nodes=[n_per_node] * nnodes, use_gpu=True,
                                             max_colocate_count=1)
        ref_is_initial = not block["ref_model_path"] or str(block["ref_model_path"]) == str(self.config.model.path)
        cls = RayClassWithInitArgs(ray.remote(RaySelectiveTrainingWorker), config=config, block=block,
                                   ref_config=ref_config, seed=int(self.config.trainer.get("seed", 1)),
                                   ref_is_initial=ref_is_initial)
        self.training_client = RayWorkerGroup(resource_pool=self.resource_pool, ray_cls_with_init=cls,
                                              device_name=device)
        self.training_client.reset()
        self.loss_fn = None  # the workers set their own (SelectiveLossHook)


def ray_init_kwargs(config) -> dict:
    """`ray.init` keyword arguments from the config's `ray_kwargs.ray_init` (the stage writes it)."""
    node = OmegaConf.select(config, "ray_kwargs.ray_init")
    kw = {k: v for k, v in (OmegaConf.to_container(node, resolve=True) if node is not None else {}).items()
          if v is not None}
    if "temp_dir" in kw:
        kw["_temp_dir"] = kw.pop("temp_dir")
    return kw


def run(config) -> None:
    from verl.utils.device import auto_set_device

    from eksft_pipeline.verl_ext.ppo_main import allow_logical_gpus

    auto_set_device(config)
    allow_logical_gpus()
    kw = ray_init_kwargs(config)
    if not ray.is_initialized():
        ray.init(**kw)
    try:
        trainer = EKSFTRayTrainer(config=config)
        trainer.fit()
    finally:
        ray.shutdown()


def main() -> None:
    import hydra

    @hydra.main(config_path=None, config_name=None, version_base=None)
    def _main(config) -> None:
        run(config)

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _main()


if __name__ == "__main__":
    main()
