"""verl's dataclasses as the validator of a composed SFT config (pipeline/verl_config.py composes it).

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
