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

from eksft_pipeline.contract.manifest import Manifest
from eksft_pipeline.contract.recipes import compose_pipeline, recipes_dir
from eksft_pipeline.contract.stage_api import StageContext
from eksft_pipeline.verl_ext.verl_config import ConfigKeyError

RECIPES = recipes_dir()
METHODS = sorted(p.stem for p in (RECIPES / "method").glob("*.yaml"))
GPU_MODELS = ["qwen3-4b", "qwen3-8b", "qwen3-4b-base", "qwen3-8b-base"]


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
        # the paper's 20,000-token cutoff (authors' eksft.sh:L48), over 2 GPUs per sequence (Ulysses SP)
        assert vc.data.max_length == 20000 and vc.trainer.n_gpus_per_node == 8
        assert vc.engine.ulysses_sequence_parallel_size == 2 and vc.model.use_remove_padding
        assert vc.data.max_token_len_per_gpu * 2 >= vc.data.max_length
        assert vc.engine.strategy == "fsdp2" and vc.model.override_config.attn_implementation == "flash_attention_2"
    else:
        assert vc.trainer.device == "cpu" and vc.engine.strategy == "fsdp2"
        assert vc.model.override_config.attn_implementation == "sdpa"
    assert "hf_model" in list(vc.checkpoint.save_contents)


def test_qwen3_4b_sft_config(tmp_path):
    from eksft_pipeline.sft.stage import SFTStage

    cfg = compose_pipeline("model=qwen3-4b", "cluster=8gpu")
    vc = SFTStage().verl_config(ctx_for(cfg, tmp_path, "sft/eksft"))
    assert vc.model.path == "Qwen/Qwen3-4B" and vc.data.train_batch_size == 64
    assert vc.data.max_length == 20000 and vc.engine.ulysses_sequence_parallel_size == 2
    assert vc.data.max_token_len_per_gpu * 2 >= vc.data.max_length


@pytest.mark.parametrize("model,cluster", [("tiny", "cpu"), *[(m, "8gpu") for m in GPU_MODELS], ("qwen3-8b", "2x8gpu")])
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
    assert vc.reward.custom_reward_function.path == "pkg://eksft_pipeline.scoring.reward"
    assert vc.reward.reward_kwargs.max_resp_len == vc.data.max_response_length
    assert a.rollout.temperature == 1.0 and a.rollout.top_p == 1.0
    assert vc.data.max_response_length == cfg.rl.max_response_length
    assert vc.trainer.default_local_dir == str(tmp_path / "rl" / "eksft" / "checkpoints")
    if cluster != "cpu":
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
    from eksft_pipeline.orchestrator.runner import ORDER

    cfg = compose_pipeline()
    assert list(cfg.stage.run) == ORDER  # stage=all: every stage, in order
    for name in ORDER:
        assert list(compose_pipeline(f"stage={name}").stage.run) == [name]


def test_two_node_recipe(tmp_path):
    """cluster=2x8gpu: verl's trainer.nnodes=2 for SFT and RL, 16 data-parallel ranks, the running Ray cluster."""
    from eksft_pipeline.rl.stage import RLStage
    from eksft_pipeline.sft.stage import SFTStage

    cfg = compose_pipeline("model=qwen3-8b", "cluster=2x8gpu", "init=eksft")
    sft = SFTStage().verl_config(ctx_for(cfg, tmp_path, "sft/eksft"))
    assert (sft.trainer.nnodes, sft.trainer.n_gpus_per_node) == (2, 8)
    stage = RLStage()
    rl = stage.verl_config(ctx_for(cfg, tmp_path, "rl/eksft"))
    stage.validate_verl(rl)
    assert (rl.trainer.nnodes, rl.trainer.n_gpus_per_node) == (2, 8)
    assert rl.ray_kwargs.ray_init.address == "auto" and rl.ray_kwargs.ray_init.num_cpus is None


@pytest.mark.parametrize("model", ["qwen3-8b", "qwen3-8b-base"])
def test_paper_models_and_one_chat_template(tmp_path, model):
    """model=qwen3-8b is the released Qwen3-8B (the paper's); the base is its own recipe. SFT and RL get the same
    explicit template through verl's own custom_chat_template."""
    from eksft_pipeline.data.chat_template import CHATML
    from eksft_pipeline.rl.stage import RLStage
    from eksft_pipeline.sft.stage import SFTStage

    cfg = compose_pipeline(f"model={model}", "cluster=8gpu", "init=eksft")
    assert cfg.model.path == ("Qwen/Qwen3-8B" if model == "qwen3-8b" else "Qwen/Qwen3-8B-Base")
    assert cfg.model.eos_token == (None if model == "qwen3-8b" else "<|im_end|>")
    sft = SFTStage().verl_config(ctx_for(cfg, tmp_path, "sft/eksft"))
    rl = RLStage().verl_config(ctx_for(cfg, tmp_path, "rl/eksft"))
    assert sft.model.custom_chat_template == rl.actor_rollout_ref.model.custom_chat_template == CHATML


def test_rl_stage_environment_reaches_the_ray_job(tmp_path):
    """On an existing Ray cluster workers do not inherit the driver's environment: the stage's variables go into
    ray_kwargs.ray_init.runtime_env (verl merges it into the job's runtime env), CUDA_VISIBLE_DEVICES and secrets
    never do."""
    from eksft_pipeline.rl.stage import RLStage

    cfg = compose_pipeline("model=tiny", "cluster=cpu", "init=eksft", "cluster.ray_address=127.0.0.1:6399",
                           "+rl.env.EKSFT_MARK=seen")  # fmt: skip
    stage = RLStage()
    ctx = ctx_for(cfg, tmp_path, "rl/eksft")
    env = {**stage.stage_env(ctx, tmp_path / "m.jsonl"), "HF_TOKEN": "secret", "WANDB_API_KEY": "secret"}
    vc = stage.verl_config(ctx, env=env)
    ray_init = vc.ray_kwargs.ray_init
    assert ray_init.address == "127.0.0.1:6399" and ray_init.num_cpus is None and ray_init.num_gpus is None
    ev = ray_init.runtime_env.env_vars
    assert ev["VERL_FILE_LOGGER_PATH"] == str(tmp_path / "m.jsonl") and ev["EKSFT_MARK"] == "seen"
    assert ev["VERL_PLATFORM"] == "cpu" and ev["PYTHONPATH"].split(":")[0] == str(RECIPES.parent)
    assert "eksft_pipeline.verl_ext.cpu_rollout" in ev["VERL_USE_EXTERNAL_MODULES"].split(",")
    assert "CUDA_VISIBLE_DEVICES" not in ev and "HF_TOKEN" not in ev and "WANDB_API_KEY" not in ev
    stage.validate_verl(vc)  # no logical-resource check when joining a cluster (Ray refuses num_cpus there)


def test_two_node_sft_is_one_ray_job_over_both_nodes(tmp_path):
    """Two nodes: one command (the Ray SFT driver, no torchrun, no per-node command) that joins the running cluster
    and places 2 x 8 ranks; the memory estimate shards over all 16; the stage's environment is the job's runtime
    env (no CUDA_VISIBLE_DEVICES, no secrets)."""
    import os

    from eksft_pipeline.sft.stage import SFTStage

    cfg = compose_pipeline("model=qwen3-8b", "cluster=2x8gpu")
    stage = SFTStage()
    ctx = ctx_for(cfg, tmp_path, "sft/eksft")
    cmd = " ".join(stage.command(ctx))
    assert "eksft_pipeline.verl_ext.sft_ray" in cmd and "torch.distributed.run" not in cmd and "nnodes" not in cmd
    os.environ["HF_TOKEN_TEST_SECRET_KEY"] = "x"
    try:
        vc, loss = stage.configure(ctx)
    finally:
        del os.environ["HF_TOKEN_TEST_SECRET_KEY"]
    assert (vc.trainer.n_gpus_per_node, vc.trainer.nnodes) == (8, 2)
    init = vc.ray_kwargs.ray_init
    assert init.address == "auto" and init.num_gpus is None and init.num_cpus is None and init.temp_dir is None
    ev = init.runtime_env.env_vars
    assert "CUDA_VISIBLE_DEVICES" not in ev and "HF_TOKEN_TEST_SECRET_KEY" not in ev
    assert ev["PYTHONPATH"].split(":")[0] == str(RECIPES.parent)
    assert stage.ray_job(vc)["world_size"] == 16 and stage.ray_job(vc)["ray"] == "join auto"
    est = stage.memory_estimate(ctx, vc, loss)
    assert "W=16" in "\n".join(est.lines())
    one = compose_pipeline("model=qwen3-8b", "cluster=8gpu")
    vc1, loss1 = stage.configure(ctx_for(one, tmp_path, "sft/eksft"))
    assert stage.memory_estimate(ctx_for(one, tmp_path, "sft/eksft"), vc1, loss1).total > est.total  # 8 vs 16 shards


def test_cpu_sft_starts_its_own_ray_with_logical_gpus(tmp_path, monkeypatch):
    """cluster=cpu: a local Ray (own short temp dir, per run dir and stage) with one logical GPU and CPU per rank; the
    workers get the cpu platform and the run's ids through runtime_env."""
    from eksft_pipeline.sft.stage import SFTStage

    monkeypatch.setenv("EKSFT_RUN_TOKEN", "tok123")
    cfg = compose_pipeline("cluster=cpu", "sft.nproc_per_node=2")
    vc, _ = SFTStage().configure(ctx_for(cfg, tmp_path, "sft/eksft"))
    init = vc.ray_kwargs.ray_init
    assert init.address is None and init.num_gpus == 2 and init.num_cpus >= 3 and init.include_dashboard is False
    assert init.temp_dir.startswith("/tmp/eksft-ray-") and len(init.temp_dir) < 40
    other, _ = SFTStage().configure(ctx_for(cfg, tmp_path / "other", "sft/eksft"))
    assert other.ray_kwargs.ray_init.temp_dir != init.temp_dir
    ev = init.runtime_env.env_vars
    assert ev["EKSFT_RUN_TOKEN"] == "tok123" and ev["VERL_PLATFORM"] == "cpu" and "CUDA_VISIBLE_DEVICES" not in ev
    assert "eksft_pipeline.verl_ext.cpu_platform" in ev["VERL_USE_EXTERNAL_MODULES"]


@pytest.mark.parametrize("model", GPU_MODELS)
def test_paper_recipes_evaluate_the_base_model_and_random_mask_regularises(tmp_path, model):
    """The paper-scale recipes evaluate the base model by default (the "Original Model" rows, Fig. 1), and
    random_mask carries EKSFT's lambdas on its dropped tokens (App. H) into the SFT trainer."""
    from eksft_pipeline.sft.stage import SFTStage

    cfg = compose_pipeline(f"model={model}", "cluster=8gpu", "method=random_mask")
    assert list(cfg.eval.targets) == ["base", "sft", "rl"]
    vc = SFTStage().verl_config(ctx_for(cfg, tmp_path, "sft/random_mask"))
    params = dict(vc.eksft.loss_params)
    assert (params["mask_ratio"], params["lambda_entropy"], params["lambda_kl"]) == (0.1, 0.05, 0.05)
    eksft = OmegaConf.load(RECIPES / "method" / "eksft.yaml").params
    assert (params["lambda_entropy"], params["lambda_kl"]) == (eksft.lambda_entropy, eksft.lambda_kl)
