"""Answer extraction (parent side) and math-verify checking (worker side) for the math reward.

Two halves with different trust levels:

* Parent side, pure string work, no sympy, bounded cost: :func:`sanitize_text`, :func:`answer_region`,
  :func:`last_boxed`, :func:`normalize_answer`, :func:`brace_depth`. These run in the caller's process
  (the verl reward worker) for every completion, so they are linear scans with early exits.
* Worker side, :func:`check_answer`: parses the extracted prediction and the gold answer with
  math-verify 0.9.0 and compares them with ``math_verify.verify``. It runs only inside the verifier
  worker processes started by :mod:`eksft_pipeline.rl.reward` (this file is their entry point,
  ``python -P answer.py --serve RFD WFD``), because sympy can hang or eat memory on adversarial input and
  math-verify's own timeouts use ``signal.alarm``, which raises in any thread but the main one. Here the
  timeouts are disabled (``parse(..., parsing_timeout=None)``, ``verify(..., timeout_seconds=None)``) and
  the parent enforces a wall-clock limit by killing the worker.

Extraction semantics (``extraction="boxed"``, the default):

1. Answer region: with ``after_think=True`` the text after the LAST ``</think>``; if there is no
   ``</think>`` the whole text, unless ``require_think_close=True`` and a ``<think>`` was opened, in which
   case there is no answer (the trace was cut off inside its reasoning).
2. The LAST ``\\boxed{...}`` or ``\\fbox{...}`` in the region (by start position; whitespace between the
   command and ``{`` is allowed), brace-matched: ``\\{``/``\\}`` are escaped literals and do not count,
   ``\\\\`` is a line break (so ``\\\\{`` opens a group). An unclosed last box (a truncated completion) is
   no answer; an earlier complete box is NOT used in its place, since the model was overriding it.
3. Content longer than ``max_pred_chars`` or with brace depth above ``max_brace_depth`` is rejected before
   sympy sees it (a 500-deep ``{{{1}}}`` takes math-verify ~8 s; depth 10 already ~1 s).

``extraction="math_verify"`` instead hands the last ``max_tail_chars`` characters of the answer region to
math-verify's own LaTeX + plain-expression extraction (``LatexExtractionConfig``, ``ExprExtractionConfig``).

Gold answers are plain strings as stored in verl parquet (``204``, ``\\frac{1}{2}``, ``336^\\circ``,
``\\$36``, ``$69$,$84$``): a gold without an unescaped ``$`` or a ``\\boxed`` is wrapped as
``\\boxed{gold}`` so math-verify's LaTeX extractor parses exactly it (else it is parsed as written); if that
yields nothing the other of the two is tried, then the raw gold as a plain expression (``-1./3``). A gold
that still parses to nothing is "gold_unparseable". Departure from plain math-verify: an integer-valued
decimal gold (``142.0``, how AMC golds are stored) is read as the integer (``142``), because math-verify
matches a Float gold against ``\\text{142}`` by string and would score that answer wrong.
"""

from __future__ import annotations

import re
import sys
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
_UNESCAPED_DOLLAR = re.compile(r"(?<!\\)\$")


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


def _last_box_open(text: str) -> int:
    """Index of the ``{`` that opens the last ``\\boxed``/``\\fbox`` group in ``text``; -1 if none."""
    best = -1
    for cmd in _BOX_COMMANDS:
        end = len(text)
        while True:
            p = text.rfind(cmd, 0, end)
            if p < 0:
                break
            q = p + len(cmd)
            # Skip whitespace between the command and its group; reject e.g. "\boxedfoo" or "\boxed 5".
            while q < len(text) and text[q] in " \t\r\n":
                q += 1
            if q < len(text) and text[q] == "{":
                best = max(best, q)
                break
            end = p  # this occurrence has no group: look further left
    return best


def last_boxed(text: str, *, max_chars: int | None = None) -> tuple[str | None, str]:
    """Content of the last ``\\boxed{...}``/``\\fbox{...}`` of ``text``.

    Returns ``(content, status)``: ``(str, "ok")`` for a closed box (content may be ``""`` for
    ``\\boxed{}``, the caller decides), ``(None, "no_answer")`` when there is no box or the last one is
    unclosed, ``(None, "pred_too_long")`` as soon as the content exceeds ``max_chars`` (the scan stops
    there, so the cost is O(max_chars) past the box even for a 100k-character unclosed box).
    """
    open_idx = _last_box_open(text)
    if open_idx < 0:
        return None, NO_ANSWER
    start = open_idx + 1
    limit = len(text) if max_chars is None else min(len(text), start + max_chars + 1)
    depth = 1
    for m in _BRACE_TOKEN.finditer(text, start, limit):
        tok = m.group()
        if tok == "{":
            depth += 1
        elif tok == "}":
            depth -= 1
            if depth == 0:
                return text[start : m.start()], OK
    if limit < len(text):
        return None, PRED_TOO_LONG
    return None, NO_ANSWER


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


# --------------------------------------------------------------------------------------------------
# Worker side (imports math_verify lazily: the parent never needs sympy).
# --------------------------------------------------------------------------------------------------

_GOLD_CACHE: dict[tuple[str, ...], list] = {}
_GOLD_CACHE_MAX = 4096


def _mv():
    import math_verify  # noqa: PLC0415  (deferred: only worker processes pay for sympy)

    return math_verify


def _parse(text: str, targets) -> list:
    mv = _mv()
    return mv.parse(text, targets, fallback_mode="no_fallback", parsing_timeout=None)


_INT_VALUED_DECIMAL = re.compile(r"(-?[0-9]+)\.0+")


def parse_gold(golds: tuple[str, ...]) -> list:
    """Parsed math-verify targets of all gold strings (empty list: none parses). Cached per process."""
    hit = _GOLD_CACHE.get(golds)
    if hit is not None:
        return hit
    mv = _mv()
    parsed: list = []
    for g in golds:
        g = g.strip()
        if not g:
            continue
        # "142.0" (AMC golds are stored as floats) -> "142": math-verify compares a Float gold with a
        # \text{142} prediction (a Symbol) by string and says no; as an integer gold it says yes.
        m = _INT_VALUED_DECIMAL.fullmatch(g)
        if m:
            g = m.group(1)
        wrapped = "\\boxed{" + g + "}"
        # a gold with its own math delimiters ("$69$,$84$") or box is parsed as written; "\\$36" is not one
        first, second = (g, wrapped) if (_UNESCAPED_DOLLAR.search(g) or "\\boxed" in g) else (wrapped, g)
        res = _parse(first, [mv.LatexExtractionConfig()]) or _parse(second, [mv.LatexExtractionConfig()])
        if not res:
            res = _parse(g, [mv.ExprExtractionConfig()])
        parsed.extend(res)
    if len(_GOLD_CACHE) >= _GOLD_CACHE_MAX:
        _GOLD_CACHE.clear()
    _GOLD_CACHE[golds] = parsed
    return parsed


def check_answer(pred: str, golds: tuple[str, ...], mode: str = "boxed") -> tuple[str, bool, str]:
    """Compare one prediction with the gold answers; runs in a verifier worker.

    ``pred`` is the extracted box content (``mode="boxed"``) or the answer-region tail
    (``mode="math_verify"``). Returns ``(status, correct, pred_display)`` where status is "ok",
    "gold_unparseable" (checked first, so dataset problems surface even when the prediction is junk),
    "pred_unparseable" or "error"; ``pred_display`` is what math-verify matched in math_verify mode
    (else ``pred`` unchanged).
    """
    mv = _mv()
    try:
        gold = parse_gold(golds)
        if not gold:
            return GOLD_UNPARSEABLE, False, pred if mode == "boxed" else ""
        if mode == "boxed":
            target = _parse("\\boxed{" + pred + "}", [mv.LatexExtractionConfig()])
            if not target:
                target = _parse(pred, [mv.ExprExtractionConfig()])
            display = pred
        elif mode == "math_verify":
            # "first_match" fallback appends the matched string (our display); only parsed objects are compared
            found = mv.parse(
                pred,
                [mv.LatexExtractionConfig(), mv.ExprExtractionConfig()],
                fallback_mode="first_match",
                parsing_timeout=None,
            )
            target = [x for x in found if not isinstance(x, str)]
            display = next((x for x in found if isinstance(x, str)), "")
        else:
            return ERROR, False, f"unknown mode {mode!r}"
        if not target:
            return PRED_UNPARSEABLE, False, display
        ok = bool(mv.verify(gold, target, timeout_seconds=None))
        return OK, ok, display
    except (Exception, MemoryError, RecursionError) as e:  # sympy raises almost anything on odd input
        msg = f"{type(e).__name__}: {e}"
        return ERROR, False, msg[:200]


# CPU seconds one item may use in a worker before the kernel kills it (SIGXCPU). The parent's wall-clock
# kill normally acts long before; this bounds a worker orphaned mid-item (parent died) inside a C-level
# computation such as a huge integer power, which holds the GIL and so also starves the watchdog thread.
ITEM_CPU_CAP_S = 300


def _serve(rfd: int, wfd: int, memory_limit_mb: int) -> None:
    """Worker loop: recv ``(req_id, pred, golds, mode)``, send ``(req_id, (status, correct, display))``.

    Exits on EOF (parent gone), a ``None`` message or a broken pipe, quietly. Sends ``("ready", pid)`` once
    math-verify is imported and warm, so the parent's per-item wall clock never includes the sympy import.
    Ignores SIGINT (a Ctrl-C in the parent's terminal reaches the whole process group; the parent decides).
    A watchdog thread exits the worker when it is re-parented (its parent died without closing the pipe).
    """
    import logging
    import os
    import signal
    import threading
    from multiprocessing.connection import Connection

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = os.getppid()

    def watchdog() -> None:
        while True:
            threading.Event().wait(2.0)
            if os.getppid() != parent:
                os._exit(0)

    threading.Thread(target=watchdog, daemon=True).start()
    try:
        import resource
    except ImportError:  # not POSIX: only the parent's wall-clock kill bounds an item
        resource = None
    if resource is not None and memory_limit_mb > 0:
        try:
            lim = memory_limit_mb * 1024 * 1024
            resource.setrlimit(resource.RLIMIT_AS, (lim, lim))
        except (ValueError, OSError):
            pass  # best effort: the wall-clock kill still bounds a runaway item
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # silences "Timeout is disabled" etc.
    conn_in = Connection(rfd, writable=False)
    conn_out = Connection(wfd, readable=False)
    try:
        check_answer("1", ("1",))  # warm-up: imports sympy/latex2sympy and fills their caches
        conn_out.send(("ready", os.getpid()))
        while True:
            msg = conn_in.recv()
            if msg is None:
                return
            req_id, pred, golds, mode = msg
            if resource is not None:
                try:
                    ru = resource.getrusage(resource.RUSAGE_SELF)
                    soft = int(ru.ru_utime + ru.ru_stime) + ITEM_CPU_CAP_S
                    hard = resource.getrlimit(resource.RLIMIT_CPU)[1]
                    if hard != resource.RLIM_INFINITY:
                        soft = min(soft, hard)
                    resource.setrlimit(resource.RLIMIT_CPU, (soft, hard))
                except (ValueError, OSError):
                    pass
            conn_out.send((req_id, check_answer(pred, golds, mode)))
    except (EOFError, OSError):  # parent closed the pipes (shutdown, killed, exited)
        return


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--serve":
        _serve(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
    else:
        sys.exit("usage: python -P answer.py --serve RFD WFD MEMORY_LIMIT_MB (started by eksft_pipeline.rl.reward)")
