"""Parameter drift of a fine-tuned model against its reference (the paper's Appendix C figure).

For every tensor present in both checkpoints (matched by name, streamed one tensor at a time from
safetensors so an 8B pair never sits in memory at once):

    rel_norm(tensor)      = ||theta - theta_0||_2 / ||theta_0||_2
    rel_change(element)   = |theta - theta_0| / max(|theta_0|, eps)            eps = 1e-8
    frac_over[tau]        = (# elements with rel_change > tau) / (# elements)   per tensor and overall

Precision (paper App. C compares the authors' released checkpoints, which are bf16). The comparison is
always computed in fp32 arithmetic; what differs is the precision of the two weight sets compared:

    "fp32"  the tensors as stored, upcast exactly to fp32 (the SFT stage saves fp32 on CPU; a bf16 checkpoint
            upcasts exactly, so for two bf16 checkpoints this IS the bf16 comparison);
    "bf16"  both sides first rounded to bf16 (round-to-nearest-even), as the authors' bf16 checkpoints would
            be: a change smaller than half a bf16 ulp of the weight (about 2^-9 relative) disappears, so
            fractions over tau <= 1e-3 can be much lower than in fp32.

`drift.json` = {"precision": "fp32", "stored_dtype": {"model": [...], "reference": [...]}, "thresholds": [...],
"overall": {"n_params", "frac_over": {tau: f}, "rel_norm"} (fp32, as stored),
"by_precision": {"fp32": overall, "bf16": overall}, "per_tensor": {name: {"numel", "rel_norm",
"frac_over": {tau: f}}} (fp32), "reference": path, "model": path}.
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


def iter_tensors(model_dir: str | Path, *, raw: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, fp32 tensor) for every weight of a saved HF model, one at a time (`raw`: the stored dtype)."""
    model_dir = Path(model_dir)
    for f in _tensor_files(model_dir):
        if f.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(f), framework="pt") as sf:
                for name in sf.keys():
                    t = sf.get_tensor(name)
                    yield name, t if raw else t.float()
        else:
            for name, t in torch.load(f, map_location="cpu", weights_only=True).items():
                yield name, t if raw else t.float()


def _index(model_dir: Path) -> dict[str, Path]:
    out = {}
    for f in _tensor_files(model_dir):
        if f.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(f), framework="pt") as sf:
                for name in sf.keys():
                    out[name] = f
    return out


PRECISIONS = ("fp32", "bf16")


def _as(t: torch.Tensor, precision: str) -> torch.Tensor:
    """The tensor at `precision`, returned in fp32 for the arithmetic (see the module docstring)."""
    if precision == "fp32":
        return t.float()
    if precision == "bf16":
        return t.to(torch.bfloat16).float()
    raise ValueError(f"drift precision must be one of {PRECISIONS}, got {precision!r}")


class _Acc:
    """Running totals of one precision's comparison."""

    def __init__(self, thresholds: list[float]):
        self.thresholds = thresholds
        self.n = 0
        self.over = [0] * len(thresholds)
        self.diff_sq = self.ref_sq = 0.0

    def add(self, theta: torch.Tensor, theta0: torch.Tensor) -> dict:
        d = theta - theta0
        rel = d.abs() / theta0.abs().clamp_min(EPS)
        numel = theta.numel()
        over = [int((rel > t).sum().item()) for t in self.thresholds]
        dn, rn = float(d.double().pow(2).sum().item()), float(theta0.double().pow(2).sum().item())
        self.n += numel
        self.over = [a + b for a, b in zip(self.over, over)]
        self.diff_sq += dn
        self.ref_sq += rn
        return {"numel": numel, "rel_norm": math.sqrt(dn) / max(math.sqrt(rn), EPS),
                "frac_over": {str(t): o / numel for t, o in zip(self.thresholds, over)}}

    def overall(self) -> dict:
        return {"n_params": self.n, "rel_norm": math.sqrt(self.diff_sq) / max(math.sqrt(self.ref_sq), EPS),
                "frac_over": {str(t): o / self.n for t, o in zip(self.thresholds, self.over)}}


def compute_drift(model_dir: str | Path, reference_dir: str | Path, thresholds: list[float],
                  precisions: tuple[str, ...] = PRECISIONS) -> dict:
    """Drift of `model_dir` against `reference_dir` at every precision in `precisions` (see the docstring);
    the top-level `overall` / `per_tensor` are the fp32 (as stored) comparison."""
    model_dir, reference_dir = Path(model_dir), Path(reference_dir)
    thresholds = sorted(float(t) for t in thresholds)
    precisions = tuple(dict.fromkeys(("fp32", *precisions)))
    for p in precisions:
        _as(torch.zeros(1), p)  # unknown precision -> ValueError before any work
    ref = dict(iter_tensors(reference_dir, raw=True)) if not _index(reference_dir) else None
    ref_index = _index(reference_dir)
    acc = {p: _Acc(thresholds) for p in precisions}
    per_tensor: dict[str, dict] = {}
    dtypes: dict[str, set[str]] = {"model": set(), "reference": set()}
    missing: list[str] = []
    tied_skipped: list[str] = []
    for name, theta in iter_tensors(model_dir, raw=True):
        if ref is not None:
            theta0 = ref.get(name)
        elif name in ref_index:
            from safetensors import safe_open

            with safe_open(str(ref_index[name]), framework="pt") as sf:
                theta0 = sf.get_tensor(name)
        else:
            theta0 = None
        if theta0 is None:
            # tied lm_head saved on one side only is not a difference
            (tied_skipped if name.endswith("lm_head.weight") else missing).append(name)
            continue
        if theta0.shape != theta.shape:
            raise ValueError(f"drift: tensor {name} has shape {tuple(theta.shape)} vs reference {tuple(theta0.shape)}")
        dtypes["model"].add(str(theta.dtype).replace("torch.", ""))
        dtypes["reference"].add(str(theta0.dtype).replace("torch.", ""))
        for p in precisions:
            row = acc[p].add(_as(theta, p), _as(theta0, p))
            if p == "fp32":
                per_tensor[name] = row
    if missing:
        raise ValueError(f"drift: {len(missing)} tensor(s) of {model_dir} are not in the reference, e.g. {missing[:3]}")
    if acc["fp32"].n == 0:
        raise ValueError(f"drift: no tensors compared between {model_dir} and {reference_dir}")
    return {
        "model": str(model_dir),
        "reference": str(reference_dir),
        "precision": "fp32",
        "stored_dtype": {k: sorted(v) for k, v in dtypes.items()},
        "thresholds": thresholds,
        "overall": acc["fp32"].overall(),
        "by_precision": {p: a.overall() for p, a in acc.items()},
        "per_tensor": per_tensor,
        "skipped_tied": tied_skipped,
    }


def write_drift(model_dir, reference_dir, thresholds, out_path) -> dict:
    from eksft_pipeline.contract.artifacts import atomic_write_json

    d = compute_drift(model_dir, reference_dir, thresholds)
    atomic_write_json(out_path, d, indent=2)
    return d
