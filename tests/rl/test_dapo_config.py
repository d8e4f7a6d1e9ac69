"""recipes/verl/dapo.yaml (+ dapo_platform/cpu.yaml) composed with Hydra and checked against verl 0.9.1 itself.

Every config is validated with `eksft_pipeline.verl_ext.ppo_main.validate_ppo_config`, which runs verl's own
`validate_config` and instantiates the dataclass-backed blocks the V1 trainer, workers and reward loop build,
so a key or value verl would reject fails here, not after a Ray start-up on the cluster.
"""

from __future__ import annotations

import functools
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException

REPO = Path(__file__).resolve().parents[2]
RECIPES = REPO / "recipes" / "verl"
HUB_MODEL = "Qwen/Qwen3-4B"  # GPU recipe: a hub name, never downloaded (model block only field-checked)


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=str(RECIPES), version_base=None):
        return compose(config_name="dapo", overrides=list(overrides))


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    from eksft_pipeline.models.tiny import build_tiny_model
    from eksft_pipeline.models.tokenizer import build_tiny_tokenizer

    d = tmp_path_factory.mktemp("dapo_cfg") / "model"
    tok = build_tiny_tokenizer(None, ["What is 1 + 2? The answer is \\boxed{3}."] * 4, vocab_size=280)
    build_tiny_model(d, tok, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2, intermediate_size=64)
    return d


@pytest.fixture(scope="module")
def cpu_cfg(tiny_model_dir):
    return _compose("dapo_platform=cpu", f"actor_rollout_ref.model.path={tiny_model_dir}")


def _validate(cfg, **kw):
    from eksft_pipeline.verl_ext.ppo_main import validate_ppo_config

    return validate_ppo_config(cfg, **kw)


def _assert_dapo(cfg, out):
    """DAPO's switches, read back from verl's dataclasses (what the trainer will actually use)."""
    from verl.trainer.ppo.utils import need_critic, need_reference_policy

    actor, algo, rollout = out["actor_rollout_ref.actor"], out["algorithm"], out["actor_rollout_ref.rollout"]
    assert algo.adv_estimator == "grpo" and algo.norm_adv_by_std_in_grpo
    assert algo.use_kl_in_reward is False and algo.kl_ctrl.kl_coef == 0.0
    assert (actor.use_kl_loss, actor.kl_loss_coef, actor.entropy_coeff) == (False, 0.0, 0)
    assert (actor.clip_ratio_low, actor.clip_ratio_high, actor.clip_ratio_c) == (0.2, 0.28, 10.0)
    assert actor.loss_agg_mode == "token-mean"
    assert algo.filter_groups.enable and algo.filter_groups.metric == "acc"
    assert out["algorithm.filter_groups"] == "acc"  # resolved by the V1 trainer's own code
    assert (rollout.temperature, rollout.top_p, rollout.top_k) == (1.0, 1.0, -1)
    assert not need_reference_policy(cfg) and not need_critic(cfg)  # no ref model, no critic is built
    assert cfg.trainer.use_v1 and cfg.trainer.v1.trainer_mode == "sync"
    # reward: verl's DAPO manager around the project's compute_score, with the overlong buffer on
    from eksft_pipeline.scoring.reward import compute_score

    assert out["reward.reward_manager.cls"].__name__ == "DAPORewardManager"
    fn = out["reward.custom_reward_function"]
    assert isinstance(fn, functools.partial) and fn.args[0] is compute_score
    manager = out["reward.reward_kwargs"]
    assert manager.overlong_buffer_cfg.enable and manager.overlong_buffer_cfg.penalty_factor == 1.0
    assert manager.max_resp_len == cfg.data.max_response_length > manager.overlong_buffer_cfg.len > 0


def test_gpu_recipe_is_dapo_and_verl_accepts_it():
    cfg = _compose(f"actor_rollout_ref.model.path={HUB_MODEL}")
    out = _validate(cfg)
    _assert_dapo(cfg, out)
    assert out["actor_rollout_ref.rollout"].name == "vllm" and out["actor_rollout_ref.rollout"].n == 16
    assert cfg.data.train_batch_size == 512 and cfg.actor_rollout_ref.actor.ppo_mini_batch_size == 32
    assert "actor_rollout_ref.model" not in out  # hub name: not instantiated (no download in CI)
    # seeded requests on GPU too (vLLM SamplingParams.seed; tests/rl/test_vllm_rollout.py shows they repeat)
    assert cfg.actor_rollout_ref.rollout.agent.default_agent_loop == "seeded_single_turn_agent"


def test_model_path_is_required():
    with pytest.raises(ValueError, match="model.path is not set"):
        _validate(_compose())


def test_cpu_recipe_is_dapo_and_verl_accepts_it(cpu_cfg):
    out = _validate(cpu_cfg)
    _assert_dapo(cpu_cfg, out)
    rollout, model = out["actor_rollout_ref.rollout"], out["actor_rollout_ref.model"]
    assert rollout.name == "hf_cpu" and rollout.n == 4 and rollout.response_length == 128
    assert (rollout.tensor_model_parallel_size, rollout.data_parallel_size) == (1, 1) and rollout.dtype == "float32"
    assert model.hf_config._attn_implementation == "sdpa" and not model.use_remove_padding
    assert out["actor_rollout_ref.actor"].strategy == "fsdp2"
    assert dict(cpu_cfg.actor_rollout_ref.actor.fsdp_config.mixed_precision) == {
        "param_dtype": "fp32",
        "reduce_dtype": "fp32",
        "buffer_dtype": "fp32",
    }
    assert cpu_cfg.trainer.device == "cpu" and cpu_cfg.data.train_batch_size == 8
    assert cpu_cfg.transfer_queue.backend.SimpleStorage.num_data_storage_units == 1
    # logical resources: 1 GPU per rank, CPUs for verl's placement group (3) + TQ controller + 1 unit + 1 spare
    assert out["ray_kwargs.ray_init"] == {"num_gpus": 1, "num_cpus_needed": 6}
    assert cpu_cfg.ray_kwargs.ray_init.num_cpus >= 6
    assert cpu_cfg.reward.reward_kwargs.max_resp_len == 128
    assert out["actor_rollout_ref.rollout.engine_kwargs.hf_cpu"]["batch_wait_s"] == 0.05


def test_filter_metric_is_a_key_of_the_reward():
    """Dynamic sampling groups on `acc`, which compute_score must return (1.0 right, 0.0 wrong)."""
    from eksft_pipeline.scoring.reward import compute_score

    metric = _compose(f"actor_rollout_ref.model.path={HUB_MODEL}").algorithm.filter_groups.metric
    right = compute_score("tiny_add", "<think>\n1 + 2 = 3\n</think>\n\n\\boxed{3}", "3")
    wrong = compute_score("tiny_add", "<think>\n1 + 2 = 4\n</think>\n\n\\boxed{4}", "3")
    assert (right[metric], wrong[metric]) == (1.0, 0.0)
    assert (right["score"], wrong["score"]) == (1.0, -1.0)


@pytest.mark.parametrize(
    "override,match",
    [
        ("+actor_rollout_ref.actor.clip_ratio_hgih=0.3", "clip_ratio_hgih"),  # forced typo: verl's dataclass rejects
        ("actor_rollout_ref.actor.loss_agg_mode=tokenmean", "loss_agg_mode"),
        ("algorithm.filter_groups.metric=null", "filter_groups.metric must be set"),
        ("reward.reward_kwargs.overlong_buffer_cfg.len=4096", "max_resp_len must be larger"),
        ("+actor_rollout_ref.rollout.engine_kwargs.hf_cpu.batch_wiat_s=1", "batch_wiat_s"),
        ("actor_rollout_ref.rollout.tensor_model_parallel_size=2", "one process per replica"),
        ("ray_kwargs.ray_init.num_gpus=0", "num_gpus"),
        ("ray_kwargs.ray_init.num_cpus=5", "wait forever"),
        ("transfer_queue.backend.SimpleStorage.num_data_storage_units=12", "wait forever"),
        ("reward.custom_reward_function.name=no_such_fn", "reward.custom_reward_function"),
        ("reward.reward_manager.name=dappo", "reward.reward_manager"),
    ],
)
def test_bad_cpu_config_is_rejected_naming_the_problem(tiny_model_dir, override, match):
    cfg = _compose("dapo_platform=cpu", f"actor_rollout_ref.model.path={tiny_model_dir}", override)
    with pytest.raises(ValueError, match=match):
        _validate(cfg, instantiate_model=False)


def test_unknown_key_without_plus_fails_at_composition():
    with pytest.raises(ConfigCompositionException, match="clip_ratio_hgih"):
        _compose("dapo_platform=cpu", "actor_rollout_ref.model.path=/x", "actor_rollout_ref.actor.clip_ratio_hgih=0.3")


def test_entry_point_cli_composes_the_cpu_recipe():
    """The exact CLI the RL stage runs, stopped by Hydra's --cfg job after composition (no Ray)."""
    cmd = [
        sys.executable, "-m", "eksft_pipeline.verl_ext.ppo_main", "--config-path", str(RECIPES), "--config-name", "dapo",
        "dapo_platform=cpu", "actor_rollout_ref.model.path=/nonexistent", "--cfg", "job",
    ]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=REPO)
    assert res.returncode == 0, res.stderr[-3000:]
    import yaml

    printed = yaml.safe_load(res.stdout)
    assert printed["actor_rollout_ref"]["rollout"]["name"] == "hf_cpu"
    assert printed["algorithm"]["filter_groups"] == {**printed["algorithm"]["filter_groups"], "enable": True}
    from eksft_pipeline.verl_ext.ppo_main import EXTERNAL_MODULES

    assert printed["eksft"]["external_modules"] == list(EXTERNAL_MODULES)
    assert printed["actor_rollout_ref"]["rollout"]["agent"]["default_agent_loop"] == "seeded_single_turn_agent"  # cpu
