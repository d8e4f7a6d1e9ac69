"""Sample n completions per problem: HF `generate` on CPU, vLLM's offline engine on GPU.

Output rows (one per completion), saved as parquet by the eval stage:

    benchmark, problem_id, sample_idx, completion, finish_reason ("stop" | "length"),
    n_tokens (completion tokens incl. the stop token), ground_truth, seed

Resumable: `sample_problems` skips (problem_id, sample_idx) pairs already present in `existing`,
and every problem's samples are seeded by (seed, problem_id, sample_idx), so a re-run after a kill
produces the same samples as an uninterrupted run (HF backend) and never regenerates saved ones.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch


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

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def render_prompt(tokenizer, messages: list[dict], generation_prefix: str = "") -> str:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return text + generation_prefix


def _sample_seed(seed: int, problem_id: str, sample_idx: int) -> int:
    h = hashlib.sha256(f"{seed}:{problem_id}:{sample_idx}".encode()).digest()
    return int.from_bytes(h[:8], "little") % (2**63 - 1)


class HFSampler:
    """Batched `model.generate` on CPU (or one GPU). One prompt x `chunk` samples per call."""

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
        tok = self.tokenizer
        prompt = render_prompt(tok, problem.messages, params.generation_prefix)
        enc = tok(prompt, return_tensors="pt", add_special_tokens=False).to(self.device)
        plen = enc["input_ids"].shape[1]
        eos = tok.eos_token_id
        pad = tok.pad_token_id if tok.pad_token_id is not None else eos
        rows = []
        for start in range(0, len(sample_ids), self.chunk):
            ids = sample_ids[start : start + self.chunk]
            # one generator seed per chunk, derived from its first sample id: deterministic on re-run
            torch.manual_seed(_sample_seed(params.seed, problem.problem_id, ids[0]))
            out = self.model.generate(
                input_ids=enc["input_ids"].expand(len(ids), -1),
                attention_mask=enc["attention_mask"].expand(len(ids), -1),
                do_sample=params.temperature > 0,
                temperature=max(params.temperature, 1e-5),
                top_p=params.top_p,
                top_k=0,
                max_new_tokens=params.max_new_tokens,
                eos_token_id=eos,
                pad_token_id=pad,
            )
            gen = out[:, plen:]
            for j, sid in enumerate(ids):
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
                rows.append(
                    {
                        "benchmark": problem.benchmark,
                        "problem_id": problem.problem_id,
                        "sample_idx": int(sid),
                        "completion": tok.decode(toks, skip_special_tokens=True),
                        "finish_reason": finish,
                        "n_tokens": len(toks),
                        "ground_truth": problem.ground_truth,
                        "seed": int(params.seed),
                    }
                )
        return rows


class VLLMSampler:
    """vLLM offline engine (GPU extra). Thin: one `LLM.generate` over all pending prompts."""

    def __init__(
        self,
        model_dir: str,
        *,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.85,
        max_model_len: int | None = None,
        seed: int = 0,
    ):
        try:
            from vllm import LLM
        except ImportError as e:  # pragma: no cover - GPU extra
            raise ImportError("the vllm sampler needs the GPU extra: pip install -e '.[gpu]'") from e
        self.llm = LLM(
            model=model_dir,
            tensor_parallel_size=tensor_parallel_size,
            seed=seed,
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len,
        )
        self.tokenizer = self.llm.get_tokenizer()

    def sample_many(self, problems: list[Problem], pending: dict[str, list[int]], params: SamplingParams) -> list[dict]:
        from vllm import SamplingParams as VSP  # pragma: no cover - GPU extra

        prompts, owners = [], []
        for p in problems:
            ids = pending.get(p.problem_id) or []
            if not ids:
                continue
            prompts.append(render_prompt(self.tokenizer, p.messages, params.generation_prefix))
            owners.append((p, ids))
        rows = []
        for (p, ids), prompt in zip(owners, prompts):
            sp = VSP(
                n=len(ids),
                temperature=params.temperature,
                top_p=params.top_p,
                max_tokens=params.max_new_tokens,
                seed=_sample_seed(params.seed, p.problem_id, ids[0]),
            )
            for out in self.llm.generate([prompt], sp, use_tqdm=False):
                for sid, o in zip(ids, out.outputs):
                    rows.append(
                        {
                            "benchmark": p.benchmark,
                            "problem_id": p.problem_id,
                            "sample_idx": int(sid),
                            "completion": o.text,
                            "finish_reason": "stop" if o.finish_reason == "stop" else "length",
                            "n_tokens": len(o.token_ids),
                            "ground_truth": p.ground_truth,
                            "seed": int(params.seed),
                        }
                    )
        return rows


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
    total = 0
    for p in tqdm(todo, desc="sampling", unit="problem", disable=not progress):
        rows = sampler.sample(p, pending[p.problem_id], params)
        on_rows(rows)
        total += len(rows)
    return total
