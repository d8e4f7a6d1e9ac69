"""The verifier worker pool: ``n_workers`` long-lived ``python -P verify.py --serve`` processes, killable per item.

Why processes, and the time bound of a call: :mod:`eksft_pipeline.scoring.reward` (module docstring). A caller
checks out idle workers, hands them (prediction, gold, policy options) jobs grouped by gold
(:class:`_GoldQueues`), waits at most ``timeout_s`` per job, SIGKILLs and replaces a worker that overruns
(the job scores "timeout"), retries once a job whose worker died under it, and returns the workers.
Settings: ``EKSFT_REWARD_WORKERS`` (2), ``EKSFT_REWARD_STARTUP_TIMEOUT_S`` (120),
``EKSFT_REWARD_WORKER_MEM_MB`` (4096; 0 = no cap), or :func:`configure_pool`.
"""

from __future__ import annotations

import atexit
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from multiprocessing.connection import Connection, wait

from eksft_pipeline.scoring import verify as _verify
from eksft_pipeline.scoring.answer import ERROR, TIMEOUT
from eksft_pipeline.scoring.stats import _bump, logger

_WORKER_SCRIPT = os.path.abspath(_verify.__file__)


class _Worker:
    """One verifier process and its two pipe ends (parent side)."""

    def __init__(self, memory_limit_mb: int, startup_timeout_s: float):
        c_read, p_write = os.pipe()  # parent -> child
        p_read, c_write = os.pipe()  # child -> parent
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-P", _WORKER_SCRIPT, "--serve", str(c_read), str(c_write), str(memory_limit_mb)],
                pass_fds=(c_read, c_write),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                close_fds=True,
            )
        except BaseException:
            for fd in (c_read, p_write, p_read, c_write):
                os.close(fd)
            raise
        os.close(c_read)
        os.close(c_write)
        self.send_conn = Connection(p_write, readable=False)
        self.recv_conn = Connection(p_read, writable=False)
        self.ready = False
        self.startup_deadline = time.monotonic() + startup_timeout_s
        _bump("worker_starts")

    def kill(self) -> None:
        try:
            self.proc.kill()
            self.proc.wait(timeout=10)
        except Exception:  # already gone / unkillable: nothing more to do
            pass
        for c in (self.send_conn, self.recv_conn):
            try:
                c.close()
            except OSError:
                pass

    def close(self) -> None:
        try:
            self.send_conn.send(None)
        except (OSError, ValueError):
            pass
        try:
            self.proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            pass
        self.kill()


class _GoldQueues:
    """Pending jobs grouped by gold, handed out with gold affinity.

    A worker keeps taking jobs of the gold it last worked on (its parse of that gold is cached), then
    starts a gold nobody has touched, and only then helps with the gold that has most jobs left. With
    16 samples per prompt this parses each gold about once instead of once per worker.
    """

    def __init__(self, jobs: Sequence[tuple[str, tuple[str, ...], str, tuple]]):
        self._groups: dict[tuple, list[int]] = {}
        for j in range(len(jobs) - 1, -1, -1):  # reversed: list.pop() yields jobs in input order
            self._groups.setdefault(jobs[j][1], []).append(j)
        self._fresh = list(self._groups)  # golds not started yet (stack: pop() gives the earliest)
        self._current: dict[int, tuple] = {}  # id(worker) -> gold it works on
        self._n = len(jobs)

    def __bool__(self) -> bool:
        return self._n > 0

    def take(self, worker: object) -> int:
        gold = self._current.get(id(worker))
        if gold is None or not self._groups.get(gold):
            while self._fresh and not self._groups.get(self._fresh[-1]):
                self._fresh.pop()
            if self._fresh:
                gold = self._fresh.pop()
            else:
                gold = max(self._groups, key=lambda g: len(self._groups[g]))
            self._current[id(worker)] = gold
        self._n -= 1
        j = self._groups[gold].pop()
        if not self._groups[gold]:
            del self._groups[gold]
        return j

    def put_back(self, j: int, gold: tuple) -> None:
        """Return job ``j`` (not run: its worker was found dead) to the front of its gold's queue."""
        if gold not in self._groups:
            self._groups[gold] = []
            self._fresh.append(gold)
        self._groups[gold].append(j)
        self._n += 1

    def drain(self) -> list[int]:
        out = [j for js in self._groups.values() for j in js]
        self._groups.clear()
        self._n = 0
        return out


class _Pool:
    """``n_workers`` verifier processes; a caller checks out idle workers, uses them, returns them."""

    def __init__(self, n_workers: int, startup_timeout_s: float, memory_limit_mb: int):
        self.n_workers = n_workers
        self.startup_timeout_s = startup_timeout_s
        self.memory_limit_mb = memory_limit_mb
        self.pid = os.getpid()
        self._cond = threading.Condition()
        self._idle: list[_Worker] = [self._new_worker() for _ in range(n_workers)]
        self._all: set[_Worker] = set(self._idle)
        self.closed = False

    def _new_worker(self) -> _Worker:
        return _Worker(self.memory_limit_mb, self.startup_timeout_s)

    def _checkout(self, want: int) -> list[_Worker]:
        """Take up to ``want`` idle workers, blocking until at least one is idle.

        Workers lost earlier (killed and not restartable at the time) are re-created here, so waiters
        cannot hang on a pool that shrank; if a process cannot be started this raises (-> "error").
        """
        with self._cond:
            while not self._idle:
                if len(self._all) < self.n_workers:
                    w = self._new_worker()
                    self._all.add(w)
                    self._idle.append(w)
                    break
                self._cond.wait(timeout=1.0)
            return [self._idle.pop() for _ in range(min(want, len(self._idle)))]

    def _checkin(self, workers: Iterable[_Worker]) -> None:
        with self._cond:
            for w in workers:
                if self.closed:
                    w.close()
                else:
                    self._idle.append(w)
            self._cond.notify_all()

    def _replace(self, w: _Worker) -> _Worker | None:
        w.kill()
        _bump("worker_kills")
        with self._cond:
            self._all.discard(w)
        try:
            nw = self._new_worker()
        except Exception as e:  # cannot start processes any more: callers get "error"
            logger.error("reward: cannot start a verifier worker: %s", e)
            return None
        with self._cond:
            self._all.add(nw)
        return nw

    def run(self, jobs: Sequence[tuple[str, tuple[str, ...], str, tuple]], timeout_s: float) -> list[tuple[str, bool, str]]:
        """Verify ``jobs`` (``(pred, golds, mode, opts)``) on as many idle workers as there are (at least one)."""
        results: list[tuple[str, bool, str] | None] = [None] * len(jobs)
        if not jobs:
            return []
        workers = self._checkout(len(jobs))
        pending = _GoldQueues(jobs)
        busy: dict[Connection, tuple[_Worker, int, float]] = {}  # recv_conn -> (worker, job, deadline)
        starting: dict[Connection, _Worker] = {}
        free: list[_Worker] = []
        attempts: dict[int, int] = {}  # job -> times its worker died under it
        for w in workers:
            if w.proc.poll() is not None:  # died while idle: replace before use
                w = self._replace(w)
                if w is None:
                    continue
            if w.ready:
                free.append(w)
            else:
                starting[w.recv_conn] = w
        try:
            while pending or busy:
                # hand out work to free, ready workers
                while free and pending:
                    w = free.pop()
                    j = pending.take(w)
                    try:
                        w.send_conn.send((j, *jobs[j]))
                    except (OSError, ValueError) as e:
                        # the worker died while idle (killed from outside): the job never ran
                        self._retry_or_fail(j, jobs, attempts, pending, results, f"send failed: {e}")
                        nw = self._replace(w)
                        if nw is not None:
                            starting[nw.recv_conn] = nw
                        continue
                    busy[w.recv_conn] = (w, j, time.monotonic() + timeout_s)
                if not busy and not starting:
                    # every worker died and none could be restarted
                    for j in pending.drain():
                        results[j] = (ERROR, False, "no verifier worker available")
                    break
                if not busy and not pending:
                    break
                now = time.monotonic()
                deadlines = [d for (_, _, d) in busy.values()] + [w.startup_deadline for w in starting.values()]
                ready_conns = wait(list(busy) + list(starting), timeout=max(0.0, min(deadlines) - now))
                for c in ready_conns:
                    if c in starting:
                        w = starting.pop(c)
                        try:
                            msg = c.recv()
                            if not (isinstance(msg, tuple) and msg[:1] == ("ready",)):
                                raise RuntimeError(f"unexpected start-up message {msg!r:.100}")
                            w.ready = True
                            free.append(w)
                        except (EOFError, OSError, RuntimeError) as e:
                            self._note_startup_failure(w, e)
                        continue
                    w, j, _ = busy.pop(c)
                    try:
                        req_id, res = c.recv()
                        if req_id != j:
                            raise RuntimeError(f"worker answered request {req_id}, expected {j}")
                        results[j] = tuple(res)
                        free.append(w)
                    except (EOFError, OSError, RuntimeError, ValueError, TypeError) as e:
                        # the worker died mid-item: killed from outside (OOM killer, a dying idle worker
                        # that took the job) or by the item itself (segfault): retry once, then error
                        self._retry_or_fail(
                            j, jobs, attempts, pending, results, f"worker died: {type(e).__name__}: {e}"
                        )
                        nw = self._replace(w)
                        if nw is not None:
                            starting[nw.recv_conn] = nw
                now = time.monotonic()
                for c, (w, j, d) in list(busy.items()):
                    if now >= d:
                        del busy[c]
                        results[j] = (TIMEOUT, False, "")
                        nw = self._replace(w)
                        if nw is not None:
                            starting[nw.recv_conn] = nw
                for c, w in list(starting.items()):
                    if now >= w.startup_deadline:
                        del starting[c]
                        self._note_startup_failure(w, TimeoutError(f"not ready after {self.startup_timeout_s}s"))
        finally:
            # return every live worker (a still-starting one keeps starting in the background)
            back = free + list(starting.values())
            for w, _, _ in busy.values():  # only on an exception escaping the loop
                nw = self._replace(w)
                if nw is not None:
                    back.append(nw)
            self._checkin(back)
        return [r if r is not None else (ERROR, False, "not run") for r in results]

    @staticmethod
    def _retry_or_fail(j, jobs, attempts, pending, results, msg: str) -> None:
        attempts[j] = attempts.get(j, 0) + 1
        if attempts[j] > 1:
            results[j] = (ERROR, False, msg[:200])
        else:
            pending.put_back(j, jobs[j][1])

    def _note_startup_failure(self, w: _Worker, e: BaseException) -> None:
        rc = w.proc.poll()
        logger.error("reward: verifier worker pid %s failed to start (rc=%s): %s", w.proc.pid, rc, e)
        w.kill()
        _bump("worker_kills")
        with self._cond:
            self._all.discard(w)

    def shutdown(self) -> None:
        with self._cond:
            self.closed = True
            idle, self._idle = self._idle, []
        for w in idle:
            w.close()


_pool: _Pool | None = None
_pool_lock = threading.Lock()
_pool_cfg = {
    "n_workers": int(os.environ.get("EKSFT_REWARD_WORKERS", "2")),
    "startup_timeout_s": float(os.environ.get("EKSFT_REWARD_STARTUP_TIMEOUT_S", "120")),
    "memory_limit_mb": int(os.environ.get("EKSFT_REWARD_WORKER_MEM_MB", "4096")),
}


def _get_pool() -> _Pool:
    global _pool
    with _pool_lock:
        # A pool inherited through fork belongs to the parent process: start our own.
        if _pool is None or _pool.closed or _pool.pid != os.getpid():
            _pool = _Pool(**_pool_cfg)
        return _pool


def worker_pids() -> list[int]:
    """PIDs of the current verifier workers (for monitoring, e.g. CPU accounting in the benchmark)."""
    p = _pool
    if p is None or p.pid != os.getpid():
        return []
    with p._cond:
        return [w.proc.pid for w in p._all]


def shutdown_pool() -> None:
    """Stop the verifier workers (idle ones now, busy ones when their caller returns them)."""
    global _pool
    with _pool_lock:
        p, _pool = _pool, None
    if p is not None and p.pid == os.getpid():
        p.shutdown()


atexit.register(shutdown_pool)


def configure_pool(n_workers: int | None = None, startup_timeout_s: float | None = None,
                   memory_limit_mb: int | None = None) -> None:
    """Change pool settings; a changed setting restarts the pool on next use."""
    changed = False
    for name, val in (
        ("n_workers", n_workers),
        ("startup_timeout_s", startup_timeout_s),
        ("memory_limit_mb", memory_limit_mb),
    ):
        if val is None:
            continue
        if name == "n_workers" and int(val) < 1:
            raise ValueError(f"n_workers must be >= 1, got {val!r}")
        if _pool_cfg[name] != val:
            _pool_cfg[name] = val
            changed = True
    if changed:
        shutdown_pool()
