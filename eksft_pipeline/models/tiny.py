"""The CPU default model: a ~1M-parameter Qwen3 with a locally trained byte-level BPE tokenizer.

* :func:`build_tiny_tokenizer` trains a byte-level BPE (``tokenizers``) on the project's own synthetic math
  text. Pre-tokenisation is a GPT/Qwen-style regex split in which every digit is its own pre-token (so
  numbers are always split into single digits, which helps arithmetic), then byte-level mapping. Special
  tokens get fixed ids: ``<|endoftext|>``=0 (pad), ``<|im_start|>``=1, ``<|im_end|>``=2 (EOS), ``<think>``=3,
  ``</think>``=4. ``<think>``/``</think>`` are *non-special* added tokens (as in Qwen3): always one token,
  but kept by ``decode(skip_special_tokens=True)`` so reward/format checks see them.
  Chat template: Qwen ChatML without a default system prompt::

      <|im_start|>{role}\\n{content}<|im_end|>\\n          (per message)
      <|im_start|>assistant\\n                          (add_generation_prompt=True)

  plus an optional template variable ``generation_prefix`` (pass it via ``apply_chat_template(...,
  generation_prefix="<think>\\n")`` or verl's ``apply_chat_template_kwargs``): it is rendered right after
  ``<|im_start|>assistant\\n`` both in the generation prompt and before every assistant message, which is what
  the split stage's ``think_prefix=prompt`` mode needs (the prefix is then part of verl's masked
  generation prompt in SFT, and of the RL/eval prompt). No default system prompt means verl's
  ``MultiTurnSFTDataset`` sees an empty "system prompt" prefix and renders each turn independently
  (per-turn concatenation == whole-conversation rendering, its sanity check).
* :func:`build_tiny_model` builds a randomly initialised ``Qwen3ForCausalLM`` (tied embeddings, fp32, sdpa)
  and saves it with the tokenizer and a ``generation_config.json`` (eos = ``<|im_end|>``).
* :func:`pretrain_tiny` runs a short causal-LM pre-training on plain text so the reference model is a
  meaningful base rather than uniform noise (departure from the paper, whose base is Qwen2.5-Math-7B).
* :func:`make_tiny_assets` does all of it (data + tokenizer + model + pretraining) idempotently.

Launch (through the orchestrator): ``python -m eksft_pipeline stage=assets`` / ``make tiny-assets``; directly:
``python -c "from eksft_pipeline.models.tiny import make_tiny_assets; make_tiny_assets('data/generated/tiny')"``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

SPECIAL_TOKENS: tuple[str, ...] = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")
NON_SPECIAL_ADDED = frozenset({"<think>", "</think>"})
PAD_TOKEN, EOS_TOKEN = "<|endoftext|>", "<|im_end|>"

# GPT-2/Qwen2-style split, except that \p{N} matches ONE digit (Qwen2 does this too), so digits never merge.
PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['role'] == 'assistant' and generation_prefix is defined and generation_prefix -%}"
    "{{- generation_prefix -}}"
    "{%- endif -%}"
    "{{- message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- if generation_prefix is defined and generation_prefix -%}{{- generation_prefix -}}{%- endif -%}"
    "{%- endif -%}"
)

MARKER_FILE = "TINY_ASSETS_COMPLETE.json"


# ------------------------------------------------------------------------------------------------ tokenizer


def build_tiny_tokenizer(out_dir: str | Path | None, corpus_texts: Iterable[str], vocab_size: int = 1024):
    """Train the tiny byte-level BPE on ``corpus_texts`` and return a ``PreTrainedTokenizerFast``.

    ``vocab_size`` counts the 5 special tokens and the 256 byte symbols; the trainer may stop below it when
    the corpus has no more pairs. Literal special-token strings are removed from the corpus first (they are
    matched before BPE anyway). Saved with ``save_pretrained`` to ``out_dir`` if given, loadable offline
    with ``AutoTokenizer.from_pretrained(out_dir)``. Deterministic: same texts -> same ``tokenizer.json``.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 256 + len(SPECIAL_TOKENS) + 1:
        raise ValueError(f"vocab_size={vocab_size} is too small (needs > {256 + len(SPECIAL_TOKENS)})")
    texts = list(corpus_texts)
    if not texts:
        raise ValueError("build_tiny_tokenizer needs a non-empty corpus")
    # Encoding splits on added tokens before BPE, so train on exactly those pieces.
    special_re = re.compile("|".join(re.escape(s) for s in SPECIAL_TOKENS))
    clean = [piece for t in texts for piece in special_re.split(t) if piece]

    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(clean, trainer=trainer)
    # The trainer registers all its special tokens as "special"; <think>/</think> must stay visible in decode.
    spec = json.loads(tok.to_str())
    for added in spec["added_tokens"]:
        if added["content"] in NON_SPECIAL_ADDED:
            added["special"] = False
    tok = Tokenizer.from_str(json.dumps(spec))

    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        extra_special_tokens=["<|im_start|>"],
        clean_up_tokenization_spaces=False,  # keep decode(encode(x)) == x
        model_max_length=4096,
    )
    hf.chat_template = CHAT_TEMPLATE
    for i, s in enumerate(SPECIAL_TOKENS):
        assert hf.convert_tokens_to_ids(s) == i, f"special token {s} got id {hf.convert_tokens_to_ids(s)}, expected {i}"
    if out_dir is not None:
        save_tokenizer(hf, out_dir)
    return hf


def save_tokenizer(tokenizer, out_dir: str | Path) -> None:
    """``save_pretrained`` + name the class ``PreTrainedTokenizerFast`` (resolves in transformers 4 and 5;
    transformers 5 writes its internal ``TokenizersBackend`` name, which 4.x cannot load)."""
    tokenizer.save_pretrained(str(out_dir))
    cfg_path = Path(out_dir) / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def render_chatml(
    messages: list[dict[str, str]], *, add_generation_prompt: bool = False, generation_prefix: str = ""
) -> str:
    """Python twin of :data:`CHAT_TEMPLATE` (used to build the tokenizer corpus before a tokenizer exists)."""
    out = []
    for m in messages:
        pre = generation_prefix if m["role"] == "assistant" else ""
        out.append(f"<|im_start|>{m['role']}\n{pre}{m['content']}<|im_end|>\n")
    if add_generation_prompt:
        out.append("<|im_start|>assistant\n" + generation_prefix)
    return "".join(out)


# ---------------------------------------------------------------------------------------------------- model


def tiny_config(
    tokenizer,
    *,
    hidden_size: int = 128,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 384,
    max_position_embeddings: int = 4096,
):
    """A ``Qwen3Config`` for the tiny model; vocab = tokenizer size rounded up to a multiple of 64."""
    from transformers import Qwen3Config

    if hidden_size % num_heads:
        raise ValueError(f"hidden_size={hidden_size} not divisible by num_heads={num_heads}")
    vocab = int(math.ceil(len(tokenizer) / 64) * 64)
    return Qwen3Config(
        vocab_size=vocab,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=hidden_size // num_heads,
        max_position_embeddings=max_position_embeddings,
        max_window_layers=num_layers,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        use_cache=True,
        bos_token_id=tokenizer.convert_tokens_to_ids(PAD_TOKEN),  # Qwen convention: no BOS, <|endoftext|> id
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
        attn_implementation="sdpa",
    )


def save_generation_config(out_dir: str | Path, tokenizer) -> None:
    from transformers import GenerationConfig

    GenerationConfig(
        bos_token_id=tokenizer.convert_tokens_to_ids(PAD_TOKEN),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    ).save_pretrained(str(out_dir))


def build_tiny_model(
    out_dir: str | Path,
    tokenizer,
    *,
    hidden_size: int = 128,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 384,
    max_position_embeddings: int = 4096,
    seed: int = 0,
):
    """Randomly initialise a tiny ``Qwen3ForCausalLM`` and save model + tokenizer + generation config.

    Defaults give ~0.9M parameters (embedding 1024x128 tied with the LM head, 4 layers of GQA attention with
    4 query / 2 kv heads of dim 32 and a 384-wide SwiGLU MLP). Returns the model (fp32, eval mode).
    """
    import torch
    from transformers import Qwen3ForCausalLM

    cfg = tiny_config(
        tokenizer,
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
    )
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(cfg).to(torch.float32)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    save_tokenizer(tokenizer, out)
    save_generation_config(out, tokenizer)
    return model.eval()


def count_parameters(model) -> int:
    """Unique parameters (tied embedding counted once)."""
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------------------------ pretrain


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
        bar = tqdm(range(steps), desc="pretrain tiny", disable=not progress, mininterval=1.0)
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
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
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


# ------------------------------------------------------------------------------------------------- assets


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _manifest_ok(out: Path, params: dict[str, Any]) -> bool:
    marker = out / MARKER_FILE
    if not marker.exists():
        return False
    try:
        m = json.loads(marker.read_text())
    except json.JSONDecodeError:
        return False
    if m.get("params") != params:
        return False
    for rel, digest in m.get("sha256", {}).items():
        p = out / rel
        if not p.is_file() or _sha256(p) != digest:
            return False
    return bool(m.get("sha256"))


def make_tiny_assets(
    out_dir: str | Path,
    *,
    n_problems: int = 2400,
    n_eval_per_source: int = 32,
    n_pretrain: int = 4000,
    pretrain_chat_frac: float = 0.5,
    pretrain_chat_trace_frac: float = 0.2,
    sft_preamble: str | None = "default",
    seed: int = 0,
    vocab_size: int = 1024,
    pretrain: bool = True,
    pretrain_steps: int = 800,
    pretrain_time_budget_s: float | None = None,
    model_kwargs: dict[str, Any] | None = None,
    force: bool = False,
    progress: bool = True,
) -> dict[str, Path]:
    """Build the whole CPU default in ``out_dir``: data, tokenizer, model, pretraining. Idempotent.

    Layout::

        out_dir/data/tiny_math_train.parquet   n_problems rows, OpenR1 schema (split-stage input)
        out_dir/data/tiny_math_eval.parquet    eval prompts, verl RL layout (tiny_add, tiny_linear)
        out_dir/data/tiny_pretrain.jsonl       plain-text pretraining corpus, disjoint from both
        out_dir/model/                         Qwen3 model + tokenizer + generation_config (+ pretrain_log.json)
        out_dir/TINY_ASSETS_COMPLETE.json      completion marker: parameters + sha256 of every file above

    If the marker exists, its parameters equal this call's and every hash matches, nothing is rebuilt.
    Otherwise (absent, half-written, edited, other parameters, or ``force``) ``data/`` and ``model/`` are
    deleted and rebuilt; the marker is written last. The tokenizer is trained on the train problems and
    traces plus the system prompt. Returns ``{"root", "data_dir", "train", "eval", "pretrain_corpus",
    "model", "tokenizer", "marker"}`` (the tokenizer lives in the model dir).
    """
    from ..data.synth import make_tiny_data

    out = Path(out_dir)
    params = {
        "n_problems": n_problems,
        "n_eval_per_source": n_eval_per_source,
        "n_pretrain": n_pretrain,
        "pretrain_chat_frac": pretrain_chat_frac,
        "pretrain_chat_trace_frac": pretrain_chat_trace_frac,
        "sft_preamble": sft_preamble,
        "seed": seed,
        "vocab_size": vocab_size,
        "pretrain": pretrain,
        "pretrain_steps": pretrain_steps,
        "model_kwargs": dict(model_kwargs or {}),
    }
    data_dir, model_dir = out / "data", out / "model"
    paths = {
        "root": out,
        "data_dir": data_dir,
        "train": data_dir / "tiny_math_train.parquet",
        "eval": data_dir / "tiny_math_eval.parquet",
        "pretrain_corpus": data_dir / "tiny_pretrain.jsonl",
        "model": model_dir,
        "tokenizer": model_dir,
        "marker": out / MARKER_FILE,
    }
    if not force and _manifest_ok(out, params):
        if progress:
            print(f"[tiny] assets complete in {out} (marker + hashes match); skipping")
        return paths

    t0 = time.perf_counter()
    (out / MARKER_FILE).unlink(missing_ok=True)
    for d in (data_dir, model_dir):
        if d.exists():
            shutil.rmtree(d)
    out.mkdir(parents=True, exist_ok=True)
    if progress:
        print(f"[tiny] building assets in {out} ...")
    made = make_tiny_data(
        data_dir, n_problems=n_problems, n_eval_per_source=n_eval_per_source, n_pretrain=n_pretrain, seed=seed,
        pretrain_chat_frac=pretrain_chat_frac, pretrain_chat_trace_frac=pretrain_chat_trace_frac,
        **({} if sft_preamble == "default" else {"sft_preamble": sft_preamble}),
    )
    import pyarrow.parquet as pq

    # Tokenizer corpus: train conversations rendered with the chat template (so role names and the turn
    # skeleton are learned) + the plain-text pretraining corpus.
    train_rows = pq.read_table(made["train"]).to_pylist()
    pretrain_texts = [json.loads(line)["text"] for line in made["pretrain"].read_text(encoding="utf-8").splitlines()]
    corpus = [render_chatml(r["prompt"] + r["target"]) for r in train_rows] + pretrain_texts
    tokenizer = build_tiny_tokenizer(None, corpus, vocab_size=vocab_size)
    if progress:
        print(f"[tiny] tokenizer: {len(tokenizer)} tokens")
    model = build_tiny_model(model_dir, tokenizer, seed=seed, **(model_kwargs or {}))
    if progress:
        print(f"[tiny] model: {count_parameters(model):,} parameters")
    del model
    if pretrain:
        pretrain_tiny(
            model_dir,
            pretrain_texts,
            steps=pretrain_steps,
            seed=seed,
            time_budget_s=pretrain_time_budget_s,
            # one thread: the same weights on every machine (thread count changes float reductions), and a
            # 128-wide model gains little from a second thread while a busy 2-core box makes two threads crawl
            num_threads=1,
            progress=progress,
        )
    # only what this function owns: other stages may write next to data/ and model/ in out_dir
    files = sorted(p for d in (data_dir, model_dir) for p in d.rglob("*") if p.is_file())
    marker = {
        "params": params,
        "sha256": {str(p.relative_to(out)): _sha256(p) for p in files},
        "build_s": round(time.perf_counter() - t0, 2),
    }
    (out / MARKER_FILE).write_text(json.dumps(marker, indent=1) + "\n")
    if progress:
        print(f"[tiny] assets built in {marker['build_s']}s -> {out}")
    return paths
