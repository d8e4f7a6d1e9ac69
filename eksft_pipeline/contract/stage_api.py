"""What a stage is, to the orchestrator.

A stage is a small class in its own concern's package (`eksft_pipeline/data/stage.py`,
`eksft_pipeline/sft/stage.py`, ...). Stages never import each other: a later stage finds an
earlier one's files through the run directory's manifest (`ctx.upstream(key)`).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from eksft_pipeline.contract.errors import ConfigError, PipelineError
from eksft_pipeline.contract.keys import init_spec
from eksft_pipeline.contract.manifest import Manifest
from eksft_pipeline.contract.run_format import (
    RUN_FORMAT_OUTPUT,
    RunFormat,
    RunFormatError,
    read_run_format,
    run_format_from_config,
)

__all__ = ["ConfigError", "NotImplementedInThisBuild", "PipelineError", "Stage", "StageContext", "StageResult",
           "positive"]


class NotImplementedInThisBuild(RuntimeError):
    """A stage this build cannot run (never reported as success)."""


@dataclass
class StageResult:
    outputs: dict[str, str]
    summary: dict[str, Any] = field(default_factory=dict)


@dataclass
class StageContext:
    cfg: DictConfig
    run_dir: Path
    manifest: Manifest
    key: str
    dry_run: bool = False
    # the tracker identity of this attempt (contract/tracking.py RunIdentity), set by the runner; None = off
    tracking: Any = None
    _run_format: Any = field(default=None, init=False, repr=False, compare=False)

    @property
    def run_format(self) -> RunFormat:
        """The run's format (chat template, EOS, generation prefix, model dirs) as the split stage recorded it
        (contract/run_format.py): the one way a stage learns it. A run directory whose split has not completed (a
        dry run; a base model evaluated on its own) gets the format planned from the config (`planned=True`); a
        completed split's record that is missing or corrupt raises RunFormatError (one line)."""
        if self._run_format is None:
            self._run_format = self._load_run_format()
        return self._run_format

    def _load_run_format(self) -> RunFormat:
        entry = self.manifest.entry("split")
        if entry is None or entry.get("status") != "complete":
            # nothing recorded yet: the stages that need the split's data fail on ctx.upstream("split") themselves
            return run_format_from_config(self.cfg, planned=True)
        outs = self.manifest.outputs("split")
        if RUN_FORMAT_OUTPUT not in outs:
            if self.dry_run:
                return run_format_from_config(self.cfg, planned=True)
            raise RunFormatError(f"the split stage in {self.run_dir} recorded no {RUN_FORMAT_OUTPUT} (it ran before "
                                 "the record existed); rerun the split stage (stage=split force=true)")
        return read_run_format(outs[RUN_FORMAT_OUTPUT])

    @property
    def out_dir(self) -> Path:
        return self.run_dir / self.key

    def env(self) -> dict[str, str]:
        """Process environment for verl processes of this cluster (cluster.env on top of os.environ)."""
        env = dict(os.environ)
        for k, v in (OmegaConf.to_container(self.cfg.cluster.get("env", {}), resolve=True) or {}).items():
            env[str(k)] = "" if v is None else str(v)
        # verl processes must import this package: make the checkout importable even without install
        root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        return env

    def upstream(self, key: str) -> dict[str, str]:
        return self.manifest.outputs(key)

    def method_name(self) -> str:
        return str(self.cfg.method.name)

    def init_spec(self) -> str:
        return init_spec(self.cfg)


def positive(cfg_node, name: str, where: str, *, allow_none: bool = False, zero: bool = False, kind=int):
    """Read `cfg_node[name]` as a positive number (or None / 0 where allowed); ConfigError naming the key otherwise."""
    v = cfg_node.get(name)
    if v is None and allow_none:
        return None
    try:
        x = kind(v)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}.{name}={v!r} is not a number; set {where}.{name}=<{kind.__name__}>") from None
    if x < 0 or (x == 0 and not zero):
        raise ConfigError(f"{where}.{name}={v!r} must be {'>= 0' if zero else '> 0'}; fix {where}.{name}")
    return x
class Stage:
    """Base class: subclasses set `name` and implement `key`, `config`, `inputs`, `validate`, `run`, `describe`.

    Lifecycle (orchestrator/runner.py): `check` (cheap) -> `inputs` + `config` hashed -> skip if complete ->
    `validate` (the whole stage config, the composed verl config; reads only) -> end survivors of an earlier
    attempt -> manifest `start` -> `clean` -> `run` -> manifest `complete`. Nothing on disk changes before
    `validate` passed.
    """

    name: str = ""
    # relative paths under out_dir kept when a failed/killed attempt OF THE SAME CONFIG is cleaned (resume
    # points: verl checkpoints and their logs); a changed config or force=true removes them too
    keep_on_retry: tuple[str, ...] = ()
    # True when the stage's resume points carry their own key (eval samples are keyed by the model's
    # weights and the sampling settings), so they are kept across config changes (not across force=true)
    resume_keyed_by_content: bool = False
    # Ray resources when launched as a Ray task: num_gpus="all" means cluster.gpus_per_node
    resources: dict[str, Any] = {"num_cpus": 1, "num_gpus": 0}

    def key(self, cfg: DictConfig) -> str:
        return self.name

    def config(self, cfg: DictConfig) -> dict:
        """The part of the config this stage's outputs depend on (hashed into the manifest)."""
        return {}

    def inputs(self, ctx: StageContext) -> dict[str, str]:
        return {}

    def check(self, ctx: StageContext) -> None:
        """Cheap config checks (no heavy imports, no upstream files): run before anything else, even before a
        complete stage is skipped, so e.g. a bad `init=` is named as such. Reads only."""

    def validate(self, ctx: StageContext) -> None:
        """Everything `check` does plus the expensive part (compose and validate the verl config): run before
        anything is cleaned or written, when the stage is about to run. Reads only; `ctx.dry_run` may be set."""
        self.check(ctx)

    def run(self, ctx: StageContext) -> StageResult:
        raise NotImplementedInThisBuild(f"stage {self.name!r} is not implemented in this build")

    def describe(self, ctx: StageContext) -> dict:
        """What `dry_run=true` prints: commands and resolved configs, without running anything."""
        return {"stage": self.name, "key": ctx.key}

    def clean(self, ctx: StageContext, keep: tuple[str, ...] | None = None) -> None:
        """Remove a previous attempt's outputs, keeping the resume points `keep` (default `keep_on_retry`)."""
        out = ctx.out_dir
        if not out.exists():
            return
        keep = {out / k for k in (self.keep_on_retry if keep is None else keep)}
        for child in out.iterdir():
            if child in keep:
                continue
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
