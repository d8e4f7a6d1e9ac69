"""The tiny model's tokenizer: a byte-level BPE trained locally on the project's own synthetic math text.

:func:`build_tiny_tokenizer` trains a byte-level BPE (``tokenizers``). Pre-tokenisation is a GPT/Qwen-style regex
split in which every digit is its own pre-token (so numbers are always split into single digits, which helps
arithmetic), then byte-level mapping. Special tokens get fixed ids: ``<|endoftext|>``=0 (pad), ``<|im_start|>``=1,
``<|im_end|>``=2 (EOS), ``<think>``=3, ``</think>``=4. ``<think>``/``</think>`` are *non-special* added tokens (as in
Qwen3): always one token, but kept by ``decode(skip_special_tokens=True)`` so reward/format checks see them.
Chat template (:data:`CHAT_TEMPLATE`, Python twin :func:`render_chatml`): Qwen ChatML without a default system
prompt::

    <|im_start|>{role}\\n{content}<|im_end|>\\n          (per message)
    <|im_start|>assistant\\n                          (add_generation_prompt=True)

plus an optional template variable ``generation_prefix`` (pass it via ``apply_chat_template(...,
generation_prefix="<think>\\n")`` or verl's ``apply_chat_template_kwargs``): it is rendered right after
``<|im_start|>assistant\\n`` both in the generation prompt and before every assistant message, which is what the
split stage's ``think_prefix=prompt`` mode needs (the prefix is then part of verl's masked generation prompt in
SFT, and of the RL/eval prompt). No default system prompt means verl's ``MultiTurnSFTDataset`` sees an empty
"system prompt" prefix and renders each turn independently (per-turn concatenation == whole-conversation
rendering, its sanity check).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path

from eksft_pipeline.chatml import CHATML

SPECIAL_TOKENS: tuple[str, ...] = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")
NON_SPECIAL_ADDED = frozenset({"<think>", "</think>"})
PAD_TOKEN, EOS_TOKEN = "<|endoftext|>", "<|im_end|>"

# GPT-2/Qwen2-style split, except that \p{N} matches ONE digit (Qwen2 does this too), so digits never merge.
PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# the run's ChatML template (eksft_pipeline/chatml.py, explained in data/chat_template.py): the tiny tokenizer
# ships the same text
CHAT_TEMPLATE = CHATML


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
