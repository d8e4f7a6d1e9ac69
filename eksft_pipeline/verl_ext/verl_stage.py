"""One base for the two stages that train inside verl, both Ray jobs: `sft` (verl's Ray SFT trainer, FSDP workers)
and `rl` (verl's `main_ppo`, DAPO).

    python -m eksft_pipeline stage=sft method=eksft      # eksft_pipeline/sft/stage.py: SFTStage(VerlTrainingStage)
    python -m eksft_pipeline stage=rl init=eksft         # eksft_pipeline/rl/stage.py:  RLStage(VerlTrainingStage)

What both do, here once:

- config layering (later wins): `recipes/verl/<recipe>.yaml` on verl's own YAML <- `<block>.verl` <-
  `model.<block>.verl` <- `cluster.<block>.verl` <- the command line's overrides of those keys (`strict_merge`:
  a key verl does not have is an error naming it; keys the stage owns are refused on the command line);
- experiment tracking (contract/tracking.py): the tracker backends appended to verl's `trainer.logger`, verl's
  `trainer.project_name` / `experiment_name` set to the run's project and name (`sft/eksft`, `rl/eksft`:
  verl passes them to `wandb.init` explicitly), and the rest of the identity (group, run id, resume, job type,
  folders) in the environment of verl's processes (`tracking_env`), which verl's `wandb.init` and its
  TensorBoard writer read. Tracking off: names and logger exactly as before;
- the verl config written atomically next to the stage's outputs;
- the training run: resume point checked, "already finished under this config" honoured, verl's output teed
  to `logs/train-<time>.log` with a progress line (and an optional stall watchdog), `.training_done` marked;
- the export of the last checkpoint's HF folder to `hf_model/`, and the metrics of every attempt merged into
  `metrics.json`.

The subclasses keep what differs: the verl recipe and its owned keys, the files and launch command, memory
estimate, validation and the stage's own outputs (drift for SFT, the validation parquet for RL).
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from eksft_pipeline.contract import procs
from eksft_pipeline.contract.artifacts import (
    StepProgress,
    atomic_path,
    atomic_write_json,
    check_resume_point,
    export_hf_model,
    log_cause,
    mark_training_done,
    read_metric_logs,
    tail,
    tee,
    training_done,
)
from eksft_pipeline.contract.stage_api import PipelineError, Stage, StageContext
from eksft_pipeline.contract.tracking import identity_of, verl_env, verl_logger, verl_trainer_names
from eksft_pipeline.verl_ext.verl_config import command_line_blocks, compose_verl, strict_merge

PROJECT_NAME = "eksft-pipeline"  # verl's trainer.project_name when tracking is off
# stage variables forwarded to every Ray worker of a job (besides the keys of cluster.env and <block>.env)
RAY_ENV_PREFIXES = ("VERL_", "HF_", "WANDB_", "TOKENIZERS_", "TRANSFORMERS_", "NCCL_", "VLLM_", "PYTHONPATH",
                    "OMP_NUM_THREADS", "EKSFT_", "TENSORBOARD_DIR")
RAY_ENV_NEVER = frozenset({"CUDA_VISIBLE_DEVICES"})  # Ray sets it per worker from the GPUs it assigns
# secrets are not written into the run's verl config: give them to the Ray cluster's own environment
SECRET_SUFFIXES = ("_TOKEN", "_API_KEY", "_KEY", "_SECRET", "_PASSWORD")


def hydra_quote(value: str) -> str:
    """`value` as one quoted Hydra override value (verl's entry points parse their command line with Hydra): a
    path with spaces, quotes, `=`, brackets or non-ASCII letters is otherwise a LexerNoViableAltException.

    Hydra's quoted strings treat a backslash as an escape only before a quote or the closing quote, so exactly
    those backslash runs are doubled; `${` is escaped so OmegaConf does not read it as an interpolation."""
    out = re.sub(r"(\\*)'", lambda m: m.group(1) * 2 + "\\'", str(value))
    out = re.sub(r"(\\+)$", lambda m: m.group(1) * 2, out)
    out = out.replace("${", "\\${")
    return f"'{out}'"


class VerlTrainingStage(Stage):
    """Base of the `sft` and `rl` stages (see the module docstring)."""

    keep_on_retry = ("checkpoints", "logs")
    tracked = True  # gets a tracker run when tracking is on (contract/tracking.py)
    recipe: str = ""  # recipes/verl/<recipe>.yaml
    block: str = ""  # the pipeline keys holding verl overrides: <block>.verl, model.<block>.verl, cluster.<block>.verl
    config_name: str = ""  # <out_dir>/<config_name>.yaml
    owned: dict[str, str] = {}  # verl keys the stage sets itself -> the pipeline key that controls each
    hf_subdir: str = "huggingface"  # the HF folder inside a verl checkpoint
    what: str = "verl"  # how errors name the training process

    # -- config -----------------------------------------------------------------------------------
    def compose(self, ctx: StageContext, overrides: list[str] | None = None):
        """verl's YAML + recipes/verl/<recipe>.yaml (Hydra `overrides`), then the recipes' layers and the command
        line's values, each merged strictly."""
        cfg, b = ctx.cfg, self.block
        vc = compose_verl(self.recipe, overrides or [])
        reference = OmegaConf.to_container(vc, resolve=False)
        for where, block in (
            (f"{b}.verl", cfg[b].get("verl")),
            (f"model.{b}.verl", (cfg.model.get(b) or {}).get("verl")),
            (f"cluster.{b}.verl", (cfg.cluster.get(b) or {}).get("verl")),
            *command_line_blocks(cfg, f"{b}.verl", f"model.{b}.verl", f"cluster.{b}.verl", owned=self.owned),
        ):
            strict_merge(vc, block, where=where)
        # every value the layers changed: the type verl's dataclass field (or the recipe's value) has, and the
        # range verl's code assumes -- `optim.lr=abc` fails here, not in AdamW after the old outputs were removed
        from eksft_pipeline.contract.errors import ConfigError
        from eksft_pipeline.verl_ext.validate import check_verl_values

        try:
            check_verl_values(vc, reference, where=f"{b}.verl")
        except ValueError as e:
            raise ConfigError(str(e)) from None
        return vc

    def experiment_name(self, ctx: StageContext) -> str:
        """verl's `trainer.experiment_name` when tracking is off."""
        return f"{ctx.cfg.model.name}-{ctx.key.replace('/', '-')}"

    def set_trainer_names(self, ctx: StageContext, vc) -> None:
        """`trainer.project_name`, `experiment_name` and `logger` (inside `open_dict`): the tracker's run when on."""
        ident = identity_of(ctx)
        names = verl_trainer_names(ident)
        vc.trainer.project_name = names.get("project_name", PROJECT_NAME)
        vc.trainer.experiment_name = names.get("experiment_name", self.experiment_name(ctx))
        vc.trainer.logger = verl_logger(list(vc.trainer.get("logger") or ["console"]), ident)

    def tracking_env(self, ctx: StageContext) -> dict[str, str]:
        """WANDB_* / TENSORBOARD_DIR for verl's processes (empty when tracking is off)."""
        return verl_env(identity_of(ctx), create=not ctx.dry_run)

    def ray_env_vars(self, ctx: StageContext, env: dict[str, str]) -> dict[str, str]:
        """The part of the stage environment every Ray worker of the job must see, for `runtime_env.env_vars`: on a
        cluster someone else started, workers are children of that cluster's raylets and do not inherit this
        process's environment. The keys of `cluster.env` and `<block>.env`, and the prefixes above; never
        `CUDA_VISIBLE_DEVICES` (Ray assigns it per worker) nor secrets (they would be written into the config)."""
        cluster_env = OmegaConf.to_container(ctx.cfg.cluster.get("env"), resolve=True) if ctx.cfg.cluster.get("env") else {}
        block_env = (ctx.cfg.get(self.block) or {}).get("env")
        keys = set(cluster_env or {}) | set(OmegaConf.to_container(block_env, resolve=True) if block_env else {})
        keys |= {k for k in env if k.startswith(RAY_ENV_PREFIXES)}
        # the run's ids (contract/procs.py) are no secret: with them the watchdog finds the job's workers on a cluster
        # it did not start (EKSFT_RUN_TOKEN would otherwise fall under the `_TOKEN` rule)
        ids = {procs.ENV_TOKEN, procs.ENV_RUN_DIR, procs.ENV_STAGE}
        return {k: str(env[k]) for k in sorted(keys) if k in env and k not in RAY_ENV_NEVER
                and (k in ids or not k.upper().endswith(SECRET_SUFFIXES))}

    @staticmethod
    def write_config(vc, path: Path) -> None:
        with atomic_path(path) as tmp:
            OmegaConf.save(vc, tmp, resolve=True)

    # -- run --------------------------------------------------------------------------------------
    def note_resume_point(self, ctx: StageContext) -> None:
        note = check_resume_point(ctx.out_dir / "checkpoints")
        if note:
            print(f"[{ctx.key}] {note}", flush=True)

    def train(self, ctx: StageContext, command: list[str], env: dict[str, str], log: Path, progress: StepProgress,
              watchdog=None) -> None:
        """Run verl (unless training under this config already finished), teeing its output to `log`."""
        ckpt = ctx.out_dir / "checkpoints"
        done = training_done(ckpt)
        if done is not None:
            print(f"[{ctx.key}] training under this config already finished at step {done}; exporting only", flush=True)
            return
        rc = tee(command, env, log, watchdog=watchdog, progress=progress)
        if rc != 0:
            cause = log_cause(log)
            if cause is None:
                raise PipelineError(f"{self.what} exited with code {rc}; no Python exception in its log {log} "
                                    "(last lines above); fix it and re-run (same config: resumes)",
                                    details=tail(log, 30))
            raise PipelineError(f"{self.what} exited with code {rc}: {cause}; full log: {log}; fix it and re-run "
                                "(same config: resumes)")
        mark_training_done(ckpt)

    def export(self, ctx: StageContext, base_model: str) -> Path:
        out = ctx.out_dir
        try:
            base_dir = ctx.run_format.model_dir_of(base_model)  # the run's record, not a second resolution
        except FileNotFoundError:
            base_dir = None
        return export_hf_model(out / "checkpoints", out / "hf_model", base_dir=base_dir, subdir=self.hf_subdir)

    def collect_metrics(self, ctx: StageContext, what: str) -> dict[int, dict[str, Any]]:
        """step -> metrics of every attempt (a later attempt's value for a step wins), written to `metrics.json`."""
        out = ctx.out_dir
        metrics = read_metric_logs(out / "logs")[0]
        if not metrics:
            raise RuntimeError(f"{what} finished but logged no metrics under {out / 'logs'}")
        atomic_write_json(out / "metrics.json", metrics, indent=1)
        return metrics

    @staticmethod
    def stamp() -> str:
        return time.strftime("%Y%m%d-%H%M%S")

