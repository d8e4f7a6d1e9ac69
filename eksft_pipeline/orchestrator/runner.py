"""Run the configured stages in order, skipping complete ones, recording everything in the manifest.

    python -m eksft_pipeline                       # stage=all: assets split sft handoff rl eval report export
    python -m eksft_pipeline stage=sft method=dft  # one stage
    python -m eksft_pipeline dry_run=true model=qwen3-8b cluster=8gpu   # print commands + configs

Per stage (nothing on disk changes before step 1 passed):

1. `stage.check` (cheap checks, e.g. `init=`), inputs + config -> hash; a complete entry with the same
   hash and intact outputs is skipped. Then `stage.validate` -- the whole stage config and the composed
   verl config (read-only). With several stages listed, every stage not yet complete is validated once
   up front (placeholder upstream paths), so a bad SFT value fails before the split runs.
2. an attempt still running in another live orchestrator is an error; processes left over by an
   earlier attempt of this stage in this run dir (see contract/procs.py) are ended.
3. manifest `start` (status `running`; entries that used this stage's outputs become `stale`), then
   `stage.clean`: resume points (verl checkpoints, eval samples) are kept only for the SAME config
   (and not with force=true): a changed config retrains from scratch instead of resuming a checkpoint
   written under another config. Eval samples carry their own key (model weights + sampling).
4. run, manifest `complete`.

Failure: the manifest says `failed`, or `killed` after SIGTERM / SIGINT / SIGHUP; every process the
stage started is ended first. A manifest that cannot be written (full disk) never hides the original
error. The console's last line is one `error:` line naming the fix; verl's full output stays in the
stage's log file.

Launchers: `cluster.launcher=local` runs a stage in this process (the SFT and RL stages start verl's
Ray trainers themselves); `cluster.launcher=ray` submits each stage as a Ray task with the stage's
resources (the eval stage holds the node's GPUs; the SFT and RL stages hold none because verl's own Ray
actors take them).
"""

from __future__ import annotations

import contextlib
import errno
import importlib
import json
import os
import signal
import socket
import sys
import tempfile
import time
import traceback
import uuid
from collections.abc import Callable
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from eksft_pipeline.contract import procs
from eksft_pipeline.contract.artifacts import quiet
from eksft_pipeline.contract.keys import apply_method_tag
from eksft_pipeline.contract.manifest import Manifest
from eksft_pipeline.contract.stage_api import ConfigError, PipelineError, Stage, StageContext, StageResult
from eksft_pipeline.orchestrator import watchdog

REGISTRY = {
    "assets": "eksft_pipeline.data.stage:AssetsStage",
    "split": "eksft_pipeline.data.stage:SplitStage",
    "sft": "eksft_pipeline.sft.stage:SFTStage",
    "handoff": "eksft_pipeline.rl.handoff:HandoffStage",
    "rl": "eksft_pipeline.rl.stage:RLStage",
    "eval": "eksft_pipeline.eval.stage:EvalStage",
    "report": "eksft_pipeline.analysis.stage:ReportStage",
    "export": "eksft_pipeline.export.stage:ExportStage",
}
ORDER = list(REGISTRY)
# Stages a task (recipes/task/) runs in place of a registered one (task.stage_map); same stage key and outputs.
TASK_STAGES = {
    "tool_split": "eksft_pipeline.data.tool_use.stage:ToolSplitStage",
    "tool_eval": "eksft_pipeline.eval.bfcl_stage:ToolEvalStage",
    "tool_report": "eksft_pipeline.analysis.tool_use_report:ToolReportStage",
}
OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")


class StageKilled(BaseException):
    """SIGTERM / SIGHUP reached the orchestrator (SIGINT arrives as KeyboardInterrupt)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def load_stage(name: str) -> Stage:
    if name not in REGISTRY and name not in TASK_STAGES:
        raise ConfigError(f"unknown stage {name!r}; known stages: {', '.join(ORDER)} (or 'all')")
    module, cls = (REGISTRY.get(name) or TASK_STAGES[name]).split(":")
    return getattr(importlib.import_module(module), cls)()


def _say(msg: str) -> None:
    print(f"[eksft-pipeline] {msg}", flush=True)


def _resources(stage: Stage, cfg: DictConfig) -> dict:
    res = dict(stage.resources)
    if res.get("num_gpus") == "all":
        res["num_gpus"] = int(cfg.cluster.gpus_per_node) if str(cfg.cluster.device) != "cpu" else 0
    return res


def _run_stage_in_process(stage_name: str, cfg_container: dict, run_dir: str, key: str,
                          tracking: dict | None = None) -> StageResult:
    from eksft_pipeline.contract.tracking import RunIdentity

    cfg = OmegaConf.create(cfg_container)
    stage = load_stage(stage_name)
    ctx = StageContext(cfg=cfg, run_dir=Path(run_dir), manifest=Manifest(run_dir), key=key,
                       tracking=RunIdentity.from_record(tracking, run_dir) if tracking else None)
    return stage.run(ctx)


def _launch(stage: Stage, ctx: StageContext) -> StageResult:
    cfg = ctx.cfg
    if str(cfg.cluster.launcher) == "local":
        return stage.run(ctx)
    if str(cfg.cluster.launcher) != "ray":
        raise ConfigError(f"cluster.launcher must be 'local' or 'ray', got {cfg.cluster.launcher!r}")
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
            if k.startswith(("VERL_", "HF_", "WANDB_", "PYTHONPATH", "CUDA_", "TOKENIZERS", "EKSFT_"))
        }
        init_kwargs["runtime_env"] = {"env_vars": env}
        ray.init(**init_kwargs)
    res = _resources(stage, cfg)
    remote = ray.remote(**res)(_run_stage_in_process)
    cfg_container = OmegaConf.to_container(cfg, resolve=True)
    _say(f"{ctx.key}: submitted as a Ray task {res}")
    rec = ctx.tracking.record(ctx.run_dir) if ctx.tracking is not None else None
    return ray.get(remote.remote(stage.name, cfg_container, str(ctx.run_dir), ctx.key, rec))


# -- run directory, environment, processes -------------------------------------------------------------
def check_run_dir(value) -> Path:
    """The run directory, resolved; ConfigError (one line) for an empty value, a file, or the repository."""
    from eksft_pipeline.contract.recipes import RECIPES_DIR

    text = "" if value is None else str(value).strip()
    if not text:
        raise ConfigError("run_dir is empty; set run_dir=runs/<name> (a directory for this run's stages and manifest)")
    p = Path(text).expanduser().resolve()
    if p.exists() and not p.is_dir():
        raise ConfigError(f"run_dir={value} is a file, not a directory; choose another run_dir=runs/<name>")
    repo = RECIPES_DIR.parent.resolve()
    if p == Path(p.anchor) or p == repo or p in repo.parents:
        raise ConfigError(f"run_dir={value} is {p}, which would mix stage folders into "
                          f"{'the repository' if p == repo else 'a parent of the repository'}; use run_dir=runs/<name>")
    if p.exists() and not os.access(p, os.W_OK):
        raise ConfigError(f"run_dir={p} is not writable; choose another run_dir")
    return p


@contextlib.contextmanager
def _env(updates: dict[str, str | None]):
    saved = {k: os.environ.get(k) for k in updates}
    for k, v in updates.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _offline_updates(cfg: DictConfig) -> dict[str, str]:
    """The cluster's HF offline switches, applied to this process too: in-process stages (split's tokenizer,
    eval, the report) must fail at once on a missing model, not retry the network for a minute."""
    env = OmegaConf.to_container(cfg.cluster.get("env") or {}, resolve=True) or {}
    if str(env.get("HF_HUB_OFFLINE", os.environ.get("HF_HUB_OFFLINE", ""))).lower() not in ("1", "true", "yes"):
        return {}
    return dict.fromkeys(OFFLINE_VARS, "1")


@contextlib.contextmanager
def _hub_offline(on: bool):
    """huggingface_hub reads HF_HUB_OFFLINE at import; patch the constant if it was imported already."""
    hub = sys.modules.get("huggingface_hub.constants")
    if not on or hub is None:
        yield
        return
    saved = hub.HF_HUB_OFFLINE
    hub.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hub.HF_HUB_OFFLINE = saved


GPU_STAGES = ("sft", "rl", "eval", "report")


def gpu_count() -> int:
    """CUDA devices this machine has (torch's count; 0 without a CUDA build or a driver)."""
    try:
        import torch

        return int(torch.cuda.device_count()) if torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001 - no usable CUDA is "no GPU"
        return 0


def check_gpus(cfg: DictConfig, names: list[str]) -> None:
    """A GPU cluster recipe on a machine without GPUs is refused at once (not after Ray started and the hub was
    retried for minutes). A run that joins a Ray cluster elsewhere (`cluster.ray_address`) is not checked here."""
    if str(cfg.cluster.get("device")) != "cuda" or cfg.cluster.get("ray_address"):
        return
    if not set(names) & set(GPU_STAGES) or os.environ.get("EKSFT_SKIP_GPU_CHECK") == "1":
        return
    if gpu_count() == 0:
        raise ConfigError(
            f"cluster={cfg.cluster.name} needs CUDA GPUs (cluster.device=cuda) but this machine has none; run it on "
            "the GPU node, print its commands with dry_run=true, or use cluster=cpu (model=tiny) here"
        )


def missing_eval_data(cfg: DictConfig) -> list[str]:
    """`<benchmark>: <path>` for every eval benchmark file that does not exist."""
    benches = OmegaConf.to_container(cfg.eval.get("benchmarks") or {}, resolve=True) or {}
    return [f"{n}: {(b or {}).get('path')}" for n, b in benches.items()
            if not Path(str((b or {}).get("path"))).expanduser().exists()]


def eval_data_note(cfg: DictConfig, names: list[str]) -> None:
    """Said up front, before hours of training: the eval benchmark files are missing. A real run stops here; a
    dry run prints a warning (it runs nothing)."""
    if "eval" not in names:
        return
    missing = missing_eval_data(cfg)
    if "assets" in names and cfg.model.get("assets_dir"):  # files the assets stage of this run builds first
        built = str(Path(str(cfg.model.assets_dir)).expanduser().resolve())
        missing = [m for m in missing
                   if not str(Path(m.split(": ", 1)[1]).expanduser().resolve()).startswith(built + os.sep)]
    if not missing:
        return
    msg = (f"eval benchmark file(s) not found ({'; '.join(missing)}); put them there or set EKSFT_EVAL_DATA_DIR / "
           "eval_data_dir to their folder")
    if cfg.dry_run:
        _say(f"warning: {msg}")
        return
    raise ConfigError(msg)


def preflight(cfg: DictConfig, names: list[str]) -> None:
    """Checks that need no stage: a GPU recipe needs GPUs here, the eval data must exist, and a hub model on an
    offline cluster must already be in the local cache."""
    check_gpus(cfg, names)
    eval_data_note(cfg, names)
    if not set(names) & {"split", "sft", "handoff", "rl", "eval"}:
        return
    ref = str(cfg.model.path)
    if Path(ref).expanduser().is_dir() or not _offline_updates(cfg):
        return
    if str(cfg.model.get("kind")) == "tiny":
        return  # built by the assets stage
    from eksft_pipeline.contract.run_format import resolve_model

    try:
        resolve_model(ref)  # a preflight: the split resolves it for the run and records it (run_format.json)
    except FileNotFoundError:
        raise ConfigError(
            f"model.path={ref} is neither a local directory nor in the local HF cache, and cluster={cfg.cluster.name} "
            f"is offline (HF_HUB_OFFLINE=1): download it first (huggingface-cli download {ref}), set "
            "model.path=/local/dir, or use model=tiny on this machine"
        ) from None


class Session:
    """One orchestrator invocation: its run token in the environment and the watchdog that ends its
    processes if it dies (contract/procs.py)."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        # the command line put one into this process's own environment (__main__._reexec_with_run_token)
        self.token = os.environ.get(procs.ENV_TOKEN) or uuid.uuid4().hex[:16]
        self.watchdog: watchdog.Watchdog | None = None
        self._env = _env({procs.ENV_TOKEN: self.token, procs.ENV_RUN_DIR: str(run_dir), procs.ENV_STAGE: None})
        self._env.__enter__()

    def ensure_watchdog(self) -> None:
        if self.watchdog is None and sys.platform.startswith("linux"):
            self.watchdog = watchdog.Watchdog(self.token, self.run_dir)

    def close(self) -> None:
        if self.watchdog is not None:
            self.watchdog.close()
            self.watchdog = None
        self._env.__exit__(None, None, None)


_signals = {"deferred": False, "pending": None}


@contextlib.contextmanager
def _signals_deferred():
    """Cleanup after a failure must not itself be interrupted by a second Ctrl-C / SIGTERM."""
    _signals["deferred"] = True
    try:
        yield
    finally:
        _signals["deferred"] = False


def _live_owner(key: str) -> Callable[[dict | None], None]:
    """The check `Manifest.start` runs under its lock: an entry `running` under an orchestrator that is still
    alive on this host belongs to that attempt -- refuse, never take it over (nor end its processes)."""

    def check(entry: dict | None) -> None:
        if not entry or entry.get("status") != "running" or entry.get("host") != socket.gethostname():
            return
        pid = int(entry.get("pid", -1))
        started = entry.get("pid_start")
        if pid > 0 and pid != os.getpid():
            live = procs.alive(pid, started) if started is not None else (
                procs.alive(pid) and "eksft_pipeline" in procs.cmdline(pid))
            if live:
                raise PipelineError(
                    f"stage {key} is already running in process {pid} (since {entry.get('started')}); "
                    f"wait for it to finish, or stop it with `kill {pid}` and re-run"
                )

    return check


def _end_survivors(key: str, run_dir: Path, session: Session) -> None:
    """Processes of an earlier attempt of `key` whose orchestrator no longer owns the entry (this run just claimed
    it, having checked that no live orchestrator did)."""
    left = procs.survivors(str(run_dir), key, session.token)
    if left:
        _say(f"{key}: ending {len(left)} process(es) left over by an earlier attempt: {procs.describe(left)}")
        procs.end_processes({procs.ENV_RUN_DIR: str(run_dir), procs.ENV_STAGE: key}, exclude_token=session.token)


def _record_failure(e: BaseException, key: str, manifest: Manifest, session: Session | None) -> None:
    killed = isinstance(e, KeyboardInterrupt | StageKilled)
    with _signals_deferred():
        if session is not None:
            ended = procs.end_processes({procs.ENV_TOKEN: session.token, procs.ENV_STAGE: key})
            if ended:
                _say(f"{key}: ended {len(ended)} process(es) of this stage")
        status = "killed" if killed else "failed"
        try:
            owned = manifest.fail(key, "".join(traceback.format_exception(e)), status=status,
                                  run_token=session.token if session is not None else None)
            if not owned:
                _say(f"{key}: not recording '{status}': another attempt owns the manifest entry now")
        except OSError as me:  # e.g. ENOSPC: keep the original error, say what else went wrong
            try:
                e.manifest_error = me
            except AttributeError:
                pass
            _say(f"warning: could not record '{status}' for {key} in {manifest.path}: {me}")


def run_stage(name: str, cfg: DictConfig, run_dir: Path, manifest: Manifest, session: Session | None = None) -> dict:
    stage = load_stage(name)
    key = stage.key(cfg)
    ctx = StageContext(cfg=cfg, run_dir=run_dir, manifest=manifest, key=key, dry_run=bool(cfg.dry_run))
    try:
        if ctx.dry_run:
            ctx.tracking = _identity(stage, ctx, manifest.entry(key), "<config hash>", preview=True)
            with quiet():
                stage.validate(ctx)
            print(json.dumps(stage.describe(ctx), indent=2, default=str), flush=True)
            return {"key": key, "status": "dry-run"}
        return _run_stage(stage, key, ctx, session)
    except BaseException as e:
        if not hasattr(e, "stage_key"):
            with contextlib.suppress(AttributeError):
                e.stage_key = key
        raise


def _identity(stage: Stage, ctx: StageContext, entry: dict | None, cfg_hash: str, *, preview: bool = False):
    """The tracker identity of this attempt (contract/tracking.py), or None when `tracking=none`.

    `entry` is the stage's manifest entry BEFORE this attempt: its run id is continued only by a resume of
    the same config hash. A dry run previews it without writing the manifest. Only stages that log something
    (`tracked = True`: sft, rl, eval, report) get one; assets, split and handoff do not."""
    from eksft_pipeline.contract import tracking as T

    try:
        settings = T.settings_from_config(ctx.cfg)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if not settings.enabled or not getattr(stage, "tracked", False):
        return None
    if preview:
        group = settings.group or ctx.manifest.read().get("tracking_group") or "<created at the first run>"
    else:
        group = T.run_group(settings, ctx.manifest, str(ctx.cfg.model.name))
    return T.identity_for(settings, stage_key=ctx.key, run_dir=ctx.run_dir, group=group, previous=entry,
                          config_hash=cfg_hash)


def _run_stage(stage: Stage, key: str, ctx: StageContext, session: Session | None) -> dict:
    cfg, run_dir, manifest = ctx.cfg, ctx.run_dir, ctx.manifest
    stage.check(ctx)
    inputs = stage.inputs(ctx)
    # files other stages produced must be what they recorded: a damaged input is named, its producer marked for
    # a re-run, and nothing of this stage is touched (a changed input is NOT a changed config)
    manifest.verify_inputs(key, inputs)
    stage_cfg = stage.config(cfg)
    h = manifest.stage_hash(stage_cfg, inputs)
    done, reason = manifest.is_complete(key, h)
    force = bool(cfg.force)
    if done and not force:
        _say(f"{key}: complete, skipped (outputs in {ctx.out_dir})")
        return {"key": key, "status": "skipped"}
    with quiet():
        stage.validate(ctx)  # before anything below touches the disk

    if session is None:
        session = Session(run_dir)
        own_session = True
    else:
        own_session = False
    try:
        entry = manifest.entry(key)
        ctx.tracking = _identity(stage, ctx, entry, h)
        session.ensure_watchdog()
        # 'running' is recorded BEFORE the previous outputs are removed: a kill in between never leaves a
        # 'complete' entry whose files are gone. The check for a live owner and the claim are one locked step.
        claimed: dict = {}

        def check_and_remember(current: dict | None) -> None:
            _live_owner(key)(current)
            claimed["entry"] = current

        stale = manifest.start(key, stage_cfg, h, inputs, run_token=session.token, live_owner=check_and_remember)
        entry = claimed.get("entry")
        if entry is None:
            _say(f"{key}: running")
            keep: tuple[str, ...] = ()
        else:
            why = "force=true" if force and done else reason
            same = entry.get("config_hash") == h or stage.resume_keyed_by_content
            keep = tuple(k for k in stage.keep_on_retry if (ctx.out_dir / k).exists()) if same and not force else ()
            if keep and entry.get("config_hash") != h:
                _say(f"{key}: re-running ({why}); keeping {list(keep)}: their own key decides what is reused")
            elif keep:
                _say(f"{key}: re-running ({why}); same config: keeping {list(keep)} to resume from")
            else:
                _say(f"{key}: re-running ({why}); removing the previous attempt's outputs"
                     + (" and its checkpoints (they belong to another config)" if stage.keep_on_retry else ""))
        if stale:
            _say(f"{key}: marked stale (they used its previous outputs): {', '.join(stale)}")
        if ctx.tracking is not None:
            manifest.update(key, tracking=ctx.tracking.record(run_dir))
            _say(f"{key}: tracking {'+'.join(ctx.tracking.backends)} run {ctx.tracking.name} "
                 f"(id {ctx.tracking.run_id}{', resumed' if ctx.tracking.resumed else ''}, group {ctx.tracking.group})")
        t0 = time.time()
        try:
            _end_survivors(key, run_dir, session)
            stage.clean(ctx, keep=keep)
            ctx.out_dir.mkdir(parents=True, exist_ok=True)
            with _env({procs.ENV_STAGE: key}):
                result = _launch(stage, ctx)
                result.summary.setdefault("wall_time_s", round(time.time() - t0, 2))
                restored = manifest.complete(key, result.outputs, result.summary, run_token=session.token)
        except BaseException as e:
            _record_failure(e, key, manifest, session)
            raise
        _say(f"{key}: complete in {time.time() - t0:.1f}s")
        if restored:
            _say(f"{key}: its outputs are unchanged, so these are current again: {', '.join(restored)}")
        return {"key": key, "status": "complete", "outputs": result.outputs, "summary": result.summary}
    finally:
        if own_session:
            session.close()


def stage_list(cfg: DictConfig) -> list[str]:
    names = list(cfg.stage.run)
    for n in names:
        if n not in REGISTRY:
            raise ConfigError(f"unknown stage {n!r} in stage.run; known stages: {', '.join(ORDER)}")
    task = cfg.get("task") or {}  # recipes/task/: stages the task skips or runs in place of registered ones
    skip = set(task.get("skip_stages") or [])
    mapping = dict(task.get("stage_map") or {})
    bad = sorted(v for v in mapping.values() if v not in TASK_STAGES)
    if bad:
        raise ConfigError(f"task.stage_map names unknown stage(s) {bad}; known: {', '.join(TASK_STAGES)}")
    return [mapping.get(n, n) for n in names if n not in skip]


def _validate_upfront(names: list[str], cfg: DictConfig, run_dir: Path, manifest: Manifest) -> None:
    """Validate every listed stage that is not complete yet, with placeholder upstream paths."""
    if len(names) < 2:
        return
    stages = manifest.read()["stages"]
    for name in names:
        stage = load_stage(name)
        key = stage.key(cfg)
        if (stages.get(key) or {}).get("status") == "complete" and not cfg.force:
            continue
        ctx = StageContext(cfg=cfg, run_dir=run_dir, manifest=manifest, key=key, dry_run=True)
        try:
            with quiet():
                stage.validate(ctx)
        except BaseException as e:
            with contextlib.suppress(AttributeError):
                e.stage_key = key
            raise


def run_pipeline(cfg: DictConfig) -> list[dict]:
    try:
        cfg = apply_method_tag(cfg)  # variants of one recipe (method.params.rho=...) get their own stage keys
    except ValueError as e:
        raise ConfigError(str(e)) from None
    run_dir = check_run_dir(cfg.get("run_dir"))
    names = stage_list(cfg)
    manifest = Manifest(run_dir)
    results = []
    _say(
        f"run dir {run_dir}; stages {' -> '.join(names)}; model={cfg.model.name} method={cfg.method.name}"
        f" cluster={cfg.cluster.name}" + (" (dry run)" if cfg.dry_run else "")
    )
    verdicts = Verdicts(names, cfg) if cfg.get("verdicts") and not cfg.dry_run else None
    try:
        results = _run_stages(cfg, names, run_dir, manifest, results, verdicts)
    except BaseException as e:
        if verdicts is not None:
            verdicts.stopped(e)
        raise
    if verdicts is not None:
        verdicts.finished()
    return results


def _run_stages(cfg: DictConfig, names: list[str], run_dir: Path, manifest: Manifest, results: list[dict],
                verdicts: Verdicts | None) -> list[dict]:
    offline = _offline_updates(cfg)
    if not sys.stdout.isatty():  # console captured to a file: in-process progress bars redraw rarely
        offline.setdefault("TQDM_MININTERVAL", os.environ.get("TQDM_MININTERVAL", "30"))
    with _env(offline), _hub_offline(bool(offline)):
        if cfg.dry_run:
            eval_data_note(cfg, names)
        else:
            from eksft_pipeline.models.hub import pin_model_revision

            cfg = pin_model_revision(cfg, offline=bool(offline))  # model.path=owner/name@rev -> that snapshot's dir
            preflight(cfg, names)
            _validate_upfront(names, cfg, run_dir, manifest)
        session = None if cfg.dry_run else Session(run_dir)
        try:
            for name in names:
                if verdicts is not None:
                    verdicts.started = time.time()
                results.append(run_stage(name, cfg, run_dir, manifest, session))
                if verdicts is not None:
                    verdicts.stage_done(results[-1])
        finally:
            if session is not None:
                session.close()
    if not cfg.dry_run:
        report = [r for r in results if r["key"] == "report" and r["status"] in ("complete", "skipped")]
        if report:
            with contextlib.suppress(FileNotFoundError):
                path = manifest.outputs("report").get("report_md")
                if path:
                    _say(f"report: {path}")
    return results


class Verdicts:
    """One console line per stage (`verdicts=true`; recipes/profile/smoke.yaml turns it on): `ok` (run now, or
    complete from an earlier run and reused), `failed` with the first line of its error, or `skipped` (not run:
    an earlier stage or the preflight failed). A failure before any stage ran (the preflight, a stage's up-front
    validation) gets its own line, so every listed stage still has exactly one. The lines start with `PREFIX`
    (the Makefile's smoke target shows only them; the whole console goes to the run's smoke.log)."""

    PREFIX = "[verdict]"

    def __init__(self, names: list[str], cfg: DictConfig):
        self.keys: list[str] = []
        for name in names:
            try:
                self.keys.append(load_stage(name).key(cfg))
            except Exception:  # noqa: BLE001 - a bad key fails the run itself, with its own message
                self.keys.append(name)
        self.done: dict[str, str] = {}
        self.t0 = time.time()
        self.started: float | None = None  # when the stage now running started

    def _line(self, key: str, verdict: str, seconds: float | None, note: str = "") -> None:
        secs = f"{seconds:7.1f}s" if seconds is not None else " " * 8
        self.done[key] = verdict
        print(f"{self.PREFIX} {key:<16} {verdict:<7} {secs}{'  ' + note if note else ''}".rstrip(), flush=True)

    def stage_done(self, result: dict) -> None:
        reused = result.get("status") == "skipped"
        self._line(result["key"], "ok", time.time() - (self.started or self.t0), "(complete in an earlier run, reused)" if reused else "")

    @staticmethod
    def first_error_line(e: BaseException) -> str:
        if isinstance(e, KeyboardInterrupt | StageKilled):
            return f"stopped by {_signal_name(e)[0]}"
        cause = getattr(e, "cause", None)  # a stage run as a Ray task (cluster.launcher=ray): ray's RayTaskError
        if isinstance(cause, BaseException):
            e = cause
        msg = str(e.args[0]) if isinstance(e, KeyError) and len(e.args) == 1 else str(e)
        lines = [ln.strip() for ln in msg.strip().splitlines() if ln.strip()]
        first = lines[0] if lines else ""
        return f"{type(e).__name__}: {first}" if first else type(e).__name__

    def stopped(self, e: BaseException) -> None:
        failed = getattr(e, "stage_key", None)
        killed = isinstance(e, KeyboardInterrupt | StageKilled)
        if failed not in self.keys:  # before any stage (the preflight, the run dir)
            self._line("preflight", "killed" if killed else "failed", time.time() - self.t0,
                       self.first_error_line(e))
            failed = "preflight"
        for key in self.keys:
            if key in self.done:
                continue
            if key == failed:
                secs = time.time() - self.started if self.started is not None else None
                self._line(key, "killed" if killed else "failed", secs, self.first_error_line(e))
            else:
                self._line(key, "skipped", None, f"(not run: {failed} {'was killed' if killed else 'failed'})")
        print(f"{self.PREFIX} {failed} {'killed' if killed else 'failed'}: "
              f"{sum(v == 'ok' for v in self.done.values())} ok, {sum(v == 'skipped' for v in self.done.values())} "
              f"skipped ({time.time() - self.t0:.0f}s)", flush=True)

    def finished(self) -> None:
        print(f"{self.PREFIX} all {len(self.keys)} stages ok ({time.time() - self.t0:.0f}s)", flush=True)


# -- the command line ---------------------------------------------------------------------------------
def _on_signal(signum, frame):
    if _signals["deferred"]:
        _signals["pending"] = signum
        return
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise StageKilled(signum)


def _signal_name(e: BaseException) -> tuple[str, int]:
    signum = e.signum if isinstance(e, StageKilled) else signal.SIGINT
    return signal.Signals(signum).name, int(signum)


def _traceback_file(e: BaseException, cfg: DictConfig) -> str:
    text = "".join(traceback.format_exception(e))
    for folder in (Path(str(cfg.get("run_dir") or ".")) / "logs", Path(tempfile.gettempdir())):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"error-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.txt"
            path.write_text(text)
            return str(path.resolve())
        except OSError:
            continue
    return "(could not be written)"


def report_error(e: BaseException, cfg: DictConfig) -> int:
    """Print context (if any) and then ONE `error:` line naming the fix; returns the exit code."""
    from eksft_pipeline.contract.artifacts import StalledRun

    where = f"{e.stage_key}: " if getattr(e, "stage_key", None) else ""
    if isinstance(e, KeyboardInterrupt | StageKilled):
        name, num = _signal_name(e)
        how = ("re-run the same command WITHOUT force=true to resume from what this attempt saved (force=true "
               "would start it over)") if cfg.get("force") else "re-run the same command to resume"
        _say(f"error: {where}stopped by {name}; every process it started was ended and the manifest says 'killed'; "
             f"{how}")
        return 128 + num
    msg = str(e).strip()
    if isinstance(e, KeyError) and msg.startswith(("'", '"')) and len(e.args) == 1:
        msg = str(e.args[0])
    lines = msg.splitlines() or [type(e).__name__]
    details = [*str(getattr(e, "details", "") or "").splitlines(), *lines[1:]]
    for line in details[-40:]:
        print(f"    {line}", flush=True)
    first = lines[0]
    known = isinstance(e, PipelineError | ValueError | FileNotFoundError | KeyError | StalledRun)
    # a full disk also comes back from native writers as a plain Exception (tokenizers: "... (os error 28)")
    if (isinstance(e, OSError) and e.errno == errno.ENOSPC) or "No space left on device" in msg:
        known = True
        where_fs = getattr(e, "filename", None) or cfg.get("run_dir") or "the run directory"
        first += (f" -- the file system holding {where_fs} is full: free space there (or use another run_dir) "
                  "and re-run; resume points are kept")
    elif isinstance(e, OSError) and not isinstance(e, FileNotFoundError):
        known = True
        first = f"{type(e).__name__}: {first}"
    if not known:
        first = (f"{type(e).__name__}: {first} (unexpected; full traceback in {_traceback_file(e, cfg)}; "
                 "set EKSFT_DEBUG=1 to see it here)")
    me = getattr(e, "manifest_error", None)
    if me is not None:
        first += f" [the manifest could not record this failure either: {me.strerror or me}]"
    _say(f"error: {where}{first}")
    return 2 if known else 1


def main_from_config(cfg: DictConfig) -> int:
    import threading

    installed = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            installed[sig] = signal.signal(sig, _on_signal)
    try:
        run_pipeline(cfg)
        return 0
    except (Exception, KeyboardInterrupt, StageKilled) as e:
        if os.environ.get("EKSFT_DEBUG") and not isinstance(e, KeyboardInterrupt | StageKilled):
            traceback.print_exception(e)
        return report_error(e, cfg)
    finally:
        for sig, old in installed.items():
            signal.signal(sig, old)


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use: python -m eksft_pipeline")
