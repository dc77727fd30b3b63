"""Recent responses per (session, seq), so a retried request is answered again, not reapplied."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

_ENTRY_OVERHEAD = 256  # bytes of Python objects per entry, counted against the budget


@dataclass(frozen=True, slots=True)
class Replay:
    steps: int
    reset: bool
    y: np.ndarray
    next_seq: int


class ReplayCache:
    """LRU by bytes, keyed by (session key, session generation, seq of the request's first step).

    A session gets a new generation when it is created or reset, so entries of an ended or
    reset session are never matched again and simply age out (no scan to drop them).
    """

    def __init__(self, budget_bytes: int) -> None:
        self.budget = budget_bytes
        self.bytes = 0
        self._entries: OrderedDict[tuple[str, int, int], Replay] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, key: str, gen: int, seq: int, entry: Replay) -> None:
        size = entry.y.nbytes + _ENTRY_OVERHEAD
        if size > self.budget:
            return
        old = self._entries.pop((key, gen, seq), None)
        if old is not None:
            self.bytes -= old.y.nbytes + _ENTRY_OVERHEAD
        self._entries[(key, gen, seq)] = entry
        self.bytes += size
        while self.bytes > self.budget:
            _, dropped = self._entries.popitem(last=False)
            self.bytes -= dropped.y.nbytes + _ENTRY_OVERHEAD

    def get(self, key: str, gen: int, seq: int) -> Replay | None:
        return self._entries.get((key, gen, seq))
