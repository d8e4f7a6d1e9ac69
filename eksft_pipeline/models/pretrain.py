"""Short causal-LM pre-training of the tiny model on plain text, so the reference model is a meaningful base
rather than uniform noise (a departure from the paper, whose base is Qwen2.5-Math-7B).

    pretrain_tiny(model_dir, texts, steps=800, seed=0, num_threads=1)   # rewrites model_dir + pretrain_log.json
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

from eksft_pipeline.models.tokenizer import PAD_TOKEN


def _token_stream(tokenizer, texts: list[str]) -> list[int]:
    """Concatenate ``text + <|endoftext|>`` token ids of every text (document separator as in GPT pretraining)."""
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    sep = tokenizer.convert_tokens_to_ids(PAD_TOKEN)
    stream: list[int] = []
    for x in ids:
        stream.extend(x)
        stream.append(sep)
    return stream


def pretrain_tiny(
    model_dir: str | Path,
    texts: list[str],
    *,
    steps: int = 300,
    seq_len: int = 128,
    batch_size: int = 16,
    lr: float = 3e-3,
    warmup_steps: int = 20,
    weight_decay: float = 0.01,
    seed: int = 0,
    time_budget_s: float | None = None,
    num_threads: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Causal-LM pre-training of the model in ``model_dir`` on ``texts``; saves the weights back.

    Texts are packed into one stream (``<|endoftext|>`` between documents) and cut into ``seq_len`` windows
    at random offsets; loss = mean next-token cross-entropy over the window. AdamW, linear warm-up then cosine
    decay to 10%. Runs exactly ``steps`` steps, so the base model is the same on a fast and on a busy machine
    (same seed, same threads -> same weights); ``time_budget_s`` (off by default) is an explicit opt-in cap
    whose result then depends on machine speed, and the log records that it was hit.

    Returns ``{"losses": [...], "first_loss", "last_loss" (mean of the last 10 steps), "steps_done",
    "elapsed_s", "tokens_seen", "stopped_by": "steps"|"time_budget"}``; also written to
    ``model_dir/pretrain_log.json``.
    """
    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(num_threads or max(1, min(os.cpu_count() or 1, 8)))
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
        model.train()
        stream = torch.tensor(_token_stream(tokenizer, list(texts)), dtype=torch.long)
        if stream.numel() < seq_len + 2:
            raise ValueError(f"pretraining corpus has {stream.numel()} tokens, fewer than seq_len+2={seq_len + 2}")
        gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.95))

        def lr_at(step: int) -> float:
            if step < warmup_steps:
                return lr * (step + 1) / warmup_steps
            frac = (step - warmup_steps) / max(1, steps - warmup_steps)
            return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))

        losses: list[float] = []
        stopped_by = "steps"
        bar = tqdm(range(steps), desc="pretrain tiny", disable=not progress,
                   mininterval=float(os.environ.get("TQDM_MININTERVAL", 1.0)))  # the runner: 30 s into a log file
        for step in bar:
            if time_budget_s is not None and time.perf_counter() - t0 > time_budget_s:
                stopped_by = "time_budget"
                break
            # batch: (batch_size, seq_len) windows; labels = inputs, the model shifts them by one internally
            starts = torch.randint(0, stream.numel() - seq_len, (batch_size,), generator=gen)
            batch = torch.stack([stream[s : s + seq_len] for s in starts.tolist()])
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            out = model(input_ids=batch, labels=batch)
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            losses.append(float(out.loss.detach()))
            bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)  # drawn at the bar's own interval
        model.eval()
        model.save_pretrained(str(model_dir))
    finally:
        torch.set_num_threads(prev_threads)
    log = {
        "losses": [round(x, 5) for x in losses],
        "first_loss": losses[0] if losses else None,
        "last_loss": sum(losses[-10:]) / len(losses[-10:]) if losses else None,
        "steps_done": len(losses),
        "elapsed_s": round(time.perf_counter() - t0, 2),
        "tokens_seen": len(losses) * batch_size * seq_len,
        "stopped_by": stopped_by,
    }
    Path(model_dir, "pretrain_log.json").write_text(json.dumps(log, indent=1) + "\n")
    if progress:
        print(
            f"[tiny] pretrain: {log['steps_done']} steps, loss {log['first_loss']:.3f} -> {log['last_loss']:.3f} "
            f"in {log['elapsed_s']}s ({stopped_by})"
        )
    return log
