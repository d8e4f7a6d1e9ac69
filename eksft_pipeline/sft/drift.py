"""Parameter drift of a fine-tuned model against its reference (the paper's Appendix C figure).

For every tensor present in both checkpoints (matched by name, streamed one tensor at a time from
safetensors so an 8B pair never sits in memory at once):

    rel_norm(tensor)      = ||theta - theta_0||_2 / ||theta_0||_2
    rel_change(element)   = |theta - theta_0| / max(|theta_0|, eps)            eps = 1e-8
    frac_over[tau]        = (# elements with rel_change > tau) / (# elements)   per tensor and overall

`drift.json` = {"thresholds": [...], "overall": {"n_params", "frac_over": {tau: f}, "rel_norm"},
"per_tensor": {name: {"numel", "rel_norm", "frac_over": {tau: f}}}, "reference": path, "model": path}.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import torch

EPS = 1e-8


def _tensor_files(model_dir: Path) -> list[Path]:
    files = sorted(model_dir.glob("*.safetensors"))
    if files:
        return files
    bins = sorted(model_dir.glob("pytorch_model*.bin"))
    if bins:
        return bins
    raise FileNotFoundError(f"no *.safetensors or pytorch_model*.bin weights in {model_dir}")


def iter_tensors(model_dir: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, fp32 tensor) for every weight of a saved HF model, one at a time."""
    model_dir = Path(model_dir)
    for f in _tensor_files(model_dir):
        if f.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(f), framework="pt") as sf:
                for name in sf.keys():
                    yield name, sf.get_tensor(name).float()
        else:
            for name, t in torch.load(f, map_location="cpu", weights_only=True).items():
                yield name, t.float()


def _index(model_dir: Path) -> dict[str, Path]:
    out = {}
    for f in _tensor_files(model_dir):
        if f.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(f), framework="pt") as sf:
                for name in sf.keys():
                    out[name] = f
    return out


def compute_drift(model_dir: str | Path, reference_dir: str | Path, thresholds: list[float]) -> dict:
    model_dir, reference_dir = Path(model_dir), Path(reference_dir)
    thresholds = sorted(float(t) for t in thresholds)
    ref = dict(iter_tensors(reference_dir)) if not _index(reference_dir) else None
    ref_index = _index(reference_dir)
    per_tensor: dict[str, dict] = {}
    n_total = 0
    over_total = [0] * len(thresholds)
    diff_sq = ref_sq = 0.0
    missing: list[str] = []
    tied_skipped: list[str] = []
    for name, theta in iter_tensors(model_dir):
        if ref is not None:
            theta0 = ref.get(name)
        elif name in ref_index:
            from safetensors import safe_open

            with safe_open(str(ref_index[name]), framework="pt") as sf:
                theta0 = sf.get_tensor(name).float()
        else:
            theta0 = None
        if theta0 is None:
            # tied lm_head saved on one side only is not a difference
            (tied_skipped if name.endswith("lm_head.weight") else missing).append(name)
            continue
        if theta0.shape != theta.shape:
            raise ValueError(f"drift: tensor {name} has shape {tuple(theta.shape)} vs reference {tuple(theta0.shape)}")
        d = theta - theta0
        rel = d.abs() / theta0.abs().clamp_min(EPS)
        numel = theta.numel()
        over = [int((rel > t).sum().item()) for t in thresholds]
        dn, rn = float(d.pow(2).sum().item()), float(theta0.pow(2).sum().item())
        per_tensor[name] = {
            "numel": numel,
            "rel_norm": math.sqrt(dn) / max(math.sqrt(rn), EPS),
            "frac_over": {str(t): o / numel for t, o in zip(thresholds, over)},
        }
        n_total += numel
        over_total = [a + b for a, b in zip(over_total, over)]
        diff_sq += dn
        ref_sq += rn
    if missing:
        raise ValueError(f"drift: {len(missing)} tensor(s) of {model_dir} are not in the reference, e.g. {missing[:3]}")
    if n_total == 0:
        raise ValueError(f"drift: no tensors compared between {model_dir} and {reference_dir}")
    return {
        "model": str(model_dir),
        "reference": str(reference_dir),
        "thresholds": thresholds,
        "overall": {
            "n_params": n_total,
            "rel_norm": math.sqrt(diff_sq) / max(math.sqrt(ref_sq), EPS),
            "frac_over": {str(t): o / n_total for t, o in zip(thresholds, over_total)},
        },
        "per_tensor": per_tensor,
        "skipped_tied": tied_skipped,
    }


def write_drift(model_dir, reference_dir, thresholds, out_path) -> dict:
    from eksft_pipeline.pipeline.artifacts import atomic_write_json

    d = compute_drift(model_dir, reference_dir, thresholds)
    atomic_write_json(out_path, d, indent=2)
    return d
