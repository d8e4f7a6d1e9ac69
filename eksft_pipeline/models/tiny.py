"""The CPU default model: a ~1M-parameter Qwen3 built locally (no download).

* :func:`build_tiny_model` builds a randomly initialised ``Qwen3ForCausalLM`` (tied embeddings, fp32, sdpa)
  and saves it with the tokenizer (:mod:`eksft_pipeline.models.tokenizer`) and a ``generation_config.json``
  (eos = ``<|im_end|>``).
* Pre-training: :mod:`eksft_pipeline.models.pretrain`; the whole asset build (data + tokenizer + model +
  pretraining, idempotent): :func:`eksft_pipeline.data.tiny_assets.make_tiny_assets`.
"""

from __future__ import annotations

import math
from pathlib import Path

from eksft_pipeline.models.tokenizer import PAD_TOKEN, save_tokenizer


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
