"""`python -m eksft_pipeline [hydra overrides]` -- the orchestrator (config in recipes/).

python -m eksft_pipeline                                   # every stage, embedded CPU default
python -m eksft_pipeline stage=rl init=eksft               # one stage
python -m eksft_pipeline model=qwen3-8b cluster=8gpu       # the paper's 8-GPU run
python -m eksft_pipeline -m method=sft,dft,eksft           # multirun sweep over methods
python -m eksft_pipeline --help                            # stages and main options
"""

from __future__ import annotations

import os
import sys

_exit_code = 0
_SET_FULL_ERROR = False

HELP = """\
eksft-pipeline: split -> SFT (EKSFT or a baseline, verl) -> handoff -> DAPO (verl main_ppo) -> eval -> report -> export

usage: python -m eksft_pipeline [-m] [key=value ...]       (Hydra overrides; -m = multirun sweep)

stages (stage=...; `all` runs them in this order, a complete one is skipped):
  assets     build the tiny CPU model, tokenizer and data (model=tiny), or record the hub model
  split      OpenR1-Math-46k-8192 -> disjoint SFT / RL parquet files, dropped rows counted
  sft        the method's loss in verl's FSDP SFT trainer -> sft/<method>/hf_model, drift.json
  handoff    check the SFT model can start RL (weights, chat template, EOS, context length)
  rl         DAPO on verl's main_ppo from the handoff's model -> rl/<init>/hf_model
  eval       n samples per problem, math-verify score, avg@n and unbiased pass@k
  report     tables, figures and every stage's numbers -> report/report.md
  export     every trained model as an HF folder with a model card -> export/<sft|rl>-<method>/
             (hub.repo_id=<owner>/<name>-{{name}}: upload, or print the `hf upload` command without credentials)
  train_eval every stage but report and export (for sweeps; run stage=report, stage=export after)
  smoke      every stage but export; with profile=smoke a handful of steps each, one verdict line per stage
             (`make smoke`: model=qwen3-0.6b on the GPU node, MODEL=tiny on CPU)

main options (defaults in recipes/config.yaml):
  model=tiny|qwen3-4b|qwen3-8b        recipes/model/        ({models})
  method=eksft|sft|dft|...            recipes/method/       ({methods})
  cluster=cpu|8gpu                    recipes/cluster/      ({clusters})
  init=<method>|base|/path/to/model   the model RL and eval start from (default: the method's SFT output)
  run_dir=runs/<name>                 where stages write; its manifest.json records configs, files, hashes
  force=true                          re-run the listed stages from scratch (drops their checkpoints)
  dry_run=true                        print each stage's command and resolved verl config; run nothing
  profile=none|smoke                  recipes/profile/: smoke shrinks steps, samples, problems (runs/<model>-smoke)
  verdicts=true                       one `[verdict] <stage> ok|failed|skipped` line as each stage ends
  sft.verl.<key>=... rl.verl.<key>=... verl settings; what you type here wins over the model/cluster recipes
  method.params.<name>=...            loss parameters (e.g. method.params.rho=0.2)
  eval.n_samples=N eval.max_problems=N sampling budget of the eval stage

behaviour: a changed config re-runs the stage from scratch (checkpoints of another config are never
resumed) and marks the stages that used its outputs stale; a killed or failed stage with the same config
resumes from its checkpoints / saved samples. SIGTERM / Ctrl-C stop every process of the run and mark the
stage 'killed'. verl's full output is in <run_dir>/<stage>/logs/; the console shows step, loss/score, ETA.

examples:
  python -m eksft_pipeline                                        # everything on the tiny CPU default
  python -m eksft_pipeline stage=sft method=dft sft.verl.optim.lr=5e-4
  python -m eksft_pipeline stage=rl init=eksft model=qwen3-8b cluster=8gpu
  python -m eksft_pipeline -m stage=train_eval method=sft,eksft && python -m eksft_pipeline stage=report
  make help                                                       # the Makefile's targets

Hydra's own options: --cfg job (print the composed config), --hydra-help.
"""


def _help() -> str:
    from eksft_pipeline.contract.recipes import recipes_dir

    r = recipes_dir()

    def names(group: str) -> str:
        return ", ".join(sorted(p.stem for p in (r / group).glob("*.yaml")))

    return HELP.format(models=names("model"), methods=names("method"), clusters=names("cluster"))


def _precheck(argv: list[str]) -> str | None:
    """What Hydra would turn into a traceback before our code runs: an empty or file run_dir."""
    import os

    for a in argv:
        key, sep, value = a.partition("=")
        if sep and key.lstrip("+") == "run_dir":
            multirun = any(x in ("-m", "--multirun") for x in argv)
            for v in value.split(",") if multirun else [value]:
                v = v.strip().strip("'\"")
                if not v:
                    return "run_dir is empty; set run_dir=runs/<name> (a directory for this run's stages and manifest)"
                if os.path.exists(os.path.expanduser(v)) and not os.path.isdir(os.path.expanduser(v)):
                    return f"run_dir={v} is a file, not a directory; choose another run_dir=runs/<name>"
    return None


def _app_factory():
    import hydra
    from omegaconf import DictConfig, open_dict

    from eksft_pipeline.contract.recipes import recipes_dir

    @hydra.main(config_path=str(recipes_dir()), config_name="config", version_base=None)
    def _app(cfg: DictConfig) -> None:
        global _exit_code
        from hydra.core.hydra_config import HydraConfig

        from eksft_pipeline.orchestrator.runner import main_from_config

        if _SET_FULL_ERROR:  # only for composition errors (below); verl's own Hydra keeps its default
            os.environ.pop("HYDRA_FULL_ERROR", None)
        with open_dict(cfg):
            cfg.cli_overrides = list(HydraConfig.get().overrides.task)
        code = main_from_config(cfg)
        _exit_code = max(_exit_code, code)
        if code and (not _is_multirun() or code >= 128):  # a kill ends a sweep too
            sys.exit(code)

    return _app


def _is_multirun() -> bool:
    return any(a in ("-m", "--multirun") for a in sys.argv[1:])


def _reexec_with_run_token() -> None:
    """Put the run token into THIS process's own environment block, by re-executing once before any heavy
    import (~50 ms). Variables set later through os.environ are invisible in /proc/<pid>/environ, so a child
    the orchestrator forks without exec (multiprocessing's fork start method) would otherwise carry no token
    and escape the watchdog's sweep (contract/procs.py). EKSFT_NO_REEXEC=1 skips it (debuggers)."""
    import uuid

    from eksft_pipeline.contract.procs import ENV_TOKEN

    if os.environ.get(ENV_TOKEN) or os.environ.get("EKSFT_NO_REEXEC") or not sys.platform.startswith("linux"):
        return
    prog = os.path.basename(sys.argv[0])
    if prog == "__main__.py":  # python [flags] -m eksft_pipeline ...: the same interpreter flags again
        argv = list(getattr(sys, "orig_argv", None) or [sys.executable, "-m", "eksft_pipeline", *sys.argv[1:]])
    elif prog.startswith("eksft-pipeline"):  # the console script
        argv = [sys.executable, "-m", "eksft_pipeline", *sys.argv[1:]]
    else:  # called from other code: leave the process alone
        return
    os.execve(sys.executable, argv, {**os.environ, ENV_TOKEN: uuid.uuid4().hex[:16]})


def main() -> None:
    from eksft_pipeline.contract.recipes import redirect_benchmark_overrides

    if any(a in ("--help", "-h") for a in sys.argv[1:]):
        print(_help(), end="")
        return
    _reexec_with_run_token()
    sys.argv[1:] = redirect_benchmark_overrides(sys.argv[1:])
    argv = sys.argv[1:]
    problem = _precheck(argv)
    if problem:
        print(f"[eksft-pipeline] error: {problem}", flush=True)
        sys.exit(2)
    global _SET_FULL_ERROR
    if "HYDRA_FULL_ERROR" not in os.environ:  # composition errors come back to us as exceptions: one line
        os.environ["HYDRA_FULL_ERROR"] = "1"
        _SET_FULL_ERROR = True
    try:
        _app_factory()()
    except Exception as e:  # noqa: BLE001 - Hydra: a bad override / unknown config option
        if not _SET_FULL_ERROR:
            raise
        print(f"[eksft-pipeline] error: {_one_line(e)}", flush=True)
        sys.exit(2)
    if _exit_code:
        sys.exit(_exit_code)


def _one_line(e: Exception) -> str:
    """Hydra's multi-line composition messages as one line (the options it lists joined by commas)."""
    lines = [x.strip() for x in str(e).splitlines() if x.strip()]
    if not lines:
        return type(e).__name__
    out, opts = [], []
    for x in lines:
        if x.startswith("Config search path") or x.startswith("provider="):
            break
        if out and out[-1].endswith(":") and "Available options" in out[-1] or opts:
            opts.append(x)
        else:
            out.append(x)
    msg = " ".join(out) + (" " + ", ".join(opts) if opts else "")
    return msg + ("" if "fix" in msg.lower() else " -- fix that override (python -m eksft_pipeline --help)")


if __name__ == "__main__":
    main()
