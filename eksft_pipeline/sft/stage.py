"""Stage `sft`: the chosen loss as a verl FSDP SFT run; output = an HF model dir + drift.json.

    python -m eksft_pipeline stage=sft method=eksft            # CPU default (tiny model)
    python -m eksft_pipeline stage=sft method=sft model=qwen3-8b cluster=8gpu

Steps: compose recipes/verl/sft.yaml on verl's sft_trainer_engine config, merge the recipes'
`sft.verl` blocks (paper defaults <- model <- cluster) and the method, validate against verl's
dataclasses, write `<run_dir>/sft/<method>/verl_sft.yaml`, launch
`python -m eksft_pipeline.verl_ext.sft_ray` on it (verl's Ray SFT trainer: one driver, a Ray worker group of
`trainer.n_gpus_per_node` ranks on each of `cluster.nnodes` nodes), then export the last checkpoint's `huggingface/`
directory to `hf_model/` (weights, tokenizer, chat template, generation config) and write
`drift.json` against the reference model.

Resume: checkpoints live in `checkpoints/`, kept when a failed or killed attempt OF THE SAME CONFIG
is re-run, and verl's `resume_mode=auto` continues from `latest_checkpointed_iteration.txt` (checked
first: a tracker a kill left unreadable, or a half-written checkpoint folder, is removed). A changed
config or `force=true` removes them: the run retrains instead of "resuming" a finished checkpoint of
another config. Metrics of every attempt go to their own `logs/metrics-<time>.jsonl` (verl's file logger
truncates its file). verl's full output is in `logs/train-<time>.log`; the console shows step, loss, ETA.

Ray: the driver starts a local Ray (logical GPUs on `cluster=cpu`, its temp dir /tmp/eksft-ray-<id>) or joins
`cluster.ray_address` (`auto`: the cluster `ray start` brought up; `cluster=2x8gpu` sets it), the same way the RL
stage does; the stage's environment reaches every worker through `ray_kwargs.ray_init.runtime_env.env_vars`
(verl_ext/verl_stage.py: `ray_env_vars`). The driver is the stage's subprocess in the orchestrator's process group;
Ray's processes carry the run's token (inherited, or through runtime_env on a joined cluster), so the watchdog ends
them when the orchestrator dies, and Ray itself ends a job's actors when its driver exits.

Tracking (`tracking=wandb|tensorboard`, contract/tracking.py): verl's own tracker logs every step (loss,
`eksft/*` selection statistics) to the run `sft/<method>`; the hookup is in verl_ext/verl_stage.py.

Config layers, later wins: `sft.verl` (paper defaults) <- `model.sft.verl` <- `cluster.sft.verl` <- the
method <- anything typed on the command line under those keys (`sft.verl.optim.lr=5e-4`).
"""

from __future__ import annotations

import sys
from pathlib import Path

from omegaconf import OmegaConf, open_dict

from eksft_pipeline.contract.artifacts import StepProgress, atomic_write_json, quiet, read_metric_logs
from eksft_pipeline.contract.keys import sft_key
from eksft_pipeline.contract.recipes import plain
from eksft_pipeline.contract.stage_api import ConfigError, StageContext, StageResult, positive
from eksft_pipeline.verl_ext.sft_plan import validate_sft_block
from eksft_pipeline.verl_ext.validate import validate_sft_config
from eksft_pipeline.verl_ext.verl_stage import VerlTrainingStage, hydra_quote

CONFIG_NAME = "verl_sft"
# verl keys the stage sets itself -> the pipeline key that controls each (a command-line override is rejected)
OWNED = {
    "model.path": "model.path", "data.train_files": "the split stage's output", "data.val_files": "(none)",
    "trainer.default_local_dir": "run_dir", "trainer.n_gpus_per_node": "sft.nproc_per_node",
    "trainer.nnodes": "cluster.nnodes", "ray_kwargs": "cluster.ray_address", "eksft.loss": "method=", "eksft.loss_params": "method.params.<name>",
    "eksft.selection_scope": "method.selection_scope", "trainer.resume_mode": "(the stage: auto)",
}  # fmt: skip



def build_loss(vc):
    """The run's loss object, built from the verl config's `eksft:` block: once per configuration (the checks and
    the memory estimate read it; the trainer process builds its own from the same block). An unknown method or
    parameter fails here, before the trainer starts."""
    from eksft_pipeline.losses import get_loss

    name = vc.eksft.loss
    try:
        return get_loss(str(name), **(plain(vc.eksft.loss_params) or {}))
    except (KeyError, TypeError, ValueError) as e:
        msg = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
        raise ConfigError(f"method {name}: {msg}; fix the value (method.params.<name>=...) or pick another method=") from e


def read_metrics(log_dir: Path) -> dict[int, dict]:
    """step -> metrics, merged over attempts (a later attempt's value for a step wins; a line a kill cut
    short is skipped)."""
    return read_metric_logs(log_dir)[0]


class SFTStage(VerlTrainingStage):
    name = "sft"
    # the launching task holds no GPU: the Ray job's own workers take them (as the RL stage)
    resources = {"num_cpus": 1, "num_gpus": 0}
    recipe, block, config_name, owned = "sft", "sft", CONFIG_NAME, OWNED
    hf_subdir = "huggingface"
    what = "verl SFT (Ray)"

    def key(self, cfg):
        return sft_key(cfg)

    def config(self, cfg):
        return {
            "model": {"name": cfg.model.name, "path": str(cfg.model.path), "sft": plain(cfg.model.get("sft"))},
            "method": plain(cfg.method),
            "sft": plain(cfg.sft),
            "cluster": {
                "device": cfg.cluster.device,
                "gpus_per_node": cfg.cluster.gpus_per_node,
                "sft": plain(cfg.cluster.get("sft")),
            },
            "seed": int(cfg.seed),
        }

    def _train_file(self, ctx: StageContext) -> str:
        if ctx.dry_run:
            return str(ctx.run_dir / "split" / "sft_train.parquet")
        return ctx.upstream("split")["sft_train"]

    @staticmethod
    def _run_tokenizer(ctx: StageContext) -> str | None:
        """The split's tokenizer (run template + EOS, checked), or None before the split has run (dry run)."""
        if ctx.dry_run:
            return None
        tok = ctx.run_format.tokenizer_dir
        return tok if tok and Path(tok).is_dir() else None

    def inputs(self, ctx):
        inp = {"sft_train": self._train_file(ctx)}
        if self._run_tokenizer(ctx):
            inp["tokenizer"] = self._run_tokenizer(ctx)
        if Path(str(ctx.cfg.model.path)).exists():
            inp["model"] = str(ctx.cfg.model.path)
        return inp

    def check(self, ctx):
        positive(ctx.cfg.sft, "nproc_per_node", "sft")
        th = list(ctx.cfg.sft.get("drift_thresholds") or [])
        if not th or any(not isinstance(t, int | float) or t <= 0 for t in th):
            raise ConfigError(f"sft.drift_thresholds={th} must be a non-empty list of positive numbers")

    def validate(self, ctx):
        self.check(ctx)
        vc, loss = self.configure(ctx)
        est = self.memory_estimate(ctx, vc, loss)
        if est is not None:
            est.check()  # a configuration that cannot fit is refused before anything on disk is touched

    # -- config -----------------------------------------------------------------------------------
    def verl_config(self, ctx: StageContext):
        return self.configure(ctx)[0]

    def configure(self, ctx: StageContext):
        """(the verl SFT config, the loss object built once from it): every check and estimate below reads that one
        loss object."""
        cfg = ctx.cfg
        vc = self.compose(ctx)
        out = ctx.out_dir
        model_path = (
            str(Path(str(cfg.model.path)).resolve()) if Path(str(cfg.model.path)).exists() else str(cfg.model.path)
        )
        with open_dict(vc):
            vc.model.path = model_path
            vc.data.train_files = self._train_file(ctx)
            vc.data.val_files = None
            vc.trainer.default_local_dir = str(out / "checkpoints")
            self.set_trainer_names(ctx, vc)  # project / experiment name / logger (the tracker's, when on)
            vc.trainer.n_gpus_per_node = int(cfg.sft.nproc_per_node)
            vc.trainer.nnodes = int(cfg.cluster.nnodes)
            vc.eksft.loss = str(cfg.method.loss)
            vc.eksft.loss_params = plain(cfg.method.get("params")) or {}
            vc.eksft.selection_scope = str(cfg.method.get("selection_scope", "global_batch"))
            vc.eksft.updates_per_batch = int(cfg.method.get("updates_per_batch", 1))
            vc.eksft.pi_old_every = int(cfg.method.get("pi_old_every", 1))
            # the run's one chat template (ctx.run_format, recorded by the split): verl sets it on the tokenizer
            # that renders the SFT data and that it saves with every checkpoint (the exported model's tokenizer)
            template = ctx.run_format.chat_template
            if template is not None:
                vc.model.custom_chat_template = template
            tok_dir = self._run_tokenizer(ctx)
            if tok_dir is not None:
                vc.model.tokenizer_path = tok_dir
        try:
            validate_sft_config(vc)
        except ValueError as e:
            raise ConfigError(f"{e}; fix the sft.verl value") from e
        if str(vc.trainer.resume_mode) != "auto":
            raise ConfigError(f"sft.verl.trainer.resume_mode={vc.trainer.resume_mode}: the stage manages resumption "
                              "itself (same config: resume, changed config: retrain); leave it at auto")
        loss = build_loss(vc)
        try:
            validate_sft_block(vc, loss)  # selection scope / head / updates: fail here, not inside the trainer
        except ValueError as e:
            raise ConfigError(str(e)) from e
        self._fit_token_budget(ctx, vc, loss)
        env = ctx.env()
        env.update(self.tracking_env(ctx))
        self.set_ray(ctx, vc, env)
        return vc, loss

    def set_ray(self, ctx: StageContext, vc, env: dict[str, str]) -> None:
        """`ray_kwargs.ray_init` of the verl config (read by verl_ext/sft_ray.py; verl's SFT config has no such key):
        join `cluster.ray_address`, or start a local Ray in its own temp dir; `runtime_env.env_vars` = the stage's
        environment for every worker."""
        import hashlib

        cfg = ctx.cfg
        ranks = int(vc.trainer.n_gpus_per_node) * int(vc.trainer.nnodes)
        init: dict = {"address": None, "num_cpus": None, "num_gpus": None, "temp_dir": None, "include_dashboard": None}
        address = cfg.cluster.get("ray_address")
        if address:
            init["address"] = str(address)  # Ray refuses num_cpus / num_gpus there: the cluster has its resources
        else:
            # a short path (Ray's socket paths must fit 107 bytes), one per run dir and stage
            tag = hashlib.sha1(f"{ctx.run_dir.resolve()}|{ctx.key}".encode()).hexdigest()[:10]
            init["temp_dir"] = f"/tmp/eksft-ray-{tag}"
            init["include_dashboard"] = False  # seconds of start-up per run, and nothing reads it
            if str(cfg.cluster.device) == "cpu":
                # logical: one GPU (the cpu platform's Ray resource) and one CPU per rank, one CPU to spare
                init["num_gpus"] = ranks
                init["num_cpus"] = max(int(cfg.cluster.get("ray_num_cpus") or 0), ranks + 1)
        init["runtime_env"] = {"env_vars": self.ray_env_vars(ctx, env)}
        with open_dict(vc):
            vc.ray_kwargs = {"ray_init": init}

    def experiment_name(self, ctx: StageContext) -> str:
        return f"{ctx.cfg.model.name}-sft-{ctx.cfg.method.name}"
    def _fit_token_budget(self, ctx: StageContext, vc, loss) -> None:
        """`sft.fit_token_budget`: the model recipe sizes `max_token_len_per_gpu` for EKSFT's fused head; a method
        whose loss needs the naive head (full [N, V] logits: asft, dft, psft, eksft_official) would be refused by
        the memory check at that budget, so a baseline sweep stops at its first such method. Lower the budget in
        steps of 1024 to the largest the estimate fits, never below `data.max_length` / the Ulysses SP size (a
        packed micro-batch, max_token_len_per_gpu x sp tokens, must hold one whole sequence), and say so. The optimisation is identical (global batch and lr are per
        sequence); only the packing into micro-batches changes. Never on CPU, never for a typed value."""
        cfg = ctx.cfg
        d = vc.data
        if (not bool(cfg.sft.get("fit_token_budget", True)) or str(cfg.cluster.device) == "cpu"
                or not bool(d.use_dynamic_bsz)
                or any(str(o).lstrip("+").split("=")[0].endswith("data.max_token_len_per_gpu")
                       for o in cfg.get("cli_overrides") or [])):  # fmt: skip
            return
        est = self.memory_estimate(ctx, vc, loss)
        if est is None or est.fits:
            return
        sp = int(vc.engine.get("ulysses_sequence_parallel_size", 1) or 1)
        # a micro-batch (max_token_len_per_gpu x sp tokens) must hold the longest sequence
        start, floor = int(d.max_token_len_per_gpu), -(-int(d.max_length) // sp)
        budget = start - 1024
        while budget >= floor:
            with open_dict(vc):
                d.max_token_len_per_gpu = budget
            smaller = self.memory_estimate(ctx, vc, loss)
            if smaller.fits:
                print(f"[sft] method={cfg.method.name}: sft.verl.data.max_token_len_per_gpu {start} -> {budget} "
                      f"(estimated {smaller.total / 2**30:.1f} GiB per GPU; {start} would need "
                      f"{est.total / 2**30:.1f} GiB; sft.fit_token_budget=false keeps the recipe's value)",
                      flush=True)
                return
            budget -= 1024
        with open_dict(vc):  # nothing fits: keep the recipe's value, the memory check refuses it naming the knob
            d.max_token_len_per_gpu = start

    def memory_estimate(self, ctx: StageContext, vc, loss=None):
        """Per-GPU peak-memory estimate of one SFT step (eksft_pipeline/verl_ext/memory.py); None without a shape.
        `loss`: the loss object `configure` built (built from `vc` when not given)."""
        from eksft_pipeline.verl_ext import memory

        cfg = ctx.cfg
        shape = memory.shape_from_model(str(cfg.model.path), plain(cfg.model.get("arch")))
        if shape is None:
            return None
        d = vc.data
        sp = int(vc.engine.get("ulysses_sequence_parallel_size", 1) or 1)
        # a micro-batch: verl packs up to max_token_len_per_gpu x sp tokens (each SP rank holds 1/sp of them)
        tokens = int(d.max_token_len_per_gpu) * sp if d.use_dynamic_bsz else int(d.micro_batch_size_per_gpu) * int(d.max_length)
        mp = vc.engine.get("mixed_precision") or {}
        loss = build_loss(vc) if loss is None else loss
        device = "cpu" if str(cfg.cluster.device) == "cpu" else "cuda"
        world = int(vc.trainer.n_gpus_per_node) * int(vc.trainer.nnodes)
        if world % sp:
            raise ConfigError(f"sft.verl.engine.ulysses_sequence_parallel_size={sp} must divide the {world} SFT ranks")
        rows = int(d.train_batch_size) // (world // sp) * int(d.max_length)  # the rank's sequences x the cutoff
        return memory.sft_estimate(
            shape, tokens=tokens, world=world, sp=sp, ref_store_rows=rows,
            ref_store_on_host=str(vc.eksft.get("ref_hidden_store", "device")) == "host",
            loss=loss, head=vc.eksft.get("head", None), model_dtype=str(vc.engine.model_dtype),
            compute_dtype=str(mp.get("param_dtype", "bf16")), ref_dtype=vc.eksft.get("ref_model_dtype", None),
            grad_ckpt=bool(vc.model.enable_gradient_checkpointing), chunk=vc.eksft.get("chunk_size", None),
            device=device,
            capacity_bytes=None if device == "cpu" else memory.usable_bytes(
                cfg.cluster.get("gpu_memory_gib"), cfg.cluster.get("memory_headroom", 0.9)),
        )  # fmt: skip

    def command(self, ctx: StageContext) -> list[str]:
        out = ctx.out_dir
        return [
            sys.executable,
            "-m",
            "eksft_pipeline.verl_ext.sft_ray",
            f"--config-path={out}",
            f"--config-name={CONFIG_NAME}",
            f"hydra.run.dir={hydra_quote(str(out / 'logs' / 'hydra'))}",
            "hydra.output_subdir=null",
        ]

    def describe(self, ctx):
        vc, loss = self.configure(ctx)
        est = self.memory_estimate(ctx, vc, loss)
        if est is not None:
            print("\n".join(est.lines()), flush=True)
            est.check()  # refuse (naming the knob) before anything is launched
        return {
            "stage": "sft",
            "key": ctx.key,
            "command": " ".join(self.command(ctx)),
            "ray_job": self.ray_job(vc),
            "env": {k: v for k, v in {**ctx.env(), **self.tracking_env(ctx)}.items()
                    if k.startswith(("VERL_", "CUDA_", "HF_", "WANDB_", "TENSORBOARD_"))},
            "memory_estimate": None if est is None else {k: v for k, v in est.to_dict().items() if k != "text"},
            "verl_config": OmegaConf.to_container(vc, resolve=True),
        }

    @staticmethod
    def ray_job(vc) -> dict:
        """What the dry run shows of the Ray job: its worker group and the Ray it starts or joins."""
        init = vc.ray_kwargs.ray_init
        n, nodes = int(vc.trainer.n_gpus_per_node), int(vc.trainer.nnodes)
        return {"trainer": "verl Ray SFT trainer (eksft_pipeline.verl_ext.sft_ray)", "nnodes": nodes,
                "ranks_per_node": n, "world_size": n * nodes, "device": str(vc.trainer.device),
                "ray": f"join {init.address}" if init.get("address") else f"local (temp dir {init.temp_dir})"}

    # -- run --------------------------------------------------------------------------------------
    def run(self, ctx: StageContext) -> StageResult:
        cfg = ctx.cfg
        out = ctx.out_dir
        out.mkdir(parents=True, exist_ok=True)
        with quiet():
            vc, loss = self.configure(ctx)
        est = self.memory_estimate(ctx, vc, loss)
        if est is not None:
            est.check()  # a configuration that cannot fit is refused before the trainer starts
            atomic_write_json(out / "memory_estimate.json", est.to_dict(), indent=1)
        stamp = self.stamp()
        env = ctx.env()
        env.update(self.tracking_env(ctx))
        env["VERL_FILE_LOGGER_PATH"] = str(out / "logs" / f"metrics-{stamp}.jsonl")
        env.setdefault("VERL_SFT_LOGGING_LEVEL", "WARN")
        self.set_ray(ctx, vc, env)  # the workers write the metrics file of this attempt too
        self.write_config(vc, out / f"{CONFIG_NAME}.yaml")
        self.note_resume_point(ctx)
        log = out / "logs" / f"train-{stamp}.log"
        job = self.ray_job(vc)
        print(f"[{ctx.key}] verl SFT as a Ray job, {job['world_size']} rank(s) on {job['nnodes']} node(s), Ray: "
              f"{job['ray']}; full output: {log}", flush=True)
        progress = StepProgress(ctx.key, {"loss": "train/loss", "lr": "train/lr", "mask": "eksft/mask_frac"},
                                total=vc.trainer.get("total_training_steps"))
        self.train(ctx, self.command(ctx), env, log, progress)
        hf_dir = self.export(ctx, str(cfg.model.path))
        from eksft_pipeline.sft.drift import write_drift

        ref = vc.eksft.get("ref_model_path") or str(cfg.model.path)
        drift = write_drift(hf_dir, ctx.run_format.model_dir_of(ref), list(cfg.sft.drift_thresholds),
                            out / "drift.json")

        metrics = self.collect_metrics(ctx, "verl SFT")
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
        return StageResult(
            outputs={
                "hf_model": str(hf_dir),
                "drift": str(out / "drift.json"),
                "metrics": str(out / "metrics.json"),
                "verl_config": str(out / f"{CONFIG_NAME}.yaml"),
            },
            summary=summary,
        )
