"""The math reward end to end: real AIME/AMC golds, LaTeX forms, reasons, counters, cache, threads, processes."""

from __future__ import annotations

import multiprocessing
import subprocess
import sys
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eksft_pipeline.scoring import reward
from eksft_pipeline.scoring.verify import check_answer

KEYS = {"score", "acc", "pred", "reason", "verify_failed"}


def trace(answer: str) -> str:
    """An R1-style completion whose final answer is ``\\boxed{answer}``; a decoy box sits in the thinking."""
    return (
        "<think>\nLet me compute. Maybe it is \\boxed{-12345}? Wait, check again: "
        "$\\frac{a}{b} = 3$, so the sum telescopes.\n</think>\n\n"
        f"Putting it together, the answer is $\\boxed{{{answer}}}$."
    )


@pytest.fixture(autouse=True)
def _fresh_counters():
    reward.reset_reward_stats()
    reward.clear_cache()
    yield


# ------------------------------------------------------------------------------ real gold answers


def _aime_amc_golds(path) -> list[tuple[str, str]]:
    import pandas as pd

    df = pd.read_parquet(path, columns=["data_source", "reward_model"])
    df = df[df.data_source.isin(["aime", "aime25", "amc"])]
    pairs = {(ds, str(rm["ground_truth"])) for ds, rm in zip(df.data_source, df.reward_model)}
    assert len(pairs) >= 90, f"expected ~104 distinct AIME/AIME25/AMC golds, found {len(pairs)}"
    return sorted(pairs)


def _forms(gold: str) -> tuple[list[str], list[str]]:
    """Equivalent and wrong LaTeX forms of an integer gold ("025", "142.0", "-4.0", "336^\\circ")."""
    deg = gold.endswith("^\\circ")
    v = int(float(gold.removesuffix("^\\circ")))
    right = [str(v), f"{v}.0", f" {v} ", f"{{{v}}}"]
    if v >= 0:  # math-verify reads \text{-1} as text, not as -1
        right += [f"\\text{{{v}}}", f"\\mathbf{{{v}}}", f"\\textbf{{{v}}}"]
    if 0 <= v < 1000:
        right.append(f"{v:03d}")  # AIME answers are often written with leading zeros
    if deg:
        right += [f"{v}^\\circ", f"{v}^{{\\circ}}"]
    wrong = [str(v + 1), str(v - 1), f"{v}.5", str(10 * v + 1)]
    if v != 0:
        wrong += [f"\\frac{{{v}}}{{7}}", f"{v}\\sqrt{{2}}"]
    return right, wrong


def test_real_aime_amc_golds_in_many_forms(shared_eval_parquet):
    golds = _aime_amc_golds(shared_eval_parquet)
    items, expect = [], []
    for ds, gold in golds:
        right, wrong = _forms(gold)
        for f in right:
            items.append((ds, trace(f), gold))
            expect.append(1.0)
        for f in wrong:
            items.append((ds, trace(f), gold))
            expect.append(0.0)
    res = reward.score_batch(items)
    bad = [(it[2], r["pred"], r["reason"], e) for it, r, e in zip(items, res, expect) if r["acc"] != e]
    assert not bad, bad[:10]
    assert all(set(r) == KEYS for r in res)
    assert all(r["score"] == (1.0 if e else -1.0) for r, e in zip(res, expect))
    assert all(r["reason"] == "ok" for r in res)
    st_ = reward.reward_stats()
    assert st_["items"] == len(items) and st_["correct"] == sum(expect)
    assert st_["by_reason"]["gold_unparseable"] == 0 and st_["by_reason"]["error"] == 0
    assert st_["int_fast_path"] > 0 and st_["verify_calls"] > 0  # both routes were exercised


MATH_CASES = [
    # gold, forms math-verify 0.9.0 treats as equal, forms it does not
    (
        "\\frac{1}{2}",
        ["\\frac{1}{2}", "0.5", "\\dfrac12", "\\dfrac{1}{2}", "1/2", "\\tfrac{1}{2}", "2^{-1}"],
        ["\\frac{1}{3}", "0.51", "2", "-\\frac{1}{2}"],
    ),
    (
        "\\left( 3, \\frac{\\pi}{2} \\right)",
        ["(3, \\frac{\\pi}{2})", "\\left(3,\\dfrac{\\pi}{2}\\right)", "(3,\\pi/2)"],
        ["(3, \\pi)", "(\\frac{\\pi}{2}, 3)", "3"],
    ),
    ("3\\sqrt{13}", ["3\\sqrt{13}", "\\sqrt{117}", "3 \\sqrt{13}"], ["3\\sqrt{12}", "\\sqrt{13}"]),
    ("6 - 5i", ["6-5i", "-5i+6"], ["6+5i", "5-6i"]),
    ("\\$36", ["36", "\\$36", "36.00"], ["37", "3.6"]),
    ("\\frac{14}{3}", ["\\frac{14}{3}", "4\\frac{2}{3}", "14/3"], ["\\frac{3}{14}", "4.6"]),
    ("x=5", ["x=5", "5"], ["x=6", "y"]),
]


@pytest.mark.parametrize("gold,right,wrong", MATH_CASES, ids=[c[0] for c in MATH_CASES])
def test_math_golds_equivalent_and_wrong_forms(gold, right, wrong):
    res = reward.score_batch([("math", trace(f), gold) for f in right + wrong])
    got = [r["acc"] for r in res]
    assert got == [1.0] * len(right) + [0.0] * len(wrong), list(zip(right + wrong, got))


# ------------------------------------------------------------------------------ options and reasons


def test_scores_are_configurable():
    r = reward.compute_score("m", trace("0.5"), "\\frac{1}{2}", correct_score=2.0, wrong_score=0.25)
    assert (r["score"], r["acc"]) == (2.0, 1.0)
    r = reward.compute_score("m", trace("0.6"), "\\frac{1}{2}", correct_score=2.0, wrong_score=0.25)
    assert (r["score"], r["acc"]) == (0.25, 0.0)
    r = reward.compute_score("m", "nothing", "1", wrong_score=0.0)
    assert (r["score"], r["reason"]) == (0.0, "no_answer")


def test_bad_options_raise_but_verl_extras_are_accepted():
    with pytest.raises(TypeError, match="corect_score"):
        reward.compute_score("m", trace("1"), "1", corect_score=1.0)
    with pytest.raises(ValueError, match="extraction"):
        reward.compute_score("m", trace("1"), "1", extraction="regex")
    with pytest.raises(ValueError, match="timeout_s"):
        reward.compute_score("m", trace("1"), "1", timeout_s=0)
    with pytest.raises(TypeError, match="after_think"):
        reward.compute_score("m", trace("1"), "1", after_think="no")
    with pytest.raises(TypeError, match="max_pred_chars"):
        reward.compute_score("m", trace("1"), "1", max_pred_chars="many")
    r = reward.compute_score("m", trace("1"), "1", extra_info={"index": 3}, reward_router_address=None)
    assert r["acc"] == 1.0
    r = reward.compute_score("m", trace("1"), "1", correct_score=2, max_pred_chars="50")  # coerced
    assert r["score"] == 2.0 and isinstance(r["score"], float)


@pytest.mark.parametrize(
    "completion,gold,kwargs,reason",
    [
        ("the answer is 5", "5", {}, "no_answer"),
        (trace(""), "5", {}, "no_answer"),  # \boxed{}
        ("<think>... \\boxed{5}", "5", {"require_think_close": True}, "no_answer"),
        ("so \\boxed{5", "5", {}, "no_answer"),
        (None, "5", {}, "no_answer"),
        (trace("1" * 50), "5", {"max_pred_chars": 20}, "pred_too_long"),
        (trace("{" * 12 + "5" + "}" * 12), "5", {}, "pred_too_deep"),
        (trace("\\frac{}"), "5", {}, "pred_unparseable"),
        (trace("5"), "\\frac{", {}, "gold_unparseable"),
        (trace("\\frac{1}{2}"), "", {}, "gold_unparseable"),
        (trace("\\frac{1}{2}"), None, {}, "gold_unparseable"),
    ],
)
def test_reasons_are_reported_and_counted(completion, gold, kwargs, reason):
    r = reward.compute_score("src", completion, gold, **kwargs)
    assert set(r) == KEYS  # same keys for every outcome (verl builds its arrays from the first sample's keys)
    assert (r["reason"], r["acc"], r["score"]) == (reason, 0.0, -1.0)
    assert r["verify_failed"] == (1.0 if reason == "gold_unparseable" else 0.0)
    st_ = reward.reward_stats()
    assert st_["by_reason"][reason] == 1 and st_["items"] == 1
    if reason == "gold_unparseable":
        assert st_["gold_unparseable_examples"], "the offending gold must be recorded"


def test_think_tag_decides_which_box_counts():
    gold = "\\frac{1}{2}"
    closed = "<think>it is \\boxed{\\frac{1}{2}}</think> final: \\boxed{\\frac{1}{3}}"
    assert reward.compute_score("m", closed, gold)["acc"] == 0.0
    assert reward.compute_score("m", closed, gold, after_think=False)["acc"] == 0.0  # last box is still 1/3
    inside_only = "<think>it is \\boxed{0.5}</think> so that is it."
    assert reward.compute_score("m", inside_only, gold)["reason"] == "no_answer"
    assert reward.compute_score("m", inside_only, gold, after_think=False)["acc"] == 1.0


def test_math_verify_extraction_mode():
    r = reward.compute_score("m", "<think>x</think> The answer is $\\frac{1}{2}$.", "0.5", extraction="math_verify")
    assert (r["acc"], r["reason"]) == (1.0, "ok")
    assert "frac{1}{2}" in r["pred"]
    r = reward.compute_score("m", "<think>x</think> I give up.", "0.5", extraction="math_verify")
    assert (r["acc"], r["reason"]) == (0.0, "pred_unparseable")


def test_list_golds_and_item_dicts():
    res = reward.score_batch(
        [
            {"data_source": "m", "solution_str": trace("7"), "ground_truth": ["3", "7"]},
            {"data_source": "m", "solution_str": trace("\\frac{1}{2}"), "ground_truth": ("0.5",)},
            ("m", trace("4"), ["3", "7"]),
        ]
    )
    assert [r["acc"] for r in res] == [1.0, 1.0, 0.0]
    with pytest.raises(KeyError, match="solution_str"):
        reward.score_batch([{"ground_truth": "1"}])
    with pytest.raises(TypeError, match="score_batch item"):
        reward.score_batch(["just a string"])


# ------------------------------------------------------------------------------ cache


def test_cache_dedup_and_hits():
    batch = [("m", trace("\\dfrac{1}{2}"), "0.5")] * 5 + [("m", trace("0.25"), "0.5")] * 3
    res = reward.score_batch(batch)
    assert [r["acc"] for r in res] == [1.0] * 5 + [0.0] * 3
    s1 = reward.reward_stats()
    assert (s1["verify_calls"], s1["dedup_hits"], s1["cache_hits"], s1["cache_misses"]) == (2, 6, 0, 2)
    reward.score_batch(batch)
    s2 = reward.reward_stats()
    assert s2["verify_calls"] == 2 and s2["cache_hits"] == 8  # the second pass never reached a worker
    # whitespace-only differences share an entry
    reward.compute_score("m", trace("\\dfrac{1}{2}  "), "0.5")
    assert reward.reward_stats()["cache_hits"] == 9
    # without the cache every sample is verified
    reward.score_batch(batch, use_cache=False)
    assert reward.reward_stats()["verify_calls"] == 2 + 8


def test_cache_is_keyed_on_the_gold_too():
    pred = trace("\\frac{1}{2}")
    first = reward.score_batch([("m", pred, "0.5"), ("m", pred, "\\frac{1}{3}")])
    again = reward.score_batch([("m", pred, "\\frac{1}{3}"), ("m", pred, "0.5")])
    assert [r["acc"] for r in first] == [1.0, 0.0]
    assert [r["acc"] for r in again] == [0.0, 1.0]
    assert reward.reward_stats()["cache_hits"] == 2


def test_cache_is_a_bounded_lru():
    old = reward._cache.maxsize
    try:
        reward.configure(cache_size=3)
        preds = [f"\\frac{{1}}{{{d}}}" for d in range(2, 7)]  # five distinct pairs
        reward.score_batch([("m", trace(p), "0.5") for p in preds])
        assert len(reward._cache) == 3
        reward.compute_score("m", trace(preds[-1]), "0.5")  # newest: still cached
        assert reward.reward_stats()["cache_hits"] == 1
        reward.compute_score("m", trace(preds[0]), "0.5")  # oldest: evicted
        assert reward.reward_stats()["cache_hits"] == 1
        with pytest.raises(ValueError, match="cache_size"):
            reward.configure(cache_size=0)
    finally:
        reward.configure(cache_size=old)


@settings(max_examples=60, deadline=None)
@given(
    a=st.integers(-(10**12), 10**12),
    b=st.integers(-(10**12), 10**12),
    fmt_a=st.sampled_from(["{}", "{}.0", "{}.000", "0{}"]),
    fmt_b=st.sampled_from(["{}", "{}.0", "00{}"]),
    same=st.booleans(),
)
def test_integer_fast_path_agrees_with_math_verify(a, b, fmt_a, fmt_b, same):
    if same:
        b = a
    pa = fmt_a.format(a) if a >= 0 or not fmt_a.startswith("0") else fmt_a[1:].format(a)
    pb = fmt_b.format(b) if b >= 0 or not fmt_b.startswith("0") else fmt_b[2:].format(b)
    fast = reward._int_fast_path(pa, pb)
    assert fast is not None
    status, ok, _ = check_answer(pa, (pb,))  # math-verify itself, in this process (timeouts disabled)
    assert status == "ok" and fast == ok, (pa, pb)


# ------------------------------------------------------------------------------ threads and processes


def test_raw_math_verify_with_default_timeout_fails_in_a_thread():
    """The trap this module avoids: math-verify's SIGALRM timeout raises off the main thread."""
    import math_verify

    errors = []

    def run():
        try:
            math_verify.parse("$\\frac{1}{2}$")  # default parsing_timeout=5 -> signal.alarm
        except ValueError as e:
            errors.append(e)

    t = threading.Thread(target=run)
    t.start()
    t.join()
    assert errors and "thread" in str(errors[0])


def test_compute_score_from_threads():
    out: dict[int, dict] = {}

    def run(i):
        d = i % 5 + 2
        out[i] = reward.compute_score("m", trace(f"\\dfrac{{1}}{{{d}}}" if i % 2 else "7"), f"\\frac{{1}}{{{d}}}")

    threads = [threading.Thread(target=run, args=(i,)) for i in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(out) == 24
    assert all(out[i]["acc"] == (1.0 if i % 2 else 0.0) for i in range(24))
    assert all(out[i]["reason"] == "ok" for i in range(24))


SNIPPET = """
from eksft_pipeline.scoring.reward import compute_score, reward_stats
r = compute_score("m", "<think>x</think> so \\\\boxed{\\\\dfrac{1}{2}}", "0.5")
assert r["acc"] == 1.0 and r["reason"] == "ok", r
print("OK", reward_stats()["verify_calls"])
"""


def test_compute_score_from_a_subprocess():
    p = subprocess.run([sys.executable, "-c", SNIPPET], capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.strip() == "OK 1"


def _score_in_child(gold: str) -> tuple[float, str]:
    r = reward.compute_score("m", trace("\\dfrac{1}{2}"), gold)
    return r["acc"], r["reason"]


def test_compute_score_in_a_daemonic_forked_pool_worker():
    # multiprocessing.Pool workers are daemonic (may not start multiprocessing children) and inherit this
    # process's warm pool object through fork; the child must start and use its own workers.
    reward.compute_score("m", trace("\\frac{1}{3}"), "0.5")  # make sure the parent's pool exists
    with multiprocessing.get_context("fork").Pool(1) as pool:
        got = pool.map(_score_in_child, ["0.5", "0.25"], chunksize=1)
    assert got == [(1.0, "ok"), (0.0, "ok")]
    # the parent's pool still works afterwards
    assert reward.compute_score("m", trace("\\dfrac{1}{4}"), "0.25")["acc"] == 1.0
