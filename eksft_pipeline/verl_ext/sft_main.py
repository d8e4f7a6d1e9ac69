"""torchrun entry point of the SFT stage: verl's SFT trainer with a selective loss.

    torchrun --standalone --nproc_per_node=8 -m eksft_pipeline.verl_ext.sft_main \
        --config-path=<run_dir>/sft/eksft --config-name=verl_sft

The config is the fully resolved verl SFT config the sft stage wrote (verl's keys + our `eksft:`
block, see recipes/verl/sft.yaml). On the CPU default, `cluster=cpu` puts
VERL_USE_EXTERNAL_MODULES=eksft_pipeline.verl_ext.cpu_platform in the environment, so verl loads
the CPU platform shim before anything asks for a device.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig


def run(config: DictConfig) -> None:
    from verl.utils.device import auto_set_device
    from verl.utils.distributed import destroy_global_process_group, initialize_global_process_group

    from eksft_pipeline.verl_ext.sft_trainer import EKSFTTrainer

    auto_set_device(config)
    initialize_global_process_group()
    try:
        trainer = EKSFTTrainer(config=config)
        trainer.fit()
    finally:
        destroy_global_process_group()


@hydra.main(config_path=None, config_name=None, version_base=None)
def main(config: DictConfig) -> None:
    run(config)


if __name__ == "__main__":
    main()
