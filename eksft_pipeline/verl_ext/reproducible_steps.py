"""Reproducible DAPO steps on verl 0.9.1's V1 trainer: a seeded agent loop and batches in dataset order.

Two things made two DAPO runs from the same checkpoint, config and seeds differ from their first actor update on
(measured on the tiny testbed: identical step-1 rollouts, yet pg_loss 0.0485 vs 0.0500 and grad norm 0.247 vs
0.315 at step 1), both in how verl's V1 trainer (``trainer/ppo/v1``, TransferQueue + ``ReplayBuffer``) assembles a
step's batch:

1. **Which row gets which response.** ``AgentLoopWorkerTQ`` starts a prompt's ``n`` sessions as ``n`` identical
   requests (``request_id`` a fresh uuid, ``priority`` 0 for all), so a rollout server can only tell them apart by
   the order they arrive in, which follows thread and Ray scheduling. :class:`SeededSingleTurnAgentLoop` (agent
   loop ``seeded_single_turn_agent``) is verl's ``single_turn_agent`` that adds a sampling ``seed`` to each request,
   derived from the trainer step, the prompt's dataset ``index`` and the ``session_id`` (the k-th of the ``n``
   responses). The ``hf_cpu`` server mixes it with its own seed, the step and the weights version and samples the
   request from its own generator; vLLM seeds the request's sampler with it (``SamplingParams.seed``). A request
   that already has a ``seed``, or that lacks an ``index`` or ``session_id`` (verl's legacy agent-loop path), is
   left unchanged.
2. **The order of the rows.** ``ReplayBuffer._materialize_batch`` lists a step's trajectories in the order they
   were *written* to TransferQueue, i.e. the order the responses finished: the same rows in another order, so the
   PPO mini-batches (contiguous slices of that order) hold other trajectories, a GRPO group can be split between
   mini-batches, and the first mini-batches hold the short responses (they finish first). :func:`patch_replay_order`
   reorders the batch by the prompt's position in the step's dataloader batch (TransferQueue keeps its prompt keys
   in the order the trainer put them, ``kv_batch_put`` of the whole batch), then ``session_id``, then output index:
   whole groups, in dataset order, as verl's legacy trainer (``repeat(interleave=True)``) lays them out.

``eksft.external_modules`` (``recipes/verl/dapo.yaml``) imports this module in every verl process, so the batch
order applies on every platform. The seeded agent loop is the CPU recipes' ``rollout.agent.default_agent_loop``
(``dapo_platform/cpu.yaml``) and the GPU recipe's (``dapo_platform/gpu.yaml``): vLLM takes the seed as
``SamplingParams.seed``, so GPU reruns sample the same responses too (shown on vLLM's CPU build by
``tests/rl/test_vllm_rollout.py::test_vllm_seeded_rollouts_repeat``). Its price on GPU: vLLM draws every seeded row
from its own generator at every decoding step (one small kernel per row; not measured here);
``default_agent_loop=single_turn_agent`` gives it back, at the cost of repeatability. Not covered: with DAPO's dynamic sampling
(``algorithm.filter_groups``) the refill prompts are fetched when the trainer notices uniform groups, which depends
on timing; the float results of batched kernels (vLLM's batch composition, left padding in ``hf_cpu``) can still
differ in the last bits.

Registration runs on import (:func:`register`); tests call it directly::

    pytest tests/rl/test_reproducible_steps.py
"""

from __future__ import annotations

import dataclasses
from typing import Any

from verl.experimental.agent_loop.agent_loop import register as register_agent_loop
from verl.experimental.agent_loop.single_turn_agent_loop import SingleTurnAgentLoop

from eksft_pipeline.models.sampling import sample_seed

AGENT_LOOP_NAME = "seeded_single_turn_agent"


def request_seed(index: Any, session_id: Any, global_steps: Any = None) -> int:
    """The sampling seed of the ``session_id``-th response to dataset row ``index`` at trainer step
    ``global_steps`` (31 bits: vLLM and numpy take 32-bit seeds).

    The step is part of it so that a row drawn again in a later epoch gets fresh draws under vLLM, which uses the
    seed as it is; the hf_cpu server mixes in its own seed (``rollout.seed``), the step and the weights version
    as well."""
    return sample_seed("agent-loop", global_steps, index, session_id) % (2**31 - 1)


def seeded_sampling_params(sampling_params: dict[str, Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    """``sampling_params`` with a ``seed`` for this (step, dataset index, session) if it has none and the index and
    session are known (verl's V1 agent loop passes ``global_steps`` with every prompt)."""
    if sampling_params.get("seed") is not None:
        return sampling_params
    index, session_id = kwargs.get("index"), kwargs.get("session_id")
    if index is None or session_id is None:
        return sampling_params
    step = kwargs.get("global_steps")
    return {**sampling_params,
            "seed": request_seed(_py_scalar(index), _py_scalar(session_id), None if step is None else _py_scalar(step))}


def _py_scalar(v: Any) -> Any:
    """A numpy/tensor scalar as a Python value (its text, and so its seed, must not depend on the type)."""
    item = getattr(v, "item", None)
    return item() if callable(item) else v


def ordered_keys(keys: list[str], prompt_order: list[str]) -> list[int]:
    """Positions of ``keys`` (``{uid}_{session_id}_{index}``) sorted by (rank of uid in ``prompt_order``, session,
    index). A uid missing from ``prompt_order`` sorts after the known ones, by its text."""
    rank = {uid: i for i, uid in enumerate(prompt_order)}

    def sort_key(i: int) -> tuple:
        uid, session, index = keys[i].rsplit("_", 2)
        return (rank.get(uid, len(rank)), uid, int(session), int(index))

    return sorted(range(len(keys)), key=sort_key)


def patch_replay_order() -> bool:
    """Make ``ReplayBuffer._materialize_batch`` return its batch in dataset order (idempotent). False if verl has
    no V1 replay buffer (the legacy trainer keeps dataset order itself)."""
    try:
        from verl.trainer.ppo.v1 import replay_buffer
    except ImportError:
        return False
    cls = replay_buffer.ReplayBuffer
    if getattr(cls._materialize_batch, "_eksft_ordered", False):
        return True
    original = cls._materialize_batch

    def _materialize_batch(self, partition_id, selected_prompt_uids, partition_snapshot):
        meta = original(self, partition_id, selected_prompt_uids, partition_snapshot)
        # prompt keys in TransferQueue's order, which is the order the trainer put them (the dataloader's)
        order = ordered_keys(list(meta.keys), list(self.prompt_global_steps.get(partition_id, {})))
        return dataclasses.replace(meta, keys=[meta.keys[i] for i in order], tags=[meta.tags[i] for i in order])

    _materialize_batch._eksft_ordered = True  # type: ignore[attr-defined]
    cls._materialize_batch = _materialize_batch
    return True


class SeededSingleTurnAgentLoop(SingleTurnAgentLoop):
    """verl's ``single_turn_agent`` with a per-(step, dataset index, session) sampling seed (module docstring)."""

    async def run(self, sampling_params: dict[str, Any], **kwargs: Any):
        return await super().run(seeded_sampling_params(sampling_params, kwargs), **kwargs)


def register() -> None:
    """Register the seeded agent loop in verl's registry and patch the replay buffer (both idempotent)."""
    register_agent_loop(AGENT_LOOP_NAME)(SeededSingleTurnAgentLoop)
    patch_replay_order()


register()
