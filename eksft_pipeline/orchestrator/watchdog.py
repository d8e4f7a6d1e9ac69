"""The orchestrator's watchdog: ends a run's processes and records `killed` in the manifest when the orchestrator dies.

    python -m eksft_pipeline.orchestrator.watchdog watch TOKEN PID:START [RUN_DIR]   # started by the runner, never by hand

A tiny process in a session of its own that holds the read end of a pipe from the orchestrator. When the
orchestrator dies in any way (kill -9 of its process group included, which the watchdog survives because it is in
another session), the pipe reaches EOF and the watchdog ends every process with the invocation's token
(`procs.end_processes`), marks the stages it left `running` as `killed` (`manifest.Manifest`), then exits.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from eksft_pipeline.contract.manifest import Manifest, _now
from eksft_pipeline.contract.procs import ENV_RUN_DIR, ENV_STAGE, ENV_TOKEN, alive, end_processes, start_time


class Watchdog:
    """Ends every process carrying `token` once this process is gone (however it died), then marks the
    stages the dead orchestrator left `running` in `run_dir`'s manifest as `killed`."""

    def __init__(self, token: str, run_dir: str | os.PathLike | None = None):
        self.token = token
        env = {k: v for k, v in os.environ.items() if k not in (ENV_TOKEN, ENV_RUN_DIR, ENV_STAGE)}
        me = f"{os.getpid()}:{start_time(os.getpid())}"
        extra = [str(run_dir)] if run_dir is not None else []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "eksft_pipeline.orchestrator.watchdog", "watch", token, me, *extra],
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
    sys.exit("internal: started by the orchestrator (eksft_pipeline.orchestrator.runner)")
