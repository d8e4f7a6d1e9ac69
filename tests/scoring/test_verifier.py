"""The verifier's fixes over plain math-verify (issue 15's list), its policy decisions, and the plain reference."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from eksft_pipeline.scoring import reward
from eksft_pipeline.scoring.verify import check_answer, decimal_literal, decimal_verdict


def trace(answer: str) -> str:
    return (
        "<think>\nLet me compute. Maybe \\boxed{-12345}? Wait, check again: $\\frac{a}{b} = 3$.\n</think>\n\n"
        f"Putting it together, the answer is $\\boxed{{{answer}}}$."
    )


@pytest.fixture(autouse=True)
def _fresh():
    reward.reset_reward_stats()
    reward.clear_cache()
    yield


# (gold, completion, why) -- each a form real models write that plain math-verify scores wrong
ISSUE_MISSES = [
    ("3375", trace("3\\,375"), "thin-space thousands separator"),
    ("1037", trace("1\\,037"), "thin-space thousands separator"),
    ("1000", trace("1\\ 000"), "spaced thousands separator"),
    ("27", trace("\\textbf{(C) } 27"), "choice letter with the value"),
    ("27", trace("(C)\\ 27"), "choice letter with the value"),
    ("\\frac{-1+\\sqrt{17}}{2}, \\frac{-1-\\sqrt{17}}{2}", trace("\\frac{-1\\pm\\sqrt{17}}{2}"), "\\pm for two roots"),
    ("\\frac{4}{9}", trace("0.\\overline{4}"), "repeating decimal"),
    ("(-\\infty,3]", trace("x \\le 3"), "inequality for an interval"),
    ("[1,5)", trace("1 \\le x < 5"), "two-sided inequality for an interval"),
]
# several boxes for a two-value gold: plain math-verify accepts it, the last-box extraction did not
SEVERAL_BOXES = (
    "\\frac{-1+\\sqrt{17}}{2}, \\frac{-1-\\sqrt{17}}{2}",
    "<think>x</think> So $x = \\boxed{\\frac{-1+\\sqrt{17}}{2}}$ or $x = \\boxed{\\frac{-1-\\sqrt{17}}{2}}$.",
)


def test_every_listed_miss_is_fixed_and_plain_math_verify_misses_it():
    items = [("math", c, g) for g, c, _ in ISSUE_MISSES] + [("math", SEVERAL_BOXES[1], SEVERAL_BOXES[0])]
    ours = reward.score_batch(items)
    plain = reward.score_batch(items, extraction="plain")
    assert [(r["acc"], r["reason"]) for r in ours] == [(1.0, "ok")] * len(items), [
        (why, r["pred"]) for (_, _, why), r in zip(ISSUE_MISSES, ours) if r["acc"] != 1.0]
    assert [r["acc"] for r in plain] == [0.0] * len(ISSUE_MISSES) + [1.0]


def test_several_boxes_are_one_answer_and_a_hedge_is_wrong():
    two = "<think>x</think> The roots are $\\boxed{2}$ and $\\boxed{3}$."
    assert reward.compute_score("m", two, "2, 3")["acc"] == 1.0
    assert reward.compute_score("m", two, "3")["acc"] == 0.0  # the last box alone was accepted before
    hedge = "<think>x</think> So $x = \\boxed{-5}$ or $x = \\boxed{5}$."
    assert reward.compute_score("m", hedge, "5")["acc"] == 0.0
    assert reward.compute_score("m", hedge, "\\pm 5")["acc"] == 1.0
    # a box separated by prose is an earlier answer the model overrode
    over = "<think>x</think> I first got $\\boxed{4}$, but checking the case n=3 gives $\\boxed{5}$."
    assert reward.compute_score("m", over, "5")["acc"] == 1.0 and reward.compute_score("m", over, "4, 5")["acc"] == 0.0


def test_debatable_acceptances_are_decided():
    # 6-decimal rounding: 0.001736 has 4 significant digits of 1/576 = 0.00173611...: rejected (math-verify accepts)
    assert reward.compute_score("m", trace("0.001736"), "\\frac{1}{576}")["acc"] == 0.0
    assert reward.compute_score("m", trace("0.001736"), "\\frac{1}{576}", extraction="plain")["acc"] == 1.0
    assert reward.compute_score("m", trace("0.0017361111"), "\\frac{1}{576}")["acc"] == 1.0
    assert reward.compute_score("m", trace("1.736111 \\times 10^{-3}"), "\\frac{1}{576}")["acc"] == 1.0
    # percent sign as a unit (policy "unit", the default): 5\% is 5, not 0.05
    assert reward.compute_score("m", trace("5\\%"), "5")["acc"] == 1.0
    assert reward.compute_score("m", trace("5\\%"), "0.05")["acc"] == 0.0
    frac = {"policy": {"percent": "fraction"}}
    got = reward.score_batch([{"solution_str": trace("5\\%"), "ground_truth": g, **frac} for g in ("5", "0.05")])
    assert [r["acc"] for r in got] == [0.0, 1.0]
    # degrees vs radians: the gold's unit (policy "as_written"); "convert" accepts the other unit
    assert reward.compute_score("m", trace("\\frac{\\pi}{2}"), "90^\\circ")["acc"] == 0.0
    assert reward.compute_score("m", trace("90\u00b0"), "90^\\circ")["acc"] == 1.0
    conv = {"policy": {"angles": "convert"}}
    got = reward.score_batch([{"solution_str": trace(a), "ground_truth": g, **conv}
                              for a, g in (("\\frac{\\pi}{2}", "90^\\circ"), ("30^\\circ", "\\frac{\\pi}{6}"),
                                           ("\\frac{\\pi}{3}", "90^\\circ"))])
    assert [r["acc"] for r in got] == [1.0, 1.0, 0.0]


def test_rounded_decimals_against_hand_computed_values():
    assert decimal_literal("0.001736")[1:] == (6, 4)
    assert decimal_literal("1.7361\\times10^{-3}")[1:] == (7, 5)
    assert decimal_literal("4.5e33")[1:] == (-32, 2)
    assert decimal_literal("204") is None and decimal_literal("x") is None
    import sympy

    third, root2 = sympy.Rational(1, 3), sympy.sqrt(2)
    cases = [("0.333333", third, True), ("0.33333", third, False), ("0.3333334", third, True),
             ("0.3333", third, False), ("1.414214", root2, True), ("1.414213", root2, True),  # truncated
             ("1.414215", root2, False), ("0.125", sympy.Rational(1, 8), True), ("0.13", sympy.Rational(1, 8), False),
             ("0.1250001", sympy.Rational(1, 8), False), ("204.0000001", sympy.Integer(204), False),
             ("0.15", sympy.Float("0.15"), True), ("0.150", sympy.Float("0.15"), True)]
    for text, gold, want in cases:
        assert decimal_verdict(*decimal_literal(text), gold, 6) is want, text
    assert decimal_verdict(*decimal_literal("1.5"), sympy.Symbol("x"), 6) is None


def test_aime_policy_rejects_golds_that_are_not_integers_0_to_999():
    res = reward.score_batch([("aime24", trace("25"), "025"), ("aime24", trace("336"), "336^\\circ"),
                              ("aime24", trace("1234"), "1234"), ("aime24", trace("0.5"), "\\frac{1}{2}"),
                              ("math", trace("1234"), "1234")])
    assert [(r["acc"], r["reason"]) for r in res] == [(1.0, "ok"), (1.0, "ok"), (0.0, "gold_unparseable"),
                                                      (0.0, "gold_unparseable"), (1.0, "ok")]
    ex = reward.reward_stats()["gold_unparseable_examples"]
    assert any("not an integer in [0, 999]" in e and "aime" in e for e in ex)
    assert reward.compute_score("x", trace("5"), "1234", policy="aime")["reason"] == "gold_unparseable"
    with pytest.raises(ValueError, match="policy"):
        reward.compute_score("x", trace("5"), "5", policy="hmmt")


def test_a_letter_gold_is_compared_with_the_label():
    assert reward.compute_score("math", trace("\\textbf{(C)}\\ 27"), "\\text{(C)}")["acc"] == 1.0
    assert reward.compute_score("math", trace("\\textbf{(D)}\\ 27"), "\\text{(C)}")["acc"] == 0.0
    assert reward.compute_score("amc", trace("\\textbf{(C)}"), "27")["acc"] == 0.0  # a bare letter: no value


def test_ordered_tuple_gold_reads_a_bare_list_in_order():
    assert reward.compute_score("m", trace("6, 31, -1"), "(6,31,-1)")["acc"] == 1.0
    assert reward.compute_score("m", trace("-1, 31, 6"), "(6,31,-1)")["acc"] == 0.0
    assert reward.compute_score("m", trace("-1, 31, 6"), "6,31,-1")["acc"] == 1.0  # an unordered gold


def _verl_math_verify():
    """verl 0.9.1's math_verify reward module, loaded from its file (importing verl itself takes seconds)."""
    spec = importlib.util.find_spec("verl")
    path = Path(spec.origin).parent / "utils" / "reward_score" / "math_verify.py"
    mod_spec = importlib.util.spec_from_file_location("_verl_math_verify", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return mod


def test_plain_mode_is_verls_math_verify_reward():
    verl_mv = _verl_math_verify()
    golds = ["3375", "\\frac{4}{9}", "(-\\infty,3]", "27", "\\frac{1}{576}", "5", "(6,31,-1)", "90^\\circ"]
    answers = ["3\\,375", "3375", "0.\\overline{4}", "\\frac49", "x \\le 3", "(-\\infty, 3]", "(C)\\ 27", "27",
               "0.001736", "5\\%", "-1,31,6", "90"]
    pairs = [(g, trace(a)) for g in golds for a in answers[:: 1 + len(g) % 3]]
    ours = [check_answer(text, (g,), "plain")[1] for g, text in pairs]
    theirs = [verl_mv._verify_in_subprocess("\\boxed{" + g + "}", text) == 1.0 for g, text in pairs]
    assert ours == theirs
    assert any(ours) and not all(ours)
