"""Benchmark curves during DAPO (`rl.val_every`) and the rollout correction (`rl.rollout_correction`), as the RL stage
composes them into verl's config: fast checks, no Ray. The runs themselves: tests/test_e2e_tiny.py (the curve agrees
with the final eval) and tests/rl/test_cpu_ppo.py (correction on changes the loss)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from eksft_pipeline.contract.manifest import Manifest
from eksft_pipeline.contract.recipes import compose_pipeline
from eksft_pipeline.contract.rl_curves import expected_val_points, mismatch_keys, val_curves, val_n, val_points
from eksft_pipeline.contract.stage_api import ConfigError, StageContext


def _stage_vc(tmp_path: Path, *overrides: str):
    from eksft_pipeline.rl.stage import RLStage

    cfg = compose_pipeline(*overrides, "init=eksft")
    stage = RLStage()
    ctx = StageContext(cfg=cfg, run_dir=tmp_path, manifest=Manifest(tmp_path), key="rl/eksft", dry_run=True)
    stage.check(ctx)
    return cfg, stage.verl_config(ctx)


# ---------------------------------------------------------------------------------------------- validation


def test_curves_on_in_the_tiny_and_paper_recipes_and_off_by_the_key(tmp_path):
    _, vc = _stage_vc(tmp_path)
    assert vc.trainer.test_freq == 4 and vc.trainer.val_before_train is True
    _, vc = _stage_vc(tmp_path, "rl.val_every=null")
    assert vc.trainer.test_freq == -1 and vc.trainer.val_before_train is False
    for model in ("qwen3-8b", "qwen3-4b", "qwen3-8b-base"):
        cfg, vc = _stage_vc(tmp_path, f"model={model}", "cluster=8gpu")
        assert cfg.rl.val_every == 5 and vc.trainer.test_freq == 5 and vc.trainer.val_before_train is True
        vk = vc.actor_rollout_ref.rollout.val_kwargs
        assert (vk.n, vk.do_sample, vk.temperature, vk.top_p, vk.top_k) == (4, True, 1.0, 1.0, -1)


def test_val_settings_follow_the_eval_stage(tmp_path):
    cfg, vc = _stage_vc(tmp_path, "rl.val_every=3", "rl.val_n=2", "eval.temperature=0.6", "eval.top_p=0.95")
    assert vc.trainer.test_freq == 3 and vc.trainer.val_before_train is True
    vk = vc.actor_rollout_ref.rollout.val_kwargs
    assert (vk.n, vk.do_sample, vk.temperature, vk.top_p) == (2, True, 0.6, 0.95)
    # the reward verl validates with is the project's verifier (the RL reward)
    assert vc.reward.custom_reward_function.path == "pkg://eksft_pipeline.scoring.reward"


def test_the_stage_owns_the_validation_keys(tmp_path):
    from eksft_pipeline.rl.stage import RLStage

    cfg = compose_pipeline("init=eksft", "+rl.verl.trainer.test_freq=2")  # recorded in cfg.cli_overrides
    ctx = StageContext(cfg=cfg, run_dir=tmp_path, manifest=Manifest(tmp_path), key="rl/eksft", dry_run=True)
    with pytest.raises(ConfigError, match="rl.val_every"):
        RLStage().verl_config(ctx)


@pytest.mark.parametrize("bad", ["rl.val_every=-2", "rl.val_every=x"])
def test_bad_val_every_is_refused(tmp_path, bad):
    with pytest.raises(ConfigError, match="rl.val_every"):
        _stage_vc(tmp_path, bad)


def _eval_files(root: Path) -> dict[str, Path]:
    from eksft_pipeline.data.schema import RL_SCHEMA
    from eksft_pipeline.data.synth import write_parquet

    root.mkdir(parents=True, exist_ok=True)
    msgs = lambda q: [{"role": "system", "content": "sys"}, {"role": "user", "content": q}]  # noqa: E731
    rows = [{"data_source": "aime", "prompt": msgs(f"aime q{i}"), "ability": "math",
             "reward_model": {"ground_truth": str(100 + i), "style": "rule"}, "extra_info": {"index": i, "split": "t"}}
            for i in range(4)]
    rows += [{"data_source": "amc", "prompt": msgs(f"amc q{i}"), "ability": "math",
              "reward_model": {"ground_truth": str(i), "style": "rule"}, "extra_info": {"index": i, "split": "t"}}
             for i in range(3)]
    pq = write_parquet(rows, root / "mix.parquet", RL_SCHEMA)
    jl = root / "hmmt.jsonl"
    jl.write_text("".join(json.dumps({"question": f"hmmt q{i}", "ref_answer": f"{i}/7"}) + "\n" for i in range(5)))
    return {"parquet": pq, "jsonl": jl}


def test_val_file_is_the_eval_stages_problems(tmp_path):
    """val.parquet = the eval sets' problems (first eval.max_problems of each), data_source = benchmark name, one
    distinct extra_info.index per problem, ground truths and messages as the eval stage loads them."""
    from eksft_pipeline.data.eval_sets import load_eval_sets, specs_from_benchmarks
    from eksft_pipeline.rl.stage import RLStage

    f = _eval_files(tmp_path / "data")
    benches = {"aime24": {"path": str(f["parquet"]), "data_source": "aime", "policy": "aime"},
               "amc": {"path": str(f["parquet"]), "data_source": "amc"},
               "hmmt25": {"path": str(f["jsonl"]), "question_field": "question", "answer_field": "ref_answer"}}
    cfg = compose_pipeline("init=eksft", "rl.val_every=2", "eval.max_problems=3")
    cfg.eval.benchmarks = benches
    RLStage.check_val_policies(cfg)
    counts = RLStage.write_benchmark_val(cfg, tmp_path / "val.parquet")
    assert counts == {"aime24": 3, "amc": 3, "hmmt25": 3}
    df = pd.read_parquet(tmp_path / "val.parquet")
    assert list(df.data_source) == ["aime24"] * 3 + ["amc"] * 3 + ["hmmt25"] * 3
    assert [e["index"] for e in df.extra_info] == list(range(9))
    sets = load_eval_sets(specs_from_benchmarks(benches))
    want = [(p.ground_truth, [dict(m) for m in p.messages]) for name in benches for p in sets[name].problems[:3]]
    got = [(rm["ground_truth"], [dict(m) for m in pr]) for rm, pr in zip(df.reward_model, df.prompt)]
    assert got == want
    assert got[0][0] == "100" and got[6][0] == "0/7" and got[6][1][-1]["content"] == "hmmt q0"


def test_a_policy_the_reward_would_not_pick_is_refused(tmp_path):
    """verl's validation scores with policy="auto" from the benchmark name; an eval policy that differs is an error."""
    from eksft_pipeline.rl.stage import RLStage

    f = _eval_files(tmp_path / "data")
    cfg = compose_pipeline("init=eksft", "rl.val_every=2")
    cfg.eval.benchmarks = {"mybench": {"path": str(f["parquet"]), "data_source": "aime", "policy": "aime"}}
    with pytest.raises(ConfigError, match="mybench.*'aime'.*'math'"):
        RLStage.check_val_policies(cfg)


def test_val_curves_from_verl_metrics():
    m = {0: {"val-core/tiny_add/acc/mean@4": 0.5, "val-aux/tiny_add/reward/mean@4": 0.0,
             "val-core/tiny_sub/acc/mean@4": 0.25},
         1: {"critic/score/mean": 0.1},
         2: {"critic/score/mean": 0.2, "val-core/tiny_add/acc/mean@4": 0.75, "val-core/tiny_sub/acc/mean@4": 0.5},
         3: {"critic/score/mean": 0.3, "val-core/tiny_add/acc/mean@4": 1.0, "val-core/tiny_sub/acc/mean@4": 0.5}}
    assert val_curves(m) == {"tiny_add": {0: 0.5, 2: 0.75, 3: 1.0}, "tiny_sub": {0: 0.25, 2: 0.5, 3: 0.5}}
    assert val_points(m) == [0, 2, 3] and val_n(m) == 4 and val_n({1: {}}) is None
    assert expected_val_points(3, 2) == [0, 2, 3]
    assert expected_val_points(16, 4) == [0, 4, 8, 12, 16]
    assert expected_val_points(16, 5, before=False) == [5, 10, 15, 16]
    assert mismatch_keys({1: {"rollout_corr/kl": 0.1, "training/rollout_probs_diff_max": 0.2}}) == [
        ("rollout_corr/kl", "KL(π_rollout ‖ π_old), per token"),
        ("training/rollout_probs_diff_max", "max |p_rollout − p_old|")]


def test_summary_starts_at_the_first_training_step():
    """Step 0 holds only the validation before training: the summary's "first" values are step 1's."""
    from eksft_pipeline.rl.stage import summarize

    m = {0: {"val-core/a/acc/mean@4": 0.5},
         1: {"critic/score/mean": -0.5, "response_length/mean": 30.0},
         2: {"critic/score/mean": 0.25, "response_length/mean": 40.0}}
    s = summarize(m)
    assert (s["steps"], s["score_mean_first"], s["score_mean_last"], s["response_length_mean_first"]) == (
        2, -0.5, 0.25, 30.0)


# ---------------------------------------------------------------------------------------------- rollout correction


def test_rollout_correction_off_by_default(tmp_path):
    for model, cluster in (("tiny", "cpu"), ("qwen3-8b", "8gpu")):
        cfg, vc = _stage_vc(tmp_path, f"model={model}", f"cluster={cluster}")
        rc = vc.algorithm.rollout_correction
        assert cfg.rl.rollout_correction is None
        assert (rc.rollout_is, rc.rollout_rs, rc.bypass_mode) == (None, None, False)
        # the mismatch is still computed: verl needs the rollout's log-probs for it
        assert vc.actor_rollout_ref.rollout.calculate_log_probs is True


@pytest.mark.parametrize("preset", ["decoupled_token_is", "decoupled_seq_is_rs", "decoupled_token_icepop",
                                    "bypass_ppo_clip"])
def test_a_preset_writes_verls_fields(tmp_path, preset):
    from verl.trainer.config.algorithm import RolloutCorrectionConfig

    _, vc = _stage_vc(tmp_path, f"rl.rollout_correction={preset}")
    want = getattr(RolloutCorrectionConfig, preset)()
    rc = vc.algorithm.rollout_correction
    for field in ("rollout_is", "rollout_is_threshold", "rollout_rs", "rollout_rs_threshold", "bypass_mode",
                  "loss_type", "rollout_is_batch_normalize"):
        assert rc[field] == getattr(want, field), field
    if preset == "decoupled_token_is":  # token-level truncated IS at 2.0
        assert (rc.rollout_is, rc.rollout_is_threshold, rc.rollout_rs) == ("token", 2.0, None)


@pytest.mark.parametrize("overrides,match", [
    (("rl.rollout_correction=decoupled_tokn_is",), "not one of verl's; usable: .*decoupled_token_is"),
    (("rl.rollout_correction=bypass_pg_is",), "bypass_mode=true with rollout_is='sequence'"),
    (("rl.rollout_correction=decoupled_seq_is", "+rl.verl.algorithm.rollout_correction.rollout_rs=token_k1"),
     "set one of them"),
    (("+rl.verl.algorithm.rollout_correction.bypass_mode=true", "+rl.verl.algorithm.rollout_correction.rollout_is=token"),
     "V1 trainer only swaps"),
])
def test_bad_rollout_correction_is_refused(tmp_path, overrides, match):
    with pytest.raises(ConfigError, match=match):
        _stage_vc(tmp_path, *overrides)


def test_hand_set_correction_passes_verls_validation(tmp_path):
    from eksft_pipeline.rl.stage import RLStage

    _, vc = _stage_vc(tmp_path, "+rl.verl.algorithm.rollout_correction.rollout_is=sequence",
                      "+rl.verl.algorithm.rollout_correction.rollout_is_threshold=3.0")
    RLStage().validate_verl(vc)
    assert vc.algorithm.rollout_correction.rollout_is == "sequence"
