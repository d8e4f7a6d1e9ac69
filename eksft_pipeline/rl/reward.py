"""Rule-based math reward for DAPO RL and eval: the final boxed answer, normalised, checked with math-verify
under a per-benchmark answer policy, in a killable worker pool.

The scoring package, by concern: :mod:`~eksft_pipeline.rl.answer` (extraction from the completion),
:mod:`~eksft_pipeline.rl.normalize` (answer-string rewrites), :mod:`~eksft_pipeline.rl.policy` (the
debatable cases, per benchmark), :mod:`~eksft_pipeline.rl.verify` (math-verify in the worker processes, and
the "plain math-verify" reference), this module (pool, cache, counters, the public API), and
:mod:`~eksft_pipeline.rl.verifier_corpus` (the labelled corpus the verifier is measured on).

Public API
----------
``compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs) -> dict``
    verl's custom reward signature. Returns ``{"score", "acc", "pred", "reason", "verify_failed"}``:
    ``score`` is ``correct_score`` (default +1.0) or ``wrong_score`` (default -1.0, as DAPO); ``acc`` is
    1.0/0.0; ``pred`` is the extracted answer ("" if none); ``verify_failed`` is 1.0 when the reason is
    "timeout", "error" or "gold_unparseable" (the score says nothing about the model), which verl's
    validation logs as ``val-aux/<data_source>/verify_failed/mean@N`` next to ``acc``; ``reason`` is one
    of "ok" (verified; ``acc`` says right or wrong), "no_answer" (no/empty/unclosed last box, or no
    ``</think>`` under ``require_think_close``), "pred_too_long", "pred_too_deep", "pred_unparseable",
    "gold_unparseable" (also: a gold that violates the answer policy, e.g. not an integer 0-999 for AIME),
    "timeout", "error". Every reason other than "ok" scores ``wrong_score`` and is counted (see
    :func:`reward_stats`), so a broken gold or verifier shows up as a count, never as a silent zero.
    Every call returns the same five keys: verl's reward loop builds its extra-info arrays from the
    keys of the first sample and indexes every other sample with them.
``score_batch(items, **kwargs) -> list[dict]``
    ``items``: tuples ``(data_source, solution_str, ground_truth)`` or dicts with those keys and an
    optional ``policy`` (a policy name, a dict of fields or an ``AnswerPolicy``; overrides the ``policy``
    option for that item). Extracts and normalises in the calling process, looks up the cache,
    de-duplicates the remaining (prediction, gold, policy) triples and fans them out over the worker pool.
``reward_stats() -> dict`` / ``reset_reward_stats()``
    Process-wide counters: ``items``, ``correct``, ``by_reason`` (count per reason), ``cache_hits``
    (samples answered from the LRU cache), ``cache_misses`` (distinct pairs not in it), ``dedup_hits``
    (samples that shared a pair with an earlier sample of the same batch), ``int_fast_path`` (integer vs
    integer literals decided in the parent, see :func:`_int_fast_path`), ``verify_calls`` (pairs sent
    to workers), ``worker_starts``, ``worker_kills``,
    ``gold_unparseable_examples`` (first distinct golds), ``error_examples``.
``configure(n_workers=None, startup_timeout_s=None, memory_limit_mb=None, cache_size=None)``,
``clear_cache()``, ``shutdown_pool()``, ``worker_pids()``.

Keyword options (per call; in verl: ``+reward.custom_reward_function.reward_kwargs.NAME=VALUE``)
    ``correct_score=1.0``, ``wrong_score=-1.0``, ``extraction="boxed"`` (the project's verifier; or
    ``"math_verify"``: math-verify's own extraction on the answer region; or ``"plain"``: plain math-verify
    as verl's ``math_verify`` reward runs it, on the whole completion, no policy -- the reference of the
    eval audit and the benchmark), ``policy="auto"`` (the answer policy of every item: ``"auto"`` picks it
    from the item's ``data_source`` -- aime* -> ``aime``, amc* -> ``amc``, else ``math`` -- or a name, see
    :mod:`eksft_pipeline.rl.policy`), ``after_think=True``, ``require_think_close=False``,
    ``max_pred_chars=1000``, ``max_brace_depth=10``, ``max_tail_chars=4000`` (math_verify mode),
    ``max_plain_chars=100000`` (plain mode: the completion's tail), ``timeout_s=5.0`` (wall clock per
    verified pair), ``use_cache=True``. An unknown option raises ``TypeError`` naming it (a config typo must not be
    silently ignored); verl's own extras (``reward_router_address``, ``reward_model_tokenizer``) are
    accepted and ignored. Extraction semantics: :mod:`eksft_pipeline.rl.answer`.

Why worker processes
    math-verify's default timeouts use ``signal.alarm``; called from a thread (verl's reward loop runs
    ``compute_score`` via ``loop.run_in_executor`` inside async Ray actors) they raise ``ValueError``
    and callers that catch it score everything 0. Here ``parse``/``verify`` run with
    ``parsing_timeout=None``/``timeout_seconds=None`` in ``n_workers`` (default 2, env
    ``EKSFT_REWARD_WORKERS``) long-lived worker processes; the parent waits at most ``timeout_s`` per pair,
    then SIGKILLs the worker, starts a replacement and scores the pair "timeout". Workers are plain
    ``subprocess.Popen`` children (``python -P verify.py --serve``) talking over two pipes with
    ``multiprocessing.connection.Connection`` framing: like the "spawn" start method, but it also works
    inside daemonic multiprocessing children (which may not start ``multiprocessing`` processes) and
    never re-imports the caller's ``__main__``. Each worker caps its address space at
    ``memory_limit_mb`` (default 4096, ``EKSFT_REWARD_WORKER_MEM_MB``; 0 = no cap) so a runaway sympy
    expression hits MemoryError instead of the node's RAM, caps each item's CPU time (300 s, for a worker
    orphaned mid-item) and exits on EOF or when re-parented, so no worker outlives its caller.

Departures from calling math-verify directly
    The final answer is the last box plus the boxes joined to it by connectors only (several roots as
    several boxes), and both answer and gold are normalised (:mod:`eksft_pipeline.rl.normalize`: thousands
    separators, choice labels, repeating decimals, percent, ``\\pm``, inequality unions); intervals and
    inequalities are compared (``allow_set_relation_comp``); decimals against non-terminating golds need 6
    significant digits instead of math-verify's 6-decimal rounding; the answer policy decides the
    debatable cases (:mod:`eksft_pipeline.rl.policy`). On the held-out part of the labelled corpus this
    has a fraction of plain math-verify's false negatives and no more false positives (numbers:
    ``docs/benchmarks.md``). Integer-literal predictions against integer-literal golds (``-?[0-9]{1,15}``
    with an optional ``.0...``, most AIME/AMC pairs) are compared as integers in the caller
    (:func:`_int_fast_path`; the tests check agreement with math-verify), and integer-valued decimal golds
    such as AMC's ``142.0`` are read as integers (math-verify would score ``\\text{142}`` wrong against a
    Float gold).

Time bound
    A call returns after at most: waiting for a free worker (other callers' items, each bounded the same
    way) + worker start-up if the pool is cold (``startup_timeout_s``, default 120 s; sympy import is
    ~1-2 s) + ``timeout_s`` per unique pair it verifies on one worker. With a warm pool and no contention
    an adversarial completion costs <= ``timeout_s`` (+ ~10 ms to kill): oversized or deeply nested
    answers are rejected in the parent in O(``max_pred_chars``) without reaching sympy. A pair whose
    worker dies under it (OOM killer, segfault) is retried once on a replacement (+ start-up +
    ``timeout_s``), then scored "error".

Cache
    LRU (default 200,000 entries, ``configure(cache_size=...)``) keyed on ``(extraction mode,
    normalised prediction (plain mode: a hash of the completion), normalised gold tuple, policy options)``
    -> ``(status, correct, display)``; scores are applied after the lookup, so different
    ``correct_score``/``wrong_score`` share entries. Timeouts are cached too: the same
    pathological pair would time out again and each timeout costs a worker restart.

verl 0.9.1 wiring (reward loop, ``verl/experimental/reward_loop``)::

    reward.reward_manager.name=dapo \\
    reward.custom_reward_function.path=pkg://eksft_pipeline.rl.reward \\
    reward.custom_reward_function.name=compute_score \\
    +reward.custom_reward_function.reward_kwargs.timeout_s=5 \\
    +reward.reward_kwargs.max_resp_len=${RESPONSE_LEN} \\
    +reward.reward_kwargs.overlong_buffer_cfg.enable=True \\
    +reward.reward_kwargs.overlong_buffer_cfg.len=4096 \\
    +reward.reward_kwargs.overlong_buffer_cfg.penalty_factor=1.0 \\
    +reward.reward_kwargs.overlong_buffer_cfg.log=False

``pkg://`` imports this module by name. A file path works too: verl then executes this file as an anonymous
module, which hands out this module's functions (see the end of the file), so a process still has one pool,
one cache and one set of counters. Counters are per process: under verl they live in the reward-loop Ray
actors, so the driver learns about failures through the ``reason``/``verify_failed`` values it receives.
"""

import atexit
import hashlib
import logging
import os
import re
import subprocess
import sys
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

from eksft_pipeline.rl import answer as _answer
from eksft_pipeline.rl import normalize as _normalize
from eksft_pipeline.rl import verify as _verify
from eksft_pipeline.rl.answer import (
    ERROR,
    GOLD_UNPARSEABLE,
    NO_ANSWER,
    OK,
    PRED_TOO_DEEP,
    PRED_TOO_LONG,
    TIMEOUT,
)
from eksft_pipeline.rl.policy import POLICIES, AnswerPolicy, get_policy, policy_for

logger = logging.getLogger(__name__)

REASONS = (OK, NO_ANSWER, PRED_TOO_LONG, PRED_TOO_DEEP, _answer.PRED_UNPARSEABLE, GOLD_UNPARSEABLE, TIMEOUT, ERROR)
EXTRACTION_MODES = ("boxed", "math_verify", "plain")
_VERL_PASSTHROUGH_KWARGS = frozenset({"reward_router_address", "reward_model_tokenizer"})
_MAX_EXAMPLES = 20


@dataclass(frozen=True)
class RewardConfig:
    """Per-call scoring options (see module docstring)."""

    correct_score: float = 1.0
    wrong_score: float = -1.0
    extraction: str = "boxed"
    after_think: bool = True
    require_think_close: bool = False
    max_pred_chars: int = 1000
    max_brace_depth: int = 10
    max_tail_chars: int = 4000
    max_plain_chars: int = 100_000
    timeout_s: float = 5.0
    use_cache: bool = True
    policy: str = "auto"

    @classmethod
    def from_kwargs(cls, kwargs: dict[str, Any]) -> "RewardConfig":
        """Validated options; values are coerced to the field types (YAML/CLI may give "5" or 5 for 5.0)."""
        fields = cls.__dataclass_fields__
        unknown = sorted(set(kwargs) - set(fields) - _VERL_PASSTHROUGH_KWARGS)
        if unknown:
            raise TypeError(f"compute_score got unknown option(s) {unknown}; known: {sorted(fields)}")
        vals: dict[str, Any] = {}
        for k, v in kwargs.items():
            if k not in fields:
                continue
            default = fields[k].default
            if isinstance(default, bool):
                if not isinstance(v, bool):
                    raise TypeError(f"{k} must be True or False, got {v!r}")
            else:
                try:
                    v = type(default)(v)
                except (TypeError, ValueError):
                    raise TypeError(f"{k} must be {type(default).__name__}, got {v!r}") from None
            vals[k] = v
        cfg = cls(**vals)
        if cfg.extraction not in EXTRACTION_MODES:
            raise ValueError(f"extraction={cfg.extraction!r}; expected one of {EXTRACTION_MODES}")
        if not cfg.timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {cfg.timeout_s!r}")
        if cfg.policy != "auto" and cfg.policy not in POLICIES:
            raise ValueError(f"policy={cfg.policy!r}; expected 'auto' or one of {sorted(POLICIES)}")
        for name in ("max_pred_chars", "max_brace_depth", "max_tail_chars", "max_plain_chars"):
            if getattr(cfg, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(cfg, name)!r}")
        return cfg


# --------------------------------------------------------------------------------------------------
# Stats
# --------------------------------------------------------------------------------------------------

_stats_lock = threading.Lock()


def _fresh_stats() -> dict[str, Any]:
    return {
        "items": 0,
        "correct": 0,
        "by_reason": Counter(),
        "cache_hits": 0,
        "cache_misses": 0,
        "dedup_hits": 0,
        "int_fast_path": 0,
        "verify_calls": 0,
        "worker_starts": 0,
        "worker_kills": 0,
        "gold_unparseable_examples": [],
        "error_examples": [],
    }


_stats = _fresh_stats()


def reward_stats() -> dict[str, Any]:
    """Snapshot of the process-wide counters (``by_reason`` has every reason, zeros included)."""
    with _stats_lock:
        out = {k: (list(v) if isinstance(v, list) else v) for k, v in _stats.items() if k != "by_reason"}
        out["by_reason"] = {r: _stats["by_reason"].get(r, 0) for r in REASONS}
    return out


def reset_reward_stats() -> None:
    global _stats
    with _stats_lock:
        _stats = _fresh_stats()


def _bump(key: str, n: int = 1) -> None:
    with _stats_lock:
        _stats[key] += n


def _note_example(key: str, value: str, warn: str) -> None:
    with _stats_lock:
        examples = _stats[key]
        if value in examples or len(examples) >= _MAX_EXAMPLES:
            return
        examples.append(value)
    logger.warning(warn)


# --------------------------------------------------------------------------------------------------
# LRU cache of verdicts
# --------------------------------------------------------------------------------------------------


class _LRU:
    def __init__(self, maxsize: int):
        self.maxsize = maxsize
        self._d: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key):
        with self._lock:
            v = self._d.get(key)
            if v is not None:
                self._d.move_to_end(key)
            return v

    def put(self, key, value) -> None:
        with self._lock:
            self._d[key] = value
            self._d.move_to_end(key)
            while len(self._d) > self.maxsize:
                self._d.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._d.clear()

    def __len__(self) -> int:
        return len(self._d)


_cache = _LRU(200_000)


def clear_cache() -> None:
    _cache.clear()


# --------------------------------------------------------------------------------------------------
# Worker pool
# --------------------------------------------------------------------------------------------------

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


def configure(
    n_workers: int | None = None,
    startup_timeout_s: float | None = None,
    memory_limit_mb: int | None = None,
    cache_size: int | None = None,
) -> None:
    """Change pool/cache settings; a changed pool setting restarts the pool on next use."""
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
    if cache_size is not None:
        if int(cache_size) < 1:
            raise ValueError(f"cache_size must be >= 1, got {cache_size!r}")
        _cache.maxsize = int(cache_size)


# --------------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------------


def _gold_tuple(ground_truth: Any) -> tuple[str, ...]:
    """Gold answers as a tuple of strings (verl stores one string; lists/arrays of alternatives allowed)."""
    if ground_truth is None:
        return ()
    if isinstance(ground_truth, str | bytes | bytearray):
        return (_answer.sanitize_text(ground_truth).strip(),)
    if hasattr(ground_truth, "tolist") and not isinstance(ground_truth, int | float):
        ground_truth = ground_truth.tolist()  # numpy scalar / array
    if isinstance(ground_truth, list | tuple):
        return tuple(g for x in ground_truth for g in _gold_tuple(x))
    return (_answer.sanitize_text(ground_truth).strip(),)


# An integer literal: optional minus, ASCII digits (\d would admit other scripts' digits), optional ".000".
_INT_LITERAL = re.compile(r"-?[0-9]{1,15}(?:\.0+)?")


def _int_fast_path(pred: str, gold: str) -> bool | None:
    """Verdict for an integer-literal prediction against an integer-literal gold, else None.

    math-verify parses both to sympy integers/floats and compares values, so "025" == "25" == "25.0"
    and "-0" == "0"; the same holds here by comparing the integer values. This covers most AIME/AMC
    pairs without a worker round trip (the tests check agreement with math-verify on generated literals).
    """
    if _INT_LITERAL.fullmatch(pred) is None or _INT_LITERAL.fullmatch(gold) is None:
        return None
    return int(pred.split(".")[0]) == int(gold.split(".")[0])


@dataclass(frozen=True)
class _Gold:
    """A gold tuple prepared under a policy (cached: a prompt's gold repeats for all its samples)."""

    golds: tuple[str, ...]  # normalised strings sent to the worker
    letter: str | None  # the choice letter when the gold is one ("\text{(C)}")
    error: str | None  # why the gold violates the policy (-> "gold_unparseable"), else None


_gold_memo: OrderedDict = OrderedDict()
_GOLD_MEMO_MAX = 50_000
_gold_memo_lock = threading.Lock()


def _prepare_gold(golds: tuple[str, ...], policy: AnswerPolicy) -> _Gold:
    key = (golds, policy)
    with _gold_memo_lock:
        hit = _gold_memo.get(key)
    if hit is not None:
        return hit
    letter = _normalize.choice_letter(golds[0]) if len(golds) == 1 else None
    error = None
    if policy.integer_range is not None:
        lo, hi = policy.integer_range
        vals = [_normalize.integer_value(g) for g in golds]
        if any(v is None or not lo <= v <= hi for v in vals):
            error = f"gold {golds!r:.80} is not an integer in [{lo}, {hi}] (answer policy {policy.name!r})"
    normed = tuple(_normalize.normalize_text(g, policy, is_gold=True) for g in golds)
    out = _Gold(normed, letter, error)
    with _gold_memo_lock:
        _gold_memo[key] = out
        while len(_gold_memo) > _GOLD_MEMO_MAX:
            _gold_memo.popitem(last=False)
    return out


def _extract(solution_str: Any, cfg: RewardConfig, gold: _Gold | None, policy: AnswerPolicy
             ) -> tuple[str | None, str, str]:
    """(payload for the worker or None, status, pred for the result dict) in the calling process."""
    text = _answer.sanitize_text(solution_str) if solution_str is not None else ""
    if cfg.extraction == "plain":  # verl's math_verify reward reads the whole completion
        if not text.strip():
            return None, NO_ANSWER, ""
        return text[-cfg.max_plain_chars :], OK, ""
    region = _answer.answer_region(text, after_think=cfg.after_think, require_think_close=cfg.require_think_close)
    if region is None:
        return None, NO_ANSWER, ""
    if cfg.extraction == "math_verify":
        tail = region[-cfg.max_tail_chars :]
        if not tail.strip():
            return None, NO_ANSWER, ""
        return tail, OK, ""
    boxes, status = _answer.final_boxes(region, max_chars=cfg.max_pred_chars)
    if boxes is None:
        return None, status, ""
    letter = gold.letter if gold is not None else None
    parts = []
    for content in boxes:
        p = _answer.normalize_answer(content)
        if not p:
            continue
        if _answer.brace_depth(p) > cfg.max_brace_depth:
            return None, PRED_TOO_DEEP, ""
        parts.append(_normalize.normalize_text(p, policy, gold_letter=letter))
    parts = [p for p in parts if p]
    if not parts:
        return None, NO_ANSWER, ""
    pred = ", ".join(dict.fromkeys(parts))  # several boxes of one answer: the list of their values
    if len(pred) > cfg.max_pred_chars:
        return None, PRED_TOO_LONG, ""
    if policy.ordered_tuples and gold is not None and len(gold.golds) == 1:
        pred = _normalize.order_like_gold(pred, gold.golds[0])
    return pred, OK, pred


# Reasons that say nothing about the model: the verifier or the data failed.
VERIFY_FAILED = frozenset({TIMEOUT, ERROR, GOLD_UNPARSEABLE})


def _result(cfg: RewardConfig, status: str, correct: bool, pred: str) -> dict[str, Any]:
    correct = bool(correct) and status == OK
    return {
        "score": float(cfg.correct_score if correct else cfg.wrong_score),
        "acc": 1.0 if correct else 0.0,
        "pred": pred,
        "reason": status,
        "verify_failed": 1.0 if status in VERIFY_FAILED else 0.0,
    }


def _as_item(item: Any) -> tuple[Any, Any, Any, Any]:
    """(data_source, solution_str, ground_truth, policy or None) of one score_batch item."""
    if isinstance(item, dict):
        try:
            return item.get("data_source"), item["solution_str"], item["ground_truth"], item.get("policy")
        except KeyError as e:
            raise KeyError(f"score_batch item dict lacks key {e}; needs solution_str and ground_truth") from None
    if isinstance(item, list | tuple) and len(item) == 3:
        return item[0], item[1], item[2], None
    raise TypeError(f"score_batch item must be (data_source, solution_str, ground_truth) or a dict, got {item!r:.80}")


def _resolve_policy(spec: Any, data_source: Any) -> AnswerPolicy:
    if spec is None or spec == "auto":
        return policy_for(data_source)
    return get_policy(spec)


def score_batch(items: Sequence[Any], **kwargs: Any) -> list[dict[str, Any]]:
    """Score many completions at once (see module docstring). Bad options raise; bad items never do,
    except an item dict whose ``policy`` names no policy (a config error, like an unknown option)."""
    cfg = RewardConfig.from_kwargs(kwargs)
    batch_policy = None if cfg.policy == "auto" else get_policy(cfg.policy)
    quads = [_as_item(it) for it in items]
    policies = [_resolve_policy(p, ds) if p is not None else (batch_policy or policy_for(ds)) for ds, _, _, p in quads]
    n = len(quads)
    out: list[dict[str, Any] | None] = [None] * n
    verdicts: list[tuple[str, bool, str] | None] = [None] * n
    preds: list[str] = [""] * n
    todo: dict[tuple, tuple[str, tuple[str, ...], tuple, list[int]]] = {}  # key -> (payload, golds, opts, idx)
    gold_notes: dict[int, str] = {}  # item -> why its gold violates the policy
    hits = misses = dedup = n_fast = 0
    mode = cfg.extraction
    for i, (data_source, solution_str, ground_truth, _) in enumerate(quads):
        policy = policies[i]
        try:
            raw_golds = _gold_tuple(ground_truth)
            gold = _prepare_gold(raw_golds, policy) if any(raw_golds) and mode == "boxed" else None
            payload, status, pred = _extract(solution_str, cfg, gold, policy)
            preds[i] = pred
            if payload is None:
                verdicts[i] = (status, False, pred)
                continue
            if not any(raw_golds):
                verdicts[i] = (GOLD_UNPARSEABLE, False, pred)
                _note_example(
                    "gold_unparseable_examples",
                    repr(ground_truth)[:200],
                    f"reward: empty gold answer {ground_truth!r:.80} (data_source={data_source!r})",
                )
                continue
            if gold is not None and gold.error:
                verdicts[i] = (GOLD_UNPARSEABLE, False, pred)
                gold_notes[i] = gold.error
                continue
            golds = gold.golds if gold is not None else raw_golds
            if mode == "boxed" and len(golds) == 1:
                fast = _int_fast_path(payload, golds[0])
                if fast is not None:
                    verdicts[i] = (OK, fast, pred)
                    n_fast += 1
                    continue
            opts = policy.worker_options() if mode == "boxed" else ()
            ident = payload if mode != "plain" else hashlib.blake2b(payload.encode("utf-8", "replace")).digest()
            key = (mode, ident, golds, opts)
            hit = _cache.get(key) if cfg.use_cache else None
            if hit is not None:
                verdicts[i] = hit
                hits += 1
            elif key in todo:
                todo[key][3].append(i)
            else:
                todo[key] = (payload, golds, opts, [i])
        except Exception as e:  # extraction must never take the caller down
            verdicts[i] = (ERROR, False, f"{type(e).__name__}: {e}"[:200])
    if todo:
        # without the cache every sample is its own job (no de-duplication), which the benchmark measures
        jobs: list[tuple[str, tuple[str, ...], str, tuple]] = []
        owners: list[list[int]] = []
        keys: list[tuple] = []
        for k, (payload, golds, opts, idx) in todo.items():
            groups = [idx] if cfg.use_cache else [[i] for i in idx]
            for g in groups:
                jobs.append((payload, golds, mode, opts))
                owners.append(g)
                keys.append(k)
        misses = len(todo) if cfg.use_cache else 0
        dedup = (sum(len(g) for g in owners) - len(todo)) if cfg.use_cache else 0
        try:
            res = _get_pool().run(jobs, cfg.timeout_s)
        except Exception as e:
            logger.exception("reward: verifier pool failed")
            res = [(ERROR, False, f"pool: {type(e).__name__}: {e}"[:200])] * len(jobs)
        _bump("verify_calls", len(jobs))
        for job, k, g, r in zip(jobs, keys, owners, res):
            if r[0] == TIMEOUT:  # logged once per verification; cached repeats are only counted
                logger.warning("reward: verification timed out after %.1fs (pred=%r)", cfg.timeout_s, job[0][-80:])
            if cfg.use_cache and r[0] != ERROR:  # errors may be transient (worker crash): do not pin them
                _cache.put(k, r)
            for i in g:
                verdicts[i] = r
    correct_n = 0
    reasons: Counter = Counter()
    shows_display = mode in ("math_verify", "plain")
    for i, (data_source, _s, ground_truth, _) in enumerate(quads):
        status, correct, display = verdicts[i]  # type: ignore[misc]
        pred = display if shows_display and status in (OK, _answer.PRED_UNPARSEABLE, GOLD_UNPARSEABLE) else preds[i]
        if status == ERROR:
            _note_example(
                "error_examples", display, f"reward: verifier error {display!r} (data_source={data_source!r})"
            )
        elif status == GOLD_UNPARSEABLE and i in gold_notes:
            _note_example("gold_unparseable_examples", gold_notes[i][:200],
                          f"reward: {gold_notes[i]} (data_source={data_source!r})")
        elif status == GOLD_UNPARSEABLE:
            _note_example(
                "gold_unparseable_examples",
                repr(ground_truth)[:200],
                f"reward: gold answer {ground_truth!r:.80} does not parse (data_source={data_source!r})",
            )
        out[i] = _result(cfg, status, correct, pred if status != ERROR else preds[i])
        reasons[status] += 1
        correct_n += out[i]["acc"] == 1.0
    with _stats_lock:
        _stats["items"] += n
        _stats["correct"] += correct_n
        _stats["by_reason"].update(reasons)
        _stats["cache_hits"] += hits
        _stats["cache_misses"] += misses
        _stats["dedup_hits"] += dedup
        _stats["int_fast_path"] += n_fast
    return out  # type: ignore[return-value]


def compute_score(
    data_source: Any,
    solution_str: Any,
    ground_truth: Any,
    extra_info: dict | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """verl custom reward: score one completion (see module docstring for keys, reasons and options)."""
    return score_batch([(data_source, solution_str, ground_truth)], **kwargs)[0]


# Loaded from its file path (verl: ``reward.custom_reward_function.path=/.../eksft_pipeline/rl/reward.py``)
# this file runs as an anonymous module outside sys.modules. Its definitions above are inert (no pool is
# started until first use); hand out the package module's functions instead, so that a process has one
# worker pool, one cache and one set of counters however the reward was loaded.
if __name__ not in ("eksft_pipeline.rl.reward", "__main__"):
    from eksft_pipeline.rl import reward as _canonical

    compute_score = _canonical.compute_score  # noqa: F811
    score_batch = _canonical.score_batch  # noqa: F811
    reward_stats = _canonical.reward_stats  # noqa: F811
    reset_reward_stats = _canonical.reset_reward_stats  # noqa: F811
    configure = _canonical.configure  # noqa: F811
    clear_cache = _canonical.clear_cache  # noqa: F811
    shutdown_pool = _canonical.shutdown_pool  # noqa: F811
    worker_pids = _canonical.worker_pids  # noqa: F811
