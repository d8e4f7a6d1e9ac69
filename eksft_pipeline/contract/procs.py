"""Every process a run starts, found by its environment and ended: no child outlives its run.

    python -m eksft_pipeline ...                     # the orchestrator sets the variables below
    python -m eksft_pipeline.orchestrator.watchdog watch T  # the watchdog it starts (never run by hand)

Why the environment and not the process tree: verl's trainers start Ray, and Ray's workers and actors are
children of the raylet in process groups of their own, so neither the process group nor the parent chain
reaches them. Every process inherits its parent's environment, Ray's included (raylet, GCS, dashboard,
workers, actors, the hf_cpu rollout server, the reward loop and its verifier subprocesses), so the
orchestrator puts three variables into the environment of everything it starts:

    EKSFT_RUN_TOKEN   a fresh id per orchestrator invocation
    EKSFT_RUN_DIR     the resolved run directory
    EKSFT_STAGE_KEY   the stage being run (e.g. "rl/eksft")

and finds processes by reading `/proc/<pid>/environ` (Linux; same user or root). Three things use that:

* `end_processes` -- SIGTERM, a grace period, then SIGKILL; repeated until nothing matches (a dying
  raylet may still start a worker). Used when a stage fails or is stopped (SIGTERM / SIGINT / SIGHUP).
* `Watchdog` (orchestrator/watchdog.py) -- a tiny process in a session of its own that holds the read end of a pipe from the
  orchestrator. When the orchestrator dies in any way (kill -9 of its process group included, which the
  watchdog survives because it is in another session), the pipe reaches EOF and the watchdog ends every
  process with the invocation's token, marks the stages it left `running` as `killed`, then exits. Direct children (the SFT driver, main_ppo) stay in the
  orchestrator's process group, so a group kill reaches them at once.
* `survivors` -- a re-run looks for processes of an earlier attempt of the same stage in the same run
  directory (e.g. the watchdog was killed too) and ends them before it starts, so two trainers never
  share one checkpoint folder.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterable, Mapping

ENV_TOKEN = "EKSFT_RUN_TOKEN"
ENV_RUN_DIR = "EKSFT_RUN_DIR"
ENV_STAGE = "EKSFT_STAGE_KEY"


def _environ(pid: int) -> dict[str, str] | None:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            raw = f.read()
    except OSError:  # gone, or not ours
        return None
    env = {}
    for item in raw.split(b"\0"):
        k, sep, v = item.partition(b"=")
        if sep:
            env[k.decode(errors="replace")] = v.decode(errors="replace")
    return env


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def start_time(pid: int) -> int | None:
    """Start time of `pid` in clock ticks since boot (field 22 of /proc/<pid>/stat): (pid, start) names one
    process for good, where a pid alone may be reused."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rfind(b")") + 2 :].split()
    return int(fields[19])


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return "X"
    return stat[stat.rfind(b")") + 2 :].split()[0].decode()


def alive(pid: int, started: int | None = None) -> bool:
    """`pid` runs (not a zombie) and, when `started` is given, is the process that started then."""
    st = _state(pid)
    if st in ("X", "Z"):
        return False
    return started is None or start_time(pid) == started


def _ancestors() -> set[int]:
    out, pid = set(), os.getpid()
    while pid > 1:
        out.add(pid)
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read()
            pid = int(stat[stat.rfind(b")") + 2 :].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return out


def find(match: Mapping[str, str], *, exclude_token: str | None = None) -> list[int]:
    """Live processes (never this one or its ancestors) whose environment has every NAME=value of `match`;
    `exclude_token` leaves out those of that invocation."""
    if not os.path.isdir("/proc"):  # not Linux: nothing to find (children then get sessions of their own)
        return []
    skip = _ancestors()
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) in skip:
            continue
        env = _environ(int(name))
        if not env or any(env.get(k) != v for k, v in match.items()):
            continue
        if exclude_token is not None and env.get(ENV_TOKEN) == exclude_token:
            continue
        if alive(int(name)):
            out.append(int(name))
    return sorted(out)


def _signal(pids: Iterable[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def end_processes(match: Mapping[str, str], *, grace_s: float = 5.0, rounds: int = 5,
                  exclude_token: str | None = None) -> list[int]:
    """End every process matching `match`: SIGTERM, up to `grace_s` to exit, then SIGKILL; repeated
    (new processes may appear while a tree dies). Returns the pids that were signalled."""
    ended: list[int] = []
    for _ in range(rounds):
        pids = find(match, exclude_token=exclude_token)
        if not pids:
            break
        ended += [p for p in pids if p not in ended]
        _signal(pids, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and any(alive(p) for p in pids):
            time.sleep(0.1)
        _signal([p for p in pids if alive(p)], signal.SIGKILL)
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline and any(alive(p) for p in pids):
            time.sleep(0.05)
        grace_s = min(grace_s, 1.0)  # later rounds: stragglers, no second long wait
    return ended


def survivors(run_dir: str, key: str, current_token: str | None) -> list[int]:
    """Processes of an earlier attempt of stage `key` in `run_dir` (not of invocation `current_token`)."""
    return find({ENV_RUN_DIR: run_dir, ENV_STAGE: key}, exclude_token=current_token)


def describe(pids: Iterable[int], limit: int = 4) -> str:
    pids = list(pids)
    parts = [f"{p} ({cmdline(p)[:60] or '?'})" for p in pids[:limit]]
    return ", ".join(parts) + (f" and {len(pids) - limit} more" if len(pids) > limit else "")
