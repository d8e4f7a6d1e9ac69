"""`python -m eksft_pipeline [hydra overrides]` -- the orchestrator (config in recipes/).

python -m eksft_pipeline                                   # every stage, embedded CPU default
python -m eksft_pipeline stage=rl init=eksft               # one stage
python -m eksft_pipeline model=qwen3-8b cluster=8gpu       # the paper's 8-GPU run
python -m eksft_pipeline -m method=sft,dft,eksft           # multirun sweep over methods
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from eksft_pipeline.pipeline.verl_config import recipes_dir

_exit_code = 0


@hydra.main(config_path=str(recipes_dir()), config_name="config", version_base=None)
def _app(cfg: DictConfig) -> None:
    global _exit_code
    from eksft_pipeline.pipeline.runner import main_from_config

    code = main_from_config(cfg)
    _exit_code = max(_exit_code, code)
    if code and not _is_multirun():
        sys.exit(code)


def _is_multirun() -> bool:
    return any(a in ("-m", "--multirun") for a in sys.argv[1:])


def main() -> None:
    from eksft_pipeline.pipeline.verl_config import redirect_benchmark_overrides

    sys.argv[1:] = redirect_benchmark_overrides(sys.argv[1:])
    _app()
    if _exit_code:
        sys.exit(_exit_code)


if __name__ == "__main__":
    main()
