"""The session store: key -> slot, and the state columns. The only writer of session state.

Columns are preallocated arrays indexed by slot; h and c are [layers, capacity, hidden] so a
batch's state is gathered as take(h, slots, axis=1), already in the graph's
[layers, batch, hidden] layout and C-contiguous. h and c live where the model runs
(device_arrays.py): NumPy on the host, where np.zeros maps pages lazily so a large capacity
costs memory only as slots fill; CuPy in GPU memory, allocated whole. Everything else is host
NumPy. State crosses to the host only through read_state, in batches.

Only the scheduler calls the mutating methods, on the event loop, between inference calls; that
order, not a lock, gives one writer per session (docs/architecture.md).
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from itertools import repeat
from typing import Any, Protocol

import numpy as np

from lstm_serve.core.device_arrays import HOST, StateArrays
from lstm_serve.core.errors import ResourceExhausted
from lstm_serve.core.replay import ReplayCache, ReplayEntry


class CapPolicy(StrEnum):
    """What a new session gets at the session cap."""

    refuse = "refuse"
    evict_lru = "evict_lru"


class Journal(Protocol):
    """Told of every change, so a shared store (core/sync.py) can write it through."""

    def changed(self, slots: np.ndarray) -> None: ...
    def removed(self, keys: list[str], ended: bool) -> None: ...


@dataclass(frozen=True)
class CapturedReplay:
    """The last answer of each session that still has one, so that a retry of the last request
    after a restart is answered again instead of refused."""

    index: np.ndarray  # [m] int64: the session's position in Captured.keys
    seq: np.ndarray  # [m] int64: the answered request's seq
    next_seq: np.ndarray  # [m] int64: what the answer said
    reset: np.ndarray  # [m] bool
    digest: np.ndarray  # [m] uint64: the hash of the request's inputs
    steps: np.ndarray  # [m] int64: steps answered
    y: np.ndarray  # [sum(steps), output_dim] float32, the answers one after another

    @staticmethod
    def empty(output_dim: int) -> CapturedReplay:
        i = np.empty(0, np.int64)
        return CapturedReplay(
            i, i, i, np.empty(0, bool), np.empty(0, np.uint64), i,
            np.empty((0, output_dim), np.float32),
        )  # fmt: skip


@dataclass(frozen=True)
class Captured:
    """A copy of every session's state, in key order (see snapshot.py)."""

    keys: list[str]
    h: np.ndarray  # [n, layers, hidden]
    c: np.ndarray
    last_y: np.ndarray  # [n, output_dim]
    next_seq: np.ndarray  # [n]
    idle: np.ndarray  # [n] seconds since last use
    replay: CapturedReplay | None = None


class SessionStore:
    def __init__(
        self,
        capacity: int,
        layers: int,
        hidden: int,
        output_dim: int,
        arrays: StateArrays = HOST,
    ) -> None:
        self.capacity = capacity
        self.arrays = arrays
        self.h = arrays.xp.zeros((layers, capacity, hidden), np.float32)
        self.c = arrays.xp.zeros((layers, capacity, hidden), np.float32)
        self.last_y = np.zeros((capacity, output_dim), np.float32)
        self.next_seq = np.zeros(capacity, np.int64)
        # Bumped when a slot's session is created or reset: replay entries of an earlier
        # generation never match again.
        self.gen = np.zeros(capacity, np.int64)
        self.last_used = np.zeros(capacity, np.float64)
        # The newest replay entry of each slot's session (replay.py chains the older ones).
        self.replay: np.ndarray = np.full(capacity, None, dtype=object)
        self.replay_row = np.zeros(capacity, np.int64)
        # Insertion order is recency order: the first key is the least recently used, so LRU
        # eviction and TTL expiry look only at the front (O(1) per session removed).
        self.slots: OrderedDict[str, int] = OrderedDict()
        self.keys: list[str | None] = []
        self._free: list[int] = []
        self._high = 0
        self._gen = 0
        # None in the embedded default: the hot path pays one attribute test per change.
        self.journal: Journal | None = None

    def __len__(self) -> int:
        return len(self.slots)

    @property
    def free(self) -> int:
        return self.capacity - len(self.slots)

    def lookup(self, keys: Sequence[str]) -> np.ndarray:
        """Slots of keys, -1 where absent."""
        # map with a C callable: no Python frame per key (a gateway frame has 1024 of them)
        return np.fromiter(map(self.slots.get, keys, repeat(-1)), np.int64, len(keys))

    def slot(self, key: str) -> int | None:
        return self.slots.get(key)

    def new_generations(self, n: int) -> np.ndarray:
        first = self._gen + 1
        self._gen += n
        return np.arange(first, first + n, dtype=np.int64)

    # -- sessions ------------------------------------------------------------------------------

    def create(self, keys: Sequence[str], now: float | None = None) -> np.ndarray:
        """New sessions with a zero state; the caller made room (make_room)."""
        slots = self._alloc(keys)
        self._zero(slots)
        self.last_used[slots] = time.monotonic() if now is None else now
        if self.journal is not None:
            self.journal.changed(slots)
        return slots

    def adopt(
        self,
        keys: Sequence[str],
        h: np.ndarray,
        c: np.ndarray,
        last_y: np.ndarray,
        next_seq: np.ndarray,
    ) -> np.ndarray:
        """Sessions loaded from a shared store, as they are there (h, c [n, layers, hidden]);
        not journaled: nothing changed. The caller made room."""
        slots = self._alloc(keys)
        self._zero(slots)
        self.write_state(slots, h.transpose(1, 0, 2), c.transpose(1, 0, 2))
        self.last_y[slots] = last_y
        self.next_seq[slots] = next_seq
        self.last_used[slots] = time.monotonic()
        return slots

    def _alloc(self, keys: Sequence[str]) -> np.ndarray:
        n = len(keys)
        if n > self.free:
            raise ResourceExhausted(f"session store full ({self.capacity} sessions)")
        slots = np.empty(n, np.int64)
        for i, key in enumerate(keys):
            if self._free:
                slot = self._free.pop()
            else:
                slot = self._high
                self._high += 1
                self.keys.append(None)
            self.slots[key] = slot
            self.keys[slot] = key
            slots[i] = slot
        return slots

    def _zero(self, slots: np.ndarray) -> None:
        i = self.arrays.index(slots)
        self.h[:, i] = 0.0
        self.c[:, i] = 0.0
        self.last_y[slots] = 0.0
        self.next_seq[slots] = 0
        self.gen[slots] = self.new_generations(len(slots))
        self.replay[slots] = None

    def reset(self, slot: int) -> None:
        """A zero state and seq 0, as if the session had just begun."""
        s = np.array([slot], np.int64)
        self._zero(s)
        if self.journal is not None:
            self.journal.changed(s)

    def remove(self, keys: Iterable[str], ended: bool = False) -> int:
        """Forget sessions here; ended: the client ended them (a shared store forgets them too,
        while evicted and expired ones live on there)."""
        if self.journal is not None:
            keys = list(keys)
            self.journal.removed(keys, ended)
        n = 0
        for key in keys:
            slot = self.slots.pop(key, None)
            if slot is None:
                continue
            self.keys[slot] = None
            self.replay[slot] = None  # let the session's replay entries go
            self._free.append(slot)
            n += 1
        return n

    def make_room(self, n_new: int, policy: CapPolicy, protect: set[str], label: str) -> list[str]:
        """Free slots for n_new sessions; returns the keys evicted (least recently used first)."""
        short = n_new - self.free
        if short <= 0:
            return []
        if policy is CapPolicy.refuse:
            raise ResourceExhausted(
                f"the request starts {n_new} new session{'s' if n_new != 1 else ''}; model "
                f"{label} has {self.free} of its {self.capacity} session slots free; end idle "
                f"sessions, start fewer at once, or retry later"
            )
        if n_new > self.capacity:
            raise ResourceExhausted(
                f"the request starts {n_new} new sessions; model {label} holds at most "
                f"{self.capacity}"
            )
        victims: list[str] = []
        for key in self.slots:  # least recently used first
            if key not in protect:
                victims.append(key)
                if len(victims) == short:
                    break
        if len(victims) < short:
            raise ResourceExhausted(
                f"model {label} holds {self.capacity} sessions, all busy; retry later"
            )
        self.remove(victims)
        return victims

    def touch(self, keys: Sequence[str], slots: np.ndarray, now: float) -> None:
        self.last_used[slots] = now
        deque(map(self.slots.move_to_end, keys), maxlen=0)  # runs the calls in C

    def commit(
        self,
        slots: np.ndarray,
        h: np.ndarray,
        c: np.ndarray,
        last_y: np.ndarray,
        next_seq: np.ndarray,
    ) -> None:
        """Write the new state of sessions whose steps succeeded: h, c [layers, n, hidden],
        arrays where the state lives (the model's outputs)."""
        if len(slots) == 1:  # a slice: 1 us against 4 for a one-element fancy index (NumPy)
            s = int(slots[0])
            self.h[:, s : s + 1] = h
            self.c[:, s : s + 1] = c
        elif not self.arrays.on_host:
            i = self.arrays.index(slots)
            self.h[:, i] = h
            self.c[:, i] = c
        elif len(slots) > 128:
            # Large batches one layer at a time: rows of a 2-D array scatter faster than the
            # middle axis of a 3-D one (timeit, 2 x 96: 78 against 101 us for 1024 rows, 16 against
            # 18 us for 256), while below ~128 rows the extra calls cost more (5.0 against 2.5 us
            # for one row).
            for layer in range(self.h.shape[0]):
                self.h[layer, slots] = h[layer]
                self.c[layer, slots] = c[layer]
        else:
            self.h[:, slots] = h
            self.c[:, slots] = c
        self.last_y[slots] = last_y
        self.next_seq[slots] = next_seq
        if self.journal is not None:
            self.journal.changed(slots)

    # -- state where it lives, and on the host ------------------------------------------------

    def gather(self, slots: np.ndarray) -> tuple[Any, Any]:
        """h and c of slots, [layers, n, hidden], C-contiguous, where the state lives."""
        # take, not h[:, s]: fancy indexing on the middle axis lays the copy out batch-first,
        # and making that C-contiguous for ONNX Runtime cost 25x the gather (NumPy).
        xp, i = self.arrays.xp, self.arrays.index(slots)
        return xp.take(self.h, i, axis=1), xp.take(self.c, i, axis=1)

    def gather_one(self, slot: int) -> tuple[Any, Any]:
        """h and c of one slot, [layers, 1, hidden]: a sliced copy (a one-element take costs
        3 us more on the scalar path)."""
        return self.h[:, slot : slot + 1].copy(), self.c[:, slot : slot + 1].copy()

    def zero_state(self, n: int) -> tuple[Any, Any]:
        """A zero h and c for n sessions, [layers, n, hidden], where the state lives."""
        layers, _, hidden = self.h.shape
        h = self.arrays.xp.zeros((layers, n, hidden), np.float32)
        return h, h.copy()

    def read_state(self, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """h and c of slots on the host, [layers, n, hidden]: one copy each, however many."""
        h, c = self.gather(slots)
        return self.arrays.to_host(h), self.arrays.to_host(c)

    def write_state(self, slots: np.ndarray, h: np.ndarray, c: np.ndarray) -> None:
        """Set h and c of slots from host arrays [layers, n, hidden] (not journaled)."""
        i = self.arrays.index(slots)
        self.h[:, i] = self.arrays.to_device(np.ascontiguousarray(h, np.float32))
        self.c[:, i] = self.arrays.to_device(np.ascontiguousarray(c, np.float32))

    def renew(self, slots: np.ndarray) -> None:
        """A new generation for reset sessions: their earlier answers are never replayed."""
        self.gen[slots] = self.new_generations(len(slots))
        self.replay[slots] = None

    def forget_answers(self, slots: np.ndarray) -> None:
        """No answer of these sessions is replayable any more (steps applied without one)."""
        self.replay[slots] = None

    def record(
        self,
        cache: ReplayCache,
        slots: np.ndarray,
        y: np.ndarray | list[np.ndarray],
        seq: np.ndarray,
        reset: np.ndarray,
        next_seq: np.ndarray,
        digests: np.ndarray,
        applied: np.ndarray | None = None,
    ) -> None:
        """One replay entry for the answers of one request (or of a tick's requests), chained
        to each session's previous entry; the sessions whose rows were applied (all, when
        applied is None) then point at it. A retry finds its answer by walking that chain."""
        entry = ReplayEntry(
            y, seq, self.gen[slots], reset, next_seq, self.replay[slots], self.replay_row[slots],
            digests,
        )  # fmt: skip
        if not cache.add(entry):
            return  # larger than the whole cache: those requests cannot be replayed
        if applied is None:
            self.replay[slots] = entry
            self.replay_row[slots] = 0 if len(slots) == 1 else np.arange(len(slots))
        else:
            rows = np.flatnonzero(applied)
            self.replay[slots[rows]] = entry
            self.replay_row[slots[rows]] = rows

    def chain(self, slot: int, entry: ReplayEntry) -> None:
        """Make entry (row 0) the newest answer of a slot's session (answers loaded from a
        shared store, or from a snapshot)."""
        self.replay[slot] = entry
        self.replay_row[slot] = 0

    def expired(self, ttl_s: float, now: float, protect: set[str]) -> list[str]:
        """Sessions idle for longer than ttl_s, from the least recently used on."""
        out = []
        cutoff = now - ttl_s
        for key, slot in self.slots.items():
            if self.last_used[slot] >= cutoff:
                break
            if key not in protect:
                out.append(key)
        return out

    # -- snapshots -----------------------------------------------------------------------------

    def capture(self, now: float | None = None) -> Captured:
        keys = list(self.slots)
        slots = np.fromiter(self.slots.values(), np.int64, len(keys))
        now = time.monotonic() if now is None else now
        h, c = self.read_state(slots)
        return Captured(
            keys,
            np.ascontiguousarray(h.transpose(1, 0, 2)),
            np.ascontiguousarray(c.transpose(1, 0, 2)),
            self.last_y[slots].copy(),
            self.next_seq[slots].copy(),
            now - self.last_used[slots],
            self._capture_replay(slots),
        )

    def _capture_replay(self, slots: np.ndarray) -> CapturedReplay:
        index, seq, nxt, reset, digest, ys = [], [], [], [], [], []
        heads, rows = self.replay[slots], self.replay_row[slots]
        for i, (entry, row) in enumerate(zip(heads.tolist(), rows.tolist(), strict=True)):
            if isinstance(entry, ReplayEntry) and entry.y is not None:
                index.append(i)
                seq.append(int(entry.seq[row]))
                nxt.append(int(entry.next_seq[row]))
                reset.append(bool(entry.reset[row]))
                digest.append(int(entry.digest[row]))
                ys.append(np.asarray(entry.y[row], np.float32))
        if not index:
            return CapturedReplay.empty(self.last_y.shape[1])
        return CapturedReplay(
            np.array(index, np.int64), np.array(seq, np.int64), np.array(nxt, np.int64),
            np.array(reset, bool), np.array(digest, np.uint64),
            np.array([len(y) for y in ys], np.int64), np.concatenate(ys),
        )  # fmt: skip

    def restore(
        self, snap: Captured, cache: ReplayCache | None = None, now: float | None = None
    ) -> int:
        """Load captured sessions (the caller checked them), and their last answers into
        cache; returns how many sessions fit."""
        n = min(len(snap.keys), self.free)
        if n == 0:
            return 0
        now = time.monotonic() if now is None else now
        # Oldest first, so the recency order survives the restart.
        order = np.argsort(-snap.idle[:n], kind="stable")
        keys = [snap.keys[i] for i in order]
        slots = self.create(keys, now)
        self.write_state(slots, snap.h[order].transpose(1, 0, 2), snap.c[order].transpose(1, 0, 2))
        self.last_y[slots] = snap.last_y[order]
        self.next_seq[slots] = snap.next_seq[order]
        self.last_used[slots] = now - snap.idle[order]
        if cache is not None and snap.replay is not None and len(snap.replay.index):
            self._restore_replay(snap.replay, order, slots, cache)
        return n

    def _restore_replay(
        self, r: CapturedReplay, order: np.ndarray, slots: np.ndarray, cache: ReplayCache
    ) -> None:
        slot_of = dict(zip(order.tolist(), slots.tolist(), strict=True))
        ends = np.cumsum(r.steps)
        starts = ends - r.steps
        for k, i in enumerate(r.index.tolist()):
            slot = slot_of.get(i)
            if slot is None:
                continue  # a session that did not fit
            entry = ReplayEntry(
                [r.y[starts[k] : ends[k]]], r.seq[k : k + 1].copy(), self.gen[[slot]].copy(),
                r.reset[k : k + 1].copy(), r.next_seq[k : k + 1].copy(),
                np.full(1, None, object), np.zeros(1, np.int64), r.digest[k : k + 1].copy(),
            )  # fmt: skip
            if cache.add(entry):
                self.chain(slot, entry)
