"""Answer-string rewrites before math-verify: each one against hand-computed results (no sympy here)."""

from __future__ import annotations

from fractions import Fraction

import pytest

from eksft_pipeline.scoring.answer import final_boxes
from eksft_pipeline.scoring.normalize import (
    choice_letter,
    expand_pm,
    inequality_interval,
    inequality_union,
    integer_value,
    is_paren_tuple,
    join_thousands,
    normalize_text,
    order_like_gold,
    percent,
    repeating_decimals,
    strip_choice_label,
    strip_decorations,
    unicode_math,
)
from eksft_pipeline.scoring.policy import AIME, MATH, AnswerPolicy, get_policy, policy_for


@pytest.mark.parametrize(
    "text,expected",
    [
        ("3\\,375", "3375"),
        ("1\\,037", "1037"),
        ("1\\ 000", "1000"),
        ("1~000", "1000"),
        ("1{,}000", "1000"),
        ("\\$32,\\!348", "\\$32348"),
        ("12 345 678", "12345678"),
        ("-4\\,096", "-4096"),
        ("1\\,000.5", "1000.5"),
        ("(1\\,000, 2\\,000)", "(1000, 2000)"),
        # left alone: not groups of exactly three digits after a 1-3 digit head, or decimals
        ("2\\,3", "2\\,3"),
        ("1\\,0000", "1\\,0000"),
        ("0.5\\,000", "0.5\\,000"),
        ("1234\\,567", "1234\\,567"),
        ("1,000", "1,000"),
        ("\\frac{1}{2}\\,345", "\\frac{1}{2}\\,345"),
        ("x\\ 100", "x\\ 100"),
    ],
)
def test_thousands_separators(text, expected):
    assert join_thousands(text) == expected


def test_unicode_and_decorations():
    assert unicode_math("3\u2009375") == "3\\,375" and join_thousands(unicode_math("3\u202f375")) == "3375"
    assert unicode_math("\u22125") == "-5"
    assert unicode_math("90\u00b0") == "90^\\circ"
    assert unicode_math("x \u2264 3") == "x \\le  3"
    assert strip_decorations("\\displaystyle \\frac{1}{2}") == "\\frac{1}{2}"
    assert strip_decorations("\\text{10 cm}") == "10" and strip_decorations("\\mbox{864 inches}^2") == "864"
    assert strip_decorations("\\text{east}") == "\\text{east}" and strip_decorations("\\text{10}") == "\\text{10}"


@pytest.mark.parametrize(
    "text,value",
    [
        ("\\textbf{(C) } 27", "27"),
        ("(C)\\ 27", "27"),
        ("\\textbf{(C)}\\ 27", "27"),
        ("\\text{(C) }27", "27"),
        ("\\text{(C)}~27", "27"),
        ("(\\text{C})\\ 27", "27"),
        ("\\mathrm{(E)}\\quad \\frac{1}{2}", "\\frac{1}{2}"),
        ("\\textbf{(B) 12}", "12"),
        ("27 \\text{ (C)}", "27"),
        ("(A) -3", "-3"),
    ],
)
def test_choice_labels_are_dropped(text, value):
    assert strip_choice_label(text) == value
    assert normalize_text(text, MATH) == value
    assert strip_choice_label(text, gold_letter="C") in {"(A)", "(B)", "(C)", "(E)"}  # vs a letter gold: the label
    assert normalize_text(text, get_policy({"choice_letters": "strict"})) == text.strip()  # strict: untouched


@pytest.mark.parametrize("text", ["(C)", "\\textbf{(C)}", "27", "(1, 2)", "(A, B)", "\\text{(F) } 3", "C"])
def test_no_label_or_a_bare_label_is_unchanged(text):
    assert strip_choice_label(text) == text


def test_choice_letter_of_a_gold():
    assert [choice_letter(g) for g in ("\\text{(C)}", "(E)", "\\textbf{(A)}", "B", "27", "\\text{east}")] == [
        "C", "E", "A", "B", None, None]  # fmt: skip


@pytest.mark.parametrize(
    "text,frac",
    [
        ("0.\\overline{4}", Fraction(4, 9)),
        ("0.1\\overline{6}", Fraction(1, 6)),
        ("1.2\\overline{34}", Fraction(1234 - 12, 990)),
        ("0.\\overline{142857}", Fraction(1, 7)),
        ("-0.\\bar{3}", Fraction(-1, 3)),
        ("0.58\\dot{3}", Fraction(7, 12)),
        ("2.\\overline{9}", Fraction(3)),
    ],
)
def test_repeating_decimals(text, frac):
    out = repeating_decimals(text)
    if frac.denominator == 1:
        assert out == str(frac)
    else:
        sign = "-" if frac < 0 else ""
        assert out == f"{sign}\\frac{{{abs(frac.numerator)}}}{{{frac.denominator}}}"


def test_percent_modes():
    assert percent("5\\%", "unit") == "5" and percent("12.5 \\%", "unit") == "12.5"
    assert percent("5\\text{ percent}", "unit") == "5" and percent("5 \\text{\\%}", "unit") == "5"
    assert percent("5\\%", "fraction") == "\\frac{5}{100}" and percent("12.5\\%", "fraction") == "\\frac{12.5}{100}"
    assert percent("\\frac{1}{2}", "unit") == "\\frac{1}{2}"


def test_plus_minus_expansion():
    assert expand_pm("\\frac{-1\\pm\\sqrt{17}}{2}") == "\\frac{-1+\\sqrt{17}}{2}, \\frac{-1-\\sqrt{17}}{2}"
    assert expand_pm("1 \\pm \\sqrt{19}") == "1 + \\sqrt{19}, 1 - \\sqrt{19}"
    assert expand_pm("\\{1\\pm\\sqrt{5},-2\\}") == "\\{1+\\sqrt{5}, 1-\\sqrt{5}, -2\\}"
    assert expand_pm("a \\pm b \\mp c") == "a + b - c, a - b + c"  # correlated signs
    assert expand_pm("(1 \\pm 2, 3)") == "(1 \\pm 2, 3)"  # inside a tuple: ambiguous, left alone
    assert expand_pm("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}") == "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}"


def test_inequalities_to_intervals():
    assert inequality_interval("x \\le 3") == ("x", "(-\\infty, 3]")
    assert inequality_interval("1 \\le x < 5") == ("x", "[1, 5)")
    assert inequality_interval("5 > x \\geq 1") == ("x", "[1, 5)")
    assert inequality_interval("3 < y") == ("y", "(3, \\infty)")
    assert inequality_interval("1 < x > 2") is None and inequality_interval("x = 3") is None
    assert inequality_union("x < 2 \\text{ or } x > 3") == "(-\\infty, 2) \\cup (3, \\infty)"
    assert inequality_union("x \\le -1 \\lor 1 \\le x \\le 4") == "(-\\infty, -1] \\cup [1, 4]"
    assert inequality_union("x < 2 \\text{ or } y > 3") == "x < 2 \\text{ or } y > 3"  # two variables


def test_integer_values_and_tuples():
    assert [integer_value(s) for s in ("025", "142.0", "-4.0", "336^\\circ", "$204$", "\\text{7}")] == [
        25, 142, -4, 336, 204, 7]  # fmt: skip
    assert integer_value("\\frac{1}{2}") is None and integer_value("1.5") is None
    assert is_paren_tuple("\\left( 3, \\frac{\\pi}{2} \\right)") and not is_paren_tuple("(1,2)(3,4)")
    assert not is_paren_tuple("(5)") and not is_paren_tuple("[1, 2)")
    assert order_like_gold("-1, 31, 6", "(6,31,-1)") == "(-1, 31, 6)"
    assert order_like_gold("-1, 31, 6", "6,31,-1") == "-1, 31, 6"  # an unordered gold: a set stays a set
    assert order_like_gold("x = 1, y = 2", "(1,2)") == "x = 1, y = 2"


def test_final_boxes_group_only_connected_boxes():
    assert final_boxes("$x=\\boxed{a}$ or $x = \\boxed{b}$.")[0] == ["a", "b"]
    assert final_boxes("\\[\\boxed{1} \\quad \\text{and} \\quad \\boxed{2}\\]")[0] == ["1", "2"]
    assert final_boxes("first \\boxed{3}, but actually the answer is \\boxed{4}")[0] == ["4"]
    assert final_boxes("\\boxed{\\boxed{5}}")[0] == ["5"]
    assert final_boxes("\\boxed{1} \\boxed{2" * 3) == (None, "no_answer")
    assert len(final_boxes("\\boxed{1}," * 1000)[0]) == 8  # bounded


def test_policies():
    assert policy_for("aime") is AIME and policy_for("AIME24") is AIME and policy_for("aime_2025") is AIME
    assert policy_for("amc23").name == "amc" and policy_for("math").name == "math"
    assert policy_for("amc_aime").name == "math" and policy_for(None) is MATH
    p = get_policy({"base": "aime", "percent": "fraction"})
    assert p.integer_range == (0, 999) and p.percent == "fraction" and p.name == "aime+custom"
    with pytest.raises(ValueError, match="allowed"):
        get_policy({"percnt": "unit"})
    with pytest.raises(ValueError, match="known"):
        get_policy("hmmt")
    with pytest.raises(ValueError, match="percent"):
        AnswerPolicy(percent="half")
