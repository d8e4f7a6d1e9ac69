"""Answer-string normalisation before math-verify (caller side: pure string work, no sympy, bounded cost).

Each rewrite turns a form real models write, which math-verify 0.9.0 mis-parses, into one it parses to
the same value; none of them changes a value (the tests check each against hand-computed values), and
each is skipped by a substring test when it cannot apply, so the common answer (``204``,
``\\frac{1}{2}``) costs a few ``in`` checks.

* Unicode math: ``−`` (U+2212) -> ``-``, ``°`` -> ``^\\circ``, ``≤ ≥ ± π ∞ × ·`` -> LaTeX, thin/no-break
  spaces (U+2009, U+202F, U+00A0, U+2007) -> ``\\,``.
* Thousands separators: ``3\\,375``, ``1\\ 000``, ``1~000``, ``32,\\!348``, ``1{,}000``, ``12 345``:
  digit groups of exactly three after a 1-3 digit head are joined (``3375``). math-verify reads ``3\\,375``
  as 378 and ``1\\ 000`` as ``1*0``. A plain comma (``1,000``) is left alone: math-verify already reads it
  as a number, and ``1,2`` is a list.
* Choice labels (policy ``choice_letters="value"``): ``\\textbf{(C) } 27``, ``(C)\\ 27``, ``\\text{(C)}~27``,
  ``(\\text{C})\\ 27``, ``27 \\text{ (C)}`` -> ``27``; against a gold that is itself a letter the label
  is kept as ``(C)`` and the value dropped.
* Repeating decimals: ``0.\\overline{4}`` -> ``\\frac{4}{9}``, ``1.2\\overline{34}``, ``0.1\\dot{6}``,
  ``0.\\bar{3}``.
* Percent (policy ``percent``): ``"unit"`` drops ``\\%``/``%``/``\\text{ percent}``; ``"fraction"`` turns
  ``12.5\\%`` into ``\\frac{12.5}{100}``.
* ``\\pm``/``\\mp``: each top-level element holding one is split into its two values
  (``\\frac{-1\\pm\\sqrt{17}}{2}`` -> ``\\frac{-1+\\sqrt{17}}{2}, \\frac{-1-\\sqrt{17}}{2}``;
  ``\\{1\\pm\\sqrt{5},-2\\}`` -> ``\\{1+\\sqrt{5}, 1-\\sqrt{5}, -2\\}``), so it compares as the set of
  both roots. Inside a parenthesised tuple it is left alone.

Pair-level rule (needs the gold): :func:`order_like_gold` reads a bare list as a tuple when the gold is a
parenthesised tuple (policy ``ordered_tuples``).
"""

from __future__ import annotations

import math
import re

from eksft_pipeline.scoring.policy import AnswerPolicy

# ------------------------------------------------------------------------------------------------- unicode

_UNICODE = {
    "\u2212": "-",  # minus sign
    "\u00b0": "^\\circ ",
    "\u2264": "\\le ",
    "\u2265": "\\ge ",
    "\u00b1": "\\pm ",
    "\u2213": "\\mp ",
    "\u03c0": "\\pi ",
    "\u221e": "\\infty ",
    "\u00d7": "\\times ",
    "\u22c5": "\\cdot ",
    "\u00b7": "\\cdot ",
    "\u2009": "\\,",  # thin space
    "\u202f": "\\,",  # narrow no-break space
    "\u00a0": "\\,",  # no-break space
    "\u2007": "\\,",  # figure space
}
_UNICODE_RE = re.compile("|".join(map(re.escape, _UNICODE)))


def unicode_math(s: str) -> str:
    if s.isascii():
        return s
    return _UNICODE_RE.sub(lambda m: _UNICODE[m.group()], s).strip()


_DECOR = re.compile(r"\\(?:displaystyle|textstyle|scriptstyle)(?![a-zA-Z])\s*")
_NUMBER_IN_TEXT = re.compile(
    r"\\(?:text|mbox|textrm|mathrm|textbf)\s*\{\s*([+-]?\d[\d,.]*)\s+[A-Za-z][A-Za-z ]*\}(?:\s*\^\s*\{?\d\}?)?"
)


def strip_decorations(s: str) -> str:
    """``\\displaystyle 5`` -> ``5``; ``\\text{10 cm}`` (a number and its unit in one text group) -> ``10``."""
    if "style" in s:
        s = _DECOR.sub("", s).strip()
    if s.startswith(("\\text", "\\mbox", "\\mathrm")) and (m := _NUMBER_IN_TEXT.fullmatch(s)):
        return m.group(1)
    return s


# ------------------------------------------------------------------------------------ thousands separators

# a separator between digit groups: LaTeX thin/normal/medium spaces, a tie, {,} and ,\! (MATH's "32,\!348")
_SEP = r"(?:\\,|\\ |\\;|\\:|\\!|~|\{,\}|,\\!| )"
_THOUSANDS = re.compile(rf"(?<![\d.])(\d{{1,3}})((?:{_SEP}\d{{3}})+)(?![\d])")
_NON_DIGIT = re.compile(r"\D")


def join_thousands(s: str) -> str:
    """``3\\,375`` -> ``3375`` (see module docstring); digit groups must be exactly three long."""
    if not any(c in s for c in ("\\", "~", " ", "{,}")):
        return s
    return _THOUSANDS.sub(lambda m: m.group(1) + _NON_DIGIT.sub("", m.group(2)), s)


# -------------------------------------------------------------------------------------------- choice labels

_FMT = r"\\(?:textbf|text|textrm|textnormal|mathrm|mathbf|mathit|textit|mbox|bf|rm)"
_UNWRAP_LABEL = re.compile(rf"{_FMT}\s*\{{\s*(\(?\s*[A-E]\s*\)?)\s*\}}")
_WHOLE_FMT = re.compile(rf"{_FMT}\s*\{{")
_LABEL_SEP = r"(?:\s|~|\\[ ,;:!]|\\q?quad(?![a-zA-Z])|[:.])*"
_LEAD_LABEL = re.compile(rf"\(\s*([A-E])\s*\){_LABEL_SEP}(.*)", re.S)
_TRAIL_LABEL = re.compile(rf"(.*?){_LABEL_SEP}\(\s*([A-E])\s*\)", re.S)
_LETTER = re.compile(r"\(?\s*([A-E])\s*\)?")


_BRACE_TOKEN = re.compile(r"\\.|[{}]", re.DOTALL)


def _strip_outer_format(s: str) -> str:
    """``\\textbf{(C) 27}`` -> ``(C) 27`` when one formatting group spans the whole answer."""
    m = _WHOLE_FMT.match(s)
    if m is None or not s.endswith("}"):
        return s
    depth = 1
    for t in _BRACE_TOKEN.finditer(s, m.end()):
        if t.group() == "{":
            depth += 1
        elif t.group() == "}":
            depth -= 1
            if depth == 0:
                return s[m.end() : t.start()].strip() if t.end() == len(s) else s
    return s


def choice_letter(s: str) -> str | None:
    """The letter of an answer that is only a choice label (``\\text{(C)}``, ``(C)``, ``\\textbf{C}``), else None."""
    if len(s) > 40 or not any(c in s for c in "ABCDE"):
        return None
    t = _UNWRAP_LABEL.sub(r"\1", _strip_outer_format(s.strip()))
    m = _LETTER.fullmatch(t.strip())
    return m.group(1) if m else None


def strip_choice_label(s: str, *, gold_letter: str | None = None) -> str:
    """Drop a choice label next to a value (``(C)\\ 27`` -> ``27``); keep only the label (as ``(C)``) when
    the gold is a letter. An answer without a label, or a bare label, is returned unchanged."""
    if "(" not in s or not any(c in s for c in "ABCDE"):
        return s
    t = _UNWRAP_LABEL.sub(r"\1", _strip_outer_format(s.strip()))
    t = t.replace("(\\text{", "(").strip() if "(\\text{" in t else t
    m = _LEAD_LABEL.fullmatch(t)
    if m and m.group(2).strip():
        letter, value = m.group(1), m.group(2).strip()
    else:
        m = _TRAIL_LABEL.fullmatch(t)
        if not (m and m.group(1).strip()):
            return s
        letter, value = m.group(2), m.group(1).strip()
    return f"({letter})" if gold_letter else value


# ------------------------------------------------------------------------------------- repeating decimals

_REPEAT = re.compile(r"(-?)(\d*)\.(\d*)\s*\\(?:overline|bar|dot)\s*(?:\{\s*(\d+)\s*\}|(\d))")


def _repeat_to_frac(m: re.Match) -> str:
    sign, whole, fixed, rep = m.group(1), m.group(2) or "0", m.group(3), m.group(4) or m.group(5)
    if len(fixed) + len(rep) > 30:  # absurd: leave it (the verifier rejects or times out, bounded)
        return m.group()
    num = int(whole + fixed + rep) - int(whole + fixed)
    den = 10 ** len(fixed) * (10 ** len(rep) - 1)
    g = math.gcd(num, den)
    num, den = num // g, den // g
    return f"{sign}\\frac{{{num}}}{{{den}}}" if den != 1 else f"{sign}{num}"


def repeating_decimals(s: str) -> str:
    """``0.\\overline{4}`` -> ``\\frac{4}{9}``, ``0.1\\overline{6}`` -> ``\\frac{1}{6}``."""
    if "\\overline" not in s and "\\bar" not in s and "\\dot" not in s:
        return s
    return _REPEAT.sub(_repeat_to_frac, s)


# ------------------------------------------------------------------------------------------------ percent

_PERCENT_UNIT = re.compile(
    r"\s*(?:\\text\{\s*\\?%\s*\}|\\%|%|(?:\\[,;: ])?\s*\\(?:text|mbox|mathrm)\{\s*(?:percent|per\s*cent)\s*\})"
)
_PERCENT_NUM = re.compile(
    r"(-?\d+(?:\.\d+)?)\s*(?:\\%|%|\\text\{\s*\\?%\s*\}|(?:\\[,;: ])?\s*\\(?:text|mbox|mathrm)\{\s*(?:percent|per\s*cent)\s*\})"
)


def percent(s: str, mode: str) -> str:
    """Policy ``percent``: ``"unit"`` drops the sign, ``"fraction"`` reads ``x\\%`` as ``x/100``."""
    if "%" not in s and "percent" not in s:
        return s
    if mode == "fraction":
        s = _PERCENT_NUM.sub(r"\\frac{\1}{100}", s)
    return _PERCENT_UNIT.sub("", s).strip()


# --------------------------------------------------------------------------------------- top-level splits

_OPEN, _CLOSE = "([{", ")]}"


def split_top_level(s: str, sep: str = ",") -> list[str]:
    """Split at ``sep`` outside any (), [], {} (``\\{``/``\\}`` and ``\\left(`` count as brackets)."""
    parts, depth, start, i = [], 0, 0, 0
    while i < len(s):
        c = s[i]
        if c == "\\" and i + 1 < len(s) and s[i + 1] in "{}":
            depth += 1 if s[i + 1] == "{" else -1
            i += 2
            continue
        if c in _OPEN:
            depth += 1
        elif c in _CLOSE:
            depth -= 1
        elif c == sep and depth == 0:
            parts.append(s[start:i])
            start = i + 1
        i += 1
    parts.append(s[start:])
    return parts


def _strip_left_right(s: str) -> str:
    return s.replace("\\left", "").replace("\\right", "") if "\\left" in s else s


def is_paren_tuple(s: str) -> bool:
    """``(a, b)`` / ``\\left( a, b \\right)`` whose first bracket closes at the very end, with a top-level comma."""
    t = _strip_left_right(s).strip()
    if len(t) < 5 or t[0] != "(" or t[-1] != ")":
        return False
    depth = 0
    for i, c in enumerate(t):
        if c in _OPEN:
            depth += 1
        elif c in _CLOSE:
            depth -= 1
            if depth == 0 and i != len(t) - 1:
                return False
    return len(split_top_level(t[1:-1])) > 1


def is_bare_list(s: str) -> bool:
    """A comma list not wrapped in brackets and without relations (``3, \\frac{\\pi}{2}``)."""
    t = s.strip()
    if not t or t[0] in "([{" or t.startswith(("\\{", "\\left", "\\langle")) or "=" in t or "\\in" in t:
        return False
    return len(split_top_level(t)) > 1


def order_like_gold(pred: str, gold: str) -> str:
    """Policy ``ordered_tuples``: a bare list against a parenthesised tuple gold is read as that tuple."""
    if "," in pred and is_bare_list(pred) and is_paren_tuple(gold):
        return f"({pred})"
    return pred


# --------------------------------------------------------------------------------------- inequality unions

_REL = re.compile(r"\\leqslant|\\geqslant|\\leq|\\geq|\\le|\\ge|\\lt|\\gt|<|>")
_OR = re.compile(r"\s*(?:\\(?:text|mbox|textrm|mathrm)\s*\{\s*or\s*\}|\\lor(?![a-zA-Z])|\\vee(?![a-zA-Z])|(?<![a-zA-Z])or(?![a-zA-Z]))\s*")
_VAR_NAME = re.compile(r"[a-zA-Z]")


def _relation(op: str) -> tuple[str, bool]:
    """``("lt" | "gt", strict)`` of a relation operator."""
    less = op in ("<", "\\lt") or op.startswith("\\le")
    return ("lt" if less else "gt"), op in ("<", ">", "\\lt", "\\gt")


def inequality_interval(piece: str) -> tuple[str, str] | None:
    """``(variable, interval)`` of a one-variable inequality (``x \\le 3`` -> ``(-\\infty, 3]``,
    ``1 \\le x < 5`` -> ``[1, 5)``, ``5 > x`` -> ``(-\\infty, 5)``), else None."""
    ops = list(_REL.finditer(piece))
    if not 1 <= len(ops) <= 2:
        return None
    terms = [t.strip() for t in _REL.split(piece)]
    if any(not t for t in terms):
        return None
    rels = [_relation(m.group()) for m in ops]
    inf, ninf = "\\infty", "-\\infty"
    if len(ops) == 1:
        (kind, strict), (a, b) = rels[0], terms
        if _VAR_NAME.fullmatch(a):  # x OP b
            var, bound, kind = a, b, kind
        elif _VAR_NAME.fullmatch(b):  # a OP x  ==  x OP' a
            var, bound, kind = b, a, ("gt" if kind == "lt" else "lt")
        else:
            return None
        if kind == "lt":
            return var, f"({ninf}, {bound}{')' if strict else ']'}"
        return var, f"{'(' if strict else '['}{bound}, {inf})"
    (k1, s1), (k2, s2) = rels
    a, var, b = terms
    if k1 != k2 or not _VAR_NAME.fullmatch(var):
        return None
    if k1 == "gt":  # a > x > b  ==  b < x < a
        a, b, s1, s2 = b, a, s2, s1
    return var, f"{'(' if s1 else '['}{a}, {b}{')' if s2 else ']'}"


def inequality_union(s: str) -> str:
    """``x < 2 \\text{ or } x > 3`` -> ``(-\\infty, 2) \\cup (3, \\infty)`` (pieces in one variable, joined by
    "or"); anything else unchanged. A single inequality is left to math-verify, which compares it with an
    interval itself."""
    if "or" not in s and "\\vee" not in s:
        return s
    pieces = _OR.split(s)
    if len(pieces) < 2:
        return s
    got = [inequality_interval(p) for p in pieces]
    if any(g is None for g in got) or len({g[0] for g in got}) != 1:  # type: ignore[index]
        return s
    return " \\cup ".join(g[1] for g in got)  # type: ignore[index]


# ---------------------------------------------------------------------------------------------- plus-minus

_PM = re.compile(r"\\(pm|mp)(?![a-zA-Z])")


def expand_pm(s: str) -> str:
    """Split every top-level element with ``\\pm``/``\\mp`` into its two values (see module docstring)."""
    if "\\pm" not in s and "\\mp" not in s:
        return s
    if not _PM.search(s) or is_paren_tuple(s):
        return s
    t, wrap = s.strip(), ("", "")
    if t.startswith("\\{") and t.endswith("\\}"):
        t, wrap = t[2:-2], ("\\{", "\\}")
    out: list[str] = []
    for part in split_top_level(t):
        if _PM.search(part) is None:
            out.append(part.strip())
            continue
        plus = _PM.sub(lambda m: "+" if m.group(1) == "pm" else "-", part).strip()
        minus = _PM.sub(lambda m: "-" if m.group(1) == "pm" else "+", part).strip()
        out += [plus, minus]
    return wrap[0] + ", ".join(out) + wrap[1]


# ------------------------------------------------------------------------------------------ entry points

_INT_GOLD = re.compile(r"[+-]?\d+(?:\.0+)?")
_DEGREE = re.compile(r"\s*\^\s*\{?\s*\\circ\s*\}?|\\degree|\s*\\text\{\s*degrees?\s*\}")


def integer_value(s: str) -> int | None:
    """The integer an answer states as a literal (``025``, ``142.0``, ``336^\\circ``, ``$204$``), else None."""
    t = s.strip().strip("$").strip()
    if "\\" in t or "^" in t:
        t = _DEGREE.sub("", t).strip()
        m = re.fullmatch(r"\\(?:text|textbf|mathbf|mathrm)\{\s*([^{}]*?)\s*\}", t)
        if m:
            t = m.group(1)
    if len(t) > 40 or not _INT_GOLD.fullmatch(t):
        return None
    return int(t.split(".")[0])


def normalize_text(s: str, policy: AnswerPolicy, *, gold_letter: str | None = None, is_gold: bool = False) -> str:
    """All string rewrites of one answer (a box content or a gold) under ``policy``, in a fixed order."""
    s = strip_decorations(unicode_math(s))
    if not is_gold and policy.choice_letters == "value":
        s = strip_choice_label(s, gold_letter=gold_letter)
    s = join_thousands(s)
    s = repeating_decimals(s)
    s = percent(s, policy.percent)
    s = expand_pm(s)
    s = inequality_union(s)
    return s.strip()
