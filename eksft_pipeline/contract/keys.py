"""The SFT -> handoff -> RL -> eval contract: `init=` specs, method tags, stage keys, start models.

One place builds and resolves what the stages agree on (nothing else formats these strings):

    init_spec(cfg)        `init=`, defaulting to the run's method tag (`cfg.method.name` after `apply_method_tag`)
    check_init_spec(s)    a method (or variant tag), `base`, a model directory or a cached hub model; else ConfigError
    method_tag(method)    the name of one method *variant* (`eksft`, `eksft-rho_0.1`)
    init_tag(s)           a directory-safe name of an init spec (`eksft`, `base`, `path-<stem>-<hash>`)

    stage key             sft_key(cfg) = `sft/<method tag>`;   handoff_key / rl_key / eval_key(cfg) =
                          `handoff|rl|eval/<init_tag(init_spec)>`
    start model           init_model(ctx): the model `init=` names -- `model.path` for `base`, the SFT output of a
                          method (`sft/<tag>`'s `hf_model`, from the manifest), else the path / hub name itself;
                          used by the handoff (the RL stage's start) and by eval's `sft` target.
                          rl_model(ctx): the RL output of `init=` (`rl/<init_tag>`'s `hf_model`), eval's `rl` target.

A stage key is also the stage's directory under the run directory (`<run_dir>/<key>`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from eksft_pipeline.contract.errors import ConfigError
from eksft_pipeline.contract.recipes import recipes_dir

STAGES_BY_INIT = ("handoff", "rl", "eval")  # stages keyed by `init=` (sft is keyed by the method tag)

# -- init spec and stage keys ---------------------------------------------------------------------
def init_spec(cfg: DictConfig) -> str:
    """`init=` as given, else the run's method tag: which model the handoff / RL / eval stages start from."""
    return str(cfg.init) if cfg.get("init") not in (None, "") else str(cfg.method.name)


def sft_key(cfg_or_tag: DictConfig | str) -> str:
    """`sft/<method tag>` of the run's method (a config) or of a method tag (a string)."""
    tag = cfg_or_tag if isinstance(cfg_or_tag, str) else str(cfg_or_tag.method.name)
    return f"sft/{tag}"


def init_key(stage: str, cfg_or_spec: DictConfig | str) -> str:
    """`<stage>/<init_tag>` for the stages keyed by `init=` (handoff, rl, eval)."""
    if stage not in STAGES_BY_INIT:
        raise ValueError(f"stage {stage!r} is not keyed by init= (one of {STAGES_BY_INIT})")
    spec = cfg_or_spec if isinstance(cfg_or_spec, str) else init_spec(cfg_or_spec)
    return f"{stage}/{init_tag(spec)}"


def handoff_key(cfg_or_spec: DictConfig | str) -> str:
    return init_key("handoff", cfg_or_spec)


def rl_key(cfg_or_spec: DictConfig | str) -> str:
    return init_key("rl", cfg_or_spec)


def eval_key(cfg_or_spec: DictConfig | str) -> str:
    return init_key("eval", cfg_or_spec)


# -- which model a stage starts from --------------------------------------------------------------
def init_kind(ctx) -> str:
    """What `init=` names in this run: `base`, `sft` (an SFT output of this run: a method tag, or any spec the
    manifest has an `sft/<spec>` entry for) or `path` (a model directory or hub name)."""
    spec = ctx.init_spec()
    if spec == "base":
        return "base"
    if is_method_tag(spec) or ctx.manifest.entry(sft_key(spec)) is not None:
        return "sft"
    return "path"


def init_model(ctx, *, placeholder: bool = False) -> str:
    """The model `init=` names (`ctx`: a StageContext). On a dry run the SFT output is its would-be path
    (`<run_dir>/sft/<tag>/hf_model`; with `placeholder`, spelled with a literal `<run_dir>`)."""
    spec, kind = ctx.init_spec(), init_kind(ctx)
    if kind == "base":
        return str(ctx.cfg.model.path)
    if kind == "path":
        from eksft_pipeline.contract.run_format import resolve_model
        from eksft_pipeline.models.hub import split_revision

        # owner/name@rev: the snapshot of that revision (check_init_spec found it cached), which every loader reads
        return str(resolve_model(spec)) if split_revision(spec)[1] and not ctx.dry_run else spec
    if ctx.dry_run:
        return f"<run_dir>/{sft_key(spec)}/hf_model" if placeholder else str(ctx.run_dir / sft_key(spec) / "hf_model")
    return ctx.upstream(sft_key(spec))["hf_model"]


def rl_model(ctx, *, placeholder: bool = False) -> str:
    """The RL output of `init=` (`rl/<init_tag>/hf_model`, from the manifest; its would-be path on a dry run)."""
    key = rl_key(ctx.init_spec())
    if ctx.dry_run:
        return f"<run_dir>/{key}/hf_model" if placeholder else str(ctx.run_dir / key / "hf_model")
    return ctx.upstream(key)["hf_model"]


# -- init specs and method tags -------------------------------------------------------------------
def known_methods() -> set[str]:
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
        from eksft_pipeline.contract.run_format import resolve_model

        try:
            resolve_model(spec)
            return "hub"
        except FileNotFoundError:
            pass
    what = "is a file, not a model directory" if p.is_file() else "does not exist"
    raise ConfigError(
        f"init={spec!r} is neither a method ({', '.join(sorted(methods))}), 'base', nor a model directory or "
        f"cached hub model (as a path it {what}); fix: init=<method>, init=base or init=/path/to/hf_model"
    )


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
