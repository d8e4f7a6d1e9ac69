"""The OpenR1-Math-46k-8192 row schema, per-row validation and the verl parquet layouts.

Input schema (HF hub ``Elliott/Openr1-Math-46k-8192``, and the synthetic tiny data that copies it)::

    data_source : str
    prompt      : [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": problem}]
    target      : [{"role": "assistant", "content": "<think>\\n...reasoning...\\n</think>\\n\\n... \\boxed{answer}"}]
    ability     : str ("math")
    reward_model: {"ground_truth": str, "style": "rule"}
    extra_info  : dict (e.g. {"index": int, "split": "default"})

Column policy (used by :mod:`eksft_pipeline.data.split`): ``data_source``, ``prompt``, ``target`` and
``reward_model`` are required; ``ability`` and ``extra_info`` are optional (defaults ``"math"`` / ``{}``);
any other column is an error unless the caller passes ``allow_extra_columns=True`` (then it is ignored and
listed in the split report). A typo'd column therefore never passes silently.

Row validation (:func:`validate_row`) never raises: it returns a reason string from :data:`DROP_REASONS`
so the split stage can count and write every dropped row.

Output layouts written by the split stage (read by verl 0.9.1):

* SFT parquet (``MultiTurnSFTDataset``, ``data.messages_key=messages``): ``id`` int64 (original row index),
  ``data_source`` str, ``messages`` list<struct<role: str, content: str>> = [system, user, assistant],
  ``ground_truth`` str.
* RL parquet (``RLHFDataset``, ``data.prompt_key=prompt``): ``data_source`` str, ``prompt``
  list<struct<role, content>> = [system, user], ``ability`` str, ``reward_model`` struct<ground_truth: str,
  style: str>, ``extra_info`` struct<index: int64 (original row index), split: str>.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from typing import Any

import pyarrow as pa

from eksft_pipeline.contract.run_format import THINK_PREFIX  # the generation prefix's one source

# The exact system prompt of OpenR1-Math-46k-8192 (identical to prompt[0] of every row of the shared
# luffy_valid_all.parquet eval file; tests/data/test_eval_sets.py checks that equality).
SYSTEM_PROMPT = (
    "Your task is to follow a systematic, thorough reasoning process before providing the final solution. "
    "This involves analyzing, summarizing, exploring, reassessing, and refining your thought process through "
    "multiple iterations. Structure your response into two sections: Thought and Solution. In the Thought "
    'section, present your reasoning using the format: "<think>\n {thoughts} </think>\n". Each thought should '
    'include detailed analysis, brainstorming, verification, and refinement of ideas. After "</think>\n," in '
    "the Solution section, provide the final, logical, and accurate answer, clearly derived from the "
    "exploration in the Thought section. If applicable, include the answer in \\boxed{} for closed-form "
    "results like multiple choices or mathematical solutions."
)

THINK_OPEN = "<think>"

REQUIRED_COLUMNS: tuple[str, ...] = ("data_source", "prompt", "target", "reward_model")
OPTIONAL_COLUMNS: tuple[str, ...] = ("ability", "extra_info")
KNOWN_COLUMNS: tuple[str, ...] = REQUIRED_COLUMNS + OPTIONAL_COLUMNS

# Every reason a row can be dropped for, in report order.
DROP_REASONS: tuple[str, ...] = (
    "invalid_json",  # a jsonl line that does not parse as a JSON object
    "missing_field",  # the row lacks a required column that other rows have
    "bad_data_source",  # data_source not a non-empty string
    "prompt_not_list",  # prompt is not a list of messages
    "prompt_bad_message",  # a prompt element is not {"role": str, "content": str} with a known role
    "prompt_no_user",  # the last prompt message is not a non-empty user message
    "target_not_list",  # target is not a list
    "target_bad_message",  # target is not exactly one {"role": "assistant", "content": str}
    "empty_trace",  # the assistant content is empty / whitespace
    "bad_reward_model",  # reward_model is not a dict
    "missing_answer",  # ground_truth missing, None or empty
    "bad_answer_type",  # ground_truth present but not a string
    "bad_ability",  # ability present but not a string
    "missing_think_prefix",  # think_prefix='prompt' but the trace does not start with "<think>\n"
    "duplicate_prompt",  # same normalised user prompt as an earlier valid row (first one kept)
    "over_length",  # chat-templated prompt+target tokens > cutoff_tokens
)

VALID_ROLES = frozenset({"system", "user", "assistant"})

MESSAGE_TYPE = pa.struct([("role", pa.string()), ("content", pa.string())])
MESSAGES_TYPE = pa.list_(MESSAGE_TYPE)

SFT_SCHEMA = pa.schema(
    [
        ("id", pa.int64()),
        ("data_source", pa.string()),
        ("messages", MESSAGES_TYPE),
        ("ground_truth", pa.string()),
    ]
)

RL_SCHEMA = pa.schema(
    [
        ("data_source", pa.string()),
        ("prompt", MESSAGES_TYPE),
        ("ability", pa.string()),
        ("reward_model", pa.struct([("ground_truth", pa.string()), ("style", pa.string())])),
        ("extra_info", pa.struct([("index", pa.int64()), ("split", pa.string())])),
    ]
)

# The input (OpenR1) layout, used to write the synthetic tiny data byte-deterministically.
OPENR1_SCHEMA = pa.schema(
    [
        ("data_source", pa.string()),
        ("prompt", MESSAGES_TYPE),
        ("target", MESSAGES_TYPE),
        ("ability", pa.string()),
        ("reward_model", pa.struct([("ground_truth", pa.string()), ("style", pa.string())])),
        ("extra_info", pa.struct([("index", pa.int64()), ("split", pa.string())])),
    ]
)


class DataError(ValueError):
    """Bad input to a data stage; the message is one line and names the offending path/column/value."""


class SplitOverlapError(DataError):
    """A row landed in both the SFT and the RL split (same original index or same normalised prompt)."""


def normalize_prompt_text(text: str) -> str:
    """Key used for de-duplication and the disjointness check: NFKC, lower-case, whitespace collapsed."""
    return re.sub(r"\s+", " ", unicodedata.normalize("NFKC", text)).strip().lower()


def prompt_id(text: str) -> str:
    """Stable id of a problem: first 16 hex digits of sha256 of the exact (un-normalised) text."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _as_list(value: Any) -> list | None:
    """Lists arrive as list (jsonl, pyarrow to_pylist) or numpy arrays (pandas); anything else is not a list."""
    if isinstance(value, list | tuple):
        return list(value)
    if type(value).__name__ == "ndarray":
        return list(value.tolist())
    return None


def _check_messages(value: Any) -> tuple[list[dict[str, str]] | None, str | None]:
    """Return (messages as plain dicts, None) or (None, 'not_list' | 'bad_message')."""
    items = _as_list(value)
    if items is None:
        return None, "not_list"
    out = []
    for m in items:
        if not isinstance(m, dict):
            return None, "bad_message"
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str) or role not in VALID_ROLES or not isinstance(content, str):
            return None, "bad_message"
        out.append({"role": role, "content": content})
    return out, None


def validate_row(row: dict[str, Any], *, think_prefix: str = "keep") -> tuple[dict[str, Any] | None, str | None]:
    """Check one input row; return ``(clean_row, None)`` or ``(None, reason)`` with reason in DROP_REASONS.

    ``clean_row`` has plain-python values: ``data_source`` str, ``prompt`` list of {role, content} dicts
    whose last element is the user problem, ``trace`` (assistant content, unchanged), ``ground_truth`` str,
    ``ability`` str. ``think_prefix='prompt'`` additionally requires the trace to start with ``"<think>\\n"``
    (it is moved into the generation prompt, which is impossible when it is absent).
    Length and duplicate checks need the whole dataset / a tokenizer and live in the split stage.
    """
    for col in REQUIRED_COLUMNS:
        if col not in row:
            return None, "missing_field"
    ds = row["data_source"]
    if not isinstance(ds, str) or not ds.strip():
        return None, "bad_data_source"
    prompt, err = _check_messages(row["prompt"])
    if err:
        return None, f"prompt_{err}"
    if not prompt or prompt[-1]["role"] != "user" or not prompt[-1]["content"].strip():
        return None, "prompt_no_user"
    target, err = _check_messages(row["target"])
    if err:
        return None, f"target_{err}"
    if len(target) != 1 or target[0]["role"] != "assistant":
        return None, "target_bad_message"
    trace = target[0]["content"]
    if not trace.strip():
        return None, "empty_trace"
    rm = row["reward_model"]
    if not isinstance(rm, dict):
        return None, "bad_reward_model"
    gt = rm.get("ground_truth")
    if gt is None or (isinstance(gt, str) and not gt.strip()):
        return None, "missing_answer"
    if not isinstance(gt, str):
        return None, "bad_answer_type"
    ability = row.get("ability", "math")
    if ability is None:
        ability = "math"
    if not isinstance(ability, str):
        return None, "bad_ability"
    if think_prefix == "prompt" and not trace.startswith(THINK_PREFIX):
        return None, "missing_think_prefix"
    return {
        "data_source": ds,
        "prompt": prompt,
        "trace": trace,
        "ground_truth": gt,
        "ability": ability,
    }, None


def user_text(prompt: list[dict[str, str]]) -> str:
    """The problem text: content of the last (user) message."""
    return prompt[-1]["content"]
