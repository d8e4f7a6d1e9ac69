"""Run the configured stages in order, skipping complete ones, recording everything in the manifest.

    python -m eksft_pipeline                       # stage=all: assets split sft handoff rl eval report
    python -m eksft_pipeline stage=sft method=dft  # one stage
    python -m eksft_pipeline dry_run=true model=qwen3-8b cluster=8gpu   # print commands + configs

Launchers: `cluster.launcher=local` runs a stage in this process (stages that need torchrun or
verl's Ray trainer start those themselves); `cluster.launcher=ray` submits each stage as a Ray
task with the stage's resources (the SFT and eval stages hold the node's GPUs, the RL stage holds
none because verl's own Ray actors take them).
"""

from __future__ import annotations

import importlib
import json
import os
import socket
import sys
import time
import traceback
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from eksft_pipeline.pipeline.manifest import Manifest, config_hash, hash_path
from eksft_pipeline.pipeline.stage_api import Stage, StageContext, StageResult, apply_method_tag

REGISTRY = {
    "assets": "eksft_pipeline.data.stage:AssetsStage",
    "split": "eksft_pipeline.data.stage:SplitStage",
    "sft": "eksft_pipeline.sft.stage:SFTStage",
    "handoff": "eksft_pipeline.rl.handoff:HandoffStage",
    "rl": "eksft_pipeline.rl.stage:RLStage",
    "eval": "eksft_pipeline.eval.stage:EvalStage",
    "report": "eksft_pipeline.analysis.report:ReportStage",
}
ORDER = list(REGISTRY)


def load_stage(name: str) -> Stage:
    if name not in REGISTRY:
        raise ValueError(f"unknown stage {name!r}; known stages: {', '.join(ORDER)} (or 'all')")
    module, cls = REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _say(msg: str) -> None:
    print(f"[eksft-pipeline] {msg}", flush=True)


def _resources(stage: Stage, cfg: DictConfig) -> dict:
    res = dict(stage.resources)
    if res.get("num_gpus") == "all":
        res["num_gpus"] = int(cfg.cluster.gpus_per_node) if str(cfg.cluster.device) != "cpu" else 0
    return res


def _run_stage_in_process(stage_name: str, cfg_container: dict, run_dir: str, key: str) -> StageResult:
    cfg = OmegaConf.create(cfg_container)
    stage = load_stage(stage_name)
    ctx = StageContext(cfg=cfg, run_dir=Path(run_dir), manifest=Manifest(run_dir), key=key)
    return stage.run(ctx)


def _launch(stage: Stage, ctx: StageContext) -> StageResult:
    cfg = ctx.cfg
    if str(cfg.cluster.launcher) == "local":
        return stage.run(ctx)
    if str(cfg.cluster.launcher) != "ray":
        raise ValueError(f"cluster.launcher must be 'local' or 'ray', got {cfg.cluster.launcher!r}")
    import ray

    if not ray.is_initialized():
        init_kwargs = {"ignore_reinit_error": True, "include_dashboard": False}
        if cfg.cluster.get("ray_address"):
            init_kwargs["address"] = str(cfg.cluster.ray_address)
        elif cfg.cluster.get("ray_num_cpus"):
            init_kwargs["num_cpus"] = int(cfg.cluster.ray_num_cpus)
        env = {
            k: v
            for k, v in ctx.env().items()
            if k.startswith(("VERL_", "HF_", "WANDB_", "PYTHONPATH", "CUDA_", "TOKENIZERS"))
        }
        init_kwargs["runtime_env"] = {"env_vars": env}
        ray.init(**init_kwargs)
    res = _resources(stage, cfg)
    remote = ray.remote(**res)(_run_stage_in_process)
    cfg_container = OmegaConf.to_container(cfg, resolve=True)
    _say(f"{ctx.key}: submitted as a Ray task {res}")
    return ray.get(remote.remote(stage.name, cfg_container, str(ctx.run_dir), ctx.key))


def run_stage(name: str, cfg: DictConfig, run_dir: Path, manifest: Manifest) -> dict:
    stage = load_stage(name)
    key = stage.key(cfg)
    ctx = StageContext(cfg=cfg, run_dir=run_dir, manifest=manifest, key=key, dry_run=bool(cfg.dry_run))
    if ctx.dry_run:
        desc = stage.describe(ctx)
        print(json.dumps(desc, indent=2, default=str), flush=True)
        return {"key": key, "status": "dry-run"}

    inputs = stage.inputs(ctx)
    stage_cfg = stage.config(cfg)
    h = config_hash({"config": stage_cfg, "inputs": {k: hash_path(v) for k, v in inputs.items()}})
    done, reason = manifest.is_complete(key, h)
    if done and not cfg.force:
        _say(f"{key}: complete, skipped (outputs in {ctx.out_dir})")
        return {"key": key, "status": "skipped"}

    entry = manifest.entry(key)
    if entry and entry.get("status") == "running" and entry.get("host") == socket.gethostname():
        pid = int(entry.get("pid", -1))
        if pid != os.getpid() and pid > 0 and _pid_alive(pid):
            raise RuntimeError(f"stage {key} is already running in process {pid} (manifest {manifest.path})")
    if entry is not None:
        _say(
            f"{key}: re-running ({reason}); cleaning the previous attempt, keeping {list(stage.keep_on_retry) or 'nothing'}"
        )
        stage.clean(ctx)
    else:
        _say(f"{key}: running")
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    manifest.start(key, stage_cfg, h, inputs)
    t0 = time.time()
    try:
        result = _launch(stage, ctx)
    except BaseException as e:  # KeyboardInterrupt too: the manifest must say the attempt died
        manifest.fail(key, "".join(traceback.format_exception(e)))
        raise
    result.summary.setdefault("wall_time_s", round(time.time() - t0, 2))
    manifest.complete(key, result.outputs, result.summary)
    _say(f"{key}: complete in {time.time() - t0:.1f}s")
    return {"key": key, "status": "complete", "outputs": result.outputs, "summary": result.summary}


def stage_list(cfg: DictConfig) -> list[str]:
    names = list(cfg.stage.run)
    for n in names:
        if n not in REGISTRY:
            raise ValueError(f"unknown stage {n!r} in stage.run; known stages: {', '.join(ORDER)}")
    return names


def run_pipeline(cfg: DictConfig) -> list[dict]:
    cfg = apply_method_tag(cfg)  # variants of one recipe (method.params.rho=...) get their own stage keys
    run_dir = Path(str(cfg.run_dir)).expanduser().resolve()
    manifest = Manifest(run_dir)
    results = []
    names = stage_list(cfg)
    _say(
        f"run dir {run_dir}; stages {' -> '.join(names)}; model={cfg.model.name} method={cfg.method.name}"
        f" cluster={cfg.cluster.name}" + (" (dry run)" if cfg.dry_run else "")
    )
    for name in names:
        results.append(run_stage(name, cfg, run_dir, manifest))
    if not cfg.dry_run:
        report = [r for r in results if r["key"] == "report" and r["status"] in ("complete", "skipped")]
        if report:
            rep = manifest.entry("report") or {}
            path = (rep.get("outputs") or {}).get("report_md", {}).get("path")
            if path:
                _say(f"report: {path}")
    return results


def main_from_config(cfg: DictConfig) -> int:
    try:
        run_pipeline(cfg)
    except (FileNotFoundError, ValueError, KeyError) as e:
        _say(f"error: {e}")
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use: python -m eksft_pipeline")
