"""Per-row seeded sampling for HF `generate`: a sample depends on its own seed, not on the rows batched with it.

HF's sampling draws every row of a batch from the one global torch generator, so what a row samples depends on
how many rows share its batch and in which order. Eval (`eval/sampling.py`: a problem redone after a kill gets
its old samples back) and the CPU rollout (`verl_ext/cpu_rollout.py`: the same DAPO run samples the same
responses however its requests were batched) both give each row its own `torch.Generator`:

    sampler = RowSampler(seeds, temperature=1.0, top_p=1.0)                  # one seed per row
    model.generate(..., do_sample=False, logits_processor=LogitsProcessorList([sampler]))
    sampler.logprobs()   # [R, T]: log-prob of each drawn token under the distribution it was drawn from

With `do_sample=False`, HF's own logits processors (repetition penalty) run first, then this one draws row i's
token from the processed distribution (temperature, top-k, top-p, min-p, in HF's order) with generator i and
returns scores that are -inf everywhere else, which greedy decoding then takes.
"""

from __future__ import annotations

import hashlib

import torch


def sample_seed(*parts: object) -> int:
    """A 63-bit seed from any printable parts (sha256 of their ``:``-joined text: the same on every machine)."""
    h = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(h[:8], "little") % (2**63 - 1)


class RowSampler:
    """A `generate` logits processor that samples each row from its own generator. scores: [R, V] -> [R, V].

    ``top_k <= 0``: no top-k; ``top_p = 1``: no nucleus; ``min_p`` None or 0: no min-p. The top-p nucleus is the
    smallest prefix of the sorted distribution whose mass reaches ``top_p``."""

    def __init__(self, seeds: list[int], temperature: float, top_p: float = 1.0, top_k: int = -1,
                 min_p: float | None = None, device: str = "cpu"):  # fmt: skip
        if temperature <= 0:
            raise ValueError(f"RowSampler samples (temperature > 0); got temperature={temperature} (use greedy)")
        self.gens = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]
        self.temperature = float(temperature)
        self.top_p = float(top_p)
        self.top_k = int(top_k)
        self.min_p = float(min_p) if min_p else 0.0
        self._logps: list[torch.Tensor] = []  # one [R] per decoding step

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        logits = scores.float() / self.temperature  # [R, V]
        if 0 < self.top_k < logits.shape[-1]:
            kth = logits.topk(self.top_k, dim=-1).values[:, -1:]  # [R, 1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)  # [R, V]
        if self.top_p < 1.0:
            sp, idx = probs.sort(dim=-1, descending=True)
            sp = sp.masked_fill(sp.cumsum(-1) - sp > self.top_p, 0.0)  # keep the smallest prefix reaching top_p
            probs = torch.zeros_like(probs).scatter_(-1, idx, sp)
        if self.min_p > 0:
            probs = probs.masked_fill(probs < self.min_p * probs.amax(-1, keepdim=True), 0.0)
        pick = torch.cat([torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(self.gens)])  # [R]
        self._logps.append((probs.gather(1, pick[:, None]).squeeze(1) / probs.sum(-1)).log())
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(1, pick[:, None], 0.0)

    def logprobs(self) -> torch.Tensor:
        """[R, T]: the log-prob of every drawn token under its renormalised processed distribution."""
        return torch.stack(self._logps, dim=1) if self._logps else torch.zeros((len(self.gens), 0))
