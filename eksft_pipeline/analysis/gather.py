"""Collect what the stages of one or more run directories wrote, through their manifests.

A run directory (`runs/<model>`) holds every method of a sweep: `sft/<method>`, `rl/<init>`,
`eval/<init>/<target>/metrics.json`. Nothing here imports a stage: everything is read from the
files the manifest lists.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eksft_pipeline.pipeline.manifest import resolve_recorded

TARGET_LABEL = {"base": "base", "sft": "SFT", "rl": "SFT→RL"}


@dataclass
class EvalResult:
    """One evaluated model: `init` (method tag), `target` (base / sft / rl), its metrics.json."""

    run_dir: str
    init: str
    target: str
    metrics: dict[str, Any]

    @property
    def label(self) -> str:
        if self.target == "base":
            return "base"
        return f"{self.init} ({TARGET_LABEL.get(self.target, self.target)})"

    @property
    def benchmarks(self) -> dict[str, dict]:
        return self.metrics["benchmarks"]

    @property
    def sampling(self) -> dict[str, Any]:
        return self.metrics.get("sampling", {})


@dataclass
class RunData:
    run_dirs: list[str]
    stages: dict[str, dict] = field(default_factory=dict)  # "<run_dir>::<key>" -> manifest entry
    evals: list[EvalResult] = field(default_factory=list)
    sft_metrics: dict[str, dict[int, dict]] = field(default_factory=dict)  # method -> step -> metrics
    drift: dict[str, dict] = field(default_factory=dict)  # method -> drift.json
    rl_metrics: dict[str, dict[int, dict]] = field(default_factory=dict)  # init -> step -> metrics
    models: dict[str, str] = field(default_factory=dict)  # label -> HF dir (for the case study)
    # method tag -> the method node its SFT stage ran with (name = tag, loss, params, ...): how the report
    # groups the variants of one recipe (a multirun over method.params.rho) into one table
    method_cfg: dict[str, dict] = field(default_factory=dict)
    split: dict[str, Any] | None = None


def _load_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def _steps(d: dict) -> dict[int, dict]:
    return {int(k): v for k, v in sorted(d.items(), key=lambda kv: int(kv[0]))}


def gather(run_dirs: list[str | Path]) -> RunData:
    """Read every complete stage of every run directory. A missing manifest is an error."""
    data = RunData(run_dirs=[str(Path(r).resolve()) for r in run_dirs])
    for rd in data.run_dirs:
        mpath = Path(rd) / "manifest.json"
        if not mpath.exists():
            raise FileNotFoundError(f"no manifest.json in run directory {rd}: nothing to report")
        stages = _load_json(mpath).get("stages", {})
        for key, entry in sorted(stages.items()):
            data.stages[f"{rd}::{key}"] = entry
            if entry.get("status") != "complete":
                continue
            # recorded relative to the run dir (pipeline/manifest.py): a moved or copied run reads its own files
            outs = {k: resolve_recorded(rd, v["path"]) for k, v in (entry.get("outputs") or {}).items()}
            kind, _, tag = key.partition("/")
            if kind == "split" and data.split is None:
                data.split = entry.get("summary", {})
                if "sft_train" in outs:
                    data.split = {**data.split, "sft_train": outs["sft_train"]}
            elif kind == "assets" and "model" in outs:
                data.models.setdefault("base", outs["model"])
            elif kind == "sft":
                method = (entry.get("config") or {}).get("method")
                if isinstance(method, dict):
                    data.method_cfg[tag] = method
                if "metrics" in outs and Path(outs["metrics"]).exists():
                    data.sft_metrics[tag] = _steps(_load_json(outs["metrics"]))
                if "drift" in outs and Path(outs["drift"]).exists():
                    data.drift[tag] = _load_json(outs["drift"])
                if "hf_model" in outs:
                    data.models[f"{tag} (SFT)"] = outs["hf_model"]
            elif kind == "rl":
                if "metrics" in outs and Path(outs["metrics"]).exists():
                    data.rl_metrics[tag] = _steps(_load_json(outs["metrics"]))
                if "hf_model" in outs:
                    data.models[f"{tag} (SFT→RL)"] = outs["hf_model"]
            elif kind == "eval":
                for name, path in sorted(outs.items()):
                    if name.endswith("_metrics") and Path(path).exists():
                        m = _load_json(path)
                        data.evals.append(EvalResult(rd, tag, m.get("target", name[: -len("_metrics")]), m))
    data.evals = _one_base(data.evals)
    return data


def _one_base(evals: list[EvalResult]) -> list[EvalResult]:
    """The base model is the same for every method: keep one `base` row per sampling setting and model."""
    seen, out = set(), []
    for e in evals:
        if e.target == "base":
            key = (e.metrics.get("model"), json.dumps(e.sampling, sort_keys=True, default=str))
            if key in seen:
                continue
            seen.add(key)
        out.append(e)
    return out
