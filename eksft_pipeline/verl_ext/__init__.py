"""Everything that touches verl's code: the one package to re-read when verl changes.

The rest of the project talks to verl only through this package (tests/test_import_boundaries.py fails
on a `verl` import anywhere else) and through verl's public command lines (`python -m
verl.model_merger`, the Hydra config tree `pkg://verl.trainer.config`). Launched by module path:

    python -m eksft_pipeline.verl_ext.sft_ray --config-path=<run_dir>/sft/<tag> --config-name=verl_sft
    python -m eksft_pipeline.verl_ext.ppo_main --config-path $PWD/recipes/verl --config-name dapo ...
    VERL_USE_EXTERNAL_MODULES=eksft_pipeline.verl_ext.cpu_platform        (recipes/cluster/cpu.yaml)
    [project.entry-points."verl.plugins"] eksft_vllm_cpu = eksft_pipeline.verl_ext.vllm_cpu   (pyproject.toml)

Modules:
    validate      a composed SFT config instantiated as verl's dataclasses (composition: verl_ext/verl_config.py)
    cpu_platform  a `cpu` platform for verl (gloo, FSDP2, sdpa) for the CPU default
    cpu_rollout   `hf_cpu`: an HF-`generate` rollout server/replica/adapter for verl's async rollout path
    ppo_main      `verl.trainer.main_ppo` with the hf_cpu rollout registered; `validate_ppo_config`
    sft_ray       the SFT stage's trainer: verl's Ray SFT trainer with `SelectiveTrainingWorker`s (one driver, any nodes)
    sft_trainer   `SelectiveTrainingWorker`: the selective losses inside verl's FSDP training worker; `EKSFTTrainer`
                  (verl's one-process/torchrun SFT trainer with it: the benchmark's, sft_bench)
    sft_plan      the trainer's step plan (selection scope x update groups) and the `eksft:` block checks; no verl
    sft_head      the fused loss head (hidden states + lm_head weight) inside verl's FSDP engine
    cpu_attention a CPU varlen attention kernel behind verl's Ulysses all-to-all (SP runs on CPU)
    sft_bench     timed SFT steps in verl's / our SFT trainer (the child process of scripts/bench_sft_step.py)
    reproducible_steps  DAPO steps that repeat: a seeded agent loop, the replay buffer's batch in dataset order
    vllm_cpu      verl's vLLM rollout on vLLM's CPU build (packaging alias, vLLM plugin, sync check)
    rollout_correction  verl's rollout-correction presets (`rl.rollout_correction`) and which the V1 trainer applies
    verl_config   verl's config composed from its own YAML tree (`pkg://verl.trainer.config`) + recipes/verl/*.yaml;
                  `strict_merge` against its keys, the command line's verl blocks; no verl import
    verl_stage    the base of the two verl training stages: `trainer.project_name` / `experiment_name` / `logger`,
                  a checkpoint's `huggingface/` dir, `VERL_FILE_LOGGER_PATH` metric logs; no verl import
    memory        verl's FSDP2 / CPU-offload memory behaviour (the estimate's terms), fed from the stages' verl keys
                  (`data.max_token_len_per_gpu`, `engine.*`, `eksft.*`, rollout share); no verl import

Patched or private verl APIs, all read from verl 0.9.1 (:data:`VERL_VERSION`); re-check each one when verl moves:
    rollout_correction  no patch: reads `verl.trainer.config.algorithm.RolloutCorrectionConfig`'s presets
    cpu_platform  `verl.plugin.platform.platform_base.PlatformBase` subclassed and registered in
                  `platform_manager.PlatformRegistry`; `torch.distributed.init_process_group` wrapped globally
                  (verl's "cpu:gloo,cpu:gloo" backend string -> "gloo");
                  `verl.workers.engine.fsdp.transformer_impl.CPUOffloadPolicy` replaced by a function
                  (pin_memory=False for the CPU reference engine)
    cpu_rollout   `verl.workers.rollout.base._ROLLOUT_REGISTRY[(name, "async")]` written (private registry);
                  `RolloutReplica` / `RolloutReplicaRegistry` / `TokenOutput` / `RolloutMode` (replica.py) and
                  `BaseRollout` subclassed; `verl.utils.normalize_token_ids`
    ppo_main      `PPOTrainer._resolve_filter_groups_metric` (v1/trainer_base.py, private) called with a stand-in
                  `self` (`SimpleNamespace(config=cfg)`); `ResourcePoolManager.max_colocate_count`;
                  `verl.trainer.ppo.{core_algos.get_adv_estimator_fn, reward.get_custom_reward_fn,
                  reward.resolve_reward_manager_cls, utils.need_critic, utils.need_reference_policy}`;
                  `VERL_USE_EXTERNAL_MODULES` (verl/__init__.py) extended before verl is imported
    sft_trainer   `verl.trainer.sft_trainer.SFTTrainer` subclassed (`_build_ckpt_handler`, `_init_engine`,
                  `_build_engine` overridden: private hooks; `fit` skipped when `resume_global_step` already reaches
                  `total_training_steps`); `handler._load_dataloader_state` (checkpoint_handler,
                  private) swapped on the handler instance; `verl.workers.engine_workers.TrainingWorker`
                  subclassed (`train_batch`); `TrainingWorkerConfig`; `tensordict_utils`;
                  `checkpoint_handler.extract_step`; `engine.ulysses_sequence_parallel_size`,
                  `engine.is_mp_src_rank_with_outputs`
    sft_head      the HF model's `forward` and `lm_head` replaced on verl's engine module (as verl's own
                  `use_fused_kernels` does, models/transformers/dense_common.py); `engine.prepare_model_inputs`,
                  `engine.eval_mode`, `workers.engine.utils.prepare_micro_batches`, `utils.device.get_device_*`;
                  Ulysses SP: `engine.use_ulysses_sp`, `engine._gather_and_unpad_packed` (private),
                  `engine.ulysses_parallel_group`, `utils.ulysses.{get_ulysses_sequence_parallel_*,
                  gather_outputs_and_unpad}`; the row layout of `ulysses_pad_and_slice_inputs`
    cpu_attention  `verl.models.transformers.monkey_patch._flash_attention_forward` (the kernel verl's Ulysses
                  wrapper calls) wrapped in a dispatcher by attention name; transformers' `AttentionInterface` /
                  `AttentionMaskInterface` registrations and `integrations.flash_attention._flash_attention_forward`
    sft_ray       `verl.trainer.sft_trainer_ray.SFTTrainer` subclassed (`_build_engine`, `_build_dataloader`,
                  `_build_ckpt_handler`, `fit` as sft_trainer's); `single_controller.ray.{RayClassWithInitArgs,RayResourcePool,RayWorkerGroup}`;
                  `single_controller.base.decorator.register` re-applied on the worker methods it overrides
    sft_bench     `verl.utils.fsdp_utils._select_fsdp2_wrap_targets` (private) replaced module-wide for the benchmark's
                  floor variant (untied lm_head kept in the root FSDP unit); `verl.trainer.sft_trainer.SFTTrainer`;
                  the training client's `train_batch` wrapped on the instance; `tensordict_utils.get`;
                  `auto_set_device`, `{initialize,destroy}_global_process_group`
    reproducible_steps  `verl.trainer.ppo.v1.replay_buffer.ReplayBuffer._materialize_batch` (private) replaced on
                  the class (reads `self.prompt_global_steps` and the returned meta's `keys` / `tags`, private);
                  `verl.experimental.agent_loop.single_turn_agent_loop.SingleTurnAgentLoop` subclassed (`run`) and
                  registered with `agent_loop.register`; request fields `index`, `session_id`, `global_steps`
    validate      `verl.utils.config.omega_conf_to_dataclass`, `verl.workers.config.HFModelConfig`,
                  `verl.utils.dataset.dataset_utils.DatasetPadMode`; verl's YAML tree `verl/trainer/config` (composed by
                  verl_ext/verl_config.py through Hydra's `pkg://` searchpath, no import)
    vllm_cpu      `verl.third_party.vllm` (the `importlib.metadata.version("vllm")` lookup it does);
                  `verl.workers.rollout.vllm_rollout.utils.vLLMColocateWorkerExtension` subclassed
                  (`update_weights_from_ipc`); vLLM internals listed in that module's docstring

Files OUTSIDE this package that know verl's config keys or file layouts (strings, no imports; re-read them too;
paths under eksft_pipeline/, or from the repository root for recipes/ and scripts/):
    contract/artifacts.py     verl checkpoints (`global_step_<n>/`, `latest_checkpointed_iteration.txt`), its metric
                              jsonl, the HF export of the last checkpoint
    contract/tracking.py      `trainer.logger` backends and the tracker environment verl/utils/tracking.py reads
    contract/rl_curves.py     the metric names verl's validation logs (`val-core/<source>/acc/mean@<n>`, v1/trainer_base.py)
    sft/stage.py              the SFT config keys it sets or owns (`OWNED`: model.*, data.*, trainer.*, eksft.*)
    rl/stage.py               the DAPO config keys it sets or owns (`OWNED`: actor_rollout_ref.*, data.*, trainer.*)
    rl/handoff.py             FSDP shards `model_world_size_*_rank_*.pt`, `python -m verl.model_merger`, its bf16 cast
    scoring/__init__.py       how verl calls the reward (`custom_reward_function.path=pkg://...`)
    scoring/reward.py         verl's custom reward signature and the extras its reward loop passes
    scoring/verify.py         verl's `math_verify` reward semantics (reproduced as the reference)
    data/schema.py            verl's SFT multi-turn and RL parquet layouts (written by split / synth / eval_sets)
    data/chat_template.py     `actor_rollout_ref.model.custom_chat_template` (the template handed to verl)
    recipes/verl/**/*.yaml    verl config keys (composed on verl's own YAML)
    recipes/model/*.yaml      each model's `sft.verl` / `rl.verl` blocks (verl keys)
    recipes/cluster/*.yaml    verl's platform environment (`VERL_USE_EXTERNAL_MODULES`, `VERL_PLATFORM`, ...)
    recipes/config.yaml       the stages' verl override blocks (`sft.verl`, `rl.verl`)
    recipes/profile/*.yaml    `profile=smoke`'s `sft.verl` / `rl.verl` step counts (verl keys)
    recipes/tracking/*.yaml   `trainer.logger` through verl's tracker
    scripts/bench_sft_step.py the SFT config keys of its benchmark variants (verl runs in sft_bench above)
    scripts/gpu_check.py      the SFT config's `data.max_token_len_per_gpu` read back from a dry run's plan

tests/test_import_boundaries.py checks that every module here that imports verl is named in the list of patched or
private APIs above, that every file named in this list exists, and that every file outside this package whose text
names one of verl's keys, environment variables or files (its `VERL_MARKERS` grep) is in this list.

Importing this package with another verl version raises :class:`VerlVersionError` naming the installed and the
expected version and pointing here; `EKSFT_ALLOW_VERL_VERSION=1` turns it into a warning (to try a new verl on
purpose). The version is read from the installed distribution's metadata, without importing verl: verl itself
imports `cpu_platform` (VERL_USE_EXTERNAL_MODULES) and `vllm_cpu` (plugins) from inside its own `__init__`.
"""

from __future__ import annotations

import importlib.metadata
import os
import warnings

VERL_VERSION = "0.9.1"  # the verl release every patch and private API above was read from
ALLOW_ENV = "EKSFT_ALLOW_VERL_VERSION"


class VerlVersionError(ImportError):
    """The installed verl is not the version the patches in eksft_pipeline.verl_ext were read from."""


class VerlVersionWarning(UserWarning):
    """Same as VerlVersionError, downgraded by EKSFT_ALLOW_VERL_VERSION=1."""


def installed_verl_version() -> str | None:
    try:
        return importlib.metadata.version("verl")
    except importlib.metadata.PackageNotFoundError:
        return None


def check_verl_version(installed: str | None = None, *, allow: bool | None = None) -> str | None:
    """Raise VerlVersionError (or warn, with EKSFT_ALLOW_VERL_VERSION=1) unless verl is `VERL_VERSION`.

    No verl installed: nothing to check here (the first verl import fails with its own message)."""
    installed = installed_verl_version() if installed is None else installed
    if installed is None or installed.split("+")[0] == VERL_VERSION:
        return installed
    msg = (f"verl {installed} is installed, but eksft_pipeline.verl_ext patches and calls private APIs read from "
           f"verl {VERL_VERSION}: re-check every API listed in eksft_pipeline/verl_ext/__init__.py against verl "
           f"{installed} and update VERL_VERSION there, or install verl=={VERL_VERSION} "
           f"({ALLOW_ENV}=1 tries it anyway)")
    if allow is None:
        allow = os.environ.get(ALLOW_ENV, "").strip().lower() in ("1", "true", "yes")
    if allow:
        warnings.warn(msg, VerlVersionWarning, stacklevel=2)
        return installed
    raise VerlVersionError(msg)


check_verl_version()
