"""eksft_pipeline.verl_ext.reproducible_steps: seeds per (step, row, session) and replay batches in dataset order.

The whole effect (two DAPO runs from one checkpoint repeat step for step) is checked by
tests/rl/test_cpu_ppo.py::test_dapo_runs_repeat_exactly; these are its parts, without Ray.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

rs = pytest.importorskip("eksft_pipeline.verl_ext.reproducible_steps")


def test_seed_per_row_and_session_only_when_both_are_known():
    base = {"temperature": 1.0, "top_p": 1.0}
    s01 = rs.seeded_sampling_params(base, {"index": 0, "session_id": 1})
    assert base == {"temperature": 1.0, "top_p": 1.0}  # not modified in place
    assert s01 == {**base, "seed": rs.request_seed(0, 1)} and 0 <= s01["seed"] < 2**31 - 1
    seeds = {rs.seeded_sampling_params(base, {"index": i, "session_id": k})["seed"] for i in range(3) for k in range(4)}
    assert len(seeds) == 12
    # numpy scalars (verl's non-tensor batch) give the same seed as Python ints
    assert rs.seeded_sampling_params(base, {"index": np.int64(0), "session_id": np.int64(1)}) == s01
    # the same row and session at another step (a later epoch): other draws, also under vLLM (no mixing there)
    at3 = rs.seeded_sampling_params(base, {"index": 0, "session_id": 1, "global_steps": 3})
    at4 = rs.seeded_sampling_params(base, {"index": 0, "session_id": 1, "global_steps": np.int64(4)})
    assert at3["seed"] == rs.request_seed(0, 1, 3) and len({at3["seed"], at4["seed"], s01["seed"]}) == 3
    # an explicit seed wins; without an index or a session nothing is added (verl's legacy agent-loop path)
    assert rs.seeded_sampling_params({**base, "seed": 7}, {"index": 0, "session_id": 1})["seed"] == 7
    assert rs.seeded_sampling_params(base, {"index": 0}) == base
    assert rs.seeded_sampling_params(base, {"session_id": 0}) == base


def test_ordered_keys_group_by_prompt_order_then_session_then_index():
    prompts = ["u2", "u0", "u1"]  # the dataloader's order (uids are random: never sorted by their text)
    keys = ["u1_1_0", "u0_1_0", "u2_0_0", "u1_0_0", "x9_0_0", "u0_0_1", "u0_0_0", "u2_1_0", "a1_0_0"]
    got = [keys[i] for i in rs.ordered_keys(keys, prompts)]
    assert got == ["u2_0_0", "u2_1_0", "u0_0_0", "u0_0_1", "u0_1_0", "u1_0_0", "u1_1_0", "a1_0_0", "x9_0_0"]
    # session ids compare as numbers (10 after 9)
    assert [k for k in (["u_10_0", "u_9_0"][i] for i in rs.ordered_keys(["u_10_0", "u_9_0"], ["u"]))] == [
        "u_9_0", "u_10_0"]  # fmt: skip


def test_replay_buffer_materializes_in_dataset_order(monkeypatch):
    from verl.trainer.ppo.v1 import replay_buffer

    assert rs.patch_replay_order() and rs.patch_replay_order()  # idempotent
    monkeypatch.setattr(replay_buffer.tq, "kv_clear", lambda **kw: None)  # TransferQueue is not running here
    buf = object.__new__(replay_buffer.ReplayBuffer)
    # prompt keys in the order the trainer put them; trajectories in the order they finished
    buf.prompt_global_steps = {"train": {"pB": 1, "pA": 1}}
    finished = ["pA_1_0", "pB_1_0", "pA_0_0", "pB_0_0", "pC_0_0"]
    snapshot = {k: {"status": "success", "seq_len": n} for n, k in enumerate(finished)}
    meta = buf._materialize_batch("train", ["pA", "pB"], snapshot)
    assert meta.keys == ["pB_0_0", "pB_1_0", "pA_0_0", "pA_1_0"]  # pC was not selected
    assert [t["seq_len"] for t in meta.tags] == [3, 1, 2, 0]  # each tag travels with its key
    assert meta.partition_id == "train"


def test_seeded_agent_loop_is_registered_and_seeds_each_request(monkeypatch):
    from verl.experimental.agent_loop.agent_loop import _agent_loop_registry
    from verl.experimental.agent_loop.single_turn_agent_loop import SingleTurnAgentLoop

    assert _agent_loop_registry[rs.AGENT_LOOP_NAME] == {
        "_target_": "eksft_pipeline.verl_ext.reproducible_steps.SeededSingleTurnAgentLoop"}  # fmt: skip
    seen = []

    async def fake_run(self, sampling_params, **kwargs):
        seen.append((sampling_params, kwargs))
        return "out"

    monkeypatch.setattr(SingleTurnAgentLoop, "run", fake_run)
    loop = object.__new__(rs.SeededSingleTurnAgentLoop)
    out = asyncio.run(loop.run({"temperature": 1.0}, index=5, session_id=2, global_steps=7, raw_prompt=[]))
    assert out == "out"
    assert seen == [({"temperature": 1.0, "seed": rs.request_seed(5, 2, 7)},
                     {"index": 5, "session_id": 2, "global_steps": 7, "raw_prompt": []})]
