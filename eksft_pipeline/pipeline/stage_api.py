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

from omegaconf import DictConfig, OmegaConf, open_dict

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


_TAG_PART = re.compile(r"^[A-Za-z0-9_.+]+$")


def _tag_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "null"
    if isinstance(v, float):
        v = f"{v:g}"
    if isinstance(v, list | tuple):
        return "_".join(_tag_value(x) for x in v) or "empty"
    return re.sub(r"[^A-Za-z0-9_.+]+", "+", str(v).replace("-", "m")) or "empty"


def method_tag(method: Any) -> str:
    """Name of one configured method *variant*, used in stage keys and directories (`sft/<tag>`, ...).

    The recipe's own name when the `method` node equals `recipes/method/<name>.yaml`; otherwise the name
    followed by every setting that differs from the recipe, sorted by key: `method=eksft
    method.params.rho=0.1` -> `eksft-rho_0.1`, `... method.params.lambda_kl=0` -> `eksft-lambda_kl_0-rho_0.1`,
    `method.selection_scope=sequence` -> `eksft-selection_scope_sequence`. So a Hydra multirun over
    `method.params.rho=0,0.1,0.2,0.3` gives four run directories side by side in one run dir (the default
    value keeps the plain name, so the default run is reused), and the report groups them by recipe.
    `+method.tag=<recipe>-<label>` names a variant explicitly (it must start with its recipe's name and '-').
    """
    node = OmegaConf.to_container(method, resolve=True) if isinstance(method, DictConfig) else dict(method)
    name = str(node.get("name"))
    explicit = node.get("tag")
    if explicit not in (None, ""):
        explicit = str(explicit)
        base, dash, rest = explicit.partition("-")
        if base != name or not dash or not all(_TAG_PART.match(p) for p in rest.split("-")):
            raise ValueError(f"method.tag={explicit!r} must be '{name}-<label>' with letters, digits, '_', '.', '+' "
                             "in the label (e.g. +method.tag={name}-lr_high)")
        return explicit
    recipe = _recipe(name)
    if recipe is None:
        return name
    mine = {k: v for k, v in node.items() if k not in ("name", "tag", "params")}
    theirs = {k: v for k, v in recipe.items() if k not in ("name", "params")}
    diff = {k: mine.get(k) for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k)}
    p_mine, p_theirs = dict(node.get("params") or {}), dict(recipe.get("params") or {})
    diff |= {k: p_mine.get(k) for k in set(p_mine) | set(p_theirs) if p_mine.get(k) != p_theirs.get(k)}
    if not diff:
        return name
    return name + "".join(f"-{k}_{_tag_value(diff[k])}" for k in sorted(diff))


def _recipe(name: str) -> dict | None:
    from eksft_pipeline.pipeline.verl_config import recipes_dir

    path = recipes_dir() / "method" / f"{name}.yaml"
    if not path.is_file():
        return None
    return OmegaConf.to_container(OmegaConf.load(path), resolve=True)


def apply_method_tag(cfg: DictConfig) -> DictConfig:
    """`cfg.method.name` := `method_tag(cfg.method)` (what every stage key and directory uses)."""
    tag = method_tag(cfg.method)
    if tag != str(cfg.method.name):
        with open_dict(cfg):
            cfg.method.name = tag
    return cfg


def split_method_tag(tag: str) -> str:
    """The recipe name of a method tag (`eksft-rho_0.1` -> `eksft`)."""
    return tag.partition("-")[0]


def is_method_tag(spec: str) -> bool:
    """`spec` is a recipe name or a variant tag of one (see `method_tag`)."""
    base, dash, rest = spec.partition("-")
    if base not in known_methods():
        return False
    return not dash or all(_TAG_PART.match(p) for p in rest.split("-"))


def init_tag(spec: str) -> str:
    """Directory-safe name of an `init=` value: a method name or variant tag, `base`, or `path-<hash>`."""
    if spec == "base" or is_method_tag(spec):
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
