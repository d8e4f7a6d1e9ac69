"""Every process a run starts, found by its environment and ended: no child outlives its run.

    python -m eksft_pipeline ...                     # the orchestrator sets the variables below
    python -m eksft_pipeline.pipeline.procs watch T  # the watchdog it starts (never run by hand)

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
* `Watchdog` -- a tiny process in a session of its own that holds the read end of a pipe from the
  orchestrator. When the orchestrator dies in any way (kill -9 of its process group included, which the
  watchdog survives because it is in another session), the pipe reaches EOF and the watchdog ends every
  process with the invocation's token, marks the stages it left `running` as `killed`, then exits. Direct children (torchrun, main_ppo) stay in the
  orchestrator's process group, so a group kill reaches them at once.
* `survivors` -- a re-run looks for processes of an earlier attempt of the same stage in the same run
  directory (e.g. the watchdog was killed too) and ends them before it starts, so two trainers never
  share one checkpoint folder.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
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


class Watchdog:
    """Ends every process carrying `token` once this process is gone (however it died), then marks the
    stages the dead orchestrator left `running` in `run_dir`'s manifest as `killed`."""

    def __init__(self, token: str, run_dir: str | os.PathLike | None = None):
        self.token = token
        env = {k: v for k, v in os.environ.items() if k not in (ENV_TOKEN, ENV_RUN_DIR, ENV_STAGE)}
        me = f"{os.getpid()}:{start_time(os.getpid())}"
        extra = [str(run_dir)] if run_dir is not None else []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "eksft_pipeline.pipeline.procs", "watch", token, me, *extra],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True, close_fds=True, env=env,
        )

    def close(self, timeout_s: float = 30.0) -> None:
        """Normal exit: let it sweep (ends leftovers, e.g. a Ray worker still shutting down) and wait."""
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _watch(token: str, parent: str, run_dir: str | None = None) -> int:
    """Wait for EOF on stdin (the orchestrator closed it, or died) -- or for the orchestrator to be gone while a
    child it forked still holds the pipe open -- then sweep."""
    import select

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # only the orchestrator's end ends the watch
        signal.signal(sig, signal.SIG_IGN)
    pid, started = (int(x) if x.isdigit() else None for x in parent.split(":"))
    fd = sys.stdin.fileno()
    while True:
        try:
            ready, _, _ = select.select([fd], [], [], 0.5)
            if ready and not os.read(fd, 4096):
                break
        except OSError:
            break
        if pid is not None and not alive(pid, started):
            break
    ended = end_processes({ENV_TOKEN: token}, grace_s=2.0)
    if run_dir is not None:
        _mark_killed(run_dir, token, len(ended))
    return 0


def _mark_killed(run_dir: str, token: str, n_ended: int) -> None:
    """The orchestrator died without recording it (kill -9, OOM killer): say so in the manifest."""
    from eksft_pipeline.pipeline.manifest import Manifest, _now

    try:
        m = Manifest(run_dir)
        if not m.path.exists():
            return
        with m._locked():
            data = m.read()
            hit = False
            for e in data["stages"].values():
                if e.get("status") == "running" and e.get("run_token") == token:
                    e.update(status="killed", finished=_now(),
                             error=f"the orchestrator died (kill -9, OOM killer, ...); its watchdog ended {n_ended} "
                                   "process(es) of the run")
                    hit = True
            if hit:
                m._write(data)
    except Exception:  # noqa: BLE001 - best effort: a re-run treats a dead 'running' entry the same way
        pass


if __name__ == "__main__":
    if len(sys.argv) in (4, 5) and sys.argv[1] == "watch":
        sys.exit(_watch(sys.argv[2], sys.argv[3], sys.argv[4] if len(sys.argv) == 5 else None))
    sys.exit("internal: started by the orchestrator (eksft_pipeline.pipeline.runner)")
