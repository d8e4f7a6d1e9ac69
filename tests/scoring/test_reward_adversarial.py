"""Adversarial completions are scored wrong within a bounded time, and the pool recovers after a kill."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eksft_pipeline.scoring import pool, reward

TIMEOUT_S = 1.0
# per-call bound with a warm pool: the wall-clock limit, plus waiting for a replacement worker's start-up
# (sympy import, a few seconds on a loaded 2-core runner) when the previous call killed one
BOUND_S = TIMEOUT_S + 30.0
REASONS = set(reward.REASONS)


@pytest.fixture(scope="module", autouse=True)
def _warm_pool():
    reward.compute_score("m", "\\boxed{\\frac{1}{2}}", "0.5")  # start the workers outside the timed calls
    yield


def timed(completion, gold="204", **kw):
    t = time.perf_counter()
    r = reward.compute_score("adv", completion, gold, timeout_s=TIMEOUT_S, use_cache=False, **kw)
    return r, time.perf_counter() - t


def test_power_tower_times_out_and_the_pool_recovers():
    reward.reset_reward_stats()
    r, dt = timed("\\boxed{9^{9^{9^{9}}}}")
    assert (r["reason"], r["acc"], r["score"], r["verify_failed"]) == ("timeout", 0.0, -1.0, 1.0)
    assert dt < TIMEOUT_S + 5.0  # the caller is released at the deadline, the kill is immediate
    st_ = reward.reward_stats()
    assert st_["by_reason"]["timeout"] == 1 and st_["worker_kills"] >= 1
    # the replacement worker answers the next item correctly
    r2, _ = timed("\\boxed{\\dfrac{408}{2}}")
    assert (r2["reason"], r2["acc"]) == ("ok", 1.0)


def test_timeouts_are_cached_so_a_repeat_does_not_kill_again():
    reward.clear_cache()
    reward.reset_reward_stats()
    for _ in range(2):
        r = reward.compute_score("adv", "\\boxed{8^{8^{8^{8}}}}", "5", timeout_s=TIMEOUT_S)
        assert r["reason"] == "timeout"
    st_ = reward.reward_stats()
    assert st_["verify_calls"] == 1 and st_["cache_hits"] == 1 and st_["worker_kills"] == 1


@pytest.mark.parametrize(
    "completion,reason",
    [
        ("x" * 100_000, "no_answer"),  # 100k characters, no box
        ("\\boxed{" + "7" * 100_000 + "}", "pred_too_long"),
        ("\\boxed{" + "{" * 10_000 + "1" + "}" * 10_000 + "}", "pred_too_long"),  # 10k nested braces
        ("\\boxed{" * 10_000, "no_answer"),  # 10k unclosed boxes: the last one is empty and unclosed
        ("\\boxed{}", "no_answer"),
        ("\\boxed{   }", "no_answer"),
        ("\\boxed{\\frac{}", "no_answer"),  # unbalanced: the box never closes
        (b"\\boxed{5}\xff\xfe\xfd", "ok"),  # non-UTF-8 bytes
        ("\\boxed{5\ud800}", "ok"),  # lone surrogate inside the answer
        ("\ud800\udc00\\boxed{\x00}", "pred_unparseable"),
    ],
)
def test_adversarial_inputs_are_scored_wrong_quickly(completion, reason):
    r, dt = timed(completion)
    assert r["reason"] == reason
    assert r["acc"] == 0.0 and r["score"] == -1.0
    assert dt < BOUND_S


def test_deep_nesting_is_rejected_before_sympy_even_with_a_large_length_cap():
    r, dt = timed("\\boxed{" + "{" * 10_000 + "1" + "}" * 10_000 + "}", max_pred_chars=100_000)
    assert r["reason"] == "pred_too_deep" and dt < 2.0


def test_non_string_inputs_do_not_crash():
    assert timed(12345)[0]["reason"] == "no_answer"
    assert timed(["\\boxed{1}"])[0]["reason"] in REASONS
    r, _ = timed("\\boxed{204}", gold=object())
    assert r["reason"] in REASONS and r["acc"] == 0.0


TOKENS = [
    "\\boxed{", "\\fbox{", "}", "{", "\\{", "\\}", "\\\\", "</think>", "<think>", "9^{", "^{", "\\frac{", "\\sqrt{",
    "\\left(", "\\right)", "\\pi", "1", "204", ",", "=", "$", "\\text{", "x", " ", "\n", "\x00", "\ud800", "é", "🙂",
    "\\infty", "\\cdot", "!", "10^{10^{", "\\begin{pmatrix}", "&", "\\end{pmatrix}",
]  # fmt: skip


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(parts=st.lists(st.sampled_from(TOKENS), max_size=60), gold=st.sampled_from(["204", "\\frac{1}{2}", "(1,2)"]))
def test_fuzzed_completions_always_return_a_bounded_result(parts, gold):
    r, dt = timed("".join(parts), gold=gold)
    assert set(r) == {"score", "acc", "pred", "reason", "verify_failed"}
    assert r["reason"] in REASONS
    assert r["score"] == (1.0 if r["acc"] == 1.0 else -1.0)
    assert r["acc"] == 0.0 or r["reason"] == "ok"
    assert dt < BOUND_S


def _killer(stop: threading.Event, period: float = 0.2) -> None:
    """SIGKILL every verifier worker of this process, again and again, until ``stop`` is set."""
    while not stop.wait(period):
        for pid in reward.worker_pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_a_worker_killed_once_is_retried_transparently():
    reward.reset_reward_stats()
    pids = set(reward.worker_pids())
    stop = threading.Event()
    t = threading.Thread(target=_killer, args=(stop, 0.5))
    t.start()
    time.sleep(0.7)  # one round of kills has happened
    stop.set()
    t.join()
    res = reward.score_batch(
        [("adv", f"\\boxed{{\\dfrac{{{5 * d}}}{{{d}}}}}", "5") for d in range(2, 8)], use_cache=False
    )
    assert [(r["acc"], r["reason"]) for r in res] == [(1.0, "ok")] * 6
    assert not pids & set(reward.worker_pids())
    assert reward.reward_stats()["by_reason"]["error"] == 0


def test_workers_that_keep_dying_give_a_counted_error_not_a_crash():
    reward.reset_reward_stats()
    stop = threading.Event()
    t = threading.Thread(target=_killer, args=(stop,))
    t.start()
    try:
        r = reward.compute_score("adv", "\\boxed{7^{7^{7^{7}}}}", "5", timeout_s=20.0, use_cache=False)
    finally:
        stop.set()
        t.join()
    assert (r["reason"], r["acc"], r["verify_failed"]) == ("error", 0.0, 1.0)
    st_ = reward.reward_stats()
    assert st_["by_reason"]["error"] == 1 and st_["error_examples"] and st_["worker_kills"] >= 1
    # once the killing stops, the pool recovers
    assert reward.compute_score("adv", "\\boxed{\\dfrac{10}{2}}", "5", use_cache=False)["acc"] == 1.0


def test_workers_that_cannot_start_give_counted_errors(monkeypatch):
    reward.shutdown_pool()
    monkeypatch.setattr(pool, "_WORKER_SCRIPT", "/nonexistent/answer.py")
    reward.reset_reward_stats()
    try:
        r = reward.compute_score("adv", "\\boxed{\\dfrac{10}{2}}", "5", use_cache=False)
        assert (r["reason"], r["verify_failed"]) == ("error", 1.0)
        assert reward.reward_stats()["by_reason"]["error"] == 1
    finally:
        reward.shutdown_pool()
        monkeypatch.undo()
    assert reward.compute_score("adv", "\\boxed{\\dfrac{10}{2}}", "5", use_cache=False)["acc"] == 1.0


ORPHAN = """
import sys, time
from eksft_pipeline.scoring import reward
reward.compute_score("m", "\\\\boxed{\\\\frac{1}{2}}", "0.5")
print(" ".join(map(str, reward.worker_pids())), flush=True)
time.sleep(120)
"""


def test_workers_exit_when_their_parent_is_killed():
    p = subprocess.Popen([sys.executable, "-c", ORPHAN], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        pids = [int(x) for x in p.stdout.readline().split()]
        assert len(pids) == 2
    finally:
        p.kill()
        p.wait()
    deadline = time.monotonic() + 15
    alive = pids
    while alive and time.monotonic() < deadline:
        time.sleep(0.2)
        alive = [pid for pid in alive if _alive(pid)]
    assert not alive, f"orphaned verifier workers {alive} still running"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie awaiting reaping by init counts as gone
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
