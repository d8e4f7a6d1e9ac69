"""Parameter drift (paper App. C) at fp32 (as stored) and bf16 (the authors' checkpoint precision), hand-computed."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from eksft_pipeline.sft.drift import compute_drift, write_drift


def _save(d, tensors):
    d.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(d / "model.safetensors"))
    return d


def test_fp32_and_bf16_drift_by_hand(tmp_path):
    theta0 = torch.tensor([1.0, 2.0, -4.0, 0.5])
    # relative changes 1e-4, 0.25, 0, 2e-3; in bf16 (8 significant bits) 1.0001 -> 1.0 and 0.501 -> 0.5
    theta = torch.tensor([1.0001, 2.5, -4.0, 0.501])
    ref = _save(tmp_path / "ref", {"w": theta0})
    model = _save(tmp_path / "model", {"w": theta, "lm_head.weight": torch.ones(2)})
    d = compute_drift(model, ref, [1e-5, 1e-3, 0.1])
    assert d["precision"] == "fp32" and d["stored_dtype"] == {"model": ["float32"], "reference": ["float32"]}
    fp32, bf16 = d["by_precision"]["fp32"], d["by_precision"]["bf16"]
    assert fp32 == d["overall"] and fp32["n_params"] == 4
    assert fp32["frac_over"] == {"1e-05": 0.75, "0.001": 0.5, "0.1": 0.25}
    assert bf16["frac_over"] == {"1e-05": 0.25, "0.001": 0.25, "0.1": 0.25}
    norm0 = math.sqrt(1 + 4 + 16 + 0.25)
    assert bf16["rel_norm"] == pytest.approx(0.5 / norm0, rel=1e-6)
    assert fp32["rel_norm"] == pytest.approx(math.sqrt(1e-4 ** 2 + 0.25 + 1e-3 ** 2) / norm0, rel=1e-4)
    assert d["skipped_tied"] == ["lm_head.weight"]


def test_bf16_checkpoints_compare_the_same_at_both_precisions(tmp_path):
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(64, generator=g).to(torch.bfloat16)
    w = (w0.float() * 1.01).to(torch.bfloat16)
    d = compute_drift(_save(tmp_path / "m", {"w": w}), _save(tmp_path / "r", {"w": w0}), [1e-3])
    assert d["stored_dtype"] == {"model": ["bfloat16"], "reference": ["bfloat16"]}
    assert d["by_precision"]["bf16"] == d["by_precision"]["fp32"]


def test_write_drift_and_errors(tmp_path):
    ref = _save(tmp_path / "ref", {"w": torch.ones(3)})
    out = tmp_path / "drift.json"
    write_drift(_save(tmp_path / "m", {"w": torch.full((3,), 2.0)}), ref, [0.5], out)
    assert json.loads(out.read_text())["by_precision"]["bf16"]["frac_over"] == {"0.5": 1.0}
    with pytest.raises(ValueError, match="precision must be one of"):
        compute_drift(tmp_path / "m", ref, [0.5], precisions=("fp16",))
    with pytest.raises(ValueError, match="not in the reference"):
        compute_drift(_save(tmp_path / "x", {"v": torch.ones(3)}), ref, [0.5])
