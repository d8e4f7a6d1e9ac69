"""What a stage is, to the orchestrator.

A stage is a small class in its own concern's package (`eksft_pipeline/data/stage.py`,
`eksft_pipeline/sft/stage.py`, ...). Stages never import each other: a later stage finds an
earlier one's files through the run directory's manifest (`ctx.upstream(key)`).
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from eksft_pipeline.pipeline.manifest import Manifest


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
        return str(self.cfg.init) if self.cfg.get("init") not in (None, "") else self.method_name()


def known_methods() -> set[str]:
    from eksft_pipeline.pipeline.verl_config import recipes_dir

    return {p.stem for p in (recipes_dir() / "method").glob("*.yaml")}


def init_tag(spec: str) -> str:
    """Directory-safe name of an `init=` value: a method name, `base`, or `path-<hash>`."""
    if spec == "base" or spec in known_methods():
        return spec
    import hashlib

    stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(spec.rstrip("/")).name)[:40] or "model"
    return f"path-{stem}-{hashlib.sha256(spec.encode()).hexdigest()[:8]}"


class Stage:
    """Base class: subclasses set `name` and implement `key`, `config`, `inputs`, `run`, `describe`."""

    name: str = ""
    # relative paths under out_dir kept when a failed/killed attempt is cleaned (resume points)
    keep_on_retry: tuple[str, ...] = ()
    # Ray resources when launched as a Ray task: num_gpus="all" means cluster.gpus_per_node
    resources: dict[str, Any] = {"num_cpus": 1, "num_gpus": 0}

    def key(self, cfg: DictConfig) -> str:
        return self.name

    def config(self, cfg: DictConfig) -> dict:
        """The part of the config this stage's outputs depend on (hashed into the manifest)."""
        return {}

    def inputs(self, ctx: StageContext) -> dict[str, str]:
        return {}

    def run(self, ctx: StageContext) -> StageResult:
        raise NotImplementedInThisBuild(f"stage {self.name!r} is not implemented in this build")

    def describe(self, ctx: StageContext) -> dict:
        """What `dry_run=true` prints: commands and resolved configs, without running anything."""
        return {"stage": self.name, "key": ctx.key}

    def clean(self, ctx: StageContext) -> None:
        """Remove a failed/killed attempt's partial outputs, keeping `keep_on_retry` paths."""
        out = ctx.out_dir
        if not out.exists():
            return
        keep = {out / k for k in self.keep_on_retry}
        for child in out.iterdir():
            if child in keep:
                continue
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
