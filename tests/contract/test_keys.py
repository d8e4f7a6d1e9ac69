"""contract/keys.py: the stage keys and start models every stage uses (one contract, resolved once)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from omegaconf import OmegaConf

from eksft_pipeline.contract import keys


def _cfg(init=None, method="eksft"):
    return OmegaConf.create({"init": init, "method": {"name": method}, "model": {"path": "/models/base"}})


def _ctx(init=None, *, entries=(), dry_run=False, method="eksft"):
    cfg = _cfg(init, method)
    outputs = {k: {"hf_model": f"/run/{k}/hf_model"} for k in entries}
    return SimpleNamespace(cfg=cfg, run_dir=Path("/run"), dry_run=dry_run, init_spec=lambda: keys.init_spec(cfg),
                           manifest=SimpleNamespace(entry=lambda k: outputs.get(k)), upstream=lambda k: outputs[k])


def test_stage_keys():
    assert keys.sft_key(_cfg()) == "sft/eksft" and keys.sft_key("sft") == "sft/sft"
    assert keys.handoff_key(_cfg()) == "handoff/eksft"  # init defaults to the method tag
    assert keys.rl_key(_cfg("base")) == "rl/base" and keys.eval_key(_cfg("eksft-rho_0.1")) == "eval/eksft-rho_0.1"
    k = keys.rl_key(_cfg("/ckpt/global_step_4/"))
    assert k.startswith("rl/path-global_step_4-") and len(k.rsplit("-", 1)[1]) == 8
    assert keys.rl_key("/ckpt/global_step_4/") == k  # a spec string keys the same as a config carrying it
    with pytest.raises(ValueError, match="not keyed by init"):
        keys.init_key("sft", _cfg())


def test_init_model_resolves_base_sft_output_and_paths():
    assert keys.init_model(_ctx("base")) == "/models/base"
    assert keys.init_model(_ctx(None, entries=["sft/eksft"])) == "/run/sft/eksft/hf_model"
    assert keys.init_model(_ctx("my-run", entries=["sft/my-run"])) == "/run/sft/my-run/hf_model"  # in the manifest
    assert keys.init_model(_ctx("org/model")) == "org/model"  # neither a method nor a recorded SFT output
    assert keys.init_model(_ctx(None, dry_run=True)) == "/run/sft/eksft/hf_model"
    assert keys.init_model(_ctx(None, dry_run=True), placeholder=True) == "<run_dir>/sft/eksft/hf_model"
    assert [keys.init_kind(_ctx(s)) for s in ("base", "eksft", "/x/y")] == ["base", "sft", "path"]


def test_rl_model_is_the_rl_output_of_init():
    assert keys.rl_model(_ctx("base", entries=["rl/base"])) == "/run/rl/base/hf_model"
    assert keys.rl_model(_ctx(None, dry_run=True), placeholder=True) == "<run_dir>/rl/eksft/hf_model"


def test_stages_use_the_contract():
    from eksft_pipeline.eval.stage import EvalStage
    from eksft_pipeline.rl.handoff import HandoffStage
    from eksft_pipeline.rl.stage import RLStage
    from eksft_pipeline.sft.stage import SFTStage

    cfg = _cfg("base")
    assert [S().key(cfg) for S in (SFTStage, HandoffStage, RLStage, EvalStage)] == [
        "sft/eksft", "handoff/base", "rl/base", "eval/base"]
    ctx = _ctx("eksft", entries=["sft/eksft"])
    assert HandoffStage().source(ctx) == "/run/sft/eksft/hf_model"
