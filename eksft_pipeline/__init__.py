"""eksft-pipeline: EKSFT selective SFT -> DAPO RL -> pass@k evaluation, on verl.

Stages (one small module each, run by `python -m eksft_pipeline stage=<name>`):
split -> sft -> handoff -> rl -> eval -> report. See README.md.
"""

__version__ = "0.1.0"
