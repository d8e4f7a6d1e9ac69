"""compute_score under verl 0.9.1's own reward loop: the ``dapo`` reward manager and custom-function loading.

verl's ``RewardLoopWorker`` resolves ``reward.reward_manager.name`` and ``reward.custom_reward_function``
exactly as ``load_reward_manager`` does here, and ``DAPORewardManager.run_single`` calls the function via
``loop.run_in_executor`` (a worker thread: the SIGALRM trap) and adds the overlong penalty configured under
``reward.reward_kwargs``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from verl import DataProto
from verl.trainer.ppo.reward import get_custom_reward_fn, load_reward_manager

from eksft_pipeline.scoring import reward

REWARD_FILE = Path(__file__).parents[2] / "eksft_pipeline/scoring/reward.py"


class ByteTokenizer:
    """Token ids are UTF-8 bytes; 0 is padding."""

    eos_token = "<eos>"

    def decode(self, ids, skip_special_tokens=True):
        return bytes(int(i) for i in ids if int(i) > 0).decode("utf-8", "replace")


def make_item(text: str, gold: str, pad: int = 8) -> DataProto:
    ids = list(text.encode())
    resp = torch.zeros(1, len(ids) + pad, dtype=torch.long)
    resp[0, : len(ids)] = torch.tensor(ids)
    prompt = torch.ones(1, 3, dtype=torch.long)
    mask = torch.zeros(1, 3 + resp.shape[1], dtype=torch.long)
    mask[0, : 3 + len(ids)] = 1
    return DataProto.from_dict(
        tensors={"prompts": prompt, "responses": resp, "attention_mask": mask},
        non_tensors={
            "data_source": np.array(["math"], dtype=object),
            "reward_model": np.array([{"ground_truth": gold, "style": "rule"}], dtype=object),
            "extra_info": np.array([{"index": 0}], dtype=object),
        },
    )


def config(path: str, max_resp_len: int, buffer_len: int, reward_kwargs: dict | None = None):
    return OmegaConf.create(
        {
            "reward": {
                "custom_reward_function": {
                    "path": path,
                    "name": "compute_score",
                    "reward_kwargs": reward_kwargs or {},
                },
                "reward_manager": {"source": "register", "name": "dapo"},
                "reward_kwargs": {
                    "max_resp_len": max_resp_len,
                    "overlong_buffer_cfg": {"enable": True, "len": buffer_len, "penalty_factor": 1.0, "log": True},
                },
            }
        }
    )


TEXT = "<think>maybe \\boxed{3}</think> The answer is \\boxed{\\dfrac{1}{2}}."


@pytest.mark.parametrize("path", ["pkg://eksft_pipeline.scoring.reward", str(REWARD_FILE)], ids=["pkg", "file"])
def test_dapo_reward_manager_runs_our_compute_score(path):
    n_tokens = len(TEXT.encode())
    # response is 30 tokens over the penalty-free length (max_resp_len - buffer) -> penalty -30/20
    cfg = config(path, max_resp_len=n_tokens - 10, buffer_len=20)
    reward.reset_reward_stats()
    mgr = load_reward_manager(cfg, ByteTokenizer())
    assert type(mgr).__name__ == "DAPORewardManager"
    out = mgr.loop.run_until_complete(mgr.run_single(make_item(TEXT, "0.5")))
    info = out["reward_extra_info"]
    assert (info["score"], info["acc"], info["pred"], info["reason"]) == (1.0, 1.0, "\\dfrac{1}{2}", "ok")
    assert float(info["overlong_reward"]) == pytest.approx(-1.5)
    assert float(out["reward_score"]) == pytest.approx(1.0 - 1.5)

    wrong = mgr.loop.run_until_complete(mgr.run_single(make_item(TEXT, "0.25")))
    assert wrong["reward_extra_info"]["acc"] == 0.0
    assert float(wrong["reward_score"]) == pytest.approx(-1.0 - 1.5)
    # same keys for both outcomes: verl's RewardLoopManager builds its arrays from the first sample's keys
    assert set(wrong["reward_extra_info"]) == set(info)
    # however it was loaded, the calls went through the package module (one pool, cache and counter set)
    assert reward.reward_stats()["items"] == 2


def test_reward_kwargs_from_the_config_reach_compute_score():
    cfg = config("pkg://eksft_pipeline.scoring.reward", 4096, 512, reward_kwargs={"correct_score": 1.0, "wrong_score": 0.0})
    fn = get_custom_reward_fn(cfg)
    assert fn(data_source="math", solution_str=TEXT, ground_truth="7", extra_info={})["score"] == 0.0
    bad = config("pkg://eksft_pipeline.scoring.reward", 4096, 512, reward_kwargs={"wrong_scor": 0.0})
    with pytest.raises(TypeError, match="wrong_scor"):
        get_custom_reward_fn(bad)(data_source="math", solution_str=TEXT, ground_truth="7", extra_info={})
