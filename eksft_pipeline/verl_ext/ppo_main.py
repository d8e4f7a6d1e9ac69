"""Entry point for DAPO/PPO: verl 0.9.1's own ``verl.trainer.main_ppo`` with the ``hf_cpu`` rollout registered.

``main`` adds exactly two things before calling ``verl.trainer.main_ppo.main`` unchanged (Hydra CLI, verl's
``validate_config``, ``TaskRunnerV1``, the V1 sync trainer):

1. :func:`add_external_module` appends :mod:`eksft_pipeline.verl_ext.cpu_rollout` and
   :mod:`eksft_pipeline.verl_ext.reproducible_steps` to ``VERL_USE_EXTERNAL_MODULES`` *before verl is imported*;
   verl's own ``__init__`` imports the listed modules in every process, so the rollout, the seeded agent loop and
   the dataset-order replay batches are registered in this driver and in every Ray worker (TaskRunner, actor
   workers, rollout servers, agent-loop and reward workers inherit the environment). With ``rollout.name=vllm`` on
   a GPU node the rollout is inert; the other two apply on every platform.
2. :func:`allow_logical_gpus` (cpu platform only) lets Ray start with logical GPUs.

:func:`validate_ppo_config` checks a composed config the way verl will use it, without Ray (used by the tests;
call it in the RL stage before launching).

Launch (CPU: the ``cluster=cpu`` environment of :func:`eksft_pipeline.verl_ext.cpu_platform.cpu_env`)::

    python -m eksft_pipeline.verl_ext.ppo_main --config-path $PWD/recipes/verl --config-name dapo dapo_platform=cpu \\
        actor_rollout_ref.model.path=MODEL data.train_files=TRAIN.parquet data.val_files=VAL.parquet

GPU: the same without ``dapo_platform=cpu`` (vLLM rollout); ``python -m verl.trainer.main_ppo`` works there too.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

ROLLOUT_MODULE = "eksft_pipeline.verl_ext.cpu_rollout"
STEPS_MODULE = "eksft_pipeline.verl_ext.reproducible_steps"
# imported by verl in every process (recipes/verl/dapo.yaml lists the same under eksft.external_modules)
EXTERNAL_MODULES = (ROLLOUT_MODULE, STEPS_MODULE)


def add_external_module(modules: str | tuple[str, ...] = EXTERNAL_MODULES, env: dict[str, str] | None = None) -> str:
    """Append ``modules`` to ``VERL_USE_EXTERNAL_MODULES`` in ``env`` (default ``os.environ``), each if absent.

    Returns the new value. The list is comma-separated (verl splits on ","); existing entries and their order
    are kept, empty entries dropped.
    """
    env = os.environ if env is None else env
    mods = [m.strip() for m in env.get("VERL_USE_EXTERNAL_MODULES", "").split(",") if m.strip()]
    for module in (modules,) if isinstance(modules, str) else modules:
        if module not in mods:
            mods.append(module)
    env["VERL_USE_EXTERNAL_MODULES"] = ",".join(mods)
    return env["VERL_USE_EXTERNAL_MODULES"]


def allow_logical_gpus(env: dict[str, str] | None = None) -> bool:
    """On the cpu platform, drop an *empty* ``CUDA_VISIBLE_DEVICES`` so Ray can start with logical GPUs.

    verl's resource pools count one accelerator per rank, so the CPU run starts Ray with
    ``ray_kwargs.ray_init.num_gpus=N`` (logical; the cpu platform names ``GPU`` as its Ray resource). Ray refuses
    that while ``CUDA_VISIBLE_DEVICES`` lists fewer ids ("Attempting to start raylet with 1 GPU, but
    CUDA_VISIBLE_DEVICES contains []", ray/_private/resource_and_label_spec.py), and ``cpu_env()`` sets it to "".
    Only done when ``VERL_PLATFORM=cpu`` and the value is empty; returns True if it was dropped. There is no CUDA
    driver on such a machine, so an accidental CUDA call still fails.
    """
    env = os.environ if env is None else env
    if env.get("VERL_PLATFORM", "").strip().lower() == "cpu" and env.get("CUDA_VISIBLE_DEVICES") == "":
        del env["CUDA_VISIBLE_DEVICES"]
        return True
    return False


def validate_ppo_config(cfg: Any, *, instantiate_model: bool | None = None) -> dict[str, Any]:
    """Check a composed PPO/DAPO config the way verl 0.9.1 will use it, without starting Ray.

    Runs verl's own ``validate_config`` (as ``main_ppo.main`` does; it instantiates and validates the actor block)
    and instantiates every dataclass-backed block the V1 trainer, its workers and the agent loop build:
    ``algorithm`` (AlgoConfig, incl. ``filter_groups``), ``actor_rollout_ref.rollout`` (RolloutConfig), its
    ``checkpoint_engine``, ``ref`` / ``critic`` when verl would build them, and
    ``actor_rollout_ref.model`` (HFModelConfig, which loads the tokenizer: only when ``model.path`` is a local
    directory, or when ``instantiate_model`` forces it). It also resolves the reward the way the reward loop does: the
    reward manager class from verl's registry (``RewardManagerConfig`` itself cannot be instantiated in 0.9.1 --
    its ``__post_init__`` calls a missing ``super().__post_init__`` -- and verl never does), the custom ``compute_score`` (imported), and -- for ``dapo`` -- constructs verl's
    DAPORewardManager so its overlong-buffer assertions run. Dynamic sampling is resolved by the V1 trainer's own
    ``_resolve_filter_groups_metric``. On ``trainer.device=cpu`` it checks the logical Ray resources (too few makes
    Ray wait forever), on the hf_cpu rollout its server options and world size.

    Any rejection is re-raised as ``ValueError`` naming the block. Returns ``{block: instance}``.
    """
    from omegaconf import OmegaConf
    from verl.trainer.ppo.core_algos import get_adv_estimator_fn
    from verl.trainer.ppo.reward import get_custom_reward_fn, resolve_reward_manager_cls
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.trainer.ppo.v1.trainer_base import PPOTrainer
    from verl.utils.config import omega_conf_to_dataclass, validate_config

    out: dict[str, Any] = {}

    def build(block: str, fn):
        try:
            out[block] = fn()
        except Exception as e:  # noqa: BLE001 - re-raised with the block named
            raise ValueError(f"verl rejected the PPO config block '{block}': {type(e).__name__}: {e}") from e

    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))  # work on a copy, as verl mutates
    OmegaConf.set_struct(cfg, True)
    if not _model_path(cfg):
        raise ValueError("actor_rollout_ref.model.path is not set (the policy to train: the SFT checkpoint)")
    use_ref, use_critic = need_reference_policy(cfg), need_critic(cfg)
    build("validate_config", lambda: validate_config(cfg, use_reference_policy=use_ref, use_critic=use_critic))
    arr = cfg.actor_rollout_ref
    build("actor_rollout_ref.actor", lambda: omega_conf_to_dataclass(arr.actor))
    build("algorithm", lambda: omega_conf_to_dataclass(cfg.algorithm))
    # verl only looks the estimator up when the first advantage is computed, after rollout: check it now
    build("algorithm.adv_estimator", lambda: get_adv_estimator_fn(str(cfg.algorithm.adv_estimator)))
    build("actor_rollout_ref.rollout", lambda: omega_conf_to_dataclass(arr.rollout))
    build("actor_rollout_ref.rollout.checkpoint_engine", lambda: omega_conf_to_dataclass(arr.rollout.checkpoint_engine))
    if use_ref:
        build("actor_rollout_ref.ref", lambda: omega_conf_to_dataclass(arr.ref))
    if use_critic:
        build("critic", lambda: omega_conf_to_dataclass(cfg.critic))
    local_model = Path(os.path.expanduser(str(arr.model.path))).is_dir()
    if instantiate_model or (instantiate_model is None and local_model):
        build("actor_rollout_ref.model", lambda: omega_conf_to_dataclass(arr.model))
    build("reward.custom_reward_function", lambda: get_custom_reward_fn(cfg))
    build("reward.reward_manager.cls", lambda: resolve_reward_manager_cls(cfg))
    if str(cfg.reward.reward_manager.name) == "dapo" and str(cfg.reward.reward_manager.source) == "register":
        build(
            "reward.reward_kwargs",
            lambda: out["reward.reward_manager.cls"](cfg, None, out["reward.custom_reward_function"]),
        )
    # dynamic sampling: verl's own resolution (the trainer calls it in __init__), without building a trainer
    build(
        "algorithm.filter_groups",
        lambda: PPOTrainer._resolve_filter_groups_metric(SimpleNamespace(config=cfg)),
    )
    if str(cfg.trainer.device) == "cpu" and not cfg.ray_kwargs.ray_init.get("address", None):
        # (joining an existing cluster: its own resources apply, Ray refuses num_cpus / num_gpus)
        build("ray_kwargs.ray_init", lambda: _check_cpu_ray_resources(cfg))
    if str(arr.rollout.name) == "hf_cpu":
        from .cpu_rollout import check_replica_world_size, server_options

        rollout = out["actor_rollout_ref.rollout"]
        build("actor_rollout_ref.rollout.engine_kwargs.hf_cpu", lambda: server_options(rollout))
        build("actor_rollout_ref.rollout.tensor_model_parallel_size", lambda: check_replica_world_size(rollout))
    return out


def _model_path(cfg: Any) -> str | None:
    path = cfg.actor_rollout_ref.model.get("path", None)
    return None if path in (None, "", "???") else str(path)


def _check_cpu_ray_resources(cfg: Any) -> dict[str, int]:
    """Logical Ray resources a CPU run needs; too few makes verl wait forever for a placement, so fail early.

    What is held (verl 0.9.1 / TransferQueue 0.1.x source): the global resource pool's placement group has one
    bundle per rank of ``{"GPU": 1, "CPU": ResourcePoolManager.max_colocate_count}`` (3); TransferQueue's
    controller and each ``SimpleStorage`` unit are ``num_cpus=1`` actors. Every other actor (TaskRunner, rollout
    server, agent-loop / reward workers, router) uses Ray's default of 1 CPU to be scheduled and 0 while running,
    so one more free CPU is needed. ``num_gpus`` must cover one logical GPU per rank.
    """
    from verl.single_controller.ray.base import ResourcePoolManager

    ray_init = cfg.ray_kwargs.ray_init
    ranks = int(cfg.trainer.n_gpus_per_node) * int(cfg.trainer.nnodes)
    num_gpus = ray_init.get("num_gpus", None)
    if num_gpus is None or int(num_gpus) < ranks:
        raise ValueError(
            f"trainer.device=cpu needs ray_kwargs.ray_init.num_gpus >= trainer.n_gpus_per_node * nnodes = {ranks} "
            f"(logical GPUs for verl's resource pool), got {num_gpus}"
        )
    backend = cfg.transfer_queue.backend
    storage = (
        int(backend.SimpleStorage.num_data_storage_units) if str(backend.storage_backend) == "SimpleStorage" else 0
    )
    needed = ranks * int(ResourcePoolManager.max_colocate_count) + 1 + storage + 1
    num_cpus = ray_init.get("num_cpus", None)
    if num_cpus is not None and int(num_cpus) < needed:
        raise ValueError(
            f"ray_kwargs.ray_init.num_cpus={num_cpus} is below the {needed} logical CPUs this run holds "
            f"({ranks} rank(s) x {ResourcePoolManager.max_colocate_count} in verl's placement group + TransferQueue "
            f"controller + {storage} storage unit(s) + 1 to schedule the other actors); Ray would wait forever. "
            "Raise it (it is logical) or lower transfer_queue.backend.SimpleStorage.num_data_storage_units"
        )
    return {"num_gpus": int(num_gpus), "num_cpus_needed": needed}


def main() -> None:
    add_external_module()
    allow_logical_gpus()
    from verl.trainer import main_ppo  # verl's __init__ now imports and registers the CPU rollout

    main_ppo.main()


if __name__ == "__main__":
    main()
