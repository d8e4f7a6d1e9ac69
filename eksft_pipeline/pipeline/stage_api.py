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


class PipelineError(RuntimeError):
    """An error the user can fix: `str(e)` is ONE line naming the problem and the fix; `details` (optional,
    several lines, e.g. the last lines of verl's log) is printed above it."""

    def __init__(self, message: str, *, details: str = ""):
        super().__init__(message)
        self.details = details


class ConfigError(PipelineError, ValueError):
    """A config value a stage rejects before it touches anything on disk."""


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
    # the tracker identity of this attempt (pipeline/tracking.py RunIdentity), set by the runner; None = off
    tracking: Any = None

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


def check_init_spec(spec: str) -> str:
    """`init=` must be a method name, `base`, a local model directory or a model in the local HF cache;
    returns which of these it is, or raises ConfigError (one line) instead of a later "no complete output"."""
    if spec == "base":
        return "base"
    methods = known_methods()
    if spec in methods or is_method_tag(spec):  # a recipe or one of its variants (eksft-rho_0.1)
        return "method"
    p = Path(spec).expanduser()
    if p.is_dir():
        return "path"
    if not p.exists() and not spec.startswith(("/", ".", "~")) and "/" in spec:
        from eksft_pipeline.models.hub import resolve_model_dir

        try:
            resolve_model_dir(spec)
            return "hub"
        except FileNotFoundError:
            pass
    what = "is a file, not a model directory" if p.is_file() else "does not exist"
    raise ConfigError(
        f"init={spec!r} is neither a method ({', '.join(sorted(methods))}), 'base', nor a model directory or "
        f"cached hub model (as a path it {what}); fix: init=<method>, init=base or init=/path/to/hf_model"
    )


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
    """Base class: subclasses set `name` and implement `key`, `config`, `inputs`, `validate`, `run`, `describe`.

    Lifecycle (pipeline/runner.py): `check` (cheap) -> `inputs` + `config` hashed -> skip if complete ->
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
