"""The pipeline's own config: where the recipes are and how `recipes/config.yaml` composes (no verl here).

`python -m eksft_pipeline <overrides>` and `compose_pipeline` compose `recipes/config.yaml` with Hydra; the verl half
of the composition (verl's own YAML tree plus `recipes/verl/*.yaml`, strict merges against verl's keys) is
`eksft_pipeline/verl_ext/verl_config.py`, built on `compose_recipe` here.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

RECIPES_DIR = Path(__file__).resolve().parents[2] / "recipes"


def recipes_dir() -> Path:
    if not RECIPES_DIR.is_dir():
        raise FileNotFoundError(
            f"recipes/ not found at {RECIPES_DIR}; install the project in editable mode (`make install`)"
        )
    return RECIPES_DIR


def compose_recipe(cfg_dir: Path, name: str, overrides: list[str] | None) -> DictConfig:
    """Hydra compose of `cfg_dir/<name>.yaml`, also from inside a running Hydra app (the stages are)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    # compose() inside a running Hydra app needs its own, temporary global state
    gh = GlobalHydra.instance()
    saved = gh.hydra if gh.is_initialized() else None
    if saved is not None:
        gh.clear()
    try:
        with initialize_config_dir(config_dir=str(cfg_dir), version_base=None):
            cfg = compose(config_name=name, overrides=list(overrides or []))
    finally:
        if saved is not None:
            gh.clear()
            gh.initialize(saved)
    # hydra's own node is not part of the config
    with open_dict(cfg):
        cfg.pop("hydra", None)
    return cfg


def compose_pipeline(*overrides: str) -> DictConfig:
    """The orchestrator's config (`recipes/config.yaml`) as `python -m eksft_pipeline <overrides>` composes it,
    for running stages from Python: `run_pipeline(compose_pipeline("stage=sft", "method=sft"))`.
    The overrides are recorded in `cli_overrides`, as the command line records its own."""
    overrides = redirect_benchmark_overrides(list(overrides))
    cfg = compose_recipe(recipes_dir(), "config", overrides)
    with open_dict(cfg):
        cfg.cli_overrides = list(overrides)
    return cfg


_EVAL_BENCHMARKS = re.compile(r"^([+~]{0,2})eval\.benchmarks\.")


def redirect_benchmark_overrides(overrides: list[str]) -> list[str]:
    """`eval.benchmarks.<name>.<key>=...` -> `model.eval.benchmarks.<name>.<key>=...`.

    `eval.benchmarks` is `${model.eval.benchmarks}` (each model recipe picks its benchmark file), an
    interpolation Hydra cannot index into, so the override would fail with "Could not override"; the
    benchmark entries live in the model block, so the override is applied there, with a note."""
    out = []
    for o in overrides:
        new = _EVAL_BENCHMARKS.sub(r"\1model.eval.benchmarks.", o)
        if new != o:
            print(f"[eksft] {o} -> {new} (eval.benchmarks interpolates the model's benchmark block)", file=sys.stderr)
        out.append(new)
    return out


def plain(x):
    """A config node as plain Python (dicts, lists, resolved interpolations); anything else unchanged. The one
    helper every stage uses to hash or print a part of its config."""
    if isinstance(x, DictConfig | ListConfig):
        return OmegaConf.to_container(x, resolve=True)
    return x
