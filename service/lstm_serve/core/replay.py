"""Answers of applied requests, kept so that a retried request is answered again, not reapplied.

One entry per request holds the answers of all its sessions ([rows, steps, output_dim]). Each
session's entries form a chain: the store keeps the newest (entry, row) of each slot, and an
entry remembers, per row, the entry that was newest before it. A retry walks its session's
chain back to its seq; commits are O(1) numpy operations per request, whatever its size.
Entries are dropped oldest first once their bytes exceed the budget.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

_ENTRY_OVERHEAD = 512  # bytes of Python objects per entry, counted against the budget


@dataclass(eq=False, slots=True)
class ReplayEntry:
    y: np.ndarray | list[np.ndarray] | None  # per row [steps, output_dim]; None once dropped
    seq: np.ndarray  # [rows] seq of each row's first step
    gen: np.ndarray  # [rows] the session generation the row was applied in
    reset: np.ndarray  # [rows] bool
    next_seq: np.ndarray  # [rows] what the first answer said
    prev: np.ndarray  # [rows] object: the entry newest before this one, per row
    prev_row: np.ndarray  # [rows]
    digest: np.ndarray  # [rows] uint64: a hash of each row's inputs
    nbytes: int = 0

    def row_steps(self, row: int) -> int:
        assert self.y is not None
        return int(self.y[row].shape[0])


@dataclass(frozen=True, slots=True)
class Found:
    entry: ReplayEntry
    row: int


class ReplayCache:
    def __init__(self, budget_bytes: int) -> None:
        self.budget = budget_bytes
        self.bytes = 0
        self._order: deque[ReplayEntry] = deque()

    def __len__(self) -> int:
        return len(self._order)

    def add(self, entry: ReplayEntry) -> bool:
        """Keep entry (dropping the oldest over budget); False when it alone exceeds the budget."""
        y = entry.y
        assert y is not None
        size = (
            int(y.nbytes) if isinstance(y, np.ndarray) else sum(int(a.nbytes) for a in y)
        ) + _ENTRY_OVERHEAD
        if size > self.budget:
            return False
        entry.nbytes = size
        self._order.append(entry)
        self.bytes += size
        while self.bytes > self.budget:
            old = self._order.popleft()
            self.bytes -= old.nbytes
            old.y = None  # its rows no longer answer; chains stop here
            old.prev = np.empty(0, object)
        return True


def find(head: object, row: int, gen: int, seq: int) -> Found | None:
    """Walk a session's chain from its newest entry back to the one starting at seq."""
    entry = head
    while isinstance(entry, ReplayEntry) and entry.y is not None:
        if int(entry.gen[row]) != gen:
            return None
        s = int(entry.seq[row])
        if s == seq:
            return Found(entry, row)
        if s < seq:
            return None
        entry, row = entry.prev[row], int(entry.prev_row[row])
    return None
