"""Answer extraction from completions (caller side: pure string work, no sympy, bounded cost).

These run in the caller's process (the verl reward worker, the eval stage) for every completion, so they are
linear scans with early exits: :func:`sanitize_text`, :func:`answer_region`, :func:`last_boxed`,
:func:`final_boxes`, :func:`normalize_answer`, :func:`brace_depth`. The checking half (math-verify, sympy)
runs in worker processes: :mod:`eksft_pipeline.scoring.verify`. The status strings shared by both live here.

Extraction semantics (``extraction="boxed"``, the default):

1. Answer region: with ``after_think=True`` the text after the LAST ``</think>``; if there is no
   ``</think>`` the whole text, unless ``require_think_close=True`` and a ``<think>`` was opened, in which
   case there is no answer (the trace was cut off inside its reasoning).
2. The LAST ``\\boxed{...}`` or ``\\fbox{...}`` in the region (by start position; whitespace between the
   command and ``{`` is allowed), brace-matched: ``\\{``/``\\}`` are escaped literals and do not count,
   ``\\\\`` is a line break (so ``\\\\{`` opens a group). An unclosed last box (a truncated completion) is
   no answer; an earlier complete box is NOT used in its place, since the model was overriding it.
3. Several boxes of one final answer (:func:`final_boxes`): earlier boxes joined to the last one only by
   connectors (``$x = \\boxed{a}$ or $x = \\boxed{b}$``, ``\\boxed{a}, \\boxed{b}``,
   ``\\boxed{a} \\quad \\text{and} \\quad \\boxed{b}``: whitespace, ``$``, ``\\(\\)\\[\\]``, ``,;.``, spaces,
   ``and``/``or``, ``x =``, ``x_1 =``) belong to the same answer, which is the list of their contents. A
   box separated by any other text is an earlier, overridden answer.
4. Content longer than ``max_pred_chars`` or with brace depth above ``max_brace_depth`` is rejected before
   sympy sees it (a 500-deep ``{{{1}}}`` takes math-verify ~8 s; depth 10 already ~1 s).
"""

from __future__ import annotations

import re
from typing import Any

# Status strings shared with reward.py (the worker returns them over the pipe).
OK = "ok"
NO_ANSWER = "no_answer"
PRED_TOO_LONG = "pred_too_long"
PRED_TOO_DEEP = "pred_too_deep"
PRED_UNPARSEABLE = "pred_unparseable"
GOLD_UNPARSEABLE = "gold_unparseable"
TIMEOUT = "timeout"
ERROR = "error"

_BOX_COMMANDS = ("\\boxed", "\\fbox")
# Tokens that matter for brace matching: an escape pair (\x, incl. \{ \} \\) or a bare brace.
_BRACE_TOKEN = re.compile(r"\\.|[{}]", re.DOTALL)
_WS = re.compile(r"\s+")


def sanitize_text(text: Any) -> str:
    """Return ``text`` as a str that is safe to encode as UTF-8.

    ``bytes`` are decoded as UTF-8 with invalid sequences replaced by U+FFFD; lone surrogates in a str
    (which cannot be encoded and break pickling to a worker or sympy's printers) become U+FFFD too.
    Anything else is ``str()``-ed. Cost O(len) only when the fast encode check fails.
    """
    if isinstance(text, bytes | bytearray):
        return bytes(text).decode("utf-8", errors="replace")
    if not isinstance(text, str):
        text = str(text)
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        # via UTF-16 each lone surrogate becomes exactly one U+FFFD (a valid pair is joined)
        return text.encode("utf-16-le", errors="surrogatepass").decode("utf-16-le", errors="replace")


def answer_region(text: str, *, after_think: bool = True, require_think_close: bool = False) -> str | None:
    """The part of a completion that may hold the final answer, or None if there is none (see module doc)."""
    if not after_think:
        return text
    close = text.rfind("</think>")
    if close >= 0:
        return text[close + len("</think>") :]
    if require_think_close and "<think>" in text:
        return None
    return text


def _last_box_open(text: str, end: int | None = None) -> tuple[int, int]:
    """``(command start, index of its '{')`` of the last ``\\boxed``/``\\fbox`` group starting before
    ``end`` (default: the whole text); ``(-1, -1)`` if none."""
    best = (-1, -1)
    limit = len(text) if end is None else end
    for cmd in _BOX_COMMANDS:
        stop = limit
        while True:
            p = text.rfind(cmd, 0, stop)
            if p < 0:
                break
            q = p + len(cmd)
            # Skip whitespace between the command and its group; reject e.g. "\boxedfoo" or "\boxed 5".
            while q < len(text) and text[q] in " \t\r\n":
                q += 1
            if q < len(text) and text[q] == "{":
                if q > best[1]:
                    best = (p, q)
                break
            stop = p  # this occurrence has no group: look further left
    return best


def _group_close(text: str, open_idx: int, limit: int) -> int:
    """Index of the ``}`` closing the group opened at ``open_idx`` (scanning before ``limit``); -1 if none."""
    depth = 1
    for m in _BRACE_TOKEN.finditer(text, open_idx + 1, limit):
        tok = m.group()
        if tok == "{":
            depth += 1
        elif tok == "}":
            depth -= 1
            if depth == 0:
                return m.start()
    return -1


def last_boxed(text: str, *, max_chars: int | None = None) -> tuple[str | None, str]:
    """Content of the last ``\\boxed{...}``/``\\fbox{...}`` of ``text``.

    Returns ``(content, status)``: ``(str, "ok")`` for a closed box (content may be ``""`` for
    ``\\boxed{}``, the caller decides), ``(None, "no_answer")`` when there is no box or the last one is
    unclosed, ``(None, "pred_too_long")`` as soon as the content exceeds ``max_chars`` (the scan stops
    there, so the cost is O(max_chars) past the box even for a 100k-character unclosed box).
    """
    _, open_idx = _last_box_open(text)
    if open_idx < 0:
        return None, NO_ANSWER
    start = open_idx + 1
    limit = len(text) if max_chars is None else min(len(text), start + max_chars + 1)
    close = _group_close(text, open_idx, limit)
    if close >= 0:
        return text[start:close], OK
    if limit < len(text):
        return None, PRED_TOO_LONG
    return None, NO_ANSWER


# What may stand between two boxes of one answer: space, math delimiters, punctuation, LaTeX spaces,
# "and"/"or" (bare or in \text{}), and a variable being assigned ("x =", "x_1 =", "x_{2} =").
_GAP = re.compile(
    r"(?:\s+|\$|\\[()\[\]]|[,;.]|\\q?quad(?![a-zA-Z])|\\[,;:! ]|~|(?<![a-zA-Z])(?:and|or)(?![a-zA-Z])"
    r"|\\(?:text|mbox|mathrm|textrm)\s*\{\s*(?:and|or|,)?\s*\}|[a-zA-Z](?:_\{?\w{1,3}\}?)?\s*=)*"
)
_MAX_GAP = 80
MAX_FINAL_BOXES = 8


def final_boxes(text: str, *, max_chars: int | None = None) -> tuple[list[str] | None, str]:
    """Contents of the boxes of the final answer: the last box and the boxes joined to it by connectors
    only (see the module docstring), in text order. Statuses as :func:`last_boxed`."""
    last, status = last_boxed(text, max_chars=max_chars)
    if last is None:
        return None, status
    out = [last]
    cmd_start, _ = _last_box_open(text)
    while len(out) < MAX_FINAL_BOXES:
        prev_cmd, prev_open = _last_box_open(text, cmd_start)
        if prev_open < 0:
            break
        if max_chars is not None and cmd_start - prev_open > max_chars + _MAX_GAP + 2:
            break  # its content or the gap is too long: not part of this answer (and the scan stays bounded)
        close = _group_close(text, prev_open, cmd_start)
        if close < 0 or cmd_start - close - 1 > _MAX_GAP or not _GAP.fullmatch(text, close + 1, cmd_start):
            break
        out.append(text[prev_open + 1 : close])
        cmd_start = prev_cmd
    out.reverse()
    return out, OK


def brace_depth(s: str) -> int:
    """Maximum nesting depth of unescaped ``{}`` groups in ``s`` (unbalanced closers are ignored)."""
    depth = best = 0
    for m in _BRACE_TOKEN.finditer(s):
        tok = m.group()
        if tok == "{":
            depth += 1
            best = max(best, depth)
        elif tok == "}":
            depth = max(0, depth - 1)
    return best


def normalize_answer(s: str) -> str:
    """Cache/vote key of an extracted answer: stripped, whitespace runs collapsed to one space.

    Deliberately conservative (LaTeX treats a run of whitespace like one space in math mode), so two
    answers with the same key always get the same math-verify verdict.
    """
    return _WS.sub(" ", s).strip()


