"""Token-probability case study (the paper's Figure 6): how likely each model finds each gold token.

For one problem and its reference solution (a conversation from the SFT split), every model gets
the same token sequence -- the prompt rendered with the chat template and generation prompt, then
the reference response and EOS -- and we record p_model(y_t | y_<t) for every response token y_t
(one teacher-forced forward pass per model, fp32 softmax). Drawn as the paper draws it (Fig. 6): each
token on a white-to-red scale, darker red = higher probability of the gold token (white = the model
finds it unlikely); the HTML shows one row per model (hover for the value), the PNG is the same as a
heat map (matplotlib "Reds", 0..1) over the first `max_tokens` response tokens.

`mean_response_entropy` is the same teacher-forced pass over several reference solutions, reporting the
mean full-vocabulary entropy of the model's next-token distribution on the response tokens (the report's
"entropy kept after SFT" measurement, one number per model on identical tokens).

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


def mean_response_entropy(model_dir: str, cases: list[tuple[list[int], int]], device: str = "cpu") -> float:
    """Mean next-token entropy (nats, full vocabulary, fp32) of the model over the response tokens of `cases`
    ((token ids, first response index) from `render_case`), teacher-forced, every token weighted equally."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, start in cases:
            logits = model(input_ids=torch.tensor([ids], device=device)).logits[0, start - 1 : -1].float()  # [R, V]
            logp = torch.log_softmax(logits, dim=-1)
            total += float(-(logp.exp() * logp).sum(-1).sum())
            count += logits.shape[0]
    del model
    return total / max(count, 1)


DARK_RED = (139, 0, 0)


def _colour(p: float) -> str:
    """White (p = 0) -> dark red (p = 1): darker red = higher probability of the gold token (paper Fig. 6)."""
    p = min(1.0, max(0.0, float(p)))
    r, g, b = (round(255 + (c - 255) * p) for c in DARK_RED)
    return f"rgb({r},{g},{b})"


def _text_colour(p: float) -> str:
    return "#fff" if p > 0.55 else "#000"


def write_html(path: Path, tokens: list[str], rows: dict[str, list[float]], title: str) -> Path:
    parts = [
        "<!doctype html><meta charset='utf-8'><title>token probabilities</title>",
        "<style>body{font-family:sans-serif} .tok{font-family:monospace;white-space:pre;padding:1px;"
        "border-radius:2px;margin:0} .row{margin:10px 0;line-height:1.9} h3{margin:4px 0}</style>",
        f"<h2>{html.escape(title)}</h2>",
        "<p>Each response token coloured by the probability the model assigns to it: darker red = more likely "
        "(white = p 0, dark red = p 1; hover for the value).</p>",
    ]
    for name, probs in rows.items():
        mean = sum(probs) / max(1, len(probs))
        parts.append(f"<div class='row'><h3>{html.escape(name)} — mean p = {mean:.3f}</h3>")
        for tok, p in zip(tokens, probs):
            shown = html.escape(tok).replace("\n", "↵\n")
            parts.append(f"<span class='tok' style='background:{_colour(p)};color:{_text_colour(p)}' "
                         f"title='p={p:.4f}'>{shown}</span>")
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
    im = ax.imshow(mat, aspect="auto", cmap="Reds", vmin=0.0, vmax=1.0, interpolation="nearest")
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
