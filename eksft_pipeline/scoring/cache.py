"""The reward's LRU cache of verdicts: (extraction mode, normalised prediction, gold tuple, policy options) ->
(status, correct, display). Scores are applied after the lookup, so different correct/wrong scores share entries."""

from __future__ import annotations

import threading
from collections import OrderedDict


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
