"""`hf_cpu`: a CPU rollout backend for verl 0.9.1's async rollout path (HF ``generate`` instead of vLLM).

verl's PPO trainers (V1 ``PPOTrainerSync`` included) only generate through *rollout servers*: an
``LLMServerManager`` builds one ``RolloutReplica`` per rollout world (``RolloutReplicaRegistry``, keyed by
``actor_rollout_ref.rollout.name``), each replica starts a server actor, the agent loop sends
``server.generate(prompt_ids, sampling_params, request_id)`` to it, and every hybrid actor worker holds a
``BaseRollout`` adapter (``verl.workers.rollout.base._ROLLOUT_REGISTRY[(name, "async")]``) through which the
trainer pushes its weights (``update_weights(per_tensor_param)``) and wakes/sleeps the server. Only vLLM,
SGLang and TensorRT-LLM are registered, all GPU builds. This module provides the same three pieces for a CPU:

* :class:`HFCPUServer` -- Ray actor holding a ``transformers`` causal LM on CPU. ``generate`` returns a
  ``TokenOutput`` (response token ids, per-token log-probs, stop reason, ``extra_fields.global_steps``) like
  ``vLLMHttpServer.generate``. Concurrent requests are batched: the first request opens a window of
  ``batch_wait_s``; everything queued by then (up to ``max_batch_size``) with the same sampling parameters (the
  ``seed`` aside: each row samples from its own generator) is left-padded into one ``model.generate`` call, run in
  a single worker thread so the actor's event loop stays responsive. Weight updates run in that same thread, so
  they never interleave with a generation.
* :class:`HFCPUReplica` -- ``RolloutReplica`` that launches one server per replica (node-affine to the replica's
  worker). A replica is one process: tensor/data/pipeline parallel sizes must be 1, so with N actor ranks there
  are N replicas and each actor rank feeds its own server.
* :class:`ServerAdapter` -- ``BaseRollout`` living in each actor worker. ``update_weights`` streams the actor's
  full (un-sharded) per-tensor parameters to its server in buckets of
  ``rollout.checkpoint_engine.update_weights_bucket_megabytes`` over Ray; the server copies each tensor into the
  parameter of the same HF name and, at the end, checks that every parameter was written (a partial sync is an
  error, never silently stale weights). ``resume``/``release`` are no-ops (no device memory to free).

Semantics mirrored from the vLLM server (``vllm_async_server.py``)
    ``max_tokens`` = ``sampling_params["max_tokens"|"max_new_tokens"]``, else
    ``min(response_length, prompt_length + response_length - len(prompt))``, clamped to ``[1, max_model_len -
    len(prompt)]`` (``max_model_len`` defaults to the model's ``max_position_embeddings``). ``temperature == 0``
    (verl's greedy validation) means greedy decoding; ``top_k <= 0`` means no top-k; ``top_p = 1`` no nucleus.
    The response ends after the first EOS token (EOS ids from ``generation_config.json`` plus the tokenizer's,
    the EOS token is included in ``token_ids`` as vLLM does) unless ``ignore_eos``. Log-probs follow
    ``rollout.logprobs_mode``: ``processed_logprobs`` (default; log-softmax of the scores after temperature /
    top-k / top-p, which is what was sampled from) or ``raw_logprobs`` (log-softmax of the raw logits). With
    ``rollout.load_format=dummy`` (verl's default) the server starts from random weights, exactly like vLLM, so
    nothing can be generated from anything but the trainer's synced weights.

Departures from vLLM (CPU, single process): no prefix/KV cache across requests, no paged memory, no HTTP /
OpenAI endpoint (token-in-token-out through Ray only: the tool agent loop's chat-completions path is not
available), no LoRA adapters (use ``model.lora.merge=True``), no delta weight sync (``wire_format=delta_flush``).
``sleep``/``wake_up`` keep the weights in host memory.

Reproducible sampling (as vLLM's per-request seeds, and beyond): every request samples from its own generator
(:class:`eksft_pipeline.models.sampling.RowSampler`), seeded from the server's seed (``rollout.seed`` + replica
rank), the request's ``seed`` sampling parameter if any, the trainer step and weights version, the prompt's
tokens, and the request's rank among the identical prompts of that step (a GRPO group's ``n`` copies). So a step
samples the same responses from the same weights however Ray and the 50 ms collection window batched its
requests (HF's own sampling draws a whole batch from one global stream). Requests that differ only in ``seed``
share a batch. Without a ``seed``, which of a group's ``n`` identical requests gets which response follows the
order they arrive in; the CPU recipes' agent loop (:mod:`eksft_pipeline.verl_ext.reproducible_steps`) gives each
request a seed from the step, its dataset row and session, so every row gets the same response in every run. Not
covered: rows of different prompt lengths are left-padded, which can change logits in the last float bits.

Registration: :func:`register` adds ``hf_cpu`` to both registries. It must run in every process that resolves
the rollout (the Ray TaskRunner builds the replicas, every actor worker builds its adapter), so this module
registers itself on import and is listed in ``VERL_USE_EXTERNAL_MODULES`` (verl imports those modules from its own
``__init__`` in every process); :mod:`eksft_pipeline.verl_ext.ppo_main` adds it there before verl is imported::

    python -m eksft_pipeline.verl_ext.ppo_main --config-path $PWD/recipes/verl --config-name dapo dapo_platform=cpu ...

Server options (``+actor_rollout_ref.rollout.engine_kwargs.hf_cpu.NAME=VALUE``): ``max_batch_size`` (64),
``batch_wait_s`` (0.02), ``num_threads`` (torch intra-op threads; default: leave torch's setting),
``weights_dump_dir`` (if set, after every weight update the server saves its full state dict to
``<dir>/replica<r>_step<global_steps>.safetensors``; used by the tests to prove the rollout follows the actor).
An unknown option raises ``ValueError`` naming it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import hashlib
import logging
import os
import threading
import time
from collections.abc import AsyncIterable, Iterable
from dataclasses import dataclass, field
from typing import Any

import ray
import torch
from ray.actor import ActorHandle
from verl.workers.rollout.base import _ROLLOUT_REGISTRY, BaseRollout
from verl.workers.rollout.replica import RolloutMode, RolloutReplica, RolloutReplicaRegistry, TokenOutput

from eksft_pipeline.models.sampling import RowSampler, sample_seed

logger = logging.getLogger(__name__)
logger.setLevel(os.getenv("VERL_LOGGING_LEVEL", "INFO"))

ROLLOUT_NAME = "hf_cpu"

SERVER_OPTION_DEFAULTS: dict[str, Any] = {
    "max_batch_size": 64,
    "batch_wait_s": 0.02,
    "num_threads": None,
    "weights_dump_dir": None,
}

# sampling_params keys the agent loop / LLMServerClient may send, and how this server treats them
_KNOWN_SAMPLING_KEYS = {
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "logprobs",
    "max_tokens",
    "max_new_tokens",
    "ignore_eos",
    "stop_token_ids",
    "seed",
}

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def register(name: str = ROLLOUT_NAME) -> None:
    """Register the CPU rollout under ``name`` in verl's rollout (adapter) and replica registries. Idempotent."""
    _ROLLOUT_REGISTRY[(name, "async")] = f"{__name__}.ServerAdapter"
    RolloutReplicaRegistry.register(name, lambda: HFCPUReplica)


def server_options(rollout_config: Any) -> dict[str, Any]:
    """``engine_kwargs.hf_cpu`` merged over :data:`SERVER_OPTION_DEFAULTS`; unknown keys raise ``ValueError``."""
    engine_kwargs = _get(rollout_config, "engine_kwargs", None) or {}
    given = dict(_get(engine_kwargs, ROLLOUT_NAME, None) or {})
    unknown = sorted(set(given) - set(SERVER_OPTION_DEFAULTS))
    if unknown:
        raise ValueError(
            f"unknown rollout.engine_kwargs.{ROLLOUT_NAME} option(s) {unknown}; known: {sorted(SERVER_OPTION_DEFAULTS)}"
        )
    opts = {**SERVER_OPTION_DEFAULTS, **given}
    if int(opts["max_batch_size"]) < 1:
        raise ValueError(f"engine_kwargs.{ROLLOUT_NAME}.max_batch_size must be >= 1, got {opts['max_batch_size']}")
    if float(opts["batch_wait_s"]) < 0:
        raise ValueError(f"engine_kwargs.{ROLLOUT_NAME}.batch_wait_s must be >= 0, got {opts['batch_wait_s']}")
    return opts


def check_replica_world_size(rollout_config: Any) -> int:
    """A replica is one process: tensor x data x pipeline parallel size must be 1 (else ``ValueError``)."""
    size = (
        int(rollout_config.tensor_model_parallel_size)
        * int(rollout_config.data_parallel_size)
        * int(rollout_config.pipeline_model_parallel_size)
    )
    if size != 1:
        raise ValueError(
            f"{ROLLOUT_NAME} rollout runs one process per replica: set actor_rollout_ref.rollout."
            "tensor_model_parallel_size, data_parallel_size and pipeline_model_parallel_size to 1 "
            f"(got world size {size})"
        )
    return size


def _get(obj: Any, key: str, default: Any = None) -> Any:
    if obj is None:
        return default
    if isinstance(obj, dict):
        return obj.get(key, default)
    getter = getattr(obj, "get", None)
    if callable(getter):
        try:
            return getter(key, default)
        except Exception:  # dataclass .get may not accept a default
            pass
    return getattr(obj, key, default)


# ------------------------------------------------------------------------------------------------ sampling


@dataclass(frozen=True)
class SamplingSpec:
    """Normalised sampling parameters; requests with equal specs can share one ``generate`` call."""

    do_sample: bool
    temperature: float
    top_p: float
    top_k: int
    min_p: float | None
    repetition_penalty: float
    ignore_eos: bool
    stop_token_ids: tuple[int, ...]
    seed: int | None


@dataclass
class _Request:
    request_id: str
    prompt_ids: list[int]
    spec: SamplingSpec
    max_tokens: int
    want_logprobs: bool
    future: asyncio.Future
    seed: int | None = None  # the row's sampling seed (None: greedy)
    enqueued_at: float = field(default_factory=time.perf_counter)
    # what a batch must share: the spec without its `seed` (each row samples from its own generator)
    batch_spec: SamplingSpec = field(init=False)

    def __post_init__(self) -> None:
        self.batch_spec = dataclasses.replace(self.spec, seed=None)


def parse_sampling_params(
    sampling_params: dict[str, Any], *, default_repetition_penalty: float = 1.0, default_ignore_eos: bool = False
) -> tuple[SamplingSpec, bool, int | None]:
    """verl/vLLM sampling dict -> (spec, want_logprobs, explicit max_tokens or None). Unknown keys raise."""
    unknown = sorted(set(sampling_params) - _KNOWN_SAMPLING_KEYS)
    if unknown:
        raise ValueError(f"{ROLLOUT_NAME} rollout: unsupported sampling parameter(s) {unknown}")
    temperature = float(sampling_params.get("temperature", 1.0))
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    top_p = float(sampling_params.get("top_p", 1.0))
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    top_k = sampling_params.get("top_k", -1)
    top_k = -1 if top_k is None else int(top_k)
    min_p = sampling_params.get("min_p")
    min_p = None if min_p in (None, 0, 0.0) else float(min_p)
    rep = sampling_params.get("repetition_penalty")
    rep = default_repetition_penalty if rep is None else float(rep)
    ignore_eos = sampling_params.get("ignore_eos")
    ignore_eos = default_ignore_eos if ignore_eos is None else bool(ignore_eos)
    stop_ids = tuple(int(t) for t in (sampling_params.get("stop_token_ids") or ()))
    seed = sampling_params.get("seed")
    max_tokens = sampling_params.get("max_tokens", sampling_params.get("max_new_tokens"))
    do_sample = temperature > 0
    spec = SamplingSpec(
        do_sample=do_sample,
        # greedy: the warpers are not applied, keep the key canonical so all greedy requests batch together
        temperature=temperature if do_sample else 0.0,
        top_p=top_p if do_sample else 1.0,
        top_k=(top_k if top_k > 0 else -1) if do_sample else -1,
        min_p=min_p if do_sample else None,
        repetition_penalty=rep,
        ignore_eos=ignore_eos,
        stop_token_ids=stop_ids,
        seed=None if seed is None else int(seed),
    )
    return spec, bool(sampling_params.get("logprobs", False)), None if max_tokens is None else int(max_tokens)


def resolve_max_tokens(
    explicit: int | None, prompt_len: int, *, prompt_length: int, response_length: int, max_model_len: int
) -> int:
    """vLLM server's rule: explicit limit or ``min(response_length, prompt_length + response_length - prompt_len)``,
    clamped to ``[1, max_model_len - prompt_len]``; a prompt that leaves no room raises ``ValueError``."""
    room = max_model_len - prompt_len
    if room < 1:
        raise ValueError(
            f"prompt length ({prompt_len}) leaves no room to generate within max_model_len ({max_model_len})"
        )
    wanted = explicit if explicit is not None else min(response_length, prompt_length + response_length - prompt_len)
    return max(1, min(int(wanted), room))


def cut_response(tokens: list[int], max_tokens: int, stop_ids: frozenset[int] | set[int]) -> tuple[list[int], bool]:
    """Truncate one generated row: first ``max_tokens`` tokens, then through the first stop/EOS token (kept).

    Returns ``(tokens, finished)`` where ``finished`` is True if a stop token ended the row or the limit was hit.
    HF pads rows that finished early with ``pad_token_id``; cutting at the first stop token drops that padding
    without ever confusing a generated pad-id token for padding.
    """
    tokens = tokens[:max_tokens]
    for i, t in enumerate(tokens):
        if t in stop_ids:
            return tokens[: i + 1], True
    return tokens, len(tokens) >= max_tokens


class _AbortCriteria:
    """HF StoppingCriteria: stop every row of the running batch once the abort event is set."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


# ------------------------------------------------------------------------------------------------ model side


class HFCausalLMEngine:
    """A causal LM on CPU plus batched sampling; the part of the server that needs no Ray (unit-testable).

    ``hf_config`` carries the attention implementation (verl sets it from ``model.override_config``).
    ``load_format="dummy"`` builds the architecture with random weights (vLLM's behaviour), anything else loads
    ``model_path``'s weights.
    """

    def __init__(
        self,
        model_path: str,
        hf_config: Any,
        *,
        dtype: str = "float32",
        load_format: str = "dummy",
        eos_token_ids: Iterable[int] = (),
        pad_token_id: int | None = None,
        logprobs_mode: str = "processed_logprobs",
        seed: int = 0,
        trust_remote_code: bool = False,
    ):
        from transformers import AutoModelForCausalLM

        if dtype not in _DTYPES:
            raise ValueError(f"rollout.dtype={dtype!r} not supported on CPU; use one of {sorted(_DTYPES)}")
        if logprobs_mode not in ("processed_logprobs", "raw_logprobs"):
            raise ValueError(
                f"rollout.logprobs_mode={logprobs_mode!r} not supported by {ROLLOUT_NAME}; "
                "use processed_logprobs or raw_logprobs"
            )
        self.dtype = _DTYPES[dtype]
        self.logprobs_mode = logprobs_mode
        torch.manual_seed(seed)
        if "dummy" in (load_format or ""):
            self.model = AutoModelForCausalLM.from_config(
                hf_config, dtype=self.dtype, trust_remote_code=trust_remote_code
            )
        else:
            self.model = AutoModelForCausalLM.from_pretrained(
                model_path, config=hf_config, dtype=self.dtype, trust_remote_code=trust_remote_code
            )
        self.model.to("cpu").eval()
        self.eos_token_ids = frozenset(int(t) for t in eos_token_ids)
        if not self.eos_token_ids:
            raise ValueError(f"{ROLLOUT_NAME}: no EOS token id found for {model_path} (generation_config / tokenizer)")
        self.pad_token_id = int(pad_token_id) if pad_token_id is not None else min(self.eos_token_ids)
        # name -> tensor for every state-dict entry (tied weights appear under each of their names)
        self._targets: dict[str, torch.Tensor] = dict(self.model.state_dict(keep_vars=True))
        self._pending_names: set[str] | None = None
        self.abort_event = threading.Event()

    # -- weights -----------------------------------------------------------------------------------
    def begin_weight_update(self) -> None:
        self._pending_names = set()

    @torch.no_grad()
    def load_weights(self, named_tensors: list[tuple[str, torch.Tensor]]) -> int:
        """Copy each ``(hf_name, full_tensor)`` into the model; unknown names / shape mismatches raise."""
        for name, tensor in named_tensors:
            target = self._targets.get(name)
            if target is None:
                raise KeyError(f"{ROLLOUT_NAME}: the rollout model has no parameter or buffer named {name!r}")
            if tuple(target.shape) != tuple(tensor.shape):
                raise ValueError(
                    f"{ROLLOUT_NAME}: shape mismatch for {name!r}: rollout {tuple(target.shape)}, "
                    f"trainer {tuple(tensor.shape)}"
                )
            target.data.copy_(tensor.to(dtype=target.dtype))
            if self._pending_names is not None:
                self._pending_names.add(name)
        return len(named_tensors)

    def finish_weight_update(self) -> int:
        """Check that every tensor of the model was written since :meth:`begin_weight_update`."""
        got = self._pending_names or set()
        self._pending_names = None
        # tied weights share storage: one written alias covers all of them
        written_ptrs = {self._targets[n].data_ptr() for n in got}
        missing = sorted(n for n, t in self._targets.items() if t.data_ptr() not in written_ptrs)
        if missing:
            raise RuntimeError(
                f"{ROLLOUT_NAME}: weight update did not cover {len(missing)} tensor(s) of the rollout model, "
                f"e.g. {missing[:5]}; refusing to generate from partially stale weights"
            )
        return len(got)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def weights_digest(self) -> str:
        """sha256 over (name, dtype, shape, bytes) of every state-dict tensor in name order."""
        h = hashlib.sha256()
        for name, t in sorted(self.model.state_dict().items()):
            t = t.detach().contiguous().cpu()
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        return h.hexdigest()

    # -- generation --------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate_batch(
        self, spec: SamplingSpec, prompts: list[list[int]], max_tokens: list[int], seeds: list[int] | None = None
    ) -> list[tuple[list[int], list[float], bool]]:
        """Sample one response per prompt. Returns ``(token_ids, log_probs, finished)`` per prompt.

        Prompts are left-padded to a ``[B, L]`` batch (attention mask 0 on padding); HF derives position ids
        from the mask, so each row is generated exactly as it would be alone. When sampling, row i draws from
        its own generator seeded ``seeds[i]`` (default: from ``spec.seed`` and the row index if set, else from
        this engine's seeded torch stream).
        """
        from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList

        if not prompts:
            return []
        if any(len(p) == 0 for p in prompts):
            raise ValueError(f"{ROLLOUT_NAME}: empty prompt")
        bsz, width = len(prompts), max(len(p) for p in prompts)
        input_ids = torch.full((bsz, width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((bsz, width), dtype=torch.long)
        for i, p in enumerate(prompts):
            input_ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            attention_mask[i, width - len(p) :] = 1
        stop_ids = set(spec.stop_token_ids) | (set() if spec.ignore_eos else set(self.eos_token_ids))
        processed = self.logprobs_mode == "processed_logprobs"
        sampler = None
        if spec.do_sample:
            # HF's sampling draws the whole batch from one stream: RowSampler draws each row from its own, after
            # HF's processors (repetition penalty); generate then decodes greedily, taking the drawn token
            if seeds is None:
                seeds = ([sample_seed(spec.seed, i) for i in range(bsz)] if spec.seed is not None
                         else torch.randint(0, 2**62, (bsz,)).tolist())  # fmt: skip
            if len(seeds) != bsz:
                raise ValueError(f"{ROLLOUT_NAME}: {len(seeds)} seeds for {bsz} prompts")
            sampler = RowSampler(seeds, spec.temperature, spec.top_p, spec.top_k, spec.min_p)
        gen_kwargs: dict[str, Any] = dict(
            max_new_tokens=max(max_tokens),
            do_sample=False,
            repetition_penalty=spec.repetition_penalty,
            eos_token_id=sorted(stop_ids) if stop_ids else None,
            pad_token_id=self.pad_token_id,
            return_dict_in_generate=True,
            # greedy: the processed scores are the raw ones after the repetition penalty
            output_scores=processed and sampler is None,
            output_logits=not processed,
            use_cache=True,
            # explicit: HF would otherwise fill unset ones from generation_config.json / its defaults (top_k=50)
            temperature=None,
            top_p=None,
            top_k=None,
        )
        out = self.model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            generation_config=GenerationConfig(**gen_kwargs),
            logits_processor=LogitsProcessorList([sampler] if sampler is not None else []),
            stopping_criteria=StoppingCriteriaList([_AbortCriteria(self.abort_event)]),
        )
        new_tokens = out.sequences[:, width:]  # [B, T]
        if processed and sampler is not None:
            logps = sampler.logprobs()[:, : new_tokens.shape[1]]  # [B, T], from the distribution sampled from
        else:
            steps = out.scores if processed else out.logits  # T x [B, V]
            # log-prob of each generated token under the (processed or raw) distribution: [B, T]
            logps = (
                torch.stack(
                    [
                        torch.log_softmax(s.float(), dim=-1).gather(-1, new_tokens[:, t : t + 1]).squeeze(-1)
                        for t, s in enumerate(steps)
                    ],
                    dim=1,
                )
                if len(steps)
                else torch.zeros((bsz, 0))
            )
        frozen = frozenset(stop_ids)
        results = []
        for i in range(bsz):
            toks, finished = cut_response(new_tokens[i].tolist(), max_tokens[i], frozen)
            results.append((toks, logps[i, : len(toks)].tolist(), finished))
        return results


# ------------------------------------------------------------------------------------------------ server actor


class HFCPUServer:
    """Rollout server actor (one per replica). See the module docstring for the protocol."""

    def __init__(
        self,
        config: Any,
        model_config: Any,
        rollout_mode: RolloutMode,
        workers: list[ActorHandle],
        replica_rank: int,
        node_rank: int = 0,
        gpus_per_node: int = 1,
        nnodes: int = 1,
        name: str = "",
    ):
        from verl.utils.config import omega_conf_to_dataclass
        from verl.workers.config import HFModelConfig

        self.config = omega_conf_to_dataclass(config)
        self.model_config = omega_conf_to_dataclass(model_config, dataclass_type=HFModelConfig)
        self.options = server_options(self.config)
        self.rollout_mode = rollout_mode
        self.workers = workers
        self.replica_rank = replica_rank
        self.node_rank = node_rank
        self.name = name
        self.global_steps: int | None = None
        self.weight_version = 0

        if self.options["num_threads"]:
            torch.set_num_threads(int(self.options["num_threads"]))
        hf_config = self.model_config.hf_config
        max_pos = getattr(hf_config, "max_position_embeddings", None)
        if self.config.max_model_len is None:
            self.max_model_len = int(max_pos or (self.config.prompt_length + self.config.response_length))
        else:
            if max_pos is not None and self.config.max_model_len > max_pos:
                raise ValueError(
                    f"max_model_len ({self.config.max_model_len}) should be <= max_position_embeddings ({max_pos})"
                )
            self.max_model_len = int(self.config.max_model_len)

        eos: set[int] = set()
        gen_cfg = self.model_config.generation_config
        gen_eos = getattr(gen_cfg, "eos_token_id", None) if gen_cfg is not None else None
        for src in (gen_eos, getattr(self.model_config.tokenizer, "eos_token_id", None)):
            if src is None:
                continue
            eos.update([int(src)] if isinstance(src, int) else [int(t) for t in src])
        if not eos and getattr(hf_config, "eos_token_id", None) is not None:
            e = hf_config.eos_token_id
            eos.update([int(e)] if isinstance(e, int) else [int(t) for t in e])
        pad = getattr(self.model_config.tokenizer, "pad_token_id", None)

        self.engine_seed = int(self.config.seed) + int(replica_rank)
        # identical prompts seen in the current (step, weights version), for the per-request seeds
        self._seen_phase: tuple[Any, int] | None = None
        self._seen: dict[tuple[str, SamplingSpec], int] = {}
        self.engine = HFCausalLMEngine(
            self.model_config.local_path,
            hf_config,
            dtype=str(self.config.dtype),
            load_format=str(self.config.load_format),
            eos_token_ids=eos,
            pad_token_id=pad,
            logprobs_mode=str(self.config.logprobs_mode or "processed_logprobs"),
            seed=self.engine_seed,
            trust_remote_code=self.model_config.trust_remote_code,
        )
        # one thread: generations and weight loads are serialised and never interleave
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="hf_cpu_gen")
        self._queue: list[_Request] = []
        self._wakeup: asyncio.Event | None = None
        self._batcher: asyncio.Task | None = None
        self._inflight: list[_Request] = []
        self._idle: asyncio.Event | None = None
        self._resume: asyncio.Event | None = None
        self._paused = False
        self._rejecting = False
        self.stats = {"requests": 0, "batches": 0, "tokens": 0, "gen_s": 0.0, "weight_updates": 0, "aborted": 0}
        logger.info(
            "%s server %s: replica %d, model %s (%s, %s), max_model_len %d, eos %s",
            ROLLOUT_NAME,
            name,
            replica_rank,
            self.model_config.local_path,
            self.config.dtype,
            self.config.load_format,
            self.max_model_len,
            sorted(eos),
        )

    # -- lifecycle ---------------------------------------------------------------------------------
    async def ready(self) -> bool:
        self._ensure_loop_state()
        return True

    def _ensure_loop_state(self) -> None:
        if self._wakeup is None:
            self._wakeup = asyncio.Event()
            self._idle = asyncio.Event()
            self._idle.set()
            self._resume = asyncio.Event()
            self._resume.set()
        if self._batcher is None or self._batcher.done():
            self._batcher = asyncio.get_running_loop().create_task(self._batch_loop())

    def get_server_address(self) -> tuple[str, str]:
        return ray.util.get_node_ip_address(), self.name

    def get_rollout_config(self):
        return self.config

    def get_stats(self) -> dict[str, Any]:
        return {**self.stats, "global_steps": self.global_steps, "weight_version": self.weight_version}

    # -- generation --------------------------------------------------------------------------------
    async def generate(
        self,
        prompt_ids: list[int],
        sampling_params: dict[str, Any],
        request_id: str,
        image_data: Any = None,
        video_data: Any = None,
        audio_data: Any = None,
        mm_processor_kwargs: Any = None,
        priority: int = 0,
        **kwargs: Any,
    ) -> TokenOutput:
        """Token-in-token-out generation of one response (see the module docstring for the rules)."""
        from verl.utils import normalize_token_ids

        if image_data is not None or video_data is not None or audio_data is not None:
            raise NotImplementedError(f"{ROLLOUT_NAME} rollout serves text-only models")
        if kwargs:
            raise TypeError(f"{ROLLOUT_NAME} generate: unsupported argument(s) {sorted(kwargs)}")
        prompt_ids = [int(t) for t in normalize_token_ids(prompt_ids)]
        spec, want_logprobs, explicit = parse_sampling_params(
            dict(sampling_params),
            default_repetition_penalty=float(self.config.repetition_penalty or 1.0),
            default_ignore_eos=bool(self.config.ignore_eos),
        )
        max_tokens = resolve_max_tokens(
            explicit,
            len(prompt_ids),
            prompt_length=self.config.prompt_length,
            response_length=self.config.response_length,
            max_model_len=self.max_model_len,
        )
        self._ensure_loop_state()
        if self._paused:
            if self._rejecting:
                return self._aborted_output()
            await self._resume.wait()
        fut = asyncio.get_running_loop().create_future()
        seed = self._request_seed(spec, prompt_ids) if spec.do_sample else None
        self._queue.append(_Request(request_id, prompt_ids, spec, max_tokens, want_logprobs, fut, seed))
        self._idle.clear()
        self._wakeup.set()
        return await fut

    def _request_seed(self, spec: SamplingSpec, prompt_ids: list[int]) -> int:
        """The request's sampling seed: (server seed, request seed, step, weights version, prompt, k-th copy)."""
        phase = (self.global_steps, self.weight_version)
        if phase != self._seen_phase:  # a new step: count identical prompts afresh
            self._seen_phase, self._seen = phase, {}
        prompt = hashlib.sha256(bytes(str(prompt_ids), "ascii")).hexdigest()
        k = self._seen.get((prompt, spec), 0)
        self._seen[(prompt, spec)] = k + 1
        return sample_seed(self.engine_seed, spec.seed, *phase, prompt, k)

    def _aborted_output(self) -> TokenOutput:
        self.stats["aborted"] += 1
        return TokenOutput(
            token_ids=[], log_probs=None, stop_reason="aborted", extra_fields={"global_steps": self.global_steps}
        )

    async def _batch_loop(self) -> None:
        """Forever: wait for requests, collect a wave for ``batch_wait_s``, run same-spec batches one by one."""
        max_batch = int(self.options["max_batch_size"])
        wait_s = float(self.options["batch_wait_s"])
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            if not self._queue:
                continue
            if wait_s > 0:
                await asyncio.sleep(wait_s)  # let concurrent requests of the same wave arrive
            while self._queue and not self._paused:
                head = self._queue[0].batch_spec  # requests that differ only in their `seed` share a batch
                batch = [r for r in self._queue if r.batch_spec == head][:max_batch]
                taken = {id(r) for r in batch}
                self._queue = [r for r in self._queue if id(r) not in taken]
                self._inflight = batch
                try:
                    await self._run_batch(head, batch)
                except Exception as exc:  # noqa: BLE001 - every caller of the batch gets the error, the loop lives on
                    logger.exception("%s: generation batch of %d request(s) failed", ROLLOUT_NAME, len(batch))
                    for r in batch:
                        if not r.future.done():
                            r.future.set_exception(exc)
                finally:
                    self._inflight = []
            if not self._queue and not self._inflight:
                self._idle.set()

    async def _run_batch(self, spec: SamplingSpec, batch: list[_Request]) -> None:
        t0 = time.perf_counter()
        results = await asyncio.get_running_loop().run_in_executor(
            self._executor,
            self.engine.generate_batch,
            spec,
            [r.prompt_ids for r in batch],
            [r.max_tokens for r in batch],
            [r.seed for r in batch] if spec.do_sample else None,
        )
        aborted = self.engine.abort_event.is_set()
        self.stats["batches"] += 1
        self.stats["requests"] += len(batch)
        self.stats["gen_s"] += time.perf_counter() - t0
        for r, (toks, logps, finished) in zip(batch, results, strict=True):
            self.stats["tokens"] += len(toks)
            out = TokenOutput(
                token_ids=toks,
                log_probs=logps if r.want_logprobs else None,
                stop_reason="aborted" if (aborted and not finished) else "completed",
                extra_fields={"global_steps": self.global_steps, "num_cached_tokens": 0},
            )
            if not r.future.done():
                r.future.set_result(out)

    # -- weights -----------------------------------------------------------------------------------
    async def begin_weight_update(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._executor, self.engine.begin_weight_update)

    async def load_weights(self, named_tensors: list[tuple[str, torch.Tensor]]) -> int:
        return await asyncio.get_running_loop().run_in_executor(self._executor, self.engine.load_weights, named_tensors)

    async def finish_weight_update(self, global_steps: int | None = None) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        n = await loop.run_in_executor(self._executor, self.engine.finish_weight_update)
        self.weight_version += 1
        self.stats["weight_updates"] += 1
        if global_steps is not None:
            self.global_steps = global_steps
        dump_dir = self.options["weights_dump_dir"]
        path = None
        if dump_dir:
            path = os.path.join(str(dump_dir), f"replica{self.replica_rank}_step{global_steps}.safetensors")
            await loop.run_in_executor(self._executor, self._dump, path)
        return {"tensors": n, "global_steps": self.global_steps, "weight_version": self.weight_version, "dump": path}

    def _dump(self, path: str) -> None:
        from safetensors.torch import save_file

        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = path + ".tmp"
        # tied weights share storage; safetensors refuses shared tensors, so save independent copies
        save_file({k: v.contiguous() for k, v in self.engine.state_dict().items()}, tmp)
        os.replace(tmp, path)

    async def weights_digest(self) -> str:
        return await asyncio.get_running_loop().run_in_executor(self._executor, self.engine.weights_digest)

    async def set_global_steps(self, global_steps: int) -> None:
        self.global_steps = global_steps

    # -- control (no device memory on CPU: sleep/wake keep the weights) ------------------------------
    async def wake_up(self, tags: list[str] | None = None) -> None:
        return None

    async def sleep(self) -> None:
        return None

    async def clear_kv_cache(self) -> None:
        return None  # no cache survives a generate call

    async def release_kv_cache(self) -> None:
        return None

    async def resume_kv_cache(self) -> None:
        return None

    async def start_profile(self, **kwargs) -> None:
        return None

    async def stop_profile(self) -> None:
        return None

    async def wait_for_requests_to_drain(self) -> None:
        self._ensure_loop_state()
        await self._idle.wait()

    async def abort_all_requests(self, reset_prefix_cache: bool = True, reject_request: bool = False) -> dict[str, Any]:
        """Pause admission, stop the running batch (partial outputs come back as ``stop_reason="aborted"``) and
        answer every queued request as aborted. ``reject_request``: later requests are answered aborted at once
        instead of waiting for :meth:`resume_generation`."""
        self._ensure_loop_state()
        self._paused = True
        self._rejecting = bool(reject_request)
        self._resume.clear()
        queued, self._queue = self._queue, []
        ids = [r.request_id for r in queued] + [r.request_id for r in self._inflight]
        for r in queued:
            if not r.future.done():
                r.future.set_result(self._aborted_output())
        if self._inflight:
            self.engine.abort_event.set()
            await self._idle.wait()
        self.engine.abort_event.clear()
        self._idle.set()
        return {"aborted_count": len(ids), "request_ids": ids}

    async def resume_generation(self) -> None:
        self._ensure_loop_state()
        self._paused = False
        self._rejecting = False
        self._resume.set()
        if self._queue:
            self._wakeup.set()

    async def resume_engine_generation(self) -> None:
        return None

    async def open_submission_gate(self) -> None:
        await self.resume_generation()


# ------------------------------------------------------------------------------------------------ replica


class HFCPUReplica(RolloutReplica):
    """One :class:`HFCPUServer` per replica; a replica is a single process (tp = dp = pp = 1)."""

    def __init__(
        self,
        replica_rank: int,
        config: Any,
        model_config: Any,
        gpus_per_node: int = 8,
        is_reward_model: bool = False,
        is_teacher_model: bool = False,
        name_suffix: str = "",
    ) -> None:
        super().__init__(
            replica_rank, config, model_config, gpus_per_node, is_reward_model, is_teacher_model, name_suffix
        )
        check_replica_world_size(self.config)
        server_options(self.config)  # fail in the driver on a bad option, not later in the actor
        self.server_class = ray.remote(HFCPUServer)

    def _server_name(self) -> str:
        prefix = f"{ROLLOUT_NAME}_"
        if self.is_reward_model:
            return f"{prefix}server_reward_{self.replica_rank}_0{self.name_suffix}"
        if self.is_teacher_model:
            return f"{prefix}server_teacher_{self.replica_rank}_0{self.name_suffix}"
        return f"{prefix}server_{self.replica_rank}_0{self.name_suffix}"

    async def launch_servers(self) -> None:
        if self.workers:
            node_id = await self.workers[0].__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id())
        else:
            node_id = ray.get_runtime_context().get_node_id()
        name = self._server_name()
        server = self.server_class.options(
            scheduling_strategy=ray.util.scheduling_strategies.NodeAffinitySchedulingStrategy(
                node_id=node_id, soft=False
            ),
            name=name,
            max_concurrency=self.max_concurrency,
        ).remote(
            config=self.config,
            model_config=self.model_config,
            rollout_mode=self.rollout_mode,
            workers=self.workers,
            replica_rank=self.replica_rank,
            node_rank=0,
            gpus_per_node=self.gpus_per_replica_node,
            nnodes=self.nnodes,
            name=name,
        )
        await server.ready.remote()
        self.servers = [server]
        self._server_handle = server
        address, _ = await server.get_server_address.remote()
        # not an HTTP endpoint (token-in-token-out through Ray only); unique per replica, as the router needs
        self._server_address = f"{ROLLOUT_NAME}://{address}/{name}"

    async def sleep(self) -> None:
        await asyncio.gather(*[s.wait_for_requests_to_drain.remote() for s in self.servers])

    async def abort_all_requests(self, reject_request: bool = False) -> dict[str, Any]:
        results = await asyncio.gather(
            *[s.abort_all_requests.remote(reject_request=reject_request) for s in self.servers]
        )
        return {
            "aborted_count": sum(r["aborted_count"] for r in results),
            "request_ids": [i for r in results for i in r["request_ids"]],
            "server_results": results,
        }


# ------------------------------------------------------------------------------------------------ adapter


class ServerAdapter(BaseRollout):
    """The actor worker's handle on its replica's server: weight sync and wake/sleep (no-ops on CPU)."""

    def __init__(self, config: Any, model_config: Any, device_mesh: Any, replica_rank: int = -1):
        super().__init__(config, model_config, device_mesh)
        self.server_handle: ActorHandle | None = None
        rank = int(os.environ.get("RANK", "0"))
        rollout_world_size = (
            self.config.tensor_model_parallel_size
            * self.config.data_parallel_size
            * self.config.pipeline_model_parallel_size
        )
        self.replica_rank = rank // rollout_world_size if replica_rank == -1 else replica_rank
        self.rollout_rank = rank % rollout_world_size
        self._has_server = self.rollout_rank == 0
        self.bucket_bytes = int(self.config.checkpoint_engine.update_weights_bucket_megabytes) << 20
        self.sleep_level = 2
        self.last_update: dict[str, Any] | None = None

    def _ensure_server_handle(self) -> bool:
        if not self._has_server:
            return False
        if self.server_handle is None:
            self.server_handle = ray.get_actor(f"{ROLLOUT_NAME}_server_{self.replica_rank}_0")
        return True

    async def resume(self, tags: list[str]):
        return None

    async def release(self):
        return None

    @torch.no_grad()
    async def update_weights(
        self,
        weights: Iterable[tuple[str, torch.Tensor]] | AsyncIterable[tuple[str, torch.Tensor]],
        global_steps: int | None = None,
        wire_format: str = "named_tensors",
        peft_config: Any = None,
        **kwargs: Any,
    ):
        """Stream ``(hf_name, full_tensor)`` pairs to the server in buckets, then let it verify coverage."""
        if wire_format != "named_tensors":
            raise NotImplementedError(f"{ROLLOUT_NAME} rollout supports wire_format='named_tensors' only")
        if peft_config is not None:
            raise NotImplementedError(
                f"{ROLLOUT_NAME} rollout cannot serve LoRA adapters; set actor_rollout_ref.model.lora.merge=True"
            )
        t0 = time.perf_counter()
        if not self._ensure_server_handle():
            # the generator's full_tensor() calls are collectives: every rank must consume it
            async for _ in _aiter(weights):
                pass
            return
        await self.server_handle.begin_weight_update.remote()
        bucket: list[tuple[str, torch.Tensor]] = []
        size = 0
        sent = 0
        async for name, tensor in _aiter(weights):
            t = tensor.detach()
            if hasattr(t, "full_tensor"):  # a DTensor that the engine did not gather
                t = t.full_tensor()
            t = t.to("cpu").contiguous()
            bucket.append((name, t))
            size += t.numel() * t.element_size()
            if size >= self.bucket_bytes:
                sent += await self.server_handle.load_weights.remote(bucket)
                bucket, size = [], 0
        if bucket:
            sent += await self.server_handle.load_weights.remote(bucket)
        self.last_update = await self.server_handle.finish_weight_update.remote(global_steps)
        if self.replica_rank == 0:
            logger.info(
                "%s update_weights: %d tensors, step %s, %.2fs",
                ROLLOUT_NAME,
                sent,
                global_steps,
                time.perf_counter() - t0,
            )


async def _aiter(items: Iterable | AsyncIterable):
    if hasattr(items, "__aiter__"):
        async for x in items:
            yield x
    else:
        for x in items:
            yield x


register()
