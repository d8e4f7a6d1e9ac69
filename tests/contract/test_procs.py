"""Processes found by their environment and ended: the orchestrator's children never outlive it.

The "children" here are small Python processes that behave like verl's: one in the orchestrator's process
group (torchrun / main_ppo), one in a session of its own (a Ray worker or actor, which a process-group kill
never reaches). Linux only (/proc).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid

import pytest

from eksft_pipeline.contract import procs

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc is Linux-only")

SLEEPER = "import time\nwhile True: time.sleep(0.2)"


def _marked(mark: str) -> list[int]:
    """Live processes whose environment carries the test's own marker (independent of the code under test)."""
    return procs.find({"EKSFT_TEST_MARK": mark})


def _wait_gone(mark: str, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    left = _marked(mark)
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = _marked(mark)
    return left


def test_end_processes_reaches_children_in_other_sessions():
    mark, token = uuid.uuid4().hex, uuid.uuid4().hex
    env = {**os.environ, "EKSFT_TEST_MARK": mark, procs.ENV_TOKEN: token, procs.ENV_STAGE: "rl/x"}
    kids = [subprocess.Popen([sys.executable, "-c", SLEEPER], env=env, start_new_session=s) for s in (False, True)]
    # one that ignores SIGTERM: must get SIGKILL after the grace period
    stubborn = subprocess.Popen([sys.executable, "-c", "import signal, time\nsignal.signal(signal.SIGTERM, "
                                 "signal.SIG_IGN)\nwhile True: time.sleep(0.2)"], env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while len(_marked(mark)) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert procs.find({procs.ENV_TOKEN: token}) == sorted(k.pid for k in [*kids, stubborn])
        assert procs.survivors("/nonexistent", "rl/x", current_token=None) == []  # wrong run dir: none
        assert procs.find({procs.ENV_TOKEN: token}, exclude_token=token) == []
        ended = procs.end_processes({procs.ENV_TOKEN: token, procs.ENV_STAGE: "rl/x"}, grace_s=0.5)
        assert sorted(ended) == sorted(k.pid for k in [*kids, stubborn])
        assert _marked(mark) == []
    finally:
        for k in [*kids, stubborn]:
            k.kill()
            k.wait()


def test_watchdog_ends_everything_after_kill9_of_the_orchestrator_group(tmp_path):
    """`kill -9 -<pgid>` of a fake orchestrator: its group dies at once, and its watchdog (own session) ends the
    child that sits in a session of its own (like a Ray worker) a moment later."""
    mark = uuid.uuid4().hex
    script = tmp_path / "orchestrator.py"
    script.write_text(textwrap.dedent(f"""
        import os, subprocess, sys, time, uuid
        from eksft_pipeline.contract import procs
        from eksft_pipeline.orchestrator import watchdog
        token = uuid.uuid4().hex
        os.environ[procs.ENV_TOKEN] = token
        w = watchdog.Watchdog(token)
        a = subprocess.Popen([sys.executable, "-c", {SLEEPER!r}])                          # same group
        b = subprocess.Popen([sys.executable, "-c", {SLEEPER!r}], start_new_session=True)  # like a Ray worker
        print(w.proc.pid, flush=True)
        time.sleep(600)
    """))
    env = {**os.environ, "EKSFT_TEST_MARK": mark}
    orch = subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        watchdog_pid = int(orch.stdout.readline())
        deadline = time.monotonic() + 20
        while len(_marked(mark)) < 4 and time.monotonic() < deadline:  # orchestrator, watchdog, 2 children
            time.sleep(0.05)
        assert len(_marked(mark)) == 4 and watchdog_pid in _marked(mark)
        os.killpg(orch.pid, signal.SIGKILL)
        orch.wait()
        left = _wait_gone(mark, timeout=10)
        assert left == [], f"survivors of the killed orchestrator: {procs.describe(left)}"
        deadline = time.monotonic() + 10
        while procs.alive(watchdog_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not procs.alive(watchdog_pid), "the watchdog must exit after its sweep"
    finally:
        for pid in _marked(mark):
            os.kill(pid, signal.SIGKILL)


def test_alive_tells_a_reused_pid_from_the_original():
    p = subprocess.Popen([sys.executable, "-c", SLEEPER])
    try:
        started = procs.start_time(p.pid)
        assert procs.alive(p.pid, started) and not procs.alive(p.pid, started + 1)
    finally:
        p.kill()
        p.wait()
    assert not procs.alive(p.pid)


def test_watchdog_also_notices_a_dead_orchestrator_whose_forked_child_holds_the_pipe(tmp_path):
    """A child forked (not exec'd) after the watchdog started keeps the pipe open: the watchdog must still act
    when the orchestrator itself is gone."""
    mark = uuid.uuid4().hex
    script = tmp_path / "orchestrator.py"
    script.write_text(textwrap.dedent("""
        import os, time
        from eksft_pipeline.contract import procs
        from eksft_pipeline.orchestrator import watchdog
        w = watchdog.Watchdog(os.environ[procs.ENV_TOKEN])
        if os.fork() == 0:  # a forked (not exec'd) child in a session of its own: holds the pipe's write end
            os.setsid()
            while True:
                time.sleep(0.2)
        print(w.proc.pid, flush=True)
        time.sleep(600)
    """))
    # the token in the orchestrator's own environment block, as `python -m eksft_pipeline` arranges it
    env = {**os.environ, "EKSFT_TEST_MARK": mark, procs.ENV_TOKEN: uuid.uuid4().hex}
    orch = subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        watchdog_pid = int(orch.stdout.readline())
        time.sleep(1.0)
        os.killpg(orch.pid, signal.SIGKILL)
        orch.wait()
        assert _wait_gone(mark, timeout=10) == []
        assert not procs.alive(watchdog_pid)
    finally:
        for pid in _marked(mark):
            os.kill(pid, signal.SIGKILL)
