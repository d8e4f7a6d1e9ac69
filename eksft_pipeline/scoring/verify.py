"""math-verify checking, run inside the verifier worker processes (this file is their entry point).

``python -P verify.py --serve RFD WFD MEMORY_LIMIT_MB`` is started by :mod:`eksft_pipeline.scoring.reward`; sympy
can hang or eat memory on adversarial input and math-verify's own timeouts use ``signal.alarm`` (which raises
in any thread but the main one), so here its timeouts are disabled (``parsing_timeout=None``,
``timeout_seconds=None``) and the parent enforces a wall-clock limit by killing the worker.

Three modes (:func:`check_answer`):

``"boxed"`` (the project's verifier)
    ``pred`` is the extracted, normalised final answer (:mod:`eksft_pipeline.scoring.normalize`); golds are
    normalised the same way. Both are parsed as ``\\boxed{...}`` LaTeX (then as a plain expression), and
    compared with ``math_verify.verify(..., allow_set_relation_comp=True)`` so that ``x \\le 3`` equals
    ``(-\\infty, 3]`` and ``1 \\le x < 5`` equals ``[1, 5)``. Departures from math-verify, from the policy
    (``opts = (min_significant_digits, angles)``, see :mod:`eksft_pipeline.scoring.policy`): a decimal or
    scientific literal against a numeric gold is decided by :func:`decimal_verdict` (exact for integer and
    terminating golds, else >= ``min_significant_digits`` significant digits and within one unit of the
    last written digit), not by math-verify's rounding to 6 decimal places; ``angles="convert"`` also tries
    degrees <-> radians.
``"math_verify"``
    ``pred`` is the answer-region tail; math-verify's own LaTeX + expression extraction finds the answer.
``"plain"`` (the reference "plain math-verify", for the audit and the benchmark)
    Exactly verl 0.9.1's ``verl.utils.reward_score.math_verify`` with math-verify 0.9.0 defaults: the gold
    is parsed from ``\\boxed{gold}`` with ``LatexExtractionConfig()``, the whole completion with
    ``[ExprExtractionConfig(), LatexExtractionConfig()]``; right if any parsed gold verifies against any
    parsed prediction. No normalisation, no policy.

Gold answers are plain strings as stored in verl parquet (``204``, ``\\frac{1}{2}``, ``336^\\circ``,
``\\$36``, ``$69$,$84$``): a gold without an unescaped ``$`` or a ``\\boxed`` is wrapped as
``\\boxed{gold}`` (else parsed as written); if that yields nothing the other of the two is tried, then the
raw gold as a plain expression (``-1./3``). A gold that still parses to nothing is "gold_unparseable". An
integer-valued decimal gold (``142.0``, how AMC golds are stored) is read as the integer, because
math-verify matches a Float gold against ``\\text{142}`` by string and would score that answer wrong.
"""

from __future__ import annotations

import os
import re
import sys

if __name__ == "__main__":  # started as a worker script with -P: make this file's package importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from eksft_pipeline.scoring.answer import ERROR, GOLD_UNPARSEABLE, NO_ANSWER, OK, PRED_UNPARSEABLE  # noqa: E402

DEFAULT_OPTS = (6, "as_written")
MODES = ("boxed", "math_verify", "plain")

_GOLD_CACHE: dict[tuple[str, ...], list] = {}
_GOLD_CACHE_MAX = 4096


def _mv():
    import math_verify  # noqa: PLC0415  (deferred: only worker processes pay for sympy)

    return math_verify


def _parse(text: str, targets) -> list:
    return _mv().parse(text, targets, fallback_mode="no_fallback", parsing_timeout=None)


_INT_VALUED_DECIMAL = re.compile(r"(-?[0-9]+)\.0+")
_UNESCAPED_DOLLAR = re.compile(r"(?<!\\)\$")


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


# ------------------------------------------------------------------------------------- rounded decimals

# a decimal or scientific literal: 0.001736, -1.5, .25, 1.7361\times10^{-3}, 1.7361 \cdot 10^{-3}, 4.5e33
_NUM_LIT = re.compile(
    r"(?P<m>[+-]?(?:\d+\.\d*|\.\d+|\d+))"
    r"(?:\s*(?:\\times|\\cdot|\*)\s*10\s*\^\s*(?:\{\s*(?P<e>[+-]?\d+)\s*\}|(?P<e1>[+-]?\d))|[eE](?P<e2>[+-]?\d+))?"
)


def decimal_literal(s: str):
    """``(value as sympy Rational, decimals written, significant digits)`` of a decimal/scientific literal
    with a decimal point or an exponent (``0.001736`` -> (217/125000, 6, 4)); None for anything else."""
    m = _NUM_LIT.fullmatch(s.strip())
    if m is None:
        return None
    mant = m.group("m")
    exp = m.group("e") or m.group("e1") or m.group("e2")
    if "." not in mant and exp is None:
        return None  # an integer literal: math-verify / the integer fast path decide
    import sympy  # noqa: PLC0415

    e = int(exp) if exp is not None else 0
    if abs(e) > 400 or len(mant) > 200:
        return None
    frac = mant.split(".")[1] if "." in mant else ""
    digits = mant.lstrip("+-").replace(".", "").lstrip("0")
    value = sympy.Rational(mant.lstrip("+")) * sympy.Integer(10) ** e
    return value, len(frac) - e, max(len(digits), 1)


def _terminating(q) -> bool:
    q = int(q)
    for p in (2, 5):
        while q % p == 0:
            q //= p
    return q == 1


def decimal_verdict(value, decimals: int, sig: int, gold, min_sig: int) -> bool | None:
    """Policy verdict for a decimal prediction against a numeric gold (None: gold is not a real number).

    Integer and terminating golds (``\\frac{1}{8}``, ``0.15``, ``204``) need the exact value. Other golds
    (``\\frac{1}{3}``, ``\\sqrt{2}``, ``\\pi``) accept a prediction with >= ``min_sig`` significant digits
    within one unit of its last written digit (``|p - g| <= 10^-decimals``: rounded or truncated)."""
    import sympy  # noqa: PLC0415

    if isinstance(gold, sympy.Float):
        gold = sympy.Rational(str(gold))
    if not isinstance(gold, sympy.Expr) or not gold.is_number or gold.has(sympy.I, sympy.oo, sympy.zoo, sympy.nan):
        return None
    if gold.is_Rational:
        if _terminating(gold.q):
            return bool(value == gold)
    elif gold.is_real is False:
        return None
    if sig < min_sig:
        return False
    diff = sympy.N(sympy.Abs(value - gold), 60 + max(decimals, 0))
    if not diff.is_number or diff.is_real is False:
        return None
    return bool(diff <= sympy.Rational(1, 10**decimals) if decimals >= 0 else diff <= 10 ** (-decimals))


_DEGREE = re.compile(r"\\circ|\\degree|degree")


def _angle_converted(target: list, pred: str, golds: tuple[str, ...]) -> list:
    """Policy ``angles="convert"``: the prediction's numeric values in the gold's angle unit ([] if no change)."""
    import sympy  # noqa: PLC0415

    deg_gold = any(_DEGREE.search(g) for g in golds)
    deg_pred = bool(_DEGREE.search(pred))
    if deg_gold == deg_pred:
        return []
    factor = 180 / sympy.pi if deg_gold else sympy.pi / 180
    return [sympy.nsimplify(t * factor) for t in target if isinstance(t, sympy.Expr) and t.is_number]


# ------------------------------------------------------------------------------------------------- checks


def _check_boxed(pred: str, golds: tuple[str, ...], opts: tuple) -> tuple[str, bool, str]:
    mv = _mv()
    gold = parse_gold(golds)
    if not gold:
        return GOLD_UNPARSEABLE, False, pred
    min_sig, angles = opts
    lit = decimal_literal(pred)
    if lit is not None:
        verdicts = [decimal_verdict(*lit, g, int(min_sig)) for g in gold]
        if any(v is not None for v in verdicts):
            return OK, any(bool(v) for v in verdicts), pred
    target = _parse("\\boxed{" + pred + "}", [mv.LatexExtractionConfig()])
    if not target:
        target = _parse(pred, [mv.ExprExtractionConfig()])
    if not target:
        return PRED_UNPARSEABLE, False, pred
    ok = bool(mv.verify(gold, target, timeout_seconds=None, allow_set_relation_comp=True))
    if not ok and angles == "convert":
        conv = _angle_converted(target, pred, golds)
        ok = bool(conv) and bool(mv.verify(gold, conv, timeout_seconds=None))
    return OK, ok, pred


def _check_math_verify(tail: str, golds: tuple[str, ...]) -> tuple[str, bool, str]:
    mv = _mv()
    gold = parse_gold(golds)
    # "first_match" fallback appends the matched string (our display); only parsed objects are compared
    found = mv.parse(tail, [mv.LatexExtractionConfig(), mv.ExprExtractionConfig()], fallback_mode="first_match",
                     parsing_timeout=None)
    target = [x for x in found if not isinstance(x, str)]
    display = next((x for x in found if isinstance(x, str)), "")
    if not gold:
        return GOLD_UNPARSEABLE, False, ""
    if not target:
        return PRED_UNPARSEABLE, False, display
    return OK, bool(mv.verify(gold, target, timeout_seconds=None)), display


def _check_plain(text: str, golds: tuple[str, ...]) -> tuple[str, bool, str]:
    """verl 0.9.1 ``math_verify._verify_in_subprocess`` for each gold string, with the timeouts disabled."""
    mv = _mv()
    gold: list = []
    for g in golds:
        gold += mv.parse("\\boxed{" + g + "}", (mv.LatexExtractionConfig(),), parsing_timeout=None)
    pred = mv.parse(text, (mv.ExprExtractionConfig(), mv.LatexExtractionConfig()), parsing_timeout=None)
    display = next((x for x in reversed(pred) if isinstance(x, str)), "")
    if not pred:
        return NO_ANSWER, False, ""
    if not gold:
        return GOLD_UNPARSEABLE, False, display
    ok = any(mv.verify(g, p, timeout_seconds=None) for g in gold for p in pred)
    return OK, bool(ok), display


def check_answer(pred: str, golds: tuple[str, ...], mode: str = "boxed", opts: tuple = DEFAULT_OPTS
                 ) -> tuple[str, bool, str]:
    """Compare one prediction with the gold answers (see the module docstring for the modes).

    Returns ``(status, correct, pred_display)``: status "ok", "gold_unparseable" (checked first in "boxed"
    mode, so dataset problems surface even when the prediction is junk), "pred_unparseable", "no_answer"
    ("plain": nothing extracted) or "error"; ``pred_display`` is what math-verify matched in the
    "math_verify"/"plain" modes, else ``pred``.
    """
    try:
        if mode == "boxed":
            return _check_boxed(pred, golds, tuple(opts))
        if mode == "math_verify":
            return _check_math_verify(pred, golds)
        if mode == "plain":
            return _check_plain(pred, golds)
        return ERROR, False, f"unknown mode {mode!r}"
    except (Exception, MemoryError, RecursionError) as e:  # sympy raises almost anything on odd input
        return ERROR, False, f"{type(e).__name__}: {e}"[:200]


# CPU seconds one item may use in a worker before the kernel kills it (SIGXCPU). The parent's wall-clock
# kill normally acts long before; this bounds a worker orphaned mid-item (parent died) inside a C-level
# computation such as a huge integer power, which holds the GIL and so also starves the watchdog thread.
ITEM_CPU_CAP_S = 300


def _serve(rfd: int, wfd: int, memory_limit_mb: int) -> None:
    """Worker loop: recv ``(req_id, pred, golds, mode, opts)``, send ``(req_id, (status, correct, display))``.

    Exits on EOF (parent gone), a ``None`` message or a broken pipe, quietly. Sends ``("ready", pid)`` once
    math-verify is imported and warm, so the parent's per-item wall clock never includes the sympy import.
    Ignores SIGINT (a Ctrl-C in the parent's terminal reaches the whole process group; the parent decides).
    A watchdog thread exits the worker when it is re-parented (its parent died without closing the pipe).
    """
    import logging
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
        # warm-up: imports sympy/latex2sympy and fills their caches, on every path
        check_answer("1", ("1",))
        check_answer("0.5", ("\\frac{1}{3}",))
        check_answer("so \\boxed{1}", ("1",), "plain")
        conn_out.send(("ready", os.getpid()))
        while True:
            msg = conn_in.recv()
            if msg is None:
                return
            req_id, pred, golds, mode, opts = msg
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
            conn_out.send((req_id, check_answer(pred, golds, mode, opts)))
    except (EOFError, OSError):  # parent closed the pipes (shutdown, killed, exited)
        return


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--serve":
        _serve(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
    else:
        sys.exit("usage: python -P verify.py --serve RFD WFD MEMORY_LIMIT_MB (started by eksft_pipeline.scoring.reward)")
