"""Stage `sft`: the chosen loss as a verl FSDP SFT run; output = an HF model dir + drift.json.

    python -m eksft_pipeline stage=sft method=eksft            # CPU default (tiny model)
    python -m eksft_pipeline stage=sft method=sft model=qwen3-8b cluster=8gpu

Steps: compose recipes/verl/sft.yaml on verl's sft_trainer_engine config, merge the recipes'
`sft.verl` blocks (paper defaults <- model <- cluster) and the method, validate against verl's
dataclasses, write `<run_dir>/sft/<method>/verl_sft.yaml`, launch
`torchrun -m eksft_pipeline.sft.verl_main` on it, then export the last checkpoint's `huggingface/`
directory to `hf_model/` (weights, tokenizer, chat template, generation config) and write
`drift.json` against the reference model.

Resume: checkpoints live in `checkpoints/` (kept when a killed attempt is cleaned) and verl's
`resume_mode=auto` continues from `latest_checkpointed_iteration.txt`. Metrics of every attempt are
appended to their own `logs/metrics-<time>.jsonl` (verl's file logger truncates its file).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf, open_dict

from eksft_pipeline.pipeline.artifacts import export_hf_model, tail, tee
from eksft_pipeline.pipeline.stage_api import Stage, StageContext, StageResult
from eksft_pipeline.pipeline.verl_config import compose_verl, strict_merge, validate_sft_config
from eksft_pipeline.sft.selection import validate_sft_block

CONFIG_NAME = "verl_sft"


def _plain(node):
    return OmegaConf.to_container(node, resolve=True) if node is not None else None


def _check_loss(name: str, params) -> None:
    """Build the loss once here, so an unknown method or parameter fails before torchrun starts."""
    from eksft_pipeline.losses import get_loss

    try:
        get_loss(str(name), **(_plain(params) or {}))
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"method recipe: {e}") from e


def read_metrics(log_dir: Path) -> dict[int, dict]:
    """step -> metrics, merged over attempts (a later attempt's value for a step wins)."""
    steps: dict[int, dict] = {}
    for f in sorted(log_dir.glob("metrics-*.jsonl")):
        for line in f.read_text().splitlines():
            if not line.strip():
                continue
            rec = json.loads(line)
            steps.setdefault(int(rec["step"]), {}).update(rec["data"])
    return dict(sorted(steps.items()))


class SFTStage(Stage):
    name = "sft"
    keep_on_retry = ("checkpoints", "logs")
    resources = {"num_cpus": 1, "num_gpus": "all"}

    def key(self, cfg):
        return f"sft/{cfg.method.name}"

    def config(self, cfg):
        return {
            "model": {"name": cfg.model.name, "path": str(cfg.model.path), "sft": _plain(cfg.model.get("sft"))},
            "method": _plain(cfg.method),
            "sft": _plain(cfg.sft),
            "cluster": {
                "device": cfg.cluster.device,
                "gpus_per_node": cfg.cluster.gpus_per_node,
                "sft": _plain(cfg.cluster.get("sft")),
            },
            "seed": int(cfg.seed),
        }

    def _train_file(self, ctx: StageContext) -> str:
        if ctx.dry_run:
            return str(ctx.run_dir / "split" / "sft_train.parquet")
        return ctx.upstream("split")["sft_train"]

    def inputs(self, ctx):
        inp = {"sft_train": self._train_file(ctx)}
        if Path(str(ctx.cfg.model.path)).exists():
            inp["model"] = str(ctx.cfg.model.path)
        return inp

    # -- config -----------------------------------------------------------------------------------
    def verl_config(self, ctx: StageContext):
        cfg = ctx.cfg
        vc = compose_verl("sft")
        for where, block in (
            ("sft.verl", cfg.sft.get("verl")),
            ("model.sft.verl", (cfg.model.get("sft") or {}).get("verl")),
            ("cluster.sft.verl", (cfg.cluster.get("sft") or {}).get("verl")),
        ):
            strict_merge(vc, block, where=where)
        out = ctx.out_dir
        model_path = (
            str(Path(str(cfg.model.path)).resolve()) if Path(str(cfg.model.path)).exists() else str(cfg.model.path)
        )
        with open_dict(vc):
            vc.model.path = model_path
            vc.data.train_files = self._train_file(ctx)
            vc.data.val_files = None
            vc.trainer.default_local_dir = str(out / "checkpoints")
            vc.trainer.project_name = "eksft-pipeline"
            vc.trainer.experiment_name = f"{cfg.model.name}-sft-{cfg.method.name}"
            vc.trainer.n_gpus_per_node = int(cfg.sft.nproc_per_node)
            vc.trainer.nnodes = int(cfg.cluster.nnodes)
            vc.eksft.loss = str(cfg.method.loss)
            vc.eksft.loss_params = _plain(cfg.method.get("params")) or {}
            vc.eksft.selection_scope = str(cfg.method.get("selection_scope", "global_batch"))
            vc.eksft.updates_per_batch = int(cfg.method.get("updates_per_batch", 1))
        validate_sft_config(vc)
        _check_loss(vc.eksft.loss, vc.eksft.loss_params)
        validate_sft_block(vc)  # selection scope / head / updates: fail here, not inside torchrun
        return vc

    def command(self, ctx: StageContext) -> list[str]:
        out = ctx.out_dir
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={int(ctx.cfg.sft.nproc_per_node)}",
            "-m",
            "eksft_pipeline.sft.verl_main",
            f"--config-path={out}",
            f"--config-name={CONFIG_NAME}",
            f"hydra.run.dir={out / 'logs' / 'hydra'}",
            "hydra.output_subdir=null",
        ]

    def describe(self, ctx):
        vc = self.verl_config(ctx)
        return {
            "stage": "sft",
            "key": ctx.key,
            "command": " ".join(self.command(ctx)),
            "env": {k: v for k, v in ctx.env().items() if k.startswith(("VERL_", "CUDA_", "HF_", "WANDB_"))},
            "verl_config": OmegaConf.to_container(vc, resolve=True),
        }

    # -- run --------------------------------------------------------------------------------------
    def run(self, ctx: StageContext) -> StageResult:
        cfg = ctx.cfg
        out = ctx.out_dir
        out.mkdir(parents=True, exist_ok=True)
        vc = self.verl_config(ctx)
        OmegaConf.save(vc, out / f"{CONFIG_NAME}.yaml", resolve=True)

        stamp = time.strftime("%Y%m%d-%H%M%S")
        env = ctx.env()
        env["VERL_FILE_LOGGER_PATH"] = str(out / "logs" / f"metrics-{stamp}.jsonl")
        env.setdefault("VERL_SFT_LOGGING_LEVEL", "WARN")
        log = out / "logs" / f"train-{stamp}.log"
        rc = tee(self.command(ctx), env, log)
        if rc != 0:
            raise RuntimeError(f"verl SFT (torchrun) exited with code {rc}; log {log}; last lines:\n{tail(log)}")

        hf_dir = export_hf_model(out / "checkpoints", out / "hf_model", base_model=str(cfg.model.path), subdir="huggingface")
        from eksft_pipeline.models.hub import resolve_model_dir
        from eksft_pipeline.sft.drift import write_drift

        ref = vc.eksft.get("ref_model_path") or str(cfg.model.path)
        drift = write_drift(hf_dir, resolve_model_dir(ref), list(cfg.sft.drift_thresholds), out / "drift.json")

        metrics = read_metrics(out / "logs")
        if not metrics:
            raise RuntimeError(f"verl SFT finished but logged no metrics under {out / 'logs'}")
        last_step = max(metrics)
        first = metrics[min(metrics)]
        last = metrics[last_step]
        summary = {
            "steps": last_step,
            "loss_first": first.get("train/loss"),
            "loss_last": last.get("train/loss"),
            "drift_rel_norm": drift["overall"]["rel_norm"],
            "drift_frac_over": drift["overall"]["frac_over"],
        }
        for k, v in last.items():
            if k.startswith("eksft/"):
                summary[k] = v
        (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
        return StageResult(
            outputs={
                "hf_model": str(hf_dir),
                "drift": str(out / "drift.json"),
                "metrics": str(out / "metrics.json"),
                "verl_config": str(out / f"{CONFIG_NAME}.yaml"),
            },
            summary=summary,
        )
