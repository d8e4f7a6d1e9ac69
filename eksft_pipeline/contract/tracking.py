"""Experiment tracking for every stage: W&B (offline without credentials), TensorBoard, or none.

    python -m eksft_pipeline tracking=wandb                                   # whole pipeline, one W&B group
    python -m eksft_pipeline -m stage=train_eval method=sft,eksft tracking=wandb   # a sweep: one comparable group
    python -m eksft_pipeline tracking=tensorboard                             # for clusters without W&B
    python -m eksft_pipeline tracking=wandb tracking.backends=[wandb,tensorboard]
    WANDB_MODE=disabled python -m eksft_pipeline tracking=wandb                # WANDB_MODE always wins

How each stage logs:
- `sft` and `rl` use verl's own tracker (`trainer.logger`): the stage adds the backend names to verl's
  logger list and passes the identity through the environment of the verl processes, because verl 0.9.1
  calls `wandb.init(project=, name=, entity=, config=)` with no group, id or resume
  (verl/utils/tracking.py): wandb reads WANDB_RUN_GROUP, WANDB_RUN_ID, WANDB_RESUME, WANDB_JOB_TYPE,
  WANDB_DIR and WANDB_MODE itself. TensorBoard's folder comes from TENSORBOARD_DIR the same way.
- `eval` and `report` log from the orchestrator process through `StageRun` (this module): eval one run per
  target model (`eval/<method>/<target>`, id `<eval run id>-<target>`: avg@n, the pass@k curve with k as
  the step, a pass@k table), report one run (`report`: its figures and tables).
- `assets`, `split` and `handoff` log nothing and get no run (a stage opts in with `tracked = True`).
- the runner (orchestrator/runner.py `_identity`) makes the identity of each attempt before it starts and
  records it in the manifest; a stage reads it as `identity_of(ctx)`.

Identity: one group per pipeline run directory (created once, kept in the manifest's `tracking_group`,
overridable with `tracking.group=`), run names `<stage>/<method or init tag>` (`sft/eksft`, `rl/eksft`,
`eval/eksft`, `report`), and a run id per stage attempt kept in the stage's manifest entry (`tracking`).
A stage that resumes (same config, an earlier attempt killed or failed) continues its tracker run
(same id, `resume=allow`); a stage re-run because its config changed gets a new id, so a tracker run
never mixes two configurations -- the same rule as the checkpoints.

What the tracker does NOT change: a stage's config hash. `cfg.tracking` is no part of any stage's
`config()`, so switching tracking on (or from offline to online, or another project) for a run directory
whose stages are complete skips them exactly as before -- nobody expects `tracking=wandb` to retrain a
model. Only the stages that still have to run get a tracker run. (The verl config a stage writes
records `trainer.logger`; it is an output, not part of the hash.) The run ids and the group live in the
manifest: the top-level `tracking_group`, and each stage entry's `tracking` record (backends, project,
group, name, run_id, job_type, mode, dirs; `url` when online; eval adds `targets`, one run per model).

Mode (W&B): `WANDB_MODE` from the environment wins; else `tracking.mode`; else `online` when credentials
exist (WANDB_API_KEY, or a netrc entry for the W&B host), `offline` otherwise. Offline runs land in
`<run_dir>/tracking/wandb/` and can be uploaded later with `wandb sync <dir>` (the report lists them).
"""

from __future__ import annotations

import json
import netrc
import os
import re
import struct
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

# verl's Tracking backends we pass through by name (verl/utils/tracking.py: Tracking.supported_backend).
# "console" and "file" are always on (the stages read the file logger); the others need their own
# packages/credentials and are the user's choice.
VERL_BACKENDS = ("wandb", "tensorboard", "mlflow", "swanlab", "clearml", "trackio")
# backends that the orchestrator-side stages (eval, report) can also log to
LOCAL_BACKENDS = ("wandb", "tensorboard")
TRACKING_DIR = "tracking"


@dataclass(frozen=True)
class TrackingSettings:
    backends: tuple[str, ...] = ()
    project: str = "eksft-pipeline"
    entity: str | None = None
    group: str | None = None
    mode: str | None = None
    tags: tuple[str, ...] = ()

    @property
    def enabled(self) -> bool:
        return bool(self.backends)

    def uses(self, backend: str) -> bool:
        return backend in self.backends


def settings_from_config(cfg) -> TrackingSettings:
    """`cfg.tracking` (recipes/tracking/*.yaml) -> settings, with a clear error for unknown backends."""
    t = cfg.get("tracking") if cfg is not None else None
    if not t:
        return TrackingSettings()
    backends = t.get("backends") or []
    if isinstance(backends, str):
        backends = [backends]
    backends = tuple(str(b) for b in backends)
    unknown = [b for b in backends if b not in VERL_BACKENDS]
    if unknown:
        raise ValueError(
            f"tracking.backends: unknown backend(s) {unknown}; supported: {', '.join(VERL_BACKENDS)} "
            "(or tracking=none)"
        )
    mode = t.get("mode")
    if mode not in (None, "online", "offline", "disabled"):
        raise ValueError(f"tracking.mode must be online, offline, disabled or null, got {mode!r}")
    return TrackingSettings(
        backends=backends,
        project=str(t.get("project") or "eksft-pipeline"),
        entity=(str(t["entity"]) if t.get("entity") else None),
        group=(str(t["group"]) if t.get("group") else None),
        mode=mode,
        tags=tuple(str(x) for x in (t.get("tags") or ())),
    )


def has_wandb_credentials(environ: dict[str, str] | None = None) -> bool:
    """An API key in the environment, or a netrc entry for the W&B host (WANDB_BASE_URL's, if set)."""
    env = os.environ if environ is None else environ
    if env.get("WANDB_API_KEY"):
        return True
    host = urlparse(env.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname or "api.wandb.ai"
    path = env.get("NETRC") or str(Path(env.get("HOME", str(Path.home()))) / ".netrc")
    try:
        return netrc.netrc(path).authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def wandb_mode(settings: TrackingSettings, environ: dict[str, str] | None = None) -> str:
    env = os.environ if environ is None else environ
    if env.get("WANDB_MODE"):
        mode = env["WANDB_MODE"]
        if mode == "dryrun":  # wandb's old name for offline
            return "offline"
        return mode
    if settings.mode:
        return settings.mode
    return "online" if has_wandb_credentials(env) else "offline"


def run_name(stage_key: str) -> str:
    """Tracker run name of a stage key: `sft/eksft`, `rl/eksft`, `eval/eksft`, `report`."""
    return stage_key


def new_run_id(stage_key: str) -> str:
    """A fresh W&B run id: readable prefix + random suffix (W&B ids: letters, digits, '-', '_')."""
    slug = re.sub(r"[^A-Za-z0-9_-]+", "-", stage_key).strip("-")[:48] or "stage"
    return f"{slug}-{uuid.uuid4().hex[:8]}"


def new_group(run_dir: Path, model_name: str | None = None) -> str:
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(run_dir).name)[:40] or "run"
    prefix = f"{model_name}-" if model_name and not stem.startswith(str(model_name)) else ""
    return f"{prefix}{stem}-{uuid.uuid4().hex[:6]}"


@dataclass
class RunIdentity:
    """Who a stage attempt is, to the tracker (recorded in the stage's manifest entry as `tracking`)."""

    backends: tuple[str, ...]
    project: str
    group: str
    name: str
    run_id: str
    job_type: str
    resumed: bool = False
    mode: str | None = None
    entity: str | None = None
    dirs: dict[str, str] = field(default_factory=dict)
    tags: tuple[str, ...] = ()

    @classmethod
    def from_record(cls, record: dict, run_dir: Path) -> RunIdentity:
        """The identity a manifest `tracking` record describes (folders made absolute under `run_dir`)."""
        dirs = {k: str(v if Path(v).is_absolute() else Path(run_dir) / v) for k, v in (record.get("dirs") or {}).items()}
        return cls(
            backends=tuple(record.get("backends") or ()), project=str(record["project"]), group=str(record["group"]),
            name=str(record["name"]), run_id=str(record["run_id"]), job_type=str(record["job_type"]),
            resumed=bool(record.get("resumed")), mode=record.get("mode"), entity=record.get("entity"), dirs=dirs,
            tags=tuple(record.get("tags") or ()),
        )  # fmt: skip

    def child(self, suffix: str) -> RunIdentity:
        """A derived run of the same stage attempt (eval: one run per target model): name `<name>/<suffix>`,
        id `<run_id>-<suffix>`, so a resumed attempt continues every child run too."""
        slug = re.sub(r"[^A-Za-z0-9_-]+", "-", suffix).strip("-") or "x"
        dirs = dict(self.dirs)
        if "tensorboard" in dirs:
            dirs["tensorboard"] = str(Path(dirs["tensorboard"]).parent / f"{self.run_id}-{slug}")
        return RunIdentity(backends=self.backends, project=self.project, group=self.group,
                           name=f"{self.name}/{suffix}", run_id=f"{self.run_id}-{slug}", job_type=self.job_type,
                           resumed=self.resumed, mode=self.mode, entity=self.entity, dirs=dirs, tags=self.tags)

    def record(self, run_dir: Path) -> dict[str, Any]:
        """The manifest form; folders relative to the run directory, so a moved run dir stays whole."""
        rel = {}
        for k, v in self.dirs.items():
            try:
                rel[k] = str(Path(v).resolve().relative_to(Path(run_dir).resolve()))
            except ValueError:
                rel[k] = str(v)
        return {
            "backends": list(self.backends), "project": self.project, "entity": self.entity,
            "group": self.group, "name": self.name, "run_id": self.run_id, "job_type": self.job_type,
            "mode": self.mode, "resumed": self.resumed, "dirs": rel, "tags": list(self.tags), "url": self.url,
        }  # fmt: skip

    @property
    def url(self) -> str | None:
        if "wandb" not in self.backends or self.mode != "online" or not self.entity:
            return None
        return f"https://wandb.ai/{self.entity}/{self.project}/runs/{self.run_id}"


def identity_for(
    settings: TrackingSettings,
    *,
    stage_key: str,
    run_dir: Path,
    group: str,
    previous: dict | None,
    config_hash: str,
    environ: dict[str, str] | None = None,
) -> RunIdentity | None:
    """The tracker identity of this attempt of `stage_key`, or None when tracking is off.

    `previous` is the stage's manifest entry before this attempt (None if never run). Its run id is
    reused only when that attempt had the same config hash and did not complete (a resume); a
    complete stage being re-run (force) or a changed config starts a new tracker run.
    """
    if not settings.enabled:
        return None
    prev = (previous or {}).get("tracking") or {}
    resume = (
        bool(prev.get("run_id"))
        and (previous or {}).get("config_hash") == config_hash
        and (previous or {}).get("status") != "complete"
        and tuple(prev.get("backends") or ()) == settings.backends
    )
    run_id = str(prev["run_id"]) if resume else new_run_id(stage_key)
    root = Path(run_dir) / TRACKING_DIR
    dirs = {}
    if settings.uses("wandb"):
        dirs["wandb"] = str(root)  # wandb makes <dir>/wandb/<offline-|>run-<time>-<id>/
    if settings.uses("tensorboard"):
        dirs["tensorboard"] = str(root / "tensorboard" / run_id)
    return RunIdentity(
        backends=settings.backends, project=settings.project, group=group, name=run_name(stage_key),
        run_id=run_id, job_type=stage_key.split("/")[0], resumed=resume,
        mode=wandb_mode(settings, environ) if settings.uses("wandb") else None,
        entity=settings.entity, dirs=dirs, tags=settings.tags,
    )  # fmt: skip


def run_group(settings: TrackingSettings, manifest, model_name: str | None = None) -> str:
    """The run directory's tracking group: `tracking.group`, else the manifest's `tracking_group` (created
    once, on the first tracked stage, so every stage and every method of a sweep shares it)."""
    if settings.group:
        return settings.group
    return manifest.meta("tracking_group", lambda: new_group(manifest.run_dir, model_name))


def identity_of(ctx) -> RunIdentity | None:
    """The identity the orchestrator gave this stage attempt (`ctx.tracking`), else the one its manifest
    entry records (a stage launched as a Ray task gets a fresh context), else None (tracking off)."""
    ident = getattr(ctx, "tracking", None)
    if ident is not None or getattr(ctx, "dry_run", False):
        return ident
    if not settings_from_config(ctx.cfg).enabled:
        return None
    rec = (ctx.manifest.entry(ctx.key) or {}).get("tracking")
    return RunIdentity.from_record(rec, ctx.run_dir) if rec else None


def verl_trainer_names(identity: RunIdentity | None) -> dict[str, str]:
    """`trainer.project_name` / `trainer.experiment_name` for verl: verl 0.9.1 passes them to
    `wandb.init(project=, name=)` explicitly (so WANDB_PROJECT / WANDB_NAME would be ignored). Empty when off:
    the stage keeps its own names."""
    if identity is None:
        return {}
    return {"project_name": identity.project, "experiment_name": identity.name}


def verl_logger(base: list[str], identity: RunIdentity | None) -> list[str]:
    """verl's `trainer.logger` list: the stage's own backends (console, file) plus the tracker's."""
    out = list(base)
    for b in identity.backends if identity else ():
        if b not in out:
            out.append(b)
    return out


def verl_env(identity: RunIdentity | None, *, create: bool = True) -> dict[str, str]:
    """Environment for verl's processes so its `wandb.init` / TensorBoard writer join this identity
    (`create=False`: do not make the folders, for a dry run)."""
    if identity is None:
        return {}
    env: dict[str, str] = {}
    if "wandb" in identity.backends:
        if create:
            Path(identity.dirs["wandb"]).mkdir(parents=True, exist_ok=True)
        env.update(
            WANDB_PROJECT=identity.project, WANDB_RUN_GROUP=identity.group, WANDB_RUN_ID=identity.run_id,
            WANDB_NAME=identity.name, WANDB_RESUME="allow", WANDB_JOB_TYPE=identity.job_type,
            WANDB_DIR=identity.dirs["wandb"], WANDB_MODE=str(identity.mode),
            WANDB_SILENT="true",
        )  # fmt: skip
        if identity.tags:
            env["WANDB_TAGS"] = ",".join(identity.tags)
        if identity.entity:
            env["WANDB_ENTITY"] = identity.entity
    if "tensorboard" in identity.backends:
        if create:
            Path(identity.dirs["tensorboard"]).mkdir(parents=True, exist_ok=True)
        env["TENSORBOARD_DIR"] = identity.dirs["tensorboard"]
    return env


# ------------------------------------------------------------------------------------------------
# orchestrator-side logging (eval, report)
# ------------------------------------------------------------------------------------------------


class StageRun:
    """Log from the orchestrator process (eval metrics, report figures/tables) under `identity`.

        with StageRun(identity) as run:
            run.log({"aime25/avg@n": 0.31}, step=0)
            run.table("pass_at_k", df)
            run.image("pass_at_k", "report/pass_at_k.png")

    A no-op when `identity` is None (tracking off).
    """

    def __init__(self, identity: RunIdentity | None, config: dict | None = None):
        self.identity = identity
        self.config = config or {}
        self._wandb = None
        self._tb = None

    def __enter__(self) -> StageRun:
        ident = self.identity
        if ident is None:
            return self
        if "wandb" in ident.backends:
            import wandb

            Path(ident.dirs["wandb"]).mkdir(parents=True, exist_ok=True)
            self._wandb = wandb.init(
                project=ident.project, entity=ident.entity, group=ident.group, name=ident.name, id=ident.run_id,
                job_type=ident.job_type, resume="allow", dir=ident.dirs["wandb"], mode=ident.mode,
                config=self.config, reinit="create_new",
                # wandb names the folder by the second it started: a resume in the same second as the attempt it
                # continues would write into (and truncate) that attempt's log without a suffix of its own
                settings=wandb.Settings(silent=True, x_sync_dir_suffix=str(time.time_ns())),
                tags=list(ident.tags) or None,
            )  # fmt: skip
        if "tensorboard" in ident.backends:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(ident.dirs["tensorboard"])
        return self

    def log(self, data: dict[str, float], step: int = 0) -> None:
        data = {k: float(v) for k, v in data.items() if _is_number(v)}
        if self._wandb is not None:
            self._wandb.log(data, step=step)
        if self._tb is not None:
            for k, v in data.items():
                self._tb.add_scalar(k, v, step)

    def table(self, name: str, df) -> None:
        if self._wandb is not None:
            import wandb

            self._wandb.log({name: wandb.Table(dataframe=df.reset_index(drop=True))})
        if self._tb is not None:
            self._tb.add_text(name, _markdown_table(df))

    def image(self, name: str, path: str | os.PathLike) -> None:
        p = Path(path)
        if not p.is_file():
            return
        if self._wandb is not None:
            import wandb

            self._wandb.log({name: wandb.Image(str(p))})
        if self._tb is not None:
            import numpy as np
            from PIL import Image

            self._tb.add_image(name, np.asarray(Image.open(p).convert("RGB")), dataformats="HWC")

    def summary(self, data: dict[str, Any]) -> None:
        if self._wandb is not None:
            for k, v in data.items():
                self._wandb.summary[k] = v

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._wandb is not None:
            import wandb

            self._wandb.finish(exit_code=0 if exc_type is None else 1)
            self._wandb = None
            # finish() returns before wandb's service has flushed the offline transaction log; tearing the service
            # down waits for it, so the run's files are complete when the stage ends (and the report can read them)
            wandb.teardown()
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _markdown_table(df) -> str:
    """A DataFrame as a Markdown table (TensorBoard renders text as Markdown; no `tabulate` dependency)."""
    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in df.itertuples(index=False):
        lines.append("| " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in row) + " |")
    return "\n".join(lines)


def _is_number(v) -> bool:
    try:
        float(v)
    except (TypeError, ValueError):
        return False
    return not isinstance(v, bool | str)


# ------------------------------------------------------------------------------------------------
# reading tracker runs back (report from the tracker; tests)
# ------------------------------------------------------------------------------------------------


def wandb_run_dirs(root: Path, run_id: str) -> list[Path]:
    """Local W&B run folders of `run_id` under `root` (one per process that logged to it), oldest first.

    A folder is `<offline-|>run-<YYYYmmdd_HHMMSS>-<id>[-<suffix>]`; it is `run_id`'s when it holds
    `run-<run_id>.wandb` (the name alone cannot tell `<id>-<suffix>` from a child run's id). Order: the
    second in the name, then StageRun's nanosecond suffix (two attempts in one second get two folders)."""
    base = Path(root) / "wandb"
    found = [p for p in base.glob("*run-*") if p.is_dir() and (p / f"run-{run_id}.wandb").is_file()]

    def when(p: Path) -> tuple[str, int]:
        m = re.match(r"(?:offline-)?run-(\d{8}_\d{6})-", p.name)
        tail = p.name.rsplit("-", 1)[-1]
        return (m.group(1) if m else "", int(tail) if tail.isdigit() and len(tail) == 19 else 0)

    return sorted(found, key=when)


def _wandb_records(path: Path) -> Iterator[bytes]:
    """Raw records of a `.wandb` transaction log: a 7-byte header (':W&B', magic 0xBEE1, version 0)
    then LevelDB-log framing -- 32 KiB blocks of chunks, each `crc32c u32 | length u16 | type u8 | data`,
    type 1 = FULL, 2 = FIRST, 3 = MIDDLE, 4 = LAST; a block tail shorter than a chunk header is padding."""
    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B transaction log")
    block, pos, buf = 32768, 7, b""
    while pos + 7 <= len(data):
        left = block - (pos % block)
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            # zero padding at the end of a block
            pos += block - (pos % block) if pos % block else 0
            continue
        if kind == 1:
            yield chunk
        elif kind == 2:
            buf = chunk
        elif kind == 3:
            buf += chunk
        elif kind == 4:
            yield buf + chunk
            buf = b""


def read_wandb_history(run_dir: Path) -> list[dict[str, Any]]:
    """The logged history rows (`_step` + values) of one local W&B run folder, in order."""
    from wandb.proto import wandb_internal_pb2 as pb

    files = sorted(Path(run_dir).glob("run-*.wandb"))
    if not files:
        raise FileNotFoundError(f"no run-*.wandb file in {run_dir}")
    rows = []
    for raw in _wandb_records(files[0]):
        rec = pb.Record()
        rec.ParseFromString(raw)
        if rec.WhichOneof("record_type") != "history":
            continue
        row = {}
        for item in rec.history.item:
            key = item.key or "/".join(item.nested_key)
            try:
                row[key] = json.loads(item.value_json)
            except json.JSONDecodeError:
                row[key] = item.value_json
        rows.append(row)
    return rows


def read_wandb_run_info(run_dir: Path) -> dict[str, Any]:
    """Name, group, job type and id of a local W&B run folder (from its `run` record)."""
    from wandb.proto import wandb_internal_pb2 as pb

    files = sorted(Path(run_dir).glob("run-*.wandb"))
    if not files:
        raise FileNotFoundError(f"no run-*.wandb file in {run_dir}")
    for raw in _wandb_records(files[0]):
        rec = pb.Record()
        rec.ParseFromString(raw)
        if rec.WhichOneof("record_type") == "run":
            r = rec.run
            return {"run_id": r.run_id, "name": r.display_name, "group": r.run_group, "job_type": r.job_type,
                    "project": r.project}
    raise ValueError(f"{files[0]} has no run record")


def history(record: dict, run_dir: Path) -> dict[int, dict[str, Any]]:
    """step -> metrics of a stage's tracker run, from the manifest's `tracking` record.

    W&B runs are read from their local folders (offline, or the local copy of an online run); a
    stage that ran in several attempts (resumed) has one folder per attempt, merged in time order.
    """
    out: dict[int, dict] = {}
    if "wandb" not in (record.get("backends") or []):
        raise ValueError("only W&B runs can be read back (tracking.backends has no wandb)")
    root = Path(run_dir) / (record.get("dirs") or {}).get("wandb", TRACKING_DIR)
    dirs = wandb_run_dirs(root, str(record["run_id"]))
    if not dirs:
        raise FileNotFoundError(f"no local W&B run {record['run_id']} under {root / 'wandb'}")
    for d in dirs:
        for row in read_wandb_history(d):
            step = int(row.get("_step", 0))
            out.setdefault(step, {}).update({k: v for k, v in row.items() if not k.startswith("_")})
    return dict(sorted(out.items()))
