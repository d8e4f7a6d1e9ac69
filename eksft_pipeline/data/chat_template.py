"""The one chat template of a run -- SFT data, RL prompts, eval prompts, the exported tokenizer -- and its EOS.

Why one explicit template. The paper trains the released Qwen3-4B / Qwen3-8B with LLaMA-Factory's
``qwen3_nothink`` template: plain ChatML whose assistant turns end with ``<|im_end|>``. The template Qwen3-8B
ships in its ``tokenizer_config.json`` is different: it moves ``<think>...</think>`` out of an assistant turn
that has no user turn after the last query, i.e. it drops the reasoning of a turn rendered on its own. verl
0.9.1's ``MultiTurnSFTDataset`` renders every message on its own and then asserts that the concatenation equals
the whole conversation's rendering: with Qwen3's template that assertion fails on the first SFT row, and
``ignore_input_ids_mismatch=true`` would silently train on answers whose reasoning was cut out
(``tests/data/test_chat_template.py`` shows both). So the run names its template (``model.chat_template``) and
every stage uses exactly that text: the split measures lengths and checks the EOS with it, the SFT stage hands
it to verl as ``model.custom_chat_template`` (verl sets it on the tokenizer that builds the SFT dataset and
that verl saves next to every checkpoint, hence on the exported model), the RL stage as
``actor_rollout_ref.model.custom_chat_template`` (verl's RL dataset and agent loop render prompts with it), and
the eval stage renders prompts with it too (``SamplingParams.chat_template``, whatever the evaluated model
saved). The handoff checks that RL renders prompts exactly as SFT did, and reports whether the init model's
saved template is the run's; with ``model.chat_template: null`` every stage uses the model's own template and
a mismatch between the SFT tokenizer and the init model is refused there.

Templates (``contract/run_format.py`` ``TEMPLATES``; ``model.chat_template`` may also be a ``.jinja`` path or literal Jinja text):

* ``chatml`` -- per message ``<|im_start|>{role}\\n{content}<|im_end|>\\n``; generation prompt
  ``<|im_start|>assistant\\n``; no default system prompt; content is rendered verbatim (``<think>`` kept).
  The template variable ``generation_prefix`` (the split's ``think_prefix=prompt`` mode) is rendered right after
  ``<|im_start|>assistant\\n`` in the generation prompt and before every assistant message, so it is part of
  the prompt in SFT (outside the loss), RL and eval alike. This is LLaMA-Factory's ``qwen3_nothink`` rendering
  of a conversation (its ``format_assistant`` is ``{content}<|im_end|>\\n``), and the same text as the tiny
  model's own template (``eksft_pipeline.models.tokenizer.CHAT_TEMPLATE``, checked by a test).

EOS. Whatever token follows the assistant content in the SFT rendering is what SFT teaches the model to emit
last; RL (vLLM / the hf_cpu rollout) and eval stop on the tokenizer's ``eos_token_id`` and the model's
``generation_config.json`` ``eos_token_id``. :func:`check_eos` requires the former to be among the latter --
before SFT (split stage), not after hours of it. Qwen3-8B: ``<|im_end|>`` (151645) on both sides. Qwen3-8B-Base
ships ``<|endoftext|>`` (151643) as its EOS: its recipe sets ``model.eos_token: "<|im_end|>"``, and the split
writes the run's tokenizer (template + EOS) to ``<run_dir>/split/tokenizer``, which the SFT stage hands to verl
as ``model.tokenizer_path`` (so the exported model's tokenizer and config carry ``<|im_end|>`` as EOS).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from eksft_pipeline.chatml import CHATML  # the text lives below data/ and models/ (both use it)

# the template's names and their resolution: contract/run_format.py (the run's format is resolved in one place)
from eksft_pipeline.contract.run_format import ChatTemplateError

# A conversation with reasoning, used to find the token that ends an assistant turn.
_PROBE_CONTENT = "<think>\nprobe reasoning 1 + 1 = 2\n</think>\n\nThe answer is \\boxed{2}."
_PROBE = [{"role": "user", "content": "What is 1 + 1?"}, {"role": "assistant", "content": _PROBE_CONTENT}]


def apply_template(tokenizer: Any, template: str | None, eos_token: str | None = None) -> Any:
    """Set the run's template (and EOS override) on ``tokenizer`` in place; returns it.

    ``eos_token`` must be a single token of the vocabulary (e.g. ``<|im_end|>``).
    """
    if template is not None:
        tokenizer.chat_template = template
    if eos_token not in (None, ""):
        ids = tokenizer.convert_tokens_to_ids([str(eos_token)])
        unk = getattr(tokenizer, "unk_token_id", None)
        if not ids or ids[0] is None or (unk is not None and ids[0] == unk):
            raise ChatTemplateError(f"model.eos_token={eos_token!r} is not a token of the tokenizer's vocabulary")
        tokenizer.eos_token = str(eos_token)
    if not getattr(tokenizer, "chat_template", None):
        raise ChatTemplateError(
            "the tokenizer has no chat template: set model.chat_template (e.g. chatml) in the model recipe"
        )
    return tokenizer


def end_of_turn_id(tokenizer: Any, *, generation_prefix: str = "", chat_template_kwargs: dict | None = None) -> int:
    """The token that follows the assistant content in the rendering: what SFT teaches the model to emit last."""
    kw = dict(chat_template_kwargs or {})
    if generation_prefix:
        kw["generation_prefix"] = generation_prefix
    text = tokenizer.apply_chat_template(_PROBE, tokenize=False, add_generation_prompt=False, **kw)
    pos = text.rfind(_PROBE_CONTENT)
    if pos < 0:
        raise ChatTemplateError(
            "the chat template does not render an assistant turn verbatim (it rewrites the reasoning, as Qwen3's "
            "own template does); set model.chat_template to a template that keeps it, e.g. chatml"
        )
    ids = tokenizer(text[pos + len(_PROBE_CONTENT) :], add_special_tokens=False)["input_ids"]
    if not ids:
        raise ChatTemplateError("the chat template puts nothing after an assistant turn: no end-of-turn token")
    return int(ids[0])


def generation_eos_ids(model_ref: str | Path | None) -> list[int]:
    """``eos_token_id`` of the model's ``generation_config.json`` (local dir, HF cache or hub); [] if it has none."""
    if model_ref in (None, ""):
        return []
    f = Path(str(model_ref)).expanduser() / "generation_config.json"
    if f.is_file():
        e = json.loads(f.read_text()).get("eos_token_id")
    else:
        from transformers import GenerationConfig

        try:
            e = GenerationConfig.from_pretrained(str(model_ref)).eos_token_id
        except OSError:
            return []
    if e is None:
        return []
    return [int(x) for x in (e if isinstance(e, list) else [e])]


def stop_token_ids(tokenizer: Any, model_ref: str | Path | None) -> list[int]:
    """What RL and eval stop generating on: the tokenizer's EOS and the generation config's EOS ids."""
    ids = set(generation_eos_ids(model_ref))
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return sorted(ids)


def check_eos(
    tokenizer: Any, model_dir: str | Path | None, *, generation_prefix: str = "", template_label: str = ""
) -> dict[str, Any]:
    """Raise :class:`ChatTemplateError` unless the token ending SFT targets is a stop token of RL and eval."""
    end = end_of_turn_id(tokenizer, generation_prefix=generation_prefix)
    stops = stop_token_ids(tokenizer, model_dir)
    end_tok = tokenizer.convert_ids_to_tokens(end)
    if end not in stops:
        raise ChatTemplateError(
            f"EOS mismatch: with chat template {template_label or '?'!r} every SFT target ends with token {end} "
            f"({end_tok!r}), but RL and eval stop on {stops} ({tokenizer.convert_ids_to_tokens(stops)}: the "
            f"tokenizer's eos_token and generation_config.json of {model_dir}). The model would learn to end its "
            f"answers with a token the rollout never stops on. Set model.eos_token: {end_tok!r} in the model recipe "
            "(the run's tokenizer then declares it as EOS), or use a chat template whose turns end with the "
            "model's EOS."
        )
    return {"ok": True, "end_of_turn_id": end, "end_of_turn": end_tok, "stop_token_ids": stops,
            "stop_tokens": tokenizer.convert_ids_to_tokens(stops)}  # fmt: skip


def save_run_tokenizer(tokenizer: Any, out_dir: str | Path) -> Path:
    """Write the run's tokenizer (template and EOS applied) to ``out_dir``; loadable with AutoTokenizer."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(out))
    return out


__all__ = [
    "CHATML",
    "ChatTemplateError",
    "apply_template",
    "check_eos",
    "end_of_turn_id",
    "generation_eos_ids",
    "save_run_tokenizer",
    "stop_token_ids",
]
