"""Token-probability case study (the paper's Figure 6): how likely each model finds each gold token.

For one problem and its reference solution (a conversation from the SFT split), every model gets
the same token sequence -- the prompt rendered with the chat template and generation prompt, then
the reference response and EOS -- and we record p_model(y_t | y_<t) for every response token y_t
(one teacher-forced forward pass per model, fp32 softmax). The HTML shows one row per model with
each token coloured by its probability (red = unlikely, green = likely; hover for the value); the
PNG is the same as a heat map over the first `max_tokens` response tokens.

All models must share the tokenizer of the first one (true for a base model and its fine-tunes);
a model whose tokenizer renders the text differently is an error, since token-by-token rows would
not line up.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any


def render_case(tokenizer, messages: list[dict], generation_prefix: str = "") -> tuple[list[int], int]:
    """(token ids of prompt + response + EOS, index of the first response token)."""
    prompt_msgs = [m for m in messages if m["role"] != "assistant"]
    answer = next(m["content"] for m in messages if m["role"] == "assistant")
    kw = {"generation_prefix": generation_prefix} if generation_prefix else {}
    prompt = tokenizer.apply_chat_template(prompt_msgs, add_generation_prompt=True, tokenize=False, **kw)
    p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    r_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        r_ids = r_ids + [tokenizer.eos_token_id]
    return p_ids + r_ids, len(p_ids)


def gold_token_probs(model_dir: str, ids: list[int], start: int, device: str = "cpu") -> list[float]:
    """p(y_t | y_<t) for t >= start under the model in `model_dir` (teacher forcing, fp32 softmax)."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    with torch.no_grad():
        x = torch.tensor([ids], device=device)
        logits = model(input_ids=x).logits[0].float()  # [L, V]
        logp = torch.log_softmax(logits[start - 1 : -1], dim=-1)  # row i predicts token start+i
        gold = x[0, start:]
        probs = logp.gather(-1, gold[:, None]).squeeze(-1).exp()
    del model
    return probs.cpu().tolist()


def _colour(p: float) -> str:
    # red (p=0) -> yellow (0.5) -> green (1)
    r = int(255 * min(1.0, 2 * (1 - p)))
    g = int(255 * min(1.0, 2 * p))
    return f"rgb({r},{g},80)"


def write_html(path: Path, tokens: list[str], rows: dict[str, list[float]], title: str) -> Path:
    parts = [
        "<!doctype html><meta charset='utf-8'><title>token probabilities</title>",
        "<style>body{font-family:sans-serif} .tok{font-family:monospace;white-space:pre;padding:1px;"
        "border-radius:2px;margin:0} .row{margin:10px 0;line-height:1.9} h3{margin:4px 0}</style>",
        f"<h2>{html.escape(title)}</h2>",
        "<p>Each response token coloured by the probability the model assigns to it "
        "(red = unlikely, green = likely; hover for the value).</p>",
    ]
    for name, probs in rows.items():
        mean = sum(probs) / max(1, len(probs))
        parts.append(f"<div class='row'><h3>{html.escape(name)} — mean p = {mean:.3f}</h3>")
        for tok, p in zip(tokens, probs):
            shown = html.escape(tok).replace("\n", "↵\n")
            parts.append(f"<span class='tok' style='background:{_colour(p)}' title='p={p:.4f}'>{shown}</span>")
        parts.append("</div>")
    path.write_text("".join(parts), encoding="utf-8")
    return path


def write_png(path: Path, tokens: list[str], rows: dict[str, list[float]], max_tokens: int) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    n = min(max_tokens, len(tokens))
    mat = np.array([r[:n] for r in rows.values()])
    fig, ax = plt.subplots(figsize=(max(6.0, 0.16 * n), 0.5 * len(rows) + 1.6))
    im = ax.imshow(mat, aspect="auto", cmap="RdYlGn", vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_yticks(range(len(rows)), list(rows), fontsize=7)
    ax.set_xticks(range(n), [t.replace("\n", "↵") for t in tokens[:n]], rotation=90, fontsize=5)
    fig.colorbar(im, ax=ax, fraction=0.02, label="p(gold token)")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def token_prob_case_study(
    models: dict[str, str],
    messages: list[dict],
    out_dir: Path,
    *,
    generation_prefix: str = "",
    max_tokens: int = 96,
    device: str = "cpu",
) -> dict[str, Any]:
    """Run the case study for `models` (label -> HF dir); writes token_probs.{json,html,png}."""
    from transformers import AutoTokenizer

    if not models:
        raise ValueError("token-probability case study: no models to compare")
    out_dir.mkdir(parents=True, exist_ok=True)
    first = next(iter(models.values()))
    tok = AutoTokenizer.from_pretrained(first)
    ids, start = render_case(tok, messages, generation_prefix)
    rows: dict[str, list[float]] = {}
    for label, model_dir in models.items():
        other = AutoTokenizer.from_pretrained(model_dir)
        if render_case(other, messages, generation_prefix)[0] != ids:
            raise ValueError(f"case study: {label} ({model_dir}) tokenizes the case differently from {first}")
        rows[label] = gold_token_probs(model_dir, ids, start, device=device)
    tokens = [tok.decode([t]) for t in ids[start:]]
    result = {"messages": messages, "tokens": tokens, "probs": rows,
              "mean_prob": {k: sum(v) / len(v) for k, v in rows.items()}}
    (out_dir / "token_probs.json").write_text(json.dumps(result, indent=1, ensure_ascii=False))
    user = next((m["content"] for m in messages if m["role"] == "user"), "")
    write_html(out_dir / "token_probs.html", tokens, rows, f"Problem: {user[:300]}")
    write_png(out_dir / "token_probs.png", tokens, rows, max_tokens)
    return result
