"""Eval sample storage: keyed by the model's CONTENT + sampling settings (not its path), parts written
atomically, a damaged part redone instead of failing every resume, force=true re-samples, and the
verifier processes gone when the stage ends. A real (untrained) tiny model sampled with HF on CPU."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest

from eksft_pipeline.contract import procs
from eksft_pipeline.contract.manifest import Manifest
from eksft_pipeline.contract.recipes import compose_pipeline
from eksft_pipeline.orchestrator.runner import run_pipeline

pytestmark = pytest.mark.slow  # HF sampling with a real (untrained) tiny model, 6 eval runs: ~1 min on 2 cores


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    from eksft_pipeline.data.tiny_assets import make_tiny_assets

    out = tmp_path_factory.mktemp("assets")
    make_tiny_assets(out, n_problems=200, n_eval_per_source=4, n_pretrain=20, pretrain=False, progress=False)
    return out


def _eval(run: Path, assets: Path, model: Path, *extra: str):
    cfg = compose_pipeline(
        "stage=eval", "init=base", "eval.targets=[base]", f"run_dir={run}", f"model.assets_dir={assets}",
        f"model.path={model}", "model.eval.max_problems=2", "model.eval.n_samples=2",
        "model.eval.max_response_length=6", "model.eval.pass_k=[1,2]", "eval.bootstrap=10", *extra,
    )  # fmt: skip
    res = run_pipeline(cfg)
    assert res[0]["status"] == "complete"
    assert procs.find({procs.ENV_RUN_DIR: str(run.resolve())}) == []  # no verifier worker left behind
    return res[0]


def _samples(run: Path) -> pd.DataFrame:
    return pd.read_parquet(run / "eval" / "base" / "base" / "samples.parquet")


def test_samples_are_keyed_by_model_content_and_damaged_parts_are_redone(assets, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(assets / "model", model)
    run = tmp_path / "run"
    _eval(run, assets, model)
    first = _samples(run)
    parts = sorted((run / "eval" / "base" / "base" / "samples").glob("part-*.parquet"))
    assert len(parts) == 4 and len(first) == 8  # one part per completed problem (2 benchmarks x 2 problems)
    capsys.readouterr()

    # a part cut short by a kill (and a temporary a killed writer left): detected, removed, that problem redone
    data = parts[1].read_bytes()
    parts[1].write_bytes(data[: len(data) // 2])
    (parts[0].parent / ".part-000009.parquet.tmp-12345").write_bytes(b"PAR1 half")
    _eval(run, assets, model, "eval.bootstrap=20")  # another config: saved samples kept (same model, same settings)
    out = capsys.readouterr().out
    assert f"{parts[1].name} is unreadable" in out and "sampling 1 problems" in out
    pd.testing.assert_frame_equal(_samples(run), first)  # the redone problem has the same seeded samples
    assert not list(parts[0].parent.glob(".*"))

    # same path, different weights: the old samples must not be reported for the new model
    import torch
    from safetensors.torch import load_file, save_file

    w = load_file(str(model / "model.safetensors"))
    save_file({k: (v + 0.5 * torch.randn_like(v) if v.is_floating_point() else v) for k, v in w.items()},
              str(model / "model.safetensors"), metadata={"format": "pt"})
    _eval(run, assets, model, "eval.bootstrap=20")
    out = capsys.readouterr().out
    assert "discarding saved samples" in out and "sampling 4 problems" in out
    assert not _samples(run)["completion"].equals(first["completion"])

    # force=true re-samples even with everything unchanged
    _eval(run, assets, model, "eval.bootstrap=20", "force=true")
    assert "sampling 4 problems" in capsys.readouterr().out
    # unchanged and not forced: complete, skipped
    assert run_pipeline(compose_pipeline(
        "stage=eval", "init=base", "eval.targets=[base]", f"run_dir={run}", f"model.assets_dir={assets}",
        f"model.path={model}", "model.eval.max_problems=2", "model.eval.n_samples=2",
        "model.eval.max_response_length=6", "model.eval.pass_k=[1,2]", "eval.bootstrap=20"))[0]["status"] == "skipped"
    assert Manifest(run).entry("eval/base")["status"] == "complete"


def test_same_model_at_another_path_reuses_the_samples(assets, tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(assets / "model", a)
    shutil.copytree(assets / "model", b)
    (b / "EXPORTED_FROM").write_text("somewhere else\n")  # provenance notes are not part of the key
    run = tmp_path / "run"
    _eval(run, assets, a)
    capsys.readouterr()
    _eval(run, assets, b)
    assert "all samples present" in capsys.readouterr().out
