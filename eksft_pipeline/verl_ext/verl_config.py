"""Compose verl configs from `recipes/verl/*.yaml` (validated against verl's dataclasses in verl_ext/validate.py).

The stages never hand-write a verl config: they compose verl's own YAML (searchpath
`pkg://verl.trainer.config`) with the project's recipe on top, merge the orchestrator's override
blocks in struct mode -- so a key verl does not define fails here, naming the key, instead of on
the cluster. Instantiating every block that verl turns into a dataclass, so a value verl would
reject fails before launch too, needs verl's code: `eksft_pipeline.verl_ext.validate` (SFT) and
`eksft_pipeline.verl_ext.ppo_main.validate_ppo_config` (DAPO). Nothing here imports verl; the pipeline's own
config (recipes/config.yaml, the recipes folder) is eksft_pipeline/contract/recipes.py.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from eksft_pipeline.contract.errors import ConfigError
from eksft_pipeline.contract.recipes import compose_recipe, plain, recipes_dir

# Free-form dicts inside verl configs: any key is legal there.
OPEN_PATHS = {
    "model.override_config",
    "data.apply_chat_template_kwargs",
    "optim.override_optimizer_config",
    "eksft.loss_params",
    "actor_rollout_ref.model.override_config",
    "actor_rollout_ref.rollout.engine_kwargs",
    "actor_rollout_ref.rollout.custom",
    "reward.custom_reward_function.reward_kwargs",
    "custom_reward_function.reward_kwargs",
    "reward_model.reward_kwargs",
    "ray_kwargs.ray_init",
    "ray_kwargs",
    "transfer_queue",
}


class ConfigKeyError(KeyError):
    """An override names a key the composed verl config does not have."""

    def __str__(self):  # KeyError quotes its message; keep it readable
        return self.args[0] if self.args else ""



def compose_verl(name: str, overrides: list[str] | None = None) -> DictConfig:
    """Compose `recipes/verl/<name>.yaml` (which lists verl's own config in its defaults).

    `overrides` are Hydra overrides applied at composition, e.g. `["dapo_platform=cpu"]` to pick a
    config group option of the recipe.
    """
    cfg_dir = recipes_dir() / "verl"
    if not (cfg_dir / f"{name}.yaml").exists():
        raise FileNotFoundError(f"no verl recipe {cfg_dir / (name + '.yaml')}")
    return compose_recipe(cfg_dir, name, overrides)


def command_line_blocks(cfg: DictConfig, *prefixes: str, owned: dict[str, str] | None = None) -> list[tuple[str, dict]]:
    """The command line's overrides of keys under `prefixes` (e.g. `sft.verl`, `model.sft.verl`), as
    (where, nested dict) blocks to merge LAST into a verl config: a value typed on the command line wins over
    every recipe layer (`sft.verl.optim.lr=5e-4` beats the model recipe's `model.sft.verl.optim.lr`).

    Values are read back from the composed `cfg` (Hydra already parsed them); a '+' on the override is kept
    on the leaf key so `strict_merge` lets a deliberately new key through. Deletions (`~key`) are skipped.
    `owned` maps verl keys the stage sets itself (e.g. `data.max_response_length`) to the pipeline key that
    controls them: overriding those on the command line would be silently undone, so it is rejected.
    """
    blocks = []
    for ov in list(cfg.get("cli_overrides") or []):
        key, sep, _ = str(ov).partition("=")
        if not sep or key.startswith("~"):
            continue
        add = key.startswith("+") and not key.startswith("++")
        key = key.lstrip("+")
        for prefix in prefixes:
            if not key.startswith(prefix + "."):
                continue
            path = key[len(prefix) + 1 :].split(".")
            dotted = ".".join(path)
            for own, instead in (owned or {}).items():
                if dotted == own or dotted.startswith(own + ".") or own.startswith(dotted + "."):
                    raise ConfigError(f"{key} is set by the stage itself (from {instead}); set {instead} instead")
            value = plain(OmegaConf.select(cfg, key, default=None))
            node: Any = value
            for i, part in enumerate(reversed(path)):
                leaf = i == 0
                node = {("+" + part) if (leaf and add) else part: node}
            blocks.append((f"command line {key}", node))
    return blocks


def strict_merge(base: DictConfig, override: Any, *, where: str, _prefix: str = "") -> None:
    """Merge `override` into `base` in place; unknown keys raise ConfigKeyError naming them.

    Keys under OPEN_PATHS (free-form dicts) and keys given with a leading '+' are added freely.
    """
    override = plain(override)
    if override is None:
        return
    if not isinstance(override, dict):
        raise TypeError(f"{where}: expected a mapping at {_prefix or '<root>'}, got {type(override).__name__}")
    for raw_key, value in override.items():
        add = isinstance(raw_key, str) and raw_key.startswith("+")
        key = raw_key[1:] if add else raw_key
        path = f"{_prefix}.{key}" if _prefix else str(key)
        is_open = path in OPEN_PATHS or _prefix in OPEN_PATHS
        if key not in base:
            if not (add or is_open):
                near = ", ".join(sorted(str(k) for k in base.keys())[:40])
                raise ConfigKeyError(
                    f"{where}: '{path}' is not a key of the verl config (verl 0.9.1 would reject it). "
                    f"Keys at this level: {near}. Prefix a new key with '+' to add it deliberately."
                )
            with open_dict(base):
                base[key] = value
            continue
        current = base[key]
        if isinstance(current, DictConfig) and isinstance(value, dict) and not is_open:
            strict_merge(current, value, where=where, _prefix=path)
        elif isinstance(current, DictConfig) and isinstance(value, dict):
            with open_dict(current):
                merged = OmegaConf.merge(current, value)
            with open_dict(base):
                base[key] = merged
        else:
            with open_dict(base):
                base[key] = value
