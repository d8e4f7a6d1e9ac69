"""The one text format of tool use in a run: tool docs in the system turn, calls as Qwen3 ``<tool_call>`` blocks.

Both the SFT data (:mod:`.acebench`, :mod:`.tiny`) and the BFCL eval prompts (:mod:`eksft_pipeline.eval.bfcl`)
go through these functions, so training and evaluation see the same text.

Where the tool docs go. verl 0.9.1's ``MultiTurnSFTDataset`` reads a ``tools`` column (a list of dicts per row)
and hands it to ``apply_chat_template(tools=...)`` for the first message only; the run's template (``chatml``,
:mod:`eksft_pipeline.data.chat_template`) has no ``tools`` branch, and a parquet column of heterogeneous JSON
schemas is stored by Arrow as one struct unifying every property name of every row (each tool would come back
with hundreds of ``null`` properties). So the docs are rendered *into the system message text* here, with
exactly the text Qwen3's chat template (and BFCL's ``QwenFCHandler._format_prompt``) puts into the system turn
when given ``tools``; under ``chatml`` the rendered conversation is then byte-identical to Qwen3's own rendering
with ``tools=`` (``tests/data/test_tool_use.py`` checks this against the Qwen3-8B template fixture). The
schemas themselves are kept in the SFT parquet as a JSON string column ``tools_json`` (for inspection and the
eval): its name is deliberately not ``tools``, the column verl would pass to the template.

Departure from BFCL's ``QwenFCHandler``: it writes each tool with ``json.dumps(tool)`` (non-ASCII escaped); this
module uses ``ensure_ascii=False`` as Qwen3's own template (``tojson``) does, which only differs for non-ASCII
docs (the Chinese ACEBench option).

Calls. An assistant turn that calls tools is, as Qwen3 renders ``tool_calls`` with empty content,
``<tool_call>\\n{"name": NAME, "arguments": ARGS_JSON}\\n</tool_call>`` blocks joined by ``"\\n"``. Parsing
(:func:`parse_tool_calls`) strips a thinking block first (``...</think>``), then uses BFCL's own pattern
(``QwenFCHandler._extract_tool_calls``) but, unlike it, does not silently drop a block that is not JSON: such
output is a *parse failure*, counted by the eval.
"""

from __future__ import annotations

import json
import re
from typing import Any

TOOLS_HEADER = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
TOOLS_FOOTER = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n'
    "</tool_call>"
)
# BFCL's pattern (bfcl_eval/model_handler/local_inference/qwen_fc.py, _extract_tool_calls)
_CALL_RE = re.compile(r"<tool_call>\n(.*?)\n</tool_call>", re.DOTALL)


class ToolFormatError(ValueError):
    """A tool schema or call that cannot be rendered; one line naming the thing."""


def _dumps(x: Any) -> str:
    return json.dumps(x, ensure_ascii=False)


def tools_system_prompt(tools: list[dict[str, Any]], system: str = "") -> str:
    """System-message content holding the tool docs (Qwen3's rendering of ``tools=`` with system ``system``)."""
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise ToolFormatError(f"tools must be a list of JSON-schema objects, got {type(tools).__name__}")
    head = f"{system}\n\n" if system else ""
    return head + TOOLS_HEADER + "".join("\n" + _dumps(t) for t in tools) + TOOLS_FOOTER


def render_tool_calls(calls: list[tuple[str, dict[str, Any]]]) -> str:
    """Assistant content for ``calls`` = [(name, arguments), ...] (Qwen3's ``tool_calls`` rendering)."""
    if not calls:
        raise ToolFormatError("render_tool_calls: no calls")
    out = []
    for name, args in calls:
        if not isinstance(name, str) or not name or not isinstance(args, dict):
            raise ToolFormatError(f"a tool call needs a name and an arguments object, got {name!r}: {args!r}"[:200])
        out.append('<tool_call>\n{"name": "' + name + '", "arguments": ' + _dumps(args) + "}\n</tool_call>")
    return "\n".join(out)


def strip_thinking(text: str) -> str:
    """The answer part of a completion: what follows the last ``</think>`` (QwenFCHandler's cleaning)."""
    if "</think>" in text:
        return text.split("</think>")[-1].lstrip("\n")
    return text


def parse_tool_calls(text: str) -> tuple[list[dict[str, dict]] | None, str]:
    """``(calls, status)`` of a completion, thinking stripped first.

    ``calls`` is BFCL's decoded AST layout ``[{name: {arg: value}}, ...]``; status is ``ok``, ``no_call`` (no
    ``<tool_call>`` block: ``calls == []``) or ``parse_failure`` (a block that is not ``{"name": str,
    "arguments": object}`` JSON, or an unclosed ``<tool_call>``: ``calls is None``).
    """
    body = strip_thinking(text)
    blocks = _CALL_RE.findall(body)
    if not blocks:
        return ([], "no_call") if "<tool_call>" not in body else (None, "parse_failure")
    calls = []
    for b in blocks:
        try:
            obj = json.loads(b)
        except json.JSONDecodeError:
            return None, "parse_failure"
        if not (isinstance(obj, dict) and isinstance(obj.get("name"), str) and isinstance(obj.get("arguments"), dict)):
            return None, "parse_failure"
        calls.append({obj["name"]: dict(obj["arguments"])})
    return calls, "ok"


TOOL_CALL_TOKENS = ("<tool_call>", "</tool_call>")  # Qwen3's added tokens 151657 / 151658 (special: false)


def _add_plain_tokens(tokenizer: Any, tokens: list[str]) -> None:
    """Add ``tokens`` as exact-match, non-special tokens (kept by ``decode(skip_special_tokens=True)``)."""
    from tokenizers import AddedToken

    tokenizer.add_tokens([AddedToken(t, rstrip=False, lstrip=False, single_word=False, normalized=False,
                                     special=False) for t in tokens])  # fmt: skip


def add_tool_call_tokens(tokenizer: Any, model_vocab_size: int) -> list[str]:
    """Give ``tokenizer`` Qwen3's ``<tool_call>`` / ``</tool_call>`` as added, non-special tokens (as Qwen3's own
    tokenizer carries them: one id each, kept by ``decode(skip_special_tokens=True)``) when it lacks them and
    the model's embedding has unused rows for them (``len(tokenizer) + 2 <= model_vocab_size``; the tiny model
    has 384 rows for 370 tokens). Returns the tokens added ([] for Qwen3, which has them, or without room:
    the tags are then spelled out in ordinary tokens, the same text). The new ids' rows are the model's
    untrained spare rows, learnt in SFT."""
    vocab = tokenizer.get_vocab()
    missing = [t for t in TOOL_CALL_TOKENS if t not in vocab]
    if not missing or len(tokenizer) + len(missing) > int(model_vocab_size):
        return []
    _add_plain_tokens(tokenizer, missing)
    return missing


# The CPU twin's tool-format tokens (task.data.format_tokens: true, the tiny recipe only). The tiny tokenizer
# is BPE-trained on arithmetic, so it spells JSON and the tool prose nearly a character a token: a twin row with
# its tool docs is ~690 tokens where Qwen3's tokenizer, with merges for this text, needs a fraction of that.
# These fixed strings of the format, each one added token, bring a twin row to ~160 tokens; the text is the same.
TWIN_FORMAT_TOKENS = (
    TOOLS_HEADER,
    TOOLS_FOOTER,
    '{"name": "',
    '", "arguments": ',
    '", "description": "',
    '", "parameters": {"type": "dict", "properties": {',
    '{"type": "integer"}',
    '{"type": "string"}',
    '}, "required": [',
)


def add_twin_format_tokens(tokenizer: Any, model_vocab_size: int) -> list[str]:
    """Give the CPU twin's ``tokenizer`` :data:`TWIN_FORMAT_TOKENS` as added, non-special tokens in the model's
    unused embedding rows (after :func:`add_tool_call_tokens`); returns the tokens added.

    Departure (twin only; Qwen3 runs never call this): the text is unchanged, only its tokenization is shorter,
    standing in for the BPE merges Qwen3's tokenizer has for JSON and its tool prose. The rows are the model's
    untrained spare rows, learnt in SFT. Raises :class:`ToolFormatError` when the model has too few spare rows.
    """
    vocab = tokenizer.get_vocab()
    missing = [t for t in TWIN_FORMAT_TOKENS if t not in vocab]
    if len(tokenizer) + len(missing) > int(model_vocab_size):
        raise ToolFormatError(f"task.data.format_tokens: {len(missing)} tokens do not fit the model's "
                              f"{model_vocab_size} embedding rows ({len(tokenizer)} in use); set it false")
    _add_plain_tokens(tokenizer, missing)
    return missing


__all__ = [
    "TOOLS_FOOTER",
    "TWIN_FORMAT_TOKENS",
    "add_twin_format_tokens",
    "TOOL_CALL_TOKENS",
    "add_tool_call_tokens",
    "TOOLS_HEADER",
    "ToolFormatError",
    "parse_tool_calls",
    "render_tool_calls",
    "strip_thinking",
    "tools_system_prompt",
]

# BFCL categories scored (the eval stage and the report read them here)
LIVE_AST = ("live_simple", "live_multiple", "live_parallel", "live_parallel_multiple")
IRRELEVANCE = ("irrelevance", "live_irrelevance")
