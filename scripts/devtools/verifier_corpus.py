"""A labelled corpus of (gold, completion, correct?) pairs for measuring answer verifiers.

    python scripts/make_verifier_corpus.py --out data/verifier_corpus.jsonl            # builtin + shared golds
    python scripts/bench_reward.py                      # FN/FP of this project's verifier vs plain math-verify

Golds: :data:`BUILTIN_GOLDS` (about 130 MATH-style answers written for this corpus, shipped with the
corpus) plus, when available, the distinct golds of AIME 2024/2025, AMC and MATH-500 in a verl eval
parquet (``../shared/data/eval/luffy_valid_all.parquet``: 405 golds). Each gold is recognised by a small
recogniser of its own (:func:`classify`, independent of :mod:`eksft_pipeline.scoring.normalize`) as an integer,
decimal, fraction, ``k\\sqrt{m}/q``, ``k\\pi/q``, complex number, degree, tuple, unordered list, ``\\pm``
pair, interval, text, choice letter, percent, or "opaque" (anything else), and rewritten into

* equivalent forms (label ``True``): ``\\dfrac``, ``p/q``, ``\\sqrt{k^2 m}``, permutations of a list,
  several boxes, thousands separators, choice labels, ``0.\\overline{4}``, inequalities for intervals, ...;
* perturbations (label ``False``): off-by-one, swapped tuple, dropped list element, wrong bracket, sign,
  a hedge between two boxes, another gold of the same kind, ...

The label comes from how a form was built, never from a verifier. A few categories are decided by the
answer policy (:mod:`eksft_pipeline.scoring.policy`) rather than by mathematics; their tags start with
``policy:`` (``policy:percent_unit`` ``5\\%`` for gold 5 -> True; ``policy:rounded_few_sig`` ``0.001736``
for ``\\frac{1}{576}`` -> False; ``policy:rounded_8sig`` -> True; ``policy:radians_for_degrees`` -> False;
``policy:bare_list_reordered`` -> False), so a reader can count them separately.

Each form is put into an R1-style completion (``<think> ... </think>`` with filler reasoning, sometimes a
decoy box inside the thinking, then the final answer in one of several phrasings). Which golds are held out
is decided by a hash of the gold string (``heldout_frac``, default 0.3), so a gold and all its forms are
in exactly one part; the held-out part was never looked at while tuning the verifier.

Deterministic: the same golds and ``seed`` give the same corpus.

A development tool (scripts/make_verifier_corpus.py, scripts/bench_reward.py, tests/scoring): it lives in
``scripts/devtools/``, outside the runtime package, and no stage imports it.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from dataclasses import asdict, dataclass
from decimal import Decimal, getcontext
from fractions import Fraction
from pathlib import Path

getcontext().prec = 60
_PI = Decimal("3.14159265358979323846264338327950288419716939937510582097494459")

# --------------------------------------------------------------------------------------------- the golds

BUILTIN_GOLDS: tuple[str, ...] = (
    # integers (AIME/AMC-like and larger, negatives)
    "0", "1", "7", "12", "42", "100", "204", "512", "999", "1000", "1024", "2017", "3375", "12345",
    "1000000", "-3", "-17", "-250", "2520", "65536", "48", "315", "9",
    # decimals and money
    "0.5", "1.25", "2.75", "0.15", "3.14", "12.5", "0.008", "-0.4", "\\$18.90", "\\$4.50", "6.02",
    # fractions
    "\\frac{1}{2}", "\\frac{3}{4}", "\\frac{1}{3}", "\\frac{2}{3}", "\\frac{4}{9}", "\\frac{1}{6}",
    "\\frac{5}{12}", "\\frac{7}{11}", "\\frac{1}{576}", "\\frac{13}{7}", "-\\frac{5}{8}", "\\frac{22}{7}",
    "\\frac{1}{81}", "\\frac{3}{700}", "\\dfrac{17}{50}", "\\frac43", "\\frac{100}{3}", "\\frac{1}{12}",
    "\\frac{5}{6}", "\\frac{11}{30}", "\\frac{1}{7}", "\\frac{2}{27}", "\\frac{9}{64}",
    # roots and pi
    "2\\sqrt{3}", "\\sqrt{2}", "5\\sqrt{2}", "\\frac{\\sqrt{3}}{2}", "\\frac{3\\sqrt{5}}{7}", "4\\sqrt{6}",
    "\\sqrt{10}", "10\\sqrt{3}", "-\\sqrt{7}", "1000\\sqrt{2}", "\\pi", "2\\pi", "\\frac{\\pi}{4}",
    "\\frac{3\\pi}{2}", "\\frac{5\\pi}{6}", "12\\pi", "-\\frac{\\pi}{3}", "\\frac{\\pi}{12}",
    # degrees
    "30^\\circ", "45^\\circ", "60^\\circ", "135^\\circ", "150^\\circ", "72^\\circ",
    # complex numbers
    "3+4i", "2-5i", "-1+2i", "1-i", "6 - 5i",
    # ordered tuples / points
    "(1,2)", "(3, -4)", "\\left( 2, \\frac{\\pi}{3} \\right)", "(0, 5)", "(-1, 3, 2)",
    "\\left(\\frac{1}{2}, \\frac{3}{4}\\right)", "(4, 0)", "(7, 24, 25)",
    # unordered answer lists, two-root answers
    "1, 2", "-3, 5", "2, 3, 7", "0, 1, -1", "\\frac{1}{2}, 3", "-2, 2", "4, 9",
    "\\frac{-1+\\sqrt{17}}{2}, \\frac{-1-\\sqrt{17}}{2}", "\\frac{3+\\sqrt{5}}{2}, \\frac{3-\\sqrt{5}}{2}",
    "1+\\sqrt{2}, 1-\\sqrt{2}",
    # plus-minus
    "2 \\pm \\sqrt{3}", "-1 \\pm 2\\sqrt{2}", "\\frac{-3 \\pm \\sqrt{5}}{2}", "\\pm 4", "5 \\pm \\sqrt{7}",
    # intervals
    "(-\\infty,3]", "[1,5)", "(2, \\infty)", "[-1, 1]", "(0, 4)", "(-\\infty, -2)", "[3, \\infty)",
    "(-3, 7]", "\\left[ \\frac{1}{2}, 2 \\right)",
    # words and choice letters
    "\\text{east}", "\\text{odd}", "\\text{Tuesday}", "\\text{Alice}", "\\text{parabola}", "\\text{(A)}",
    "\\text{(D)}",
    # percent
    "25\\%", "12.5\\%", "80\\%",
    # anything else
    "x^2 + 2x + 1", "2x - 3", "\\frac{x+1}{x-1}", "3x^2 - 5", "a^2 + b^2", "\\sin x", "(x+2)(x-3)",
    "y = 2x + 1", "1011_2", "222_3", "n(n+1)", "(-\\infty, 0) \\cup (1, \\infty)",
)  # fmt: skip

SHARED_SOURCES = ("aime", "aime25", "amc", "math")


def shared_eval_parquet() -> Path:
    """``<repo>/../shared/data/eval/luffy_valid_all.parquet``, or under ``$EKSFT_SHARED_DIR`` when set (a git
    worktree elsewhere than the main checkout)."""
    env = os.environ.get("EKSFT_SHARED_DIR")
    base = Path(env) if env else Path(__file__).resolve().parents[3] / "shared"
    return base / "data" / "eval" / "luffy_valid_all.parquet"


SHARED_DEFAULT = shared_eval_parquet()
POLICY_OF_SOURCE = {"aime": "aime", "aime25": "aime", "amc": "amc", "math": "math", "builtin": "math"}


def shared_golds(path: str | Path | None = None, sources: tuple[str, ...] = SHARED_SOURCES) -> list[tuple[str, str]]:
    """Distinct ``(data_source, gold)`` of ``sources`` in a verl eval parquet, in file order."""
    import pyarrow.parquet as pq

    rows = pq.read_table(path or shared_eval_parquet(), columns=["data_source", "reward_model"]).to_pylist()
    seen: dict[tuple[str, str], None] = {}
    for r in rows:
        if r["data_source"] in sources and isinstance(r["reward_model"], dict):
            g = str(r["reward_model"].get("ground_truth") or "").strip()
            if g:
                seen.setdefault((r["data_source"], g), None)
    return list(seen)


# ---------------------------------------------------------------------------------------------- scalars


@dataclass(frozen=True)
class Num:
    """An exact real number the corpus can rewrite: ``coef * sqrt(rad) * pi^pi_pow`` with rational coef."""

    coef: Fraction
    rad: int = 1  # square-free radicand
    pi: int = 0  # 0 or 1

    def value(self) -> Decimal:
        v = Decimal(self.coef.numerator) / Decimal(self.coef.denominator)
        if self.rad != 1:
            v *= Decimal(self.rad).sqrt()
        if self.pi:
            v *= _PI
        return v

    @property
    def rational(self) -> bool:
        return self.rad == 1 and not self.pi

    def terminating(self) -> bool:
        if not self.rational:
            return False
        q = self.coef.denominator
        for p in (2, 5):
            while q % p == 0:
                q //= p
        return q == 1

    def __add__(self, k: int) -> Num:
        assert self.rational
        return Num(self.coef + k)


def latex(x: Num, style: int = 0) -> str:
    """A LaTeX form of ``x``; ``style`` picks among equivalent spellings (0 = canonical)."""
    c, neg = abs(x.coef), x.coef < 0
    sign = "-" if neg else ""
    p, q = c.numerator, c.denominator
    tail = ""
    if x.rad != 1:
        tail += f"\\sqrt{{{x.rad}}}"
    if x.pi:
        tail += "\\pi"
    if not tail:
        if q == 1:
            return f"{sign}{p}"
        if style == 1:
            return f"{sign}\\dfrac{{{p}}}{{{q}}}"
        if style == 2:
            return f"{sign}{p}/{q}"
        if style == 3:
            return f"\\frac{{{'-' if neg else ''}{p}}}{{{q}}}"
        return f"{sign}\\frac{{{p}}}{{{q}}}"
    num = tail if p == 1 else f"{p}{tail}"
    if q == 1:
        if style == 1 and x.rad != 1 and not x.pi and p * p * x.rad < 100_000:
            return f"{sign}\\sqrt{{{p * p * x.rad}}}"
        if style == 2 and p != 1:
            return f"{sign}{p} \\cdot {tail}"
        return f"{sign}{num}"
    if style == 1:
        return f"{sign}\\frac{{{p}}}{{{q}}}{tail}"
    if style == 2:
        return f"{sign}{num}/{q}"
    return f"{sign}\\frac{{{num}}}{{{q}}}"


def sig_round(v: Decimal, sig: int) -> str:
    """``v`` rounded to ``sig`` significant digits, as a plain decimal string (no exponent)."""
    if v == 0:
        return "0"
    exp = v.adjusted()  # position of the leading digit
    quant = Decimal(1).scaleb(exp - sig + 1)
    r = v.quantize(quant)
    s = format(r, "f")
    return s


def dp_round(v: Decimal, dp: int) -> str:
    return format(v.quantize(Decimal(1).scaleb(-dp)), "f")


def repeating(fr: Fraction) -> str | None:
    """``0.1\\overline{6}`` for 1/6 (None when terminating or the period / pre-period is long)."""
    if fr < 0 or fr.denominator == 1:
        return None
    whole, rem = divmod(fr.numerator, fr.denominator)
    q = fr.denominator
    digits, seen = [], {}
    while rem and rem not in seen:
        seen[rem] = len(digits)
        rem *= 10
        digits.append(str(rem // q))
        rem %= q
        if len(digits) > 12:
            return None
    if not rem:
        return None
    start = seen[rem]
    pre, per = "".join(digits[:start]), "".join(digits[start:])
    if len(per) > 6 or len(pre) > 3:
        return None
    return f"{whole}.{pre}\\overline{{{per}}}"


# ------------------------------------------------------------------------------------------ recognition

_INT = re.compile(r"(-?)0*(\d+)(?:\.0+)?")
_DEC = re.compile(r"(\\\$)?\s*(-?\d*\.\d+)")
_FRAC = re.compile(r"(-?)\\[dt]?frac\s*(?:\{(-?\d+)\}\{(\d+)\}|(\d)(\d)|(\d)\{(\d+)\})")
_SLASH = re.compile(r"(-?)(\d+)/(\d+)")
_SQRT = re.compile(r"(-?)(\d*)\s*\\sqrt\s*(?:\{(\d+)\}|(\d))")
_SQRT_FRAC = re.compile(r"(-?)\\[dt]?frac\{(\d*)\s*\\sqrt\{(\d+)\}\}\{(\d+)\}")
_PI_RE = re.compile(r"(-?)(\d*)\s*\\pi")
_PI_FRAC = re.compile(r"(-?)\\[dt]?frac\{(\d*)\s*\\pi\}\{(\d+)\}")
_DEG = re.compile(r"(-?\d+)\s*\^\s*\{?\\circ\}?")
_COMPLEX = re.compile(r"(-?\d+)\s*([+-])\s*(\d*)\s*i")
_MONEY_INT = re.compile(r"\\\$\s*(\d{1,3}(?:,(?:\\!)?\s*\d{3})+|\d+)|(\d{1,3}(?:,\\!\s*\d{3})+)")
_TEXT = re.compile(r"\\text\{\s*([A-Za-z][A-Za-z ]*?)\s*\}")
_LETTER = re.compile(r"\\text\{\s*\(([A-E])\)\s*\}")
_PERCENT = re.compile(r"(\d+(?:\.\d+)?)\s*\\%")
_INTERVAL = re.compile(r"(\\left\s*)?([\[(])\s*(.+?)\s*,\s*(.+?)\s*(\\right\s*)?([\])])")
_PM = re.compile(r"\\pm(?![a-zA-Z])")


def _square_free(m: int) -> tuple[int, int]:
    k = 1
    f = 2
    while f * f <= m:
        while m % (f * f) == 0:
            m //= f * f
            k *= f
        f += 1
    return k, m


def scalar(s: str) -> Num | None:
    """The number a simple scalar gold states (integers, decimals, fractions, roots, pi), else None."""
    s = s.strip()
    if m := _INT.fullmatch(s):
        return Num(Fraction(int(m.group(2)) * (-1 if m.group(1) else 1)))
    if (m := _DEC.fullmatch(s)) and not m.group(1):
        return Num(Fraction(m.group(2)))
    if m := _FRAC.fullmatch(s):
        p = int(m.group(2) or m.group(4) or m.group(6))
        q = int(m.group(3) or m.group(5) or m.group(7))
        return Num(Fraction(p, q) * (-1 if m.group(1) else 1))
    if m := _SLASH.fullmatch(s):
        return Num(Fraction(int(m.group(2)), int(m.group(3))) * (-1 if m.group(1) else 1))
    if m := _SQRT.fullmatch(s):
        k, rad = _square_free(int(m.group(3) or m.group(4)))
        return Num(Fraction(int(m.group(2) or 1) * k) * (-1 if m.group(1) else 1), rad)
    if m := _SQRT_FRAC.fullmatch(s):
        k, rad = _square_free(int(m.group(3)))
        return Num(Fraction(int(m.group(2) or 1) * k, int(m.group(4))) * (-1 if m.group(1) else 1), rad)
    if m := _PI_RE.fullmatch(s):
        return Num(Fraction(int(m.group(2) or 1)) * (-1 if m.group(1) else 1), 1, 1)
    if m := _PI_FRAC.fullmatch(s):
        return Num(Fraction(int(m.group(2) or 1), int(m.group(3))) * (-1 if m.group(1) else 1), 1, 1)
    return None


def _strip_lr(s: str) -> str:
    return re.sub(r"\\(?:left|right)\s*", "", s)


def _top_split(s: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for c in s:
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        if c == "," and depth == 0:
            parts.append(cur.strip())
            cur = ""
        else:
            cur += c
    parts.append(cur.strip())
    return parts


def classify(gold: str) -> tuple[str, object]:
    """``(family, data)`` of a gold string (see the module docstring)."""
    g = gold.strip()
    if m := _LETTER.fullmatch(g):
        return "letter", m.group(1)
    if m := _TEXT.fullmatch(g):
        return "text", m.group(1)
    if m := _PERCENT.fullmatch(g):
        return "percent", Fraction(m.group(1))
    if m := _DEG.fullmatch(g):
        return "degree", int(m.group(1))
    if (m := _DEC.fullmatch(g)) and m.group(1):
        return "money", m.group(2)
    if re.fullmatch(r"-?\d{1,3}(?:,\d{3})+", g):  # MATH writes 58,500 for the number 58500
        return "integer", Num(Fraction(int(g.replace(",", ""))))
    if (m := _MONEY_INT.fullmatch(g)) is not None:
        return "integer", Num(Fraction(int(re.sub(r"\D", "", m.group(1) or m.group(2)))))
    if m := _DEC.fullmatch(g):
        return "decimal", m.group(2)
    if _PM.search(g) and len(_PM.findall(g)) == 1 and "," not in g and "\\{" not in g:
        return "pm", g
    if (x := scalar(g)) is not None:
        return ("integer", x) if x.rational and x.coef.denominator == 1 else ("number", x)
    if m := _COMPLEX.fullmatch(g):
        a, b = int(m.group(1)), int(m.group(3) or 1) * (-1 if m.group(2) == "-" else 1)
        return "complex", (a, b)
    t = _strip_lr(g)
    if "\\cup" in t:
        pieces = [p.strip() for p in t.split("\\cup")]
        data = [_interval(p) for p in pieces]
        if all(d is not None for d in data):
            return "union", data
        return "opaque", g
    if m := _INTERVAL.fullmatch(t):
        lo, hi = m.group(3), m.group(4)
        lo_v = None if lo == "-\\infty" else scalar(lo)
        hi_v = None if hi in ("\\infty", "+\\infty") else scalar(hi)
        if (lo_v is not None or lo == "-\\infty") and (hi_v is not None or hi in ("\\infty", "+\\infty")):
            if m.group(2) == "(" and m.group(6) == ")" and lo_v is not None and hi_v is not None:
                return "tuple", [lo, hi]  # (a, b) with finite ends: a point (MATH's convention)
            return "interval", (m.group(2), lo, hi, m.group(6))
    if t.startswith("(") and t.endswith(")"):
        parts = _top_split(t[1:-1])
        if len(parts) >= 2 and all(scalar(p) is not None for p in parts):
            return "tuple", parts
    parts = _top_split(g)
    if len(parts) >= 2 and all(scalar(p) is not None or _root_like(p) for p in parts):
        return "list", parts
    return "opaque", g


def _interval(p: str):
    """``(lb, lo, hi, rb)`` of an interval with scalar or infinite ends (no point/interval ambiguity check)."""
    m = _INTERVAL.fullmatch(p.strip())
    if m is None:
        return None
    lo, hi = m.group(3), m.group(4)
    if (lo == "-\\infty" or scalar(lo) is not None) and (hi in ("\\infty", "+\\infty") or scalar(hi) is not None):
        return m.group(2), lo, hi, m.group(6)
    return None


def _root_like(s: str) -> bool:
    return bool(re.fullmatch(r"[-+\d\s\\{}a-z()/^]+", s)) and "\\sqrt" in s


# ------------------------------------------------------------------------------------------------- forms

LETTERS = "ABCDE"


@dataclass(frozen=True)
class Boxes:
    """An answer written as several boxes, ``joiner`` between them (``" or "``, ``", "``)."""

    parts: tuple[str, ...]
    joiner: str = ", "


Form = tuple[str, "str | Boxes"]  # (tag, answer)


def _choice_forms(v: str, r: random.Random) -> list[Form]:
    L = r.choice(LETTERS)
    return [
        ("choice_label_textbf", f"\\textbf{{({L}) }} {v}"),
        ("choice_label_paren", f"({L})\\ {v}"),
        ("choice_label_text_tie", f"\\text{{({L})}}~{v}"),
        ("choice_label_textbf_space", f"\\textbf{{({L})}}\\ {v}"),
        ("choice_label_inner_text", f"(\\text{{{L}}})\\ {v}"),
    ]


def _thousands(n: int) -> list[Form]:
    s = f"{abs(n):,}"
    sign = "-" if n < 0 else ""
    return [
        ("thousands_comma", sign + s),
        ("thousands_braced_comma", sign + s.replace(",", "{,}")),
        ("thousands_thin_space", sign + s.replace(",", "\\,")),
        ("thousands_backslash_space", sign + s.replace(",", "\\ ")),
        ("thousands_tie", sign + s.replace(",", "~")),
        ("thousands_unicode_thin", sign + s.replace(",", "\u2009")),
        ("thousands_comma_negthin", sign + s.replace(",", ",\\!")),
    ]


_UNITS = ("cm", "units", "ways", "square units", "meters", "dollars", "minutes")


def integer_forms(n: int, r: random.Random, source: str) -> tuple[list[Form], list[Form]]:
    right: list[Form] = [("canonical", str(n)), ("trailing_zero_decimal", f"{n}.0"), ("assignment", f"x = {n}"),
                         ("braced", f"{{{n}}}")]
    right.append(("units_text", f"{n} \\text{{ {r.choice(_UNITS)}}}"))
    if n >= 0:
        right += [("text_wrapped", f"\\text{{{n}}}"), ("bold", f"\\mathbf{{{n}}}"), ("textbf", f"\\textbf{{{n}}}")]
        if r.random() < 0.3:
            right.append(("number_and_unit_in_text", f"\\text{{{n} {r.choice(_UNITS)}}}"))
    if 0 <= n < 100:
        right.append(("leading_zeros", f"{n:03d}"))
    if n < 0:
        right += [("unicode_minus", f"\u2212{-n}"), ("spaced_minus", f"- {-n}")]
    if abs(n) >= 1000:
        right += _thousands(n)
    if source in ("amc", "aime") or r.random() < 0.3:
        right += r.sample(_choice_forms(str(n), r), 3)
    if r.random() < 0.25:
        right.append(("policy:percent_unit", f"{n}\\%"))
    wrong: list[Form] = [("off_by_one", str(n + 1)), ("off_by_minus_one", str(n - 1)), ("plus_ten", str(n + 10)),
                         ("plus_half", f"{n}.5"), ("near_integer", f"{n}.0001")]
    if n != 0:
        wrong += [("times_ten", str(10 * n)), ("negated", str(-n)), ("times_sqrt2", f"{n}\\sqrt{{2}}")]
    if n % 2:
        wrong.append(("half", f"\\frac{{{n}}}{{2}}"))
    rev = str(abs(n))[::-1].lstrip("0")
    if rev and rev != str(abs(n)):
        wrong.append(("digits_reversed", ("-" if n < 0 else "") + rev))
    if abs(n) >= 1000:
        wrong.append(("thousands_thin_space_off_by_one", f"{n + 1:,}".replace(",", "\\,")))
    wrong.append(("choice_label_wrong_value", _choice_forms(str(n + 1), r)[0][1]))
    wrong.append(("hedge_two_boxes", Boxes((str(n), str(n + 1)), " or ")))
    return right, wrong


def number_forms(x: Num, r: random.Random) -> tuple[list[Form], list[Form]]:
    right: list[Form] = [("canonical", latex(x)), ("alt_form_1", latex(x, 1)), ("alt_form_2", latex(x, 2))]
    wrong: list[Form] = []
    c = x.coef
    if x.rational:
        p, q = c.numerator, c.denominator
        right.append(("unreduced", f"{'-' if c < 0 else ''}\\frac{{{2 * abs(p)}}}{{{2 * q}}}"))
        if c < 0:
            right.append(("minus_in_numerator", latex(x, 3)))
        if abs(p) < 10 and q < 10 and c > 0:
            right.append(("frac_shorthand", f"\\frac{p}{q}"))
        if abs(c) > 1 and c > 0:
            w, rem = divmod(p, q)
            right.append(("mixed_number", f"{w}\\frac{{{rem}}}{{{q}}}"))
        if x.terminating():
            right.append(("exact_decimal", format(x.value().normalize(), "f")))
            dec = format(x.value().normalize(), "f")
            last = dec[:-1] + str((int(dec[-1]) + 1) % 10)
            wrong.append(("decimal_last_digit_off", last))
        else:
            rep = repeating(abs(c))
            if rep is not None:
                right.append(("repeating_decimal", ("-" if c < 0 else "") + rep))
                wrong.append(("repeating_wrong_period", ("-" if c < 0 else "") + rep[:-2] + str((int(rep[-2]) + 1) % 10) + "}"))
        wrong += [("numerator_plus_one", latex(Num(c + Fraction(1, q)))), ("denominator_plus_one",
                  latex(Num(Fraction(p, q + 1)))), ("negated", latex(Num(-c)))]
        if abs(p) != 1 and Fraction(q, p) != c:
            wrong.append(("reciprocal", latex(Num(Fraction(q, p)))))
    else:
        wrong += [("coefficient_plus_one", latex(Num(c + 1, x.rad, x.pi))), ("negated", latex(Num(-c, x.rad, x.pi)))]
        if x.rad != 1:
            wrong.append(("radicand_plus_one", latex(Num(c, x.rad + 1, x.pi))))
            wrong.append(("root_dropped", latex(Num(c))))
        if x.pi:
            wrong.append(("pi_dropped", latex(Num(c))))
    if not x.terminating():
        v = x.value()
        right.append(("policy:rounded_8sig", sig_round(v, 8)))
        wrong.append(("policy:rounded_3sig", sig_round(v, 3)))
        six = dp_round(v, 6)
        if 0 < len(six.lstrip("-").replace(".", "").lstrip("0")) < 6:
            wrong.append(("policy:rounded_few_sig", six))  # the 0.001736 for 1/576 case
    return right, wrong


def decimal_forms(d: str, money: bool, r: random.Random) -> tuple[list[Form], list[Form]]:
    fr = Fraction(d)
    pre = "\\$" if money else ""
    right: list[Form] = [("canonical", pre + d), ("trailing_zero", d + "0"), ("as_fraction", latex(Num(fr)))]
    if money:
        right += [("money_without_sign", d), ("money_units_text", f"{d} \\text{{ dollars}}")]
    if 0 < fr < 1 and d.startswith("0."):
        right.append(("no_leading_zero", d[1:]))
    elif d.startswith("."):
        right.append(("leading_zero_added", "0" + d))
    last = d[:-1] + str((int(d[-1]) + 1) % 10)
    wrong: list[Form] = [("last_digit_off", pre + last), ("times_ten", format(Decimal(d) * 10, "f")),
                         ("over_ten", format(Decimal(d) / 10, "f")), ("truncated", d[:-1].rstrip("."))]
    return right, [w for w in wrong if Fraction(w[1].replace("\\$", "") or "0") != fr]


def degree_forms(n: int, r: random.Random) -> tuple[list[Form], list[Form]]:
    right: list[Form] = [("canonical", f"{n}^\\circ"), ("number_only", str(n)), ("braced_circ", f"{n}^{{\\circ}}"),
                         ("unicode_degree", f"{n}\u00b0"), ("degrees_text", f"{n} \\text{{ degrees}}")]
    fr = Fraction(n, 180)
    rad = latex(Num(fr, 1, 1))
    wrong: list[Form] = [("off_by_one", f"{n + 1}^\\circ"), ("supplement", str(180 - n) if n != 90 else "91"),
                         ("policy:radians_for_degrees", rad)]
    return right, wrong


def complex_forms(a: int, b: int, r: random.Random) -> tuple[list[Form], list[Form]]:
    def z(x: int, y: int, style: int = 0) -> str:
        yi = ("" if abs(y) == 1 else str(abs(y))) + "i"
        if style == 1:
            return f"{'-' if y < 0 else ''}{yi} + {x}" if x >= 0 else f"{'-' if y < 0 else ''}{yi} - {-x}"
        if style == 2:
            return f"{x} {'-' if y < 0 else '+'} {yi}"
        return f"{x}{'-' if y < 0 else '+'}{yi}"

    right = [("canonical", z(a, b)), ("imaginary_first", z(a, b, 1)), ("spaced", z(a, b, 2))]
    wrong = [("conjugate", z(a, -b)), ("real_off_by_one", z(a + 1, b)), ("swapped", z(b, a))]
    return right, [w for w in wrong if not (w[0] == "swapped" and a == b)]


def _alt(e: str) -> str:
    x = scalar(e)
    return latex(x, 1) if x is not None else e


def tuple_forms(parts: list[str], r: random.Random) -> tuple[list[Form], list[Form]]:
    tup = ", ".join(parts)
    right: list[Form] = [("canonical", f"({tup})"), ("left_right", f"\\left( {tup} \\right)"),
                         ("no_spaces", "(" + ",".join(parts) + ")"), ("element_forms", "(" + ", ".join(map(_alt, parts)) + ")"),
                         ("policy:bare_list_in_order", tup)]
    wrong: list[Form] = []
    swapped = parts[1:] + parts[:1]
    if swapped != parts and len(set(parts)) > 1:
        wrong += [("rotated", "(" + ", ".join(swapped) + ")"), ("policy:bare_list_reordered", ", ".join(swapped))]
    x = scalar(parts[0])
    if x is not None and x.rational:
        wrong.append(("element_off_by_one", "(" + ", ".join([latex(x + 1)] + parts[1:]) + ")"))
    wrong.append(("element_dropped", "(" + ", ".join(parts[:-1]) + ")" if len(parts) > 2 else parts[0]))
    return right, wrong


def list_forms(parts: list[str], r: random.Random) -> tuple[list[Form], list[Form]]:
    perm = parts[:]
    while len(set(parts)) > 1 and perm == parts:
        r.shuffle(perm)
    right: list[Form] = [("canonical", ", ".join(parts)), ("permuted", ", ".join(perm)),
                         ("set_braces", "\\{" + ", ".join(parts) + "\\}"),
                         ("several_boxes_comma", Boxes(tuple(parts), ", ")),
                         ("several_boxes_or", Boxes(tuple(perm), " or ")),
                         ("several_boxes_and_text", Boxes(tuple(parts), " \\text{ and } ")),
                         ("assignments", ", ".join(f"x = {p}" for p in parts))]
    if len(parts) == 2:
        a, b = parts
        # two roots that differ in one sign only: write them with \pm (built by construction)
        for i, (ca, cb) in enumerate(zip(a, b)):
            if ca != cb:
                if {ca, cb} == {"+", "-"} and a[i + 1 :] == b[i + 1 :] and a[:i] == b[:i]:
                    right.append(("pm_combined", a[:i] + "\\pm" + a[i + 1 :]))
                break
    vals = {scalar(p).coef for p in parts if scalar(p) is not None and scalar(p).rational}
    fresh = next(k for k in range(2, 10_000) if Fraction(k) not in vals)
    last = scalar(parts[-1])
    wrong: list[Form] = [("element_dropped", ", ".join(parts[:-1])), ("extra_element", ", ".join(parts + [str(fresh)])),
                         ("one_box_of_two", parts[0])]
    if last is not None and last.rational and all(scalar(p) is not None for p in parts):
        wrong.append(("element_changed", ", ".join(parts[:-1] + [str(fresh)])))
    return right, wrong


def pm_forms(g: str, r: random.Random) -> tuple[list[Form], list[Form]]:
    plus = _PM.sub("+", g).replace("+ +", "+").strip()
    minus = _PM.sub("-", g).strip()
    if plus.startswith("+"):
        plus = plus[1:].strip()
    right: list[Form] = [("canonical", g), ("expanded", f"{plus}, {minus}"), ("expanded_reversed", f"{minus}, {plus}"),
                         ("several_boxes_or", Boxes((plus, minus), " or ")), ("assignment", f"x = {g}")]
    wrong: list[Form] = [("plus_root_only", plus), ("minus_root_only", minus)]
    m = re.search(r"\d+", g)
    if m:
        bumped = g[: m.start()] + str(int(m.group()) + 1) + g[m.end() :]
        wrong.append(("number_changed", bumped))
    return right, wrong


def interval_forms(data, r: random.Random) -> tuple[list[Form], list[Form]]:
    lb, lo, hi, rb = data
    canon = f"{lb}{lo}, {hi}{rb}"
    right: list[Form] = [("canonical", canon), ("left_right", f"\\left{lb} {lo}, {hi} \\right{rb}"),
                         ("set_membership", f"x \\in {canon}")]
    lo_inf, hi_inf = lo == "-\\infty", hi in ("\\infty", "+\\infty")
    le, ge = "\\le", "\\ge"
    lt_lo = "<" if lb == "(" else le  # lo lt_lo x
    lt_hi = "<" if rb == ")" else le  # x lt_hi hi
    if lo_inf and not hi_inf:
        ineq = f"x {lt_hi} {hi}"
        wrong_ineq = f"x {le if lt_hi == '<' else '<'} {hi}"
    elif hi_inf and not lo_inf:
        ineq = f"x {'>' if lt_lo == '<' else ge} {lo}"
        wrong_ineq = f"x {ge if lt_lo == '<' else '>'} {lo}"
    elif not lo_inf and not hi_inf:
        ineq = f"{lo} {lt_lo} x {lt_hi} {hi}"
        wrong_ineq = f"{lo} {le if lt_lo == '<' else '<'} x {lt_hi} {hi}"
    else:
        ineq = wrong_ineq = None
    if ineq:
        right.append(("inequality", ineq))
    flip_l = "[" if lb == "(" else "("
    wrong: list[Form] = []
    if not lo_inf:
        wrong.append(("left_bracket_flipped", f"{flip_l}{lo}, {hi}{rb}"))
    flip_r = "]" if rb == ")" else ")"
    if not hi_inf:
        wrong.append(("right_bracket_flipped", f"{lb}{lo}, {hi}{flip_r}"))
    if ineq:
        wrong.append(("inequality_wrong_strictness", wrong_ineq))
    x = scalar(hi) if not hi_inf else scalar(lo)
    if x is not None and x.rational:
        if not hi_inf:
            wrong.append(("endpoint_changed", f"{lb}{lo}, {latex(x + 1)}{rb}"))
        else:
            wrong.append(("endpoint_changed", f"{lb}{latex(x + 1)}, {hi}{rb}"))
    return right, wrong


def _ineq(lb: str, lo: str, hi: str, rb: str) -> str:
    le, ge = "\\le", "\\ge"
    if lo == "-\\infty":
        return f"x {'<' if rb == ')' else le} {hi}"
    if hi in ("\\infty", "+\\infty"):
        return f"x {'>' if lb == '(' else ge} {lo}"
    return f"{lo} {'<' if lb == '(' else le} x {'<' if rb == ')' else le} {hi}"


def union_forms(data, r: random.Random) -> tuple[list[Form], list[Form]]:
    def show(ds, sep=" \\cup "):
        return sep.join(f"{lb}{lo}, {hi}{rb}" for lb, lo, hi, rb in ds)

    right: list[Form] = [("canonical", show(data)), ("no_spaces", show(data, "\\cup").replace(", ", ",")),
                         ("pieces_reordered", show(data[::-1])),
                         ("inequalities_or", " \\text{ or } ".join(_ineq(*d) for d in data))]
    wrong: list[Form] = [("piece_dropped", show(data[:-1]))]
    lb, lo, hi, rb = data[-1]
    if hi not in ("\\infty", "+\\infty"):
        wrong.append(("bracket_flipped", show(data[:-1] + [(lb, lo, hi, "]" if rb == ")" else ")")])))
    if lo != "-\\infty":
        wrong.append(("bracket_flipped_left", show(data[:-1] + [("[" if lb == "(" else "(", lo, hi, rb)])))
    return right, wrong


_TEXT_POOL = ("east", "west", "north", "odd", "even", "Tuesday", "Monday", "Alice", "Bob", "parabola", "ellipse",
              "hyperbola", "Evelyn", "Navin", "circle")


def text_forms(word: str, r: random.Random) -> tuple[list[Form], list[Form]]:
    right: list[Form] = [("canonical", f"\\text{{{word}}}"), ("textbf", f"\\textbf{{{word}}}"),
                         ("mathrm", f"\\mathrm{{{word}}}"), ("case_changed", f"\\text{{{word.lower() if word[0].isupper() else word.capitalize()}}}")]
    others = [w for w in _TEXT_POOL if w.lower() != word.lower()]
    wrong: list[Form] = [("other_word", f"\\text{{{w}}}") for w in r.sample(others, 2)]
    return right, wrong


def letter_forms(L: str, r: random.Random) -> tuple[list[Form], list[Form]]:
    right: list[Form] = [("canonical", f"\\text{{({L})}}"), ("paren_letter", f"({L})"), ("bare_letter", L),
                         ("textbf_letter", f"\\textbf{{({L})}}"), ("mathrm_letter", f"\\mathrm{{({L})}}")]
    wrong: list[Form] = [("other_letter", f"\\text{{({o})}}") for o in r.sample([c for c in LETTERS if c != L], 2)]
    return right, wrong


def percent_forms(v: Fraction, r: random.Random) -> tuple[list[Form], list[Form]]:
    s = format(Decimal(v.numerator) / Decimal(v.denominator), "f").rstrip("0").rstrip(".") if v.denominator != 1 \
        else str(v.numerator)
    right: list[Form] = [("canonical", f"{s}\\%"), ("policy:percent_unit", s), ("percent_text", f"{s} \\text{{ percent}}")]
    wrong: list[Form] = [("off_by_one", f"{latex(Num(v + 1))}\\%"), ("policy:percent_as_fraction",
                         format(Decimal(v.numerator) / Decimal(v.denominator) / 100, "f"))]
    return right, wrong


def opaque_forms(g: str, others: list[str], r: random.Random) -> tuple[list[Form], list[Form]]:
    right: list[Form] = [("canonical", g), ("displaystyle", f"\\displaystyle {g}")]
    if "\\frac" in g and "\\dfrac" not in g:
        right.append(("dfrac", g.replace("\\frac", "\\dfrac")))
    if " " in g:
        right.append(("spacing", re.sub(r"\s*([+=,-])\s*", r" \1 ", g).strip()))
    if "(" in g and "\\left" not in g:
        right.append(("left_right", g.replace("(", "\\left(").replace(")", "\\right)")))
    wrong: list[Form] = []
    key = re.sub(r"\s+", "", g)
    cands = [o for o in others if re.sub(r"\s+", "", o) != key]
    if cands:
        wrong.append(("other_gold", r.choice(cands)))
    if not any(t in g for t in ("=", ",", "\\begin", "\\cup", "\\text", "_", "\\infty")):
        wrong.append(("plus_one", f"{g} + 1"))
    return right, wrong


def forms_for(source: str, gold: str, r: random.Random, opaque_pool: list[str]) -> tuple[list[Form], list[Form], str]:
    family, data = classify(gold)
    if family == "integer":
        right, wrong = integer_forms(int(data.coef), r, source)
        right[0] = ("canonical", gold) if source != "amc" else right[0]
    elif family == "number":
        right, wrong = number_forms(data, r)
        right[0] = ("canonical", gold)
    elif family in ("decimal", "money"):
        right, wrong = decimal_forms(data, family == "money", r)
    elif family == "degree":
        right, wrong = degree_forms(data, r)
    elif family == "complex":
        right, wrong = complex_forms(*data, r)
    elif family == "tuple":
        right, wrong = tuple_forms(data, r)
        right[0] = ("canonical", gold)
    elif family == "list":
        right, wrong = list_forms(data, r)
        right[0] = ("canonical", gold)
    elif family == "pm":
        right, wrong = pm_forms(data, r)
    elif family == "union":
        right, wrong = union_forms(data, r)
        right[0] = ("canonical", gold)
    elif family == "interval":
        right, wrong = interval_forms(data, r)
        right[0] = ("canonical", gold)
    elif family == "text":
        right, wrong = text_forms(data, r)
    elif family == "letter":
        right, wrong = letter_forms(data, r)
    elif family == "percent":
        right, wrong = percent_forms(data, r)
    else:
        right, wrong = opaque_forms(gold, opaque_pool, r)
    return right, wrong, family


# ------------------------------------------------------------------------------------------ completions

FILLER = (
    "Let me work through this carefully.",
    "First, I set up the equation from the conditions in the problem.",
    "So we have $x^2 + 3x - 4 = 0$, which factors as $(x+4)(x-1)=0$.",
    "Wait, let me double-check that computation.",
    "By the triangle inequality, $|a+b| \\le |a| + |b|$.",
    "Hmm, that does not look right. Let me reconsider the case $n = 3$.",
    "The sum telescopes: $\\sum_{k=1}^{n} \\left(\\frac{1}{k} - \\frac{1}{k+1}\\right) = 1 - \\frac{1}{n+1}$.",
    "Therefore the number of valid configurations is $\\binom{10}{3} = 120$.",
    "Alternatively, consider the problem modulo $7$.",
    "Okay, so the area is $\\frac{1}{2} \\cdot 6 \\cdot 8 = 24$.",
    "Substituting back into the original expression confirms the value.",
)

_FINAL = (
    "The answer is $\\boxed{{{a}}}$.",
    "**Final Answer**\n\\[\n\\boxed{{{a}}}\n\\]",
    "Therefore, the final answer is: $\\boxed{{{a}}}$. I hope it is correct.",
    "Putting everything together, we get \\(\\boxed{{{a}}}\\).",
    "So the answer is $\\boxed{{{a}}}$.\n\n**Final Answer**\n$\\boxed{{{a}}}$",
    "Hence\n$$\n\\boxed{{{a}}}\n$$",
)


def _boxes_text(a: Boxes) -> str:
    return "The solutions are " + a.joiner.join(f"$\\boxed{{{p}}}$" for p in a.parts) + "."


def completion(answer: str | Boxes, r: random.Random, decoy: str | None) -> str:
    think = " ".join(r.choice(FILLER) for _ in range(r.randint(2, 8)))
    if decoy is not None:
        think += f" Maybe the answer is $\\boxed{{{decoy}}}$? No, I made an arithmetic slip; let me redo it."
    body = "<think>\n" + think + "\n</think>\n\n" + r.choice(FILLER) + " "
    if isinstance(answer, Boxes):
        return body + _boxes_text(answer)
    return body + r.choice(_FINAL).format(a=answer)


# ----------------------------------------------------------------------------------------------- corpus


@dataclass(frozen=True)
class CorpusItem:
    source: str  # "aime", "aime25", "amc", "math" (from the eval parquet) or "builtin"
    gold: str
    family: str  # the gold's kind (see classify)
    form: str  # how the answer was built: an equivalent rewrite or a perturbation
    answer: str  # the answer as written (several boxes joined with " | ")
    completion: str
    label: bool  # True: the answer equals the gold (by construction)
    policy: str  # the answer policy of the source
    split: str  # "tune" or "heldout"

    def as_dict(self) -> dict:
        return asdict(self)


def _dedupe(forms: list[Form]) -> list[Form]:
    seen: dict[str, Form] = {}
    for tag, ans in forms:
        key = " | ".join(ans.parts) if isinstance(ans, Boxes) else ans
        seen.setdefault(key, (tag, ans))
    return list(seen.values())


def heldout(gold: str, frac: float) -> bool:
    """Whether a gold (and every form of it) is in the held-out part: a hash, not the RNG."""
    h = int.from_bytes(hashlib.sha256(gold.strip().encode()).digest()[:8], "big")
    return h / 2**64 < frac


def build_corpus(
    golds: list[tuple[str, str]] | None = None,
    *,
    seed: int = 0,
    n_right: int = 6,
    n_wrong: int = 5,
    heldout_frac: float = 0.3,
    decoy_frac: float = 0.25,
) -> list[CorpusItem]:
    """The labelled corpus for ``golds`` (``(source, gold)``; default: :data:`BUILTIN_GOLDS`), see module doc."""
    if golds is None:
        golds = [("builtin", g) for g in BUILTIN_GOLDS]
    seen: dict[tuple[str, str], None] = {}
    for src, g in golds:
        seen.setdefault((src, g.strip()), None)
    opaque_pool: dict[str, list[str]] = {}
    for src, g in seen:
        if classify(g)[0] == "opaque":
            opaque_pool.setdefault(src, []).append(g)
    items: list[CorpusItem] = []
    for src, g in seen:
        r = random.Random(f"{seed}:{src}:{g}")
        right, wrong, family = forms_for(src, g, r, opaque_pool.get(src, []))
        right, wrong = _dedupe(right), _dedupe(wrong)
        chosen = [(t, a, True) for t, a in [right[0]] + r.sample(right[1:], min(n_right - 1, len(right) - 1))]
        chosen += [(t, a, False) for t, a in r.sample(wrong, min(n_wrong, len(wrong)))]
        split = "heldout" if heldout(g, heldout_frac) else "tune"
        for tag, ans, label in chosen:
            decoy = None
            if r.random() < decoy_frac and wrong:
                d = r.choice(wrong)[1]
                decoy = d if isinstance(d, str) else None
            text = completion(ans, r, decoy)
            shown = " | ".join(ans.parts) if isinstance(ans, Boxes) else ans
            items.append(CorpusItem(src, g, family, tag, shown, text, label, POLICY_OF_SOURCE.get(src, "math"), split))
    return items


def default_golds(shared: str | Path | None = None) -> tuple[list[tuple[str, str]], str]:
    """Builtin golds plus the shared eval parquet's when it exists; and a line saying which were used."""
    golds = [("builtin", g) for g in BUILTIN_GOLDS]
    shared = shared_eval_parquet() if shared is None else shared
    if Path(shared).is_file():
        extra = shared_golds(shared)
        return golds + extra, f"{len(BUILTIN_GOLDS)} builtin golds + {len(extra)} from {shared}"
    return golds, f"{len(BUILTIN_GOLDS)} builtin golds only (no eval parquet at {shared})"


def write_corpus(items: list[CorpusItem], path: str | Path) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with p.open("w", encoding="utf-8") as f:
        for it in items:
            f.write(json.dumps(it.as_dict(), ensure_ascii=False) + "\n")
    return p


def read_corpus(path: str | Path) -> list[CorpusItem]:
    with Path(path).open(encoding="utf-8") as f:
        return [CorpusItem(**json.loads(line)) for line in f if line.strip()]


def rates(items: list[CorpusItem], verdicts: list[bool]) -> dict[str, float | int]:
    """False negatives (right answers scored wrong) and false positives (wrong answers scored right)."""
    pos = [v for it, v in zip(items, verdicts) if it.label]
    neg = [v for it, v in zip(items, verdicts) if not it.label]
    fn, fp = sum(not v for v in pos), sum(bool(v) for v in neg)
    return {"n": len(items), "positives": len(pos), "negatives": len(neg), "fn": fn, "fp": fp,
            "fn_rate": fn / max(len(pos), 1), "fp_rate": fp / max(len(neg), 1)}



VERIFIERS = ("project", "plain")


def score_corpus(items: list[CorpusItem], verifier: str = "project", **kwargs) -> list[dict]:
    """Score every item with this project's reward (``"project"``) or plain math-verify (``"plain"``:
    verl's ``math_verify`` reward semantics, see :mod:`eksft_pipeline.scoring.verify`); reward result dicts."""
    from eksft_pipeline.scoring import reward

    if verifier not in VERIFIERS:
        raise ValueError(f"verifier={verifier!r}; expected one of {VERIFIERS}")
    batch = [{"data_source": it.source, "solution_str": it.completion, "ground_truth": it.gold, "policy": it.policy}
             for it in items]
    if verifier == "plain":
        kwargs = {**kwargs, "extraction": "plain"}
    return reward.score_batch(batch, **kwargs)
