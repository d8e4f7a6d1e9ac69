"""Variants of one method recipe (a multirun over method.params.rho) get their own stage keys and directories."""

from __future__ import annotations

import pytest

from eksft_pipeline.contract.keys import apply_method_tag, init_tag, is_method_tag, method_tag, split_method_tag
from eksft_pipeline.contract.recipes import compose_pipeline


def tag(*overrides: str) -> str:
    return method_tag(compose_pipeline(*overrides).method)


def test_recipe_defaults_keep_the_plain_name():
    assert tag("method=eksft") == "eksft"
    assert tag("method=eksft", "method.params.rho=0.2") == "eksft"  # the recipe's own value: the default run
    assert tag("method=sft") == "sft"


def test_changed_settings_name_the_variant():
    assert tag("method=eksft", "method.params.rho=0.1") == "eksft-rho_0.1"
    assert tag("method=eksft", "method.params.rho=0") == "eksft-rho_0"
    assert tag("method=eksft", "method.params.rho=0.3", "method.params.lambda_kl=0") == "eksft-lambda_kl_0-rho_0.3"
    assert tag("method=eksft", "method.selection_scope=micro_batch") == "eksft-selection_scope_micro_batch"
    assert tag("method=random_mask", "+method.params.match_eksft_size=true") == "random_mask-match_eksft_size_true"
    # every value of a sweep is distinct
    sweep = {tag("method=eksft", f"method.params.rho={r}") for r in (0, 0.05, 0.1, 0.2, 0.3, 0.4)}
    assert len(sweep) == 6


def test_explicit_tag_must_start_with_the_recipe_name():
    assert tag("method=eksft", "+method.tag=eksft-lr_high") == "eksft-lr_high"
    with pytest.raises(ValueError, match="must be 'eksft-<label>'"):
        tag("method=eksft", "+method.tag=mine")
    with pytest.raises(ValueError, match="must be 'eksft-<label>'"):
        tag("method=eksft", "+method.tag=eksft-a/b")


def test_stage_keys_of_a_variant(tmp_path):
    from eksft_pipeline.eval.stage import EvalStage
    from eksft_pipeline.rl.handoff import HandoffStage
    from eksft_pipeline.rl.stage import RLStage
    from eksft_pipeline.sft.stage import SFTStage

    cfg = apply_method_tag(compose_pipeline("method=eksft", "method.params.rho=0.1"))
    assert cfg.method.name == "eksft-rho_0.1" and cfg.method.loss == "eksft"
    assert [s.key(cfg) for s in (SFTStage(), HandoffStage(), RLStage(), EvalStage())] == [
        "sft/eksft-rho_0.1", "handoff/eksft-rho_0.1", "rl/eksft-rho_0.1", "eval/eksft-rho_0.1"]
    # init= a variant tag is a method, not a path
    assert is_method_tag("eksft-rho_0.1") and init_tag("eksft-rho_0.1") == "eksft-rho_0.1"
    assert split_method_tag("eksft-rho_0.1") == "eksft"
    assert not is_method_tag("nosuchmethod-rho_0.1")
    assert init_tag("nosuchmethod-rho_0.1").startswith("path-")
    assert init_tag("/models/eksft-rho_0.1").startswith("path-")
