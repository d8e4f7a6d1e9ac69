"""Collect what the stages of one or more run directories wrote, through their manifests.

A run directory (`runs/<model>`) holds every method of a sweep: `sft/<method>`, `rl/<init>`,
`eval/<init>/<target>/metrics.json`. Nothing here imports a stage: everything is read from the
files the manifest lists.

`source="tracker"` (`report.source=tracker`): the SFT and DAPO training curves come from each stage's tracker
run instead (its manifest `tracking` record; W&B history read from the local `.wandb` files,
contract/tracking.py `history`). A stage without a readable tracker run falls back to its metrics file, and
`RunData.tracker_notes` says which stages did.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eksft_pipeline.contract.manifest import resolve_recorded

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
    split_run_dir: str | None = None  # the run directory `split` came from (its run-format record: ctx.run_format)
    tracking_groups: dict[str, str] = field(default_factory=dict)  # run dir -> its tracker group (tracking on)
    tracker_notes: list[str] = field(default_factory=list)  # source="tracker": where each curve came from


def _load_json(path: str | Path) -> Any:
    """A JSON file; a file that does not parse is named in the error (ValueError)."""
    try:
        return json.loads(Path(path).read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); re-run the stage that wrote it") from None


def _steps(d: dict) -> dict[int, dict]:
    return {int(k): v for k, v in sorted(d.items(), key=lambda kv: int(kv[0]))}


def _curves(rd: str, key: str, entry: dict, outs: dict, source: str, data: RunData) -> dict[int, dict] | None:
    """step -> metrics of a training stage, from the tracker (source="tracker") or its metrics file."""
    if source == "tracker":
        from eksft_pipeline.contract.tracking import history

        rec = entry.get("tracking")
        why = "no tracker run recorded"
        if rec:
            try:
                steps = history(rec, Path(rd))
                if steps:
                    data.tracker_notes.append(f"{key}: tracker run {rec['run_id']} ({len(steps)} steps)")
                    return steps
                why = f"tracker run {rec['run_id']} has no history"
            except (FileNotFoundError, ValueError) as e:
                why = str(e)
        data.tracker_notes.append(f"{key}: metrics file ({why})")
    if "metrics" in outs and Path(outs["metrics"]).exists():
        return _steps(_load_json(outs["metrics"]))
    return None


def gather(run_dirs: list[str | Path], source: str = "files") -> RunData:
    """Read every complete stage of every run directory. A missing manifest is an error."""
    if source not in ("files", "tracker"):
        raise ValueError(f"report.source={source!r} must be 'files' or 'tracker'")
    data = RunData(run_dirs=[str(Path(r).resolve()) for r in run_dirs])
    for rd in data.run_dirs:
        mpath = Path(rd) / "manifest.json"
        if not mpath.exists():
            raise FileNotFoundError(f"no manifest.json in run directory {rd}: nothing to report")
        manifest = _load_json(mpath)
        if manifest.get("tracking_group"):
            data.tracking_groups[rd] = str(manifest["tracking_group"])
        stages = manifest.get("stages", {})
        for key, entry in sorted(stages.items()):
            data.stages[f"{rd}::{key}"] = entry
            if entry.get("status") != "complete":
                continue
            # recorded relative to the run dir (contract/manifest.py): a moved or copied run reads its own files
            outs = {k: resolve_recorded(rd, v["path"]) for k, v in (entry.get("outputs") or {}).items()}
            kind, _, tag = key.partition("/")
            if kind == "split" and data.split is None:
                data.split = entry.get("summary", {})
                data.split_run_dir = rd
                if "sft_train" in outs:
                    data.split = {**data.split, "sft_train": outs["sft_train"]}
            elif kind == "assets" and "model" in outs:
                data.models.setdefault("base", outs["model"])
            elif kind == "sft":
                method = (entry.get("config") or {}).get("method")
                if isinstance(method, dict):
                    data.method_cfg[tag] = method
                curves = _curves(rd, key, entry, outs, source, data)
                if curves is not None:
                    data.sft_metrics[tag] = curves
                if "drift" in outs and Path(outs["drift"]).exists():
                    data.drift[tag] = _load_json(outs["drift"])
                if "hf_model" in outs:
                    data.models[f"{tag} (SFT)"] = outs["hf_model"]
            elif kind == "rl":
                curves = _curves(rd, key, entry, outs, source, data)
                if curves is not None:
                    data.rl_metrics[tag] = curves
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
