"""Handoff: the SFT output becomes the RL initial model only if weights, chat template, EOS and context fit."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from eksft_pipeline.contract.manifest import Manifest
from eksft_pipeline.contract.recipes import compose_pipeline
from eksft_pipeline.orchestrator.runner import run_pipeline
from eksft_pipeline.rl.handoff import HandoffError


@pytest.fixture(scope="module")
def split_run(tmp_path_factory):
    """Tiny assets (no pretraining) + a completed split stage in a run directory."""
    from eksft_pipeline.data.tiny_assets import make_tiny_assets

    root = tmp_path_factory.mktemp("handoff")
    assets = root / "assets"
    make_tiny_assets(
        assets,
        n_problems=150,
        n_eval_per_source=2,
        n_pretrain=10,
        pretrain=False,
        progress=False,
        model_kwargs=dict(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64),
    )
    common = [f"model.assets_dir={assets}", "model.data.n_sft=40"]
    return root, assets, common


def _handoff(root: Path, common: list[str], model: Path, name: str):
    run_dir = root / name
    run_pipeline(compose_pipeline("stage=split", f"run_dir={run_dir}", *common))
    return run_pipeline(compose_pipeline("stage=handoff", f"run_dir={run_dir}", f"init={model}", *common)), run_dir


def test_matching_model_passes_every_check(split_run):
    root, assets, common = split_run
    res, run_dir = _handoff(root, common, assets / "model", "ok")
    assert res[0]["status"] == "complete"
    assert {k: res[0]["summary"][k] for k in ("weights", "template", "eos", "context")} == dict.fromkeys(
        ("weights", "template", "eos", "context"), True
    )
    key = res[0]["key"]
    rep = json.loads(Path(Manifest(run_dir).outputs(key)["report"]).read_text())
    assert rep["eos"]["end_token"] == "<|im_end|>" and 2 in rep["eos"]["stop_token_ids"]


def test_mismatched_chat_template_is_refused_with_a_clear_error(split_run, tmp_path):
    root, assets, common = split_run
    bad = shutil.copytree(assets / "model", tmp_path / "bad_template")
    # a template that renders the assistant turn header differently (a common silent SFT->RL mismatch)
    tpl = (bad / "chat_template.jinja").read_text().replace("<|im_start|>assistant\\n", "<|im_start|>assistant\\n\\n")
    assert tpl != (assets / "model" / "chat_template.jinja").read_text()
    (bad / "chat_template.jinja").write_text(tpl)
    # the run names its template (tiny: chatml): RL and eval render with it, so the saved one is only reported
    res, run_dir = _handoff(root, common, bad, "bad_template_named")
    rep = json.loads(Path(Manifest(run_dir).outputs(res[0]["key"])["report"]).read_text())
    assert res[0]["summary"]["template"] is True and rep["init_template_is_run_template"] is False
    # without a run template every stage uses the model's own, which no longer renders prompts as SFT's did
    with pytest.raises(HandoffError, match="template: the init model renders RL prompts differently"):
        _handoff(root, common + ["model.chat_template=null"], bad, "bad_template")


def test_wrong_stop_token_is_refused(split_run, tmp_path):
    root, assets, common = split_run
    bad = shutil.copytree(assets / "model", tmp_path / "bad_eos")
    for name in ("generation_config.json", "tokenizer_config.json"):
        cfg = json.loads((bad / name).read_text())
        if "eos_token_id" in cfg:
            cfg["eos_token_id"] = 0  # <|endoftext|>, not the <|im_end|> SFT taught
        if "eos_token" in cfg:
            cfg["eos_token"] = "<|endoftext|>"
        (bad / name).write_text(json.dumps(cfg))
    with pytest.raises(HandoffError, match="eos: SFT taught the model to end turns with token 2"):
        _handoff(root, common, bad, "bad_eos")


def test_context_too_short_is_refused(split_run):
    root, assets, common = split_run
    with pytest.raises(HandoffError, match="context"):
        _handoff(root, [*common, "model.rl.max_response_length=100000"], assets / "model", "short_ctx")


def test_missing_weights_are_refused(split_run, tmp_path):
    root, assets, common = split_run
    bad = shutil.copytree(assets / "model", tmp_path / "no_weights")
    (bad / "model.safetensors").unlink()
    with pytest.raises(HandoffError, match=r"weights: no \*\.safetensors / pytorch_model\*\.bin in .*no_weights"):
        _handoff(root, common, bad, "no_weights")
