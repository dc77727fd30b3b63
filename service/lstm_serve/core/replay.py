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

# What an entry holds beyond its answers' data, counted against the budget so that the budget
# bounds memory: its object and eight small arrays (about 1.1 kB), 56 bytes per row in those
# arrays, and an array header per row when the rows' answers differ in length. Measured with
# tracemalloc for entries of 1, 16 and 256 rows.
_ENTRY_OVERHEAD = 1100
_ROW_OVERHEAD = 56
_ARRAY_OVERHEAD = 112
_NO_PREV = np.empty(0, object)
_NO_INTS = np.empty(0, np.int64)
_NO_BOOLS = np.empty(0, bool)
_NO_DIGESTS = np.empty(0, np.uint64)


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
        rows = len(entry.seq)
        size = _ENTRY_OVERHEAD + rows * _ROW_OVERHEAD
        if isinstance(y, np.ndarray):
            size += int(y.nbytes)
        else:
            size += sum(int(a.nbytes) for a in y) + len(y) * _ARRAY_OVERHEAD
        if size > self.budget:
            return False
        entry.nbytes = size
        self._order.append(entry)
        self.bytes += size
        while self.bytes > self.budget:
            old = self._order.popleft()
            self.bytes -= old.nbytes
            # Its rows no longer answer and chains stop here. The entry object itself stays
            # while a session (or a newer entry) points at it, so its arrays are let go too.
            old.y = None
            old.prev = _NO_PREV
            old.seq = old.gen = old.next_seq = old.prev_row = _NO_INTS
            old.reset = _NO_BOOLS
            old.digest = _NO_DIGESTS
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
