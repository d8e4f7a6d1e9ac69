"""Probe: can the tiny model learn the tool-use twin, and what stops it? (issue 25; README "Tool use", the CPU twin)

A plain-PyTorch SFT loop (no verl, no Ray: ~0.65 s per step of 16 twin rows of ~155 tokens on 2 cores, against
~1.8 s per verl step of the pipeline's SFT) over a finished tool split's rows (the split's run tokenizer, with
the twin's format tokens where the recipe adds them), then greedy generation on the split's BFCL-layout eval set,
scored by BFCL's own checker (`eksft_pipeline.eval.bfcl.score_entry`). It answers recipe questions (rows, steps,
lr, how much of the system turn the model can read past) in minutes before a verl run is spent on them:

    python -m eksft_pipeline task=tool_use stage=split run_dir=/tmp/tu task.data.tiny.n_train=3000
    python scripts/probe_tool_twin.py /tmp/tu/split --steps 200 --lr 3e-3 --batch 16 --prompt full

`--prompt`: `full` = the run's real rows (tool docs in the system turn, as Qwen3 renders `tools=`); `compact` =
the tool schemas without Qwen3's fixed header/footer text; `header` = that header/footer text without the
schemas; `bare` = no system turn (the request and the call only). `compact`, `header` and `bare` are diagnostics, not formats a run uses. Loss: mean cross-entropy of the assistant
turn (prompt masked), AdamW(0.9, 0.95), linear warm-up over 10 steps then cosine to 10%, grad-norm clip 1.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from pathlib import Path

CATEGORIES = ("live_simple", "live_multiple", "live_parallel", "live_parallel_multiple", "irrelevance")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("split_dir", type=Path, help="<run_dir>/split of a finished task=tool_use split (source=tiny)")
    ap.add_argument("--model", type=Path, default=None, help="base model dir (default: the split's run format)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt", choices=("full", "compact", "header", "bare"), default="full")
    ap.add_argument("--eval-per-category", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)

    import pandas as pd
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from eksft_pipeline.contract.run_format import RUN_FORMAT_FILE, read_run_format
    from eksft_pipeline.data.tool_use.format import TOOLS_FOOTER, TOOLS_HEADER
    from eksft_pipeline.eval import bfcl

    split = a.split_dir
    for f in ("sft_train.parquet", RUN_FORMAT_FILE, "tiny_tool_data/bfcl"):
        if not (split / f).exists():
            sys.exit(f"probe_tool_twin: {split / f} is missing; run the tiny tool split first (see --help)")
    fmt = read_run_format(split / RUN_FORMAT_FILE)  # the run's tokenizer, base model and stop token
    torch.manual_seed(a.seed)
    tok = AutoTokenizer.from_pretrained(fmt.tokenizer_dir)
    model = AutoModelForCausalLM.from_pretrained(a.model or fmt.base_model_dir(), dtype=torch.float32)
    eos = fmt.eos["end_of_turn_id"]

    def shape(msgs: list[dict]) -> list[dict]:
        if msgs[0]["role"] != "system" or a.prompt == "full":
            return msgs
        if a.prompt == "bare":
            return msgs[1:]
        if a.prompt == "header":
            return [dict(msgs[0], content=TOOLS_HEADER + TOOLS_FOOTER), *msgs[1:]]
        text = msgs[0]["content"].replace(TOOLS_HEADER, "").replace(TOOLS_FOOTER, "")
        return [dict(msgs[0], content=text), *msgs[1:]]

    rows = []  # (token ids of prompt + target, prompt length)
    for conv in pd.read_parquet(split / "sft_train.parquet")["messages"]:
        msgs = shape([dict(m) for m in conv])
        prompt = tok.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True)
        full = tok(prompt + msgs[-1]["content"] + fmt.eos["end_of_turn"] + "\n", add_special_tokens=False).input_ids
        rows.append((full, len(tok(prompt, add_special_tokens=False).input_ids)))
    print(
        f"[probe] {len(rows)} rows, mean {sum(len(r) for r, _ in rows) / len(rows):.0f} tokens "
        f"(--prompt {a.prompt}); {a.steps} steps x {a.batch} rows at lr {a.lr}",
        flush=True,
    )

    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, betas=(0.9, 0.95), weight_decay=0.0)
    rng = random.Random(a.seed)
    t0 = time.perf_counter()
    model.train()
    for step in range(a.steps):
        batch = rng.sample(rows, min(a.batch, len(rows)))
        width = max(len(r) for r, _ in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)  # [B, T], right-padded
        mask = torch.zeros_like(ids)
        labels = torch.full_like(ids, -100)  # prompt and padding masked
        for i, (r, n_prompt) in enumerate(batch):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
            labels[i, n_prompt : len(r)] = torch.tensor(r[n_prompt:])
        frac = step / max(1, a.steps)
        for g in opt.param_groups:
            g["lr"] = a.lr * min(1.0, (step + 1) / 10) * (0.1 + 0.45 * (1 + math.cos(math.pi * frac)))
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 25 == 0 or step == a.steps - 1:
            print(f"[probe] step {step} loss {loss.item():.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)

    model.eval()
    correct: dict[str, list[bool]] = {}
    for cat in CATEGORIES:
        for entry in bfcl.load_category(cat, split / "tiny_tool_data" / "bfcl")[: a.eval_per_category]:
            prompt = tok.apply_chat_template(shape(bfcl.prompt_messages(entry)), tokenize=False,
                                             add_generation_prompt=True)  # fmt: skip
            ids = torch.tensor([tok(prompt, add_special_tokens=False).input_ids])
            with torch.no_grad():
                out = model.generate(ids, max_new_tokens=112, do_sample=False, eos_token_id=eos, pad_token_id=0)
            text = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
            ok = bool(bfcl.score_entry(cat, entry, text)["correct"])
            if not correct.get(cat):
                print(f"[probe] {cat} e.g. {text[:120]!r} -> {'correct' if ok else 'wrong'}", flush=True)
            correct.setdefault(cat, []).append(ok)
    summary = ", ".join(f"{c} {sum(v)}/{len(v)}" for c, v in correct.items())
    print(f"[probe] correct: {summary} ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
