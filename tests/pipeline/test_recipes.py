"""Every recipe composes, and the verl configs the stages build pass verl's own validation.

For each model x cluster (and, for SFT, each method) the orchestrator config is composed with
Hydra exactly as `python -m eksft_pipeline` does, then the SFT stage's and the RL stage's verl
configs are built on verl's own YAML and instantiated against verl's dataclasses -- so a key verl
0.9.1 would reject fails here, not on the cluster.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from eksft_pipeline.pipeline.manifest import Manifest
from eksft_pipeline.pipeline.stage_api import StageContext
from eksft_pipeline.pipeline.verl_config import ConfigKeyError, compose_pipeline, recipes_dir

RECIPES = recipes_dir()
METHODS = sorted(p.stem for p in (RECIPES / "method").glob("*.yaml"))
GPU_MODELS = ["qwen3-4b", "qwen3-8b"]


def ctx_for(cfg, tmp_path: Path, key: str) -> StageContext:
    return StageContext(cfg=cfg, run_dir=tmp_path, manifest=Manifest(tmp_path), key=key, dry_run=True)


def test_all_methods_are_recipes():
    from eksft_pipeline.losses.registry import REGISTRY

    # every method recipe names a registered loss, and every registered loss has a recipe
    losses = {OmegaConf.load(RECIPES / "method" / f"{m}.yaml").loss for m in METHODS}
    assert losses == set(REGISTRY), (losses ^ set(REGISTRY))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("model,cluster", [("tiny", "cpu"), ("qwen3-8b", "8gpu")])
def test_sft_config_composes_and_verl_accepts_it(tmp_path, model, cluster, method):
    from eksft_pipeline.sft.stage import SFTStage

    cfg = compose_pipeline(f"model={model}", f"cluster={cluster}", f"method={method}")
    stage = SFTStage()
    vc = stage.verl_config(ctx_for(cfg, tmp_path, stage.key(cfg)))
    m = OmegaConf.load(RECIPES / "method" / f"{method}.yaml")
    assert vc.eksft.loss == m.loss
    assert dict(vc.eksft.loss_params) == dict(m.get("params") or {})
    if model == "qwen3-8b":
        # the paper's setting, unchanged by the model / cluster layers
        assert vc.optim.lr == 1e-5 and list(vc.optim.betas) == [0.9, 0.95]
        assert vc.optim.weight_decay == 0.1 and vc.optim.clip_grad == 1.0
        assert vc.optim.lr_warmup_steps_ratio == 0.01 and vc.optim.lr_scheduler_type == "cosine"
        assert vc.trainer.total_epochs == 8 and vc.data.train_batch_size == 64
        assert vc.data.max_length == 20000 and vc.trainer.n_gpus_per_node == 8
        assert vc.engine.strategy == "fsdp2" and vc.model.override_config.attn_implementation == "flash_attention_2"
    else:
        assert vc.trainer.device == "cpu" and vc.engine.strategy == "fsdp2"
        assert vc.model.override_config.attn_implementation == "sdpa"
    assert "hf_model" in list(vc.checkpoint.save_contents)


def test_qwen3_4b_sft_config(tmp_path):
    from eksft_pipeline.sft.stage import SFTStage

    cfg = compose_pipeline("model=qwen3-4b", "cluster=8gpu")
    vc = SFTStage().verl_config(ctx_for(cfg, tmp_path, "sft/eksft"))
    assert vc.model.path == "Qwen/Qwen3-4B-Base" and vc.data.train_batch_size == 64


@pytest.mark.parametrize("model,cluster", [("tiny", "cpu"), *[(m, "8gpu") for m in GPU_MODELS]])
def test_rl_config_composes_and_verl_accepts_it(tmp_path, model, cluster):
    from eksft_pipeline.rl.stage import RLStage

    cfg = compose_pipeline(f"model={model}", f"cluster={cluster}", "init=eksft")
    stage = RLStage()
    ctx = ctx_for(cfg, tmp_path, stage.key(cfg))
    vc = stage.verl_config(ctx)
    stage.validate_verl(vc)  # verl's validate_config + every dataclass block
    a = vc.actor_rollout_ref
    # DAPO's switches
    assert vc.algorithm.adv_estimator == "grpo" and vc.algorithm.use_kl_in_reward is False
    assert a.actor.clip_ratio_low == 0.2 and a.actor.clip_ratio_high == 0.28 and a.actor.clip_ratio_c == 10.0
    assert a.actor.loss_agg_mode == "token-mean" and a.actor.use_kl_loss is False and a.actor.entropy_coeff == 0
    assert vc.algorithm.filter_groups.metric == "acc"
    assert vc.reward.reward_manager.name == "dapo"
    assert vc.reward.custom_reward_function.path == "pkg://eksft_pipeline.rl.reward"
    assert vc.reward.reward_kwargs.max_resp_len == vc.data.max_response_length
    assert a.rollout.temperature == 1.0 and a.rollout.top_p == 1.0
    assert vc.data.max_response_length == cfg.rl.max_response_length
    assert vc.trainer.default_local_dir == str(tmp_path / "rl" / "eksft" / "checkpoints")
    if cluster == "8gpu":
        assert a.rollout.name == "vllm" and a.rollout.n == 16 and vc.data.train_batch_size == 512
        assert a.actor.optim.lr == 1e-6 and a.actor.optim.lr_warmup_steps == 10 and a.actor.optim.weight_decay == 0.1
        assert vc.trainer.n_gpus_per_node == 8
        assert vc.reward.reward_kwargs.overlong_buffer_cfg.enable is True
        assert vc.algorithm.filter_groups.enable is True
    else:
        assert a.rollout.name == "hf_cpu" and vc.trainer.device == "cpu"
        assert vc.trainer.total_training_steps == cfg.model.rl.total_training_steps
        assert vc.algorithm.filter_groups.enable is False  # documented in recipes/model/tiny.yaml


def test_unknown_verl_key_is_rejected_naming_it(tmp_path):
    from eksft_pipeline.sft.stage import SFTStage

    cfg = compose_pipeline("+sft.verl.optim.learning_rate=1e-5")
    with pytest.raises(ConfigKeyError, match=r"optim\.learning_rate"):
        SFTStage().verl_config(ctx_for(cfg, tmp_path, "sft/eksft"))


def test_unknown_rl_key_is_rejected_naming_it(tmp_path):
    from eksft_pipeline.rl.stage import RLStage

    cfg = compose_pipeline("+rl.verl.actor_rollout_ref.actor.clip_ratio_hi=0.3")
    with pytest.raises(ConfigKeyError, match=r"clip_ratio_hi"):
        RLStage().verl_config(ctx_for(cfg, tmp_path, "rl/eksft"))


def test_bad_verl_value_is_rejected(tmp_path):
    from eksft_pipeline.sft.stage import SFTStage

    cfg = compose_pipeline("+sft.verl.data.pad_mode=sideways")
    with pytest.raises(ValueError, match="pad_mode"):
        SFTStage().verl_config(ctx_for(cfg, tmp_path, "sft/eksft"))


def test_bad_method_parameter_is_rejected_before_launch(tmp_path):
    from eksft_pipeline.sft.stage import SFTStage

    cfg = compose_pipeline("method=global_reg", "+method.params.rho=0.3")
    with pytest.raises(ValueError, match="rho"):
        SFTStage().verl_config(ctx_for(cfg, tmp_path, "sft/global_reg"))


def test_unknown_method_fails_at_composition():
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException, match="no_such_method"):
        compose_pipeline("method=no_such_method")


def test_stage_lists_cover_the_pipeline():
    from eksft_pipeline.pipeline.runner import ORDER

    cfg = compose_pipeline()
    assert list(cfg.stage.run) == ORDER  # stage=all: every stage, in order
    for name in ORDER:
        assert list(compose_pipeline(f"stage={name}").stage.run) == [name]
