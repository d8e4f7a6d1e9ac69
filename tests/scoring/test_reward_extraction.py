"""Answer extraction in the caller process: last box, brace matching, think tags, sanitising (no sympy here)."""

from __future__ import annotations

import time

import pytest

from eksft_pipeline.scoring.answer import (
    answer_region,
    brace_depth,
    last_boxed,
    normalize_answer,
    sanitize_text,
)


@pytest.mark.parametrize(
    "text,expected",
    [
        ("so \\boxed{204}.", "204"),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", "\\left( 3, \\frac{\\pi}{2} \\right)"),
        ("\\boxed{{a}{b{c}}}", "{a}{b{c}}"),  # nested groups
        ("first \\boxed{1} then \\boxed{2} finally \\boxed{3}", "3"),  # last box wins
        ("\\boxed{1} and \\fbox{7}", "7"),  # \fbox counts as a box
        ("\\fbox{7} and \\boxed{8}", "8"),
        ("\\boxed {42}", "42"),  # whitespace before the group
        ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),  # escaped braces are literals
        ("\\boxed{a \\\\{b}}", "a \\\\{b}"),  # \\ is a line break, the { after it opens a group
        ("\\boxed{}", ""),
        ("\\boxed{\\boxed{5}}", "5"),  # the inner box starts last
        ("\\boxed{3} \\boxedfoo{4}", "3"),  # \boxedfoo is another command
    ],
)
def test_last_boxed_content(text, expected):
    assert last_boxed(text) == (expected, "ok")


@pytest.mark.parametrize(
    "text",
    [
        "no box here, the answer is 5",
        "\\boxed 5",  # a box without a group is not extracted
        "earlier \\boxed{4}, later \\boxed{5",  # the last box is unclosed: no answer, not the earlier one
        "\\boxed{\\}",  # the only brace closing it is escaped
    ],
)
def test_last_boxed_no_answer(text):
    assert last_boxed(text) == (None, "no_answer")


def test_last_boxed_length_cap_stops_early():
    big = "\\boxed{" + "1" * 100_000 + "}"
    assert last_boxed(big, max_chars=1000) == (None, "pred_too_long")
    assert last_boxed(big)[0] == "1" * 100_000
    exact = "\\boxed{" + "x" * 1000 + "}"
    assert last_boxed(exact, max_chars=1000) == ("x" * 1000, "ok")
    assert last_boxed(exact, max_chars=999) == (None, "pred_too_long")


def test_extraction_cost_is_bounded_on_huge_inputs():
    cases = [
        "\\boxed{" + "{" * 50_000 + "}" * 50_000 + "}",  # 50k nested braces
        "\\boxed{" * 20_000,  # 20k unclosed boxes
        "x" * 1_000_000 + "\\boxed{1}",
        "\\boxed" * 100_000,  # boxes without groups
    ]
    t = time.perf_counter()
    for c in cases:
        last_boxed(c, max_chars=1000)
        brace_depth(c[:2000])
    assert time.perf_counter() - t < 2.0


def test_answer_region_think_handling():
    trace = "<think>\nmaybe \\boxed{1}\n</think>\nThe answer is \\boxed{2}."
    assert answer_region(trace) == "\nThe answer is \\boxed{2}."
    assert last_boxed(answer_region(trace))[0] == "2"
    # the box inside the reasoning does not count once the thinking is closed
    closed_no_answer = "<think>\\boxed{1}</think> I am not sure."
    assert last_boxed(answer_region(closed_no_answer)) == (None, "no_answer")
    # several </think>: text after the last one
    assert answer_region("a</think>b</think>c") == "c"
    # no think tags at all: the whole text
    assert answer_region("plain \\boxed{3}") == "plain \\boxed{3}"
    # unclosed reasoning: whole text by default, no answer when a close tag is required
    cut = "<think> so \\boxed{7}"
    assert answer_region(cut) == cut
    assert answer_region(cut, require_think_close=True) is None
    # after_think=False ignores the tags
    assert answer_region(trace, after_think=False) == trace


def test_sanitize_text():
    assert sanitize_text(b"\\boxed{5}\xff\xfe") == "\\boxed{5}\ufffd\ufffd"
    s = sanitize_text("a\ud800b")  # lone surrogate
    assert s == "a\ufffdb"
    s.encode("utf-8")  # encodable now
    assert sanitize_text("plain") == "plain"
    assert sanitize_text(12) == "12"


def test_normalize_and_depth():
    assert normalize_answer("  \\frac{1}{2}\n ") == "\\frac{1}{2}"
    assert normalize_answer("3 \t\n \\sqrt{2}") == "3 \\sqrt{2}"
    assert brace_depth("\\frac{\\sqrt{3}}{2}") == 2
    assert brace_depth("{{{1}}}") == 3
    assert brace_depth("\\{1\\}") == 0
    assert brace_depth("}}{") == 1
