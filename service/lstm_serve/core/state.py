"""State arena (preallocated h/c arrays + free slots) and the session table.

Everything here is touched by the event loop thread only, except the arena rows of sessions
with a step in flight, which the batcher's inference thread gathers and scatters under
`Arena.lock`. A session's row is never reused while it is busy (see SessionTable.busy).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
import time
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)


class CapPolicy(StrEnum):
    """What a new session gets at the session cap."""

    refuse = "refuse"
    evict_lru = "evict_lru"


FREE = np.inf  # last_used of a free slot: never the least recently used, never idle


class Arena:
    """h, c [capacity, layers, hidden], the last output per slot, and each slot's next seq.

    np.zeros maps untouched pages lazily, so a large capacity costs memory only as slots fill.
    """

    def __init__(self, capacity: int, layers: int, hidden: int, output_dim: int) -> None:
        self.capacity = capacity
        self.h = np.zeros((capacity, layers, hidden), np.float32)
        self.c = np.zeros((capacity, layers, hidden), np.float32)
        self.last_y = np.zeros((capacity, output_dim), np.float32)
        self.next_seq = np.zeros(capacity, np.int64)
        # Bumped when a slot's session is created or reset; keys the replay cache.
        self.gen = np.zeros(capacity, np.int64)
        self._gen_counter = 0
        self.last_used = np.full(capacity, FREE, np.float64)
        # Held by the inference thread while it gathers and scatters, and by snapshots.
        self.lock = threading.Lock()
        self._high = 0  # slots [0, _high) have been handed out at least once
        self._freed: list[int] = []

    @property
    def used(self) -> int:
        return self._high - len(self._freed)

    def alloc(self) -> int | None:
        if self._freed:
            slot = self._freed.pop()
        elif self._high < self.capacity:
            slot = self._high
            self._high += 1
        else:
            return None
        self.clear(slot)
        return slot

    def new_generation(self, slot: int) -> int:
        self._gen_counter += 1
        self.gen[slot] = self._gen_counter
        return self._gen_counter

    def clear(self, slot: int) -> None:
        self.new_generation(slot)
        self.h[slot] = 0.0
        self.c[slot] = 0.0
        self.last_y[slot] = 0.0
        self.next_seq[slot] = 0
        self.last_used[slot] = time.monotonic()

    def free(self, slot: int) -> None:
        self.last_used[slot] = FREE
        self._freed.append(slot)

    @property
    def high(self) -> int:
        return self._high


@dataclass(frozen=True)
class Snapshot:
    keys: list[str]
    h: np.ndarray
    c: np.ndarray
    last_y: np.ndarray
    next_seq: np.ndarray
    idle: np.ndarray

    def write(self, path: Path, meta: dict[str, object]) -> None:
        """Write atomically: a crash leaves the previous snapshot or this one, never a mix."""
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(
                    f, h=self.h, c=self.c, last_y=self.last_y, next_seq=self.next_seq,
                    idle=self.idle, keys=np.array(json.dumps(self.keys)),
                    meta=np.array(json.dumps(meta)),
                )  # fmt: skip
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


class SessionTable:
    """Session key -> arena slot, with the per-session FIFO that gives one writer per session."""

    def __init__(self, arena: Arena) -> None:
        self.arena = arena
        self.slots: dict[str, int] = {}
        # slot -> key, for the reaper and LRU eviction (the strings are shared with `slots`).
        self.keys: list[str | None] = []
        # key -> the completion future of the last request queued on that session.
        self.tails: dict[str, object] = {}

    def __len__(self) -> int:
        return len(self.slots)

    def get(self, key: str) -> int | None:
        return self.slots.get(key)

    def busy(self, key: str) -> bool:
        return key in self.tails

    def create(self, key: str) -> int | None:
        slot = self.arena.alloc()
        if slot is None:
            return None
        self.slots[key] = slot
        if slot >= len(self.keys):
            self.keys.extend([None] * (slot + 1 - len(self.keys)))
        self.keys[slot] = key
        return slot

    def remove(self, key: str) -> int | None:
        slot = self.slots.pop(key, None)
        if slot is not None:
            self.keys[slot] = None
            self.arena.free(slot)
        return slot

    def touch(self, slot: int) -> None:
        self.arena.last_used[slot] = time.monotonic()

    def lru(self, exclude: set[str]) -> str | None:
        """The least recently used session that is not busy and not in exclude."""
        last = self.arena.last_used[: self.arena.high]
        k = min(len(last), 64 + len(exclude) + len(self.tails))
        if k == 0:
            return None
        # O(n) partial selection: a full sort of a large table would stall the event loop.
        nearest = np.argpartition(last, k - 1)[:k]
        for slot in nearest[np.argsort(last[nearest], kind="stable")]:
            if not np.isfinite(last[slot]):
                break
            key = self.keys[int(slot)]
            if key is not None and key not in exclude and not self.busy(key):
                return key
        return None

    def expired(self, ttl_s: float, now: float | None = None) -> list[str]:
        """Sessions idle for longer than ttl_s and not busy."""
        now = time.monotonic() if now is None else now
        idle = np.flatnonzero(self.arena.last_used[: self.arena.high] < now - ttl_s)
        out = []
        for slot in idle:
            key = self.keys[int(slot)]
            if key is not None and not self.busy(key):
                out.append(key)
        return out

    # -- snapshots ---------------------------------------------------------------------------

    def capture(self) -> Snapshot:
        """Copy every session's state (on the event loop; quick): write it with Snapshot.write."""
        keys = list(self.slots)
        slots = np.fromiter((self.slots[k] for k in keys), np.int64, len(keys))
        a = self.arena
        with a.lock:  # the inference thread writes state and next_seq together under this lock
            h, c, y, seq = a.h[slots], a.c[slots], a.last_y[slots], a.next_seq[slots]
        idle = time.monotonic() - a.last_used[slots]
        return Snapshot(keys, h, c, y, seq, idle)

    def restore(self, path: Path, meta: dict[str, object]) -> int:
        """Load sessions written by snapshot(); refuses a snapshot of another model shape."""
        with np.load(path, allow_pickle=False) as z:
            saved_meta = json.loads(str(z["meta"]))
            if saved_meta != meta:
                raise ValueError(f"{path}: snapshot is for {saved_meta}, not {meta}")
            keys: list[str] = json.loads(str(z["keys"]))
            h, c, y, seq, idle = z["h"], z["c"], z["last_y"], z["next_seq"], z["idle"]
        # Check everything before creating any session: a bad file restores nothing.
        a, n = self.arena, len(keys)
        want = {
            "h": (h, (n, *a.h.shape[1:])), "c": (c, (n, *a.c.shape[1:])),
            "last_y": (y, (n, *a.last_y.shape[1:])), "next_seq": (seq, (n,)), "idle": (idle, (n,)),
        }  # fmt: skip
        for name, (array, shape) in want.items():
            if array.shape != shape:
                raise ValueError(f"{path}: {name} has shape {array.shape}, expected {shape}")
        if not all(isinstance(k, str) for k in keys) or len(set(keys)) != n:
            raise ValueError(f"{path}: keys are not {n} distinct strings")
        now = time.monotonic()
        for i, key in enumerate(keys):
            slot = self.create(key)
            if slot is None:
                logger.warning(
                    "%s: session cap reached; %d sessions not restored", path, len(keys) - i
                )
                return i
            self.arena.h[slot], self.arena.c[slot], self.arena.last_y[slot] = h[i], c[i], y[i]
            self.arena.next_seq[slot] = seq[i]
            self.arena.last_used[slot] = now - float(idle[i])
        return len(keys)
