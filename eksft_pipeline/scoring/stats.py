"""Process-wide counters of the reward (items, reasons, cache and pool activity, first examples of failures).

Read with :func:`reward_stats`, cleared with :func:`reset_reward_stats` (both re-exported by
:mod:`eksft_pipeline.scoring.reward`, whose docstring lists every counter). Under verl they live in the
reward-loop Ray actors; eval reads them after scoring its samples.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from typing import Any

from eksft_pipeline.scoring.answer import (
    ERROR,
    GOLD_UNPARSEABLE,
    NO_ANSWER,
    OK,
    PRED_TOO_DEEP,
    PRED_TOO_LONG,
    PRED_UNPARSEABLE,
    TIMEOUT,
)

logger = logging.getLogger("eksft_pipeline.scoring.reward")

REASONS = (OK, NO_ANSWER, PRED_TOO_LONG, PRED_TOO_DEEP, PRED_UNPARSEABLE, GOLD_UNPARSEABLE, TIMEOUT, ERROR)
_MAX_EXAMPLES = 20

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


def record_batch(reasons: Counter, *, items: int, correct: int, cache_hits: int, cache_misses: int, dedup_hits: int,
                 int_fast_path: int) -> None:
    """Add one scored batch to the counters (one lock acquisition)."""
    with _stats_lock:
        _stats["items"] += items
        _stats["correct"] += correct
        _stats["by_reason"].update(reasons)
        _stats["cache_hits"] += cache_hits
        _stats["cache_misses"] += cache_misses
        _stats["dedup_hits"] += dedup_hits
        _stats["int_fast_path"] += int_fast_path
