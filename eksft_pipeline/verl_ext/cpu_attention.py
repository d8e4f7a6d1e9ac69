"""A CPU attention kernel behind verl's Ulysses sequence parallelism, so SP runs (and is tested) on CPU.

verl 0.9.1's Ulysses SP lives in its flash-attention patch (verl/models/transformers/monkey_patch.py:
`_ulysses_flash_attention_forward`): all-to-all from sequence shards to head shards, the varlen kernel
(`_flash_attention_forward`, sequence boundaries from the gathered `position_ids`), all-to-all back. Only the
kernel needs CUDA. This module registers an attention implementation named `eksft_cpu_varlen`
(`model.override_config.attn_implementation=eksft_cpu_varlen`): transformers routes it through its own
flash-attention integration, verl's Ulysses wrapper does the all-to-alls exactly as on a GPU, and the kernel
call lands here: causal attention inside each packed sequence (a new sequence where `position_ids` is 0),
computed with `scaled_dot_product_attention` and a block-diagonal mask. Every other attention implementation
passes through untouched (the dispatch looks at the `attn_implementation` transformers hands the kernel).
"""

from __future__ import annotations

import torch

NAME = "eksft_cpu_varlen"


def varlen_attention(
    query_states: torch.Tensor,
    key_states: torch.Tensor,
    value_states: torch.Tensor,
    attention_mask: torch.Tensor | None,
    query_length: int,
    is_causal: bool = True,
    dropout: float = 0.0,
    position_ids: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    **_,
) -> torch.Tensor:
    """Causal attention per packed sequence. q [B, S, Hq, D], k/v [B, S, Hk, D] (flash layout) -> [B, S, Hq, D].

    Sequences inside a row start where `position_ids` is 0 (verl packs them so; its SP padding starts at 0 too);
    a 2-D `attention_mask` [B, S] (padded inputs) masks keys. No dropout (training on CPU runs without it).
    """
    b, s = query_states.shape[:2]
    allowed = torch.ones(s, s, dtype=torch.bool, device=query_states.device)
    if is_causal:
        allowed = torch.tril(allowed)
    allowed = allowed.expand(b, s, s)
    if position_ids is not None:
        pos = position_ids.reshape(-1, position_ids.shape[-1])[:b]
        seg = torch.cumsum((pos == 0).long(), dim=-1)
        allowed = allowed & (seg[:, :, None] == seg[:, None, :])
    if attention_mask is not None and attention_mask.dim() == 2:
        allowed = allowed & attention_mask.bool()[:, None, :]
    allowed = allowed | torch.eye(s, dtype=torch.bool, device=allowed.device)  # no query without a key
    q, k, v = (t.transpose(1, 2) for t in (query_states, key_states, value_states))
    out = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=allowed[:, None], scale=softmax_scale, enable_gqa=q.shape[1] != k.shape[1]
    )
    return out.transpose(1, 2).contiguous()


def _dispatching(orig):
    def kernel(query_states, key_states, value_states, attention_mask, query_length, *args, **kwargs):
        if kwargs.get("attn_implementation") == NAME:
            return varlen_attention(query_states, key_states, value_states, attention_mask, query_length, *args, **kwargs)
        return orig(query_states, key_states, value_states, attention_mask, query_length, *args, **kwargs)

    kernel._eksft_dispatch = True
    return kernel


def register() -> None:
    """Make `attn_implementation=eksft_cpu_varlen` loadable and route its kernel calls here (idempotent).

    Called by the SFT worker before it builds a model, in every process (torchrun rank or Ray worker)."""
    from transformers import AttentionInterface
    from transformers.integrations import flash_attention
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask
    from verl.models.transformers import monkey_patch

    AttentionInterface.register(NAME, flash_attention.flash_attention_forward)
    AttentionMaskInterface.register(NAME, flash_attention_mask)
    # verl's Ulysses wrapper calls monkey_patch._flash_attention_forward; without verl's patch (no remove-padding,
    # no SP) transformers calls its integration's own name
    for module in (monkey_patch, flash_attention):
        if not getattr(module._flash_attention_forward, "_eksft_dispatch", False):
            module._flash_attention_forward = _dispatching(module._flash_attention_forward)


__all__ = ["NAME", "register", "varlen_attention"]
