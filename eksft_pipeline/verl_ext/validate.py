"""verl's dataclasses as the validator of a composed SFT config (verl_ext/verl_config.py composes it).

`validate_sft_config(cfg)` instantiates every dataclass-backed block the way verl 0.9.1's `SFTTrainer` does
(`verl.utils.config.omega_conf_to_dataclass`, `verl.workers.config.HFModelConfig`), so a value verl would reject
(wrong type, unknown enum, unknown field) fails before anything is launched. Used by the sft stage's `validate`.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

# dataclass-backed blocks of each verl entry point, validated by instantiation
SFT_DATACLASS_BLOCKS = ("model", "engine", "optim", "checkpoint", "profiler")


def validate_sft_config(cfg: DictConfig) -> None:
    """Instantiate every dataclass-backed block the way verl's SFTTrainer does; raise on rejection."""
    from verl.utils.config import omega_conf_to_dataclass

    for block in SFT_DATACLASS_BLOCKS:
        node = cfg[block]
        if block == "model":
            _validate_model_block(node)
            continue
        try:
            omega_conf_to_dataclass(node)
        except Exception as e:  # noqa: BLE001 - re-raised with the block named
            raise ValueError(f"verl rejected the SFT config block '{block}': {type(e).__name__}: {e}") from e
    _check_sft_values(cfg)


def _validate_model_block(node: DictConfig, block: str = "model") -> None:
    """Field check always; full instantiation when the model is a local directory.

    `HFModelConfig.__post_init__` loads the tokenizer and HF config from `path`, so for a hub name
    (the GPU recipes, composed in CI without network) only the field names can be checked here.
    """
    import dataclasses

    from verl.utils.config import omega_conf_to_dataclass
    from verl.workers.config import HFModelConfig

    names = {f.name for f in dataclasses.fields(HFModelConfig)}
    unknown = sorted(set(node.keys()) - names - {"_target_"})
    if unknown:
        raise ValueError(f"verl rejected the config block '{block}': unknown field(s) {unknown}")
    if Path(str(node.path)).expanduser().is_dir():
        try:
            omega_conf_to_dataclass(node)
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"verl rejected the config block '{block}': {type(e).__name__}: {e}") from e


def _check_sft_values(cfg: DictConfig) -> None:
    from verl.utils.dataset.dataset_utils import DatasetPadMode

    pad_modes = {m.value if hasattr(m, "value") else str(m) for m in DatasetPadMode}
    if str(cfg.data.pad_mode) not in pad_modes:
        raise ValueError(f"data.pad_mode={cfg.data.pad_mode!r} is not one of {sorted(pad_modes)}")
    if int(cfg.data.train_batch_size) <= 0:
        raise ValueError("data.train_batch_size must be positive")
    n_gpus = int(cfg.trainer.n_gpus_per_node) * int(cfg.trainer.nnodes)
    if int(cfg.data.train_batch_size) % max(n_gpus, 1):
        raise ValueError(
            f"data.train_batch_size={cfg.data.train_batch_size} is not divisible by the {n_gpus} data-parallel ranks"
        )
    if str(cfg.trainer.device) == "cpu" and str(cfg.engine.strategy) != "fsdp2":
        raise ValueError("engine.strategy must be fsdp2 on CPU (FSDP1 cannot run without an accelerator)")


# -- value types and ranges ----------------------------------------------------------------------------------
# verl's YAML -> dataclass path (`omega_conf_to_dataclass` through hydra.instantiate) does not type-check, and the
# plain blocks (`data`, `trainer`) are read by verl's code as they are: `optim.lr=abc` would only fail inside AdamW,
# after the stage removed its previous outputs. `check_verl_values` checks every value that differs from verl's
# composed recipe before anything is launched or cleaned: against the dataclass field's annotation where the block
# names one (`_target_`), else against the type of the recipe's value; then the ranges verl's code assumes.
POSITIVE = frozenset({
    "lr", "clip_grad", "train_batch_size", "micro_batch_size_per_gpu", "ppo_mini_batch_size",
    "ppo_micro_batch_size_per_gpu", "log_prob_micro_batch_size_per_gpu", "max_length", "max_token_len_per_gpu",
    "ppo_max_token_len_per_gpu", "log_prob_max_token_len_per_gpu", "max_prompt_length", "max_response_length",
    "total_epochs", "ppo_epochs", "n", "prompt_length", "response_length", "max_num_batched_tokens",
    "tensor_model_parallel_size", "n_gpus_per_node", "nnodes", "gen_batch_size", "val_batch_size",
})  # fmt: skip
NON_NEGATIVE = frozenset({
    "weight_decay", "temperature", "entropy_coeff", "clip_ratio", "clip_ratio_low", "clip_ratio_high",
    "clip_ratio_c", "kl_coef", "kl_loss_coef", "seed", "warmup_steps",
})  # fmt: skip
UNIT_OPEN = frozenset({"top_p", "gpu_memory_utilization"})  # (0, 1]
UNIT_CLOSED = frozenset({"lr_warmup_steps_ratio", "min_lr_ratio", "warmup_steps_ratio"})  # [0, 1]
# words verl's code accepts where the recipe holds a number (verl/trainer/sft_trainer.py: "after_each_epoch")
WORDS = {"save_freq": ("after_each_epoch",), "test_freq": ("after_each_epoch",)}
INTEGER_SUFFIXES = ("batch_size", "_per_gpu", "_length", "epochs", "_freq", "nnodes", "n_gpus_per_node",
                    "_size", "top_k")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _fits(v, tp) -> bool:
    """`v` is a value of annotation `tp` (unknown annotations: accepted; None always: verl's YAML uses it freely)."""
    import dataclasses
    import enum
    import types
    import typing

    if v is None or tp is typing.Any or isinstance(tp, str | typing.TypeVar):
        return True
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(v, a) for a in typing.get_args(tp))
    if origin is typing.Literal:
        return v in typing.get_args(tp)
    if tp is bool:
        return isinstance(v, bool)
    if tp is int:
        return _is_int(v)
    if tp is float:
        return _is_num(v)
    if tp is str:
        return isinstance(v, str)
    base = origin or tp
    if base in (list, tuple, set, frozenset) or (isinstance(base, type) and base.__name__ in ("Sequence", "List")):
        return isinstance(v, list | tuple)
    if base is dict:
        return isinstance(v, dict)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return v in {m.value for m in tp} or v in {m.name for m in tp}
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return isinstance(v, dict)
    return True


def _dataclass_of(node: dict, annotation=None):
    """The dataclass a config block becomes: its `_target_`, else the parent's field annotation."""
    import dataclasses
    import importlib
    import typing

    target = node.get("_target_") if isinstance(node, dict) else None
    if isinstance(target, str) and "." in target:
        mod, _, name = target.rpartition(".")
        try:
            cls = getattr(importlib.import_module(mod), name)
            if dataclasses.is_dataclass(cls):
                return cls
        except Exception:  # noqa: BLE001 - an unimportable target is verl's own error later
            return None
    for a in (annotation, *typing.get_args(annotation or int)):
        if isinstance(a, type) and dataclasses.is_dataclass(a):
            return a
    return None


def _hints(cls) -> dict:
    import dataclasses
    import typing

    try:
        return typing.get_type_hints(cls)
    except Exception:  # noqa: BLE001 - forward references verl never resolves: the raw annotations
        return {f.name: f.type for f in dataclasses.fields(cls)}


def _value_problem(key: str, v, annotation, reference, cls) -> str | None:
    """What is wrong with value `v` of the leaf `key` (None: nothing)."""
    if v is None or v in WORDS.get(key, ()):
        return None
    if annotation is not None and not _fits(v, annotation):
        return f"is not a {_type_name(annotation)} (verl's {cls.__name__}.{key})"
    if annotation is None and reference is not None:
        if isinstance(reference, bool) and not isinstance(v, bool):
            return "is not a bool (true/false)"
        if _is_num(reference) and not _is_num(v):
            return f"is not a number (the recipe's value is {reference!r})"
        if isinstance(reference, list) and not isinstance(v, list | tuple):
            return "is not a list"
        if isinstance(reference, dict) and not isinstance(v, dict):
            return "is not a mapping"
    if not _is_num(v):
        return None
    if key.endswith(INTEGER_SUFFIXES) or key == "n":
        if not _is_int(v) and not (isinstance(v, float) and v.is_integer()):
            return "must be an integer"
    if key in POSITIVE and v <= 0:
        return "must be > 0"
    if key in NON_NEGATIVE and v < 0:
        return "must be >= 0"
    if key in UNIT_OPEN and not 0 < v <= 1:
        return "must be in (0, 1]"
    if key in UNIT_CLOSED and not 0 <= v <= 1:
        return "must be in [0, 1]"
    return None


def check_verl_values(cfg, reference, where: str) -> None:
    """Type- and range-check every value of the composed verl config `cfg` that differs from `reference` (the
    recipe as composed, before the pipeline's layers and the command line); ValueError naming `<where>.<key>`."""
    from omegaconf import OmegaConf

    def plain(x):
        if not OmegaConf.is_config(x):
            return x
        try:
            return OmegaConf.to_container(x, resolve=True)
        except Exception:  # noqa: BLE001 - an interpolation only the run fills in: check the raw values
            return OmegaConf.to_container(x, resolve=False)

    missing = object()

    def walk(node, ref, path: list[str], cls) -> None:
        hints = _hints(cls) if cls is not None else {}
        for k, v in node.items():
            if k == "_target_":
                continue
            r = ref.get(k, missing) if isinstance(ref, dict) else missing
            ann = hints.get(k)
            if isinstance(v, dict):
                sub = _dataclass_of(v, ann)
                walk(v, r if isinstance(r, dict) else {}, [*path, str(k)], sub)
                if r is missing or isinstance(r, dict) or v is None:
                    continue
            if r is not missing and r == v:
                continue
            problem = _value_problem(str(k), v, ann, None if r is missing else r, cls)
            if problem:
                dotted = ".".join([where, *path, str(k)])
                raise ValueError(f"{dotted}={v!r} {problem}; fix {dotted}")

    root = plain(cfg)
    ref = plain(reference)
    walk(root, ref, [], _dataclass_of(root))
