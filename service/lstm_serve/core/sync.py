"""A scheduler's sessions written through to a shared store, so replicas share one session space.

The hook is small: the scheduler asks ready(job) when admitting (a session this replica does
not own is claimed from the store first: a new ownership epoch), calls before_tick() (loaded
sessions go in, fenced ones go out, while no batch is in flight) and flush() after each tick;
the store journals every change (SessionStore.journal). One writer task sends the changed
sessions' state, read at send time, as one script call per batch; batches never overlap, so
each write names the exact version it follows. A write refused by the store (another replica
claimed the session, or an earlier write failed) drops the local copy: the next request
claims it again, and the client's retry reaches whichever replica owns it.

acked mode gates answers (acked()) on the write that carries them: an answered step is in the
store. In early mode answers go out at once and a crash loses at most the steps not yet
written (one batch in flight plus what queued behind it); the store's next_seq says which.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Iterable
from enum import StrEnum
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from lstm_serve.core.errors import ServiceError, Unavailable
from lstm_serve.core.probes import Probes
from lstm_serve.core.remote import Claim, Remote, Reply, State, StoreDown, Write
from lstm_serve.core.replay import ReplayEntry

if TYPE_CHECKING:
    from lstm_serve.core.scheduler import Job, Scheduler

logger = logging.getLogger(__name__)

T = TypeVar("T")


class AnswerMode(StrEnum):
    """When a step is answered, with a shared store."""

    acked = "acked"  # after the store acknowledged its write
    early = "early"  # at once; the write follows


Failed = frozenset[str]  # the keys of a batch whose write did not land


class Owned:
    """This replica's claim on a session: the epoch, and the store's version of it."""

    __slots__ = ("claimed", "epoch", "gen", "version", "written")

    def __init__(self, epoch: int, version: int, claimed: float, written: int) -> None:
        self.epoch = epoch
        self.version = version
        self.claimed = claimed  # perf_counter() when the claim was sent
        self.written = written  # next_seq as the store has it: newer replies are to write
        self.gen = -1  # the store's replies are of this local generation (-1: none yet)


class StateSync:
    def __init__(
        self, scheduler: Scheduler, remote: Remote, probes: Probes, acked: bool, replies: int
    ) -> None:
        self.sched = scheduler
        self.store = scheduler.store
        self.remote = remote
        self.probes = probes
        self.acked_mode = acked
        self.replies = replies  # kept per session in the store
        self.owned: dict[str, Owned] = {}
        # key -> the future of the write that will carry its newest state
        self.pending: dict[str, asyncio.Future[Failed]] = {}
        self._loading: set[str] = set()
        self._want: list[str] = []
        self._load_soon = False
        self._loaded: list[tuple[str, Claim, float]] = []
        self._load_failed: dict[str, ServiceError] = {}
        self._failed_now: dict[str, ServiceError] = {}
        self._drops: list[tuple[str, Owned]] = []
        self._absent: list[tuple[str, Owned]] = []  # claimed, but not in the store
        self._poisoned: set[str] = set()  # a write failed; later states must not land either
        self._changed: list[np.ndarray] = []
        self._dirty: dict[str, None] = {}  # ordered set of keys to write
        # the state of dirty sessions evicted before their write went out
        self._captured: dict[str, tuple[State, Owned]] = {}
        self._ended: dict[str, Owned] = {}
        self._next: asyncio.Future[Failed] | None = None
        self._writer: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False
        self.store.journal = self
        scheduler.sync = self

    # -- the journal (SessionStore calls these) ------------------------------------------------

    def changed(self, slots: np.ndarray) -> None:
        self._changed.append(slots)

    def removed(self, keys: list[str], ended: bool) -> None:
        if self._changed:
            self._collect()  # the slots of these keys may be reused in this tick
        for key in keys:
            o = self.owned.pop(key, None)
            if o is None:
                continue
            if ended:
                self._dirty.pop(key, None)
                self._ended[key] = o
                self._mark(key)
            elif key in self._dirty:
                # Evicted before its write went out: keep the state to write (unless an
                # earlier write of it failed: then nothing after it may land).
                slot = self.store.slot(key)
                del self._dirty[key]
                if slot is not None and self.store.next_seq[slot] > 0 and key not in self._poisoned:
                    self._captured[key] = (self._state(slot, o), o)

    # -- the scheduler's hooks -----------------------------------------------------------------

    def ready(self, job: Job) -> bool:
        """Whether this replica owns every session of job; if not, loads them and says wait."""
        keys = job.keys
        owned = self.owned
        if all(k in owned for k in keys) and not self._stale(job):
            return True
        if self._failed_now:
            for k in keys:
                exc = self._failed_now.get(k)
                if exc is not None:
                    self.sched._fail(job, exc)  # stays queued, done: the next tick drops it
                    return False
        for k in keys:
            if k not in owned and k not in self._loading:
                self._loading.add(k)
                self._want.append(k)
        if self._want and not self._load_soon:
            self._load_soon = True
            self._spawn(self._load())
        return False

    def _stale(self, job: Job) -> bool:
        """A seq other than the next one of a local copy claimed before the request came:
        another replica may have changed the session since, so the error (or replay) the copy
        would give is not to be trusted. The copy is dropped, to be claimed again."""
        frame = getattr(job, "frame", None)
        if frame is None:
            return False
        store = self.store
        if len(job.keys) == 1:  # the common case, without arrays
            seq = int(frame.seq[0])
            slot = store.slots.get(job.keys[0])
            if seq < 0 or slot is None or frame.reset[0] or seq == int(store.next_seq[slot]):
                return False
        elif frame.seq.max(initial=-1) < 0:
            return False
        slots = store.lookup(job.keys)
        present = (slots >= 0) & (frame.seq >= 0) & ~frame.reset
        ahead = present & (frame.seq != store.next_seq[np.where(present, slots, 0)])
        if not ahead.any():
            return False
        t0 = getattr(job, "t0", 0.0)
        stale = [job.keys[i] for i in np.flatnonzero(ahead).tolist()]
        stale = [k for k in stale if self.owned[k].claimed < t0]
        if stale:
            store.remove(stale)
            self.probes.sessions.set(len(store))
        return bool(stale)

    def runnable(self, pending: Iterable[Job]) -> bool:
        """Whether a queued job may run now (the others wait for loads, which kick when done)."""
        loading = self._loading
        return not loading or any(loading.isdisjoint(job.keys) for job in pending)

    @property
    def idle(self) -> bool:
        return self._writer is None and not self._loading and not self._dirty

    def before_tick(self) -> None:
        self._failed_now = self._load_failed
        if self._load_failed:
            self._load_failed = {}
        if self._drops:
            drops, self._drops = self._drops, []
            gone = [key for key, o in drops if self.owned.get(key) is o]
            if gone:
                self.store.remove(gone)
                self.probes.sessions.set(len(self.store))
            self._poisoned.difference_update(key for key, _ in drops)
        if self._absent:
            # Claimed for a request that did not create the session (refused, or held back):
            # forget the claim; a later request claims again.
            absent, self._absent = self._absent, []
            for key, o in absent:
                if self.owned.get(key) is o and key not in self.store.slots:
                    del self.owned[key]
        if self._loaded:
            self._apply_loaded()

    def flush(self) -> None:
        """After a tick: what it changed goes into the next write."""
        if self._changed:
            self._collect()
        if (self._dirty or self._ended or self._captured) and self._writer is None:
            self._writer = asyncio.get_running_loop().create_task(self._write_loop())

    # -- answers -------------------------------------------------------------------------------

    def acked(self, fut: asyncio.Future[T], keys: list[str]) -> asyncio.Future[T]:
        """fut's result once the store holds it (acked mode); at once in early mode."""
        if not self.acked_mode:
            return fut
        loop = asyncio.get_running_loop()
        out: asyncio.Future[T] = loop.create_future()

        def answered(f: asyncio.Future[T]) -> None:
            if out.done():
                return
            if f.cancelled():
                out.cancel()
                return
            exc = f.exception()
            if exc is not None:
                out.set_exception(exc)
                return
            pending = self.pending
            waits = {p for k in keys if (p := pending.get(k)) is not None}
            if not waits:
                out.set_result(f.result())
                return
            left = [len(waits)]

            def written(w: asyncio.Future[Failed]) -> None:
                left[0] -= 1
                if out.done():
                    return
                if w.result() and not w.result().isdisjoint(keys):
                    out.set_exception(_not_stored())
                elif left[0] == 0:
                    out.set_result(f.result())

            for w in waits:
                w.add_done_callback(written)

        fut.add_done_callback(answered)
        # A caller that goes away takes its request out of the queue.
        out.add_done_callback(lambda o: fut.cancel() if o.cancelled() else None)
        return out

    async def peek(self, key: str) -> int | None:
        try:
            return await self.remote.peek(key)
        except StoreDown as exc:
            self.probes.store_errors.inc()
            raise _store_down(exc) from exc

    async def close(self) -> None:
        """Write what is left (drain), then close the connection."""
        self.flush()
        while self._writer is not None:
            await asyncio.shield(self._writer)
        self._closed = True
        await self.remote.close()

    # -- loading -------------------------------------------------------------------------------

    async def _load(self) -> None:
        await asyncio.sleep(0)  # let this tick's other misses join the batch
        self._load_soon = False
        keys, self._want = self._want, []
        try:
            waits = {p for k in keys if (p := self.pending.get(k)) is not None}
            if waits:  # a reload must see this replica's own writes of these sessions
                await asyncio.wait(waits)
            t0 = time.perf_counter()
            try:
                claims = await self.remote.claim(keys)
            except StoreDown as exc:
                self.probes.store_errors.inc()
                logger.warning("%s: claiming %d sessions failed: %s", self.sched.label, len(keys), exc)  # fmt: skip
                err = _store_down(exc)
                for k in keys:
                    self._load_failed[k] = err
            else:
                self.probes.store_claim_seconds.observe(time.perf_counter() - t0)
                self._loaded.extend((k, c, t0) for k, c in zip(keys, claims, strict=True))
        finally:
            self._loading.difference_update(keys)
            self.sched._kick()

    def _apply_loaded(self) -> None:
        store = self.store
        loaded, self._loaded = self._loaded, []
        stale = [k for k, _, _ in loaded if k in store.slots]
        if stale:
            store.remove(stale)
        with_state: list[tuple[str, State]] = []
        for key, claim, t0 in loaded:
            n = 0 if claim.state is None else claim.state.next_seq
            o = self.owned[key] = Owned(claim.epoch, claim.version, t0, n)
            self._poisoned.discard(key)
            if claim.state is not None:
                with_state.append((key, claim.state))
            else:
                self._absent.append((key, o))
        if not with_state:
            return
        keys = [k for k, _ in with_state]
        states = [s for _, s in with_state]
        try:
            evicted = store.make_room(
                len(keys), self.sched.limits.cap_policy, set(keys), self.sched.label
            )
        except ServiceError as exc:
            for k in keys:
                self.owned.pop(k, None)
                self._failed_now[k] = exc
            return
        if evicted:
            self.probes.evicted_lru.inc(len(evicted))
        slots = store.adopt(
            keys,
            np.stack([s.h for s in states]),
            np.stack([s.c for s in states]),
            np.stack([s.last_y for s in states]),
            np.fromiter((s.next_seq for s in states), np.int64, len(states)),
        )
        for key, slot, s in zip(keys, slots.tolist(), states, strict=True):
            self.owned[key].gen = int(store.gen[slot])
            self._seed_replay(slot, s.replies)
        self.probes.store_loaded.inc(len(keys))
        self.probes.sessions.set(len(store))

    def _seed_replay(self, slot: int, replies: tuple[Reply, ...]) -> None:
        """The stored replies, chained as the scheduler chains its own: retries of the last
        requests are answered again here too."""
        store = self.store
        gen = store.gen[[slot]].copy()
        prev: object = None
        for r in replies:  # oldest first
            entry = ReplayEntry(
                r.y[None], np.array([r.seq], np.int64), gen, np.array([r.reset]),
                np.array([r.next_seq], np.int64), np.array([prev], object),
                np.zeros(1, np.int64), np.array([r.digest], np.uint64),
            )  # fmt: skip
            if not self.sched.replay.add(entry):
                break
            prev = entry
        if prev is not None:
            store.replay[slot] = prev
            store.replay_row[slot] = 0

    # -- writing -------------------------------------------------------------------------------

    def _collect(self) -> None:
        changed, self._changed = self._changed, []
        slots = np.unique(np.concatenate(changed)) if len(changed) > 1 else changed[0]
        keys_at = self.store.keys
        owned = self.owned
        for s in slots.tolist():
            key = keys_at[s]
            if key is not None and key in owned:
                self._dirty[key] = None
                self._mark(key)

    def _mark(self, key: str) -> None:
        if self._next is None:
            self._next = asyncio.get_running_loop().create_future()
        self.pending[key] = self._next

    def _state(self, slot: int, o: Owned) -> State:
        """A session's state now, with the replies the store does not have yet."""
        store = self.store
        gen = int(store.gen[slot])
        clear = gen != o.gen  # new, or reset since the last write: the stored replies go
        replies: list[Reply] = []
        entry, row = store.replay[slot], int(store.replay_row[slot])
        while (
            isinstance(entry, ReplayEntry) and entry.y is not None and len(replies) < self.replies
        ):
            if int(entry.gen[row]) != gen or (not clear and int(entry.seq[row]) < o.written):
                break
            replies.append(
                Reply(
                    int(entry.seq[row]),
                    int(entry.next_seq[row]),
                    int(entry.digest[row]),
                    bool(entry.reset[row]),
                    np.asarray(entry.y[row]),
                )
            )
            entry, row = entry.prev[row], int(entry.prev_row[row])
        replies.reverse()
        return State(
            store.h[:, slot].copy(), store.c[:, slot].copy(), store.last_y[slot].copy(),
            int(store.next_seq[slot]), tuple(replies), clear,
        )  # fmt: skip

    def _batch(self) -> tuple[list[Write], list[tuple[Owned, int]], set[str]]:
        """The next write, read from the store now (between ticks: a consistent state), with
        each session's claim and generation."""
        writes: list[Write] = []
        owners: list[tuple[Owned, int]] = []
        failed: set[str] = set()
        dirty, self._dirty = self._dirty, {}
        captured, self._captured = self._captured, {}
        ended, self._ended = self._ended, {}
        for key, (state, o) in captured.items():
            if key in self._poisoned:
                failed.add(key)
            else:
                writes.append(Write(key, o.epoch, o.version, state))
                owners.append((o, -1))
        for key in dirty:
            o2 = self.owned.get(key)
            slot = self.store.slot(key)
            if o2 is None or slot is None or key in self._poisoned:
                failed.add(key)
                continue
            writes.append(Write(key, o2.epoch, o2.version, self._state(slot, o2)))
            owners.append((o2, int(self.store.gen[slot])))
        for key, o in ended.items():
            writes.append(Write(key, o.epoch, o.version, None))
            owners.append((o, -1))
        return writes, owners, failed

    async def _write_loop(self) -> None:
        try:
            while self._dirty or self._ended or self._captured:
                fut = self._next
                self._next = None
                writes, owners, failed = self._batch()
                if writes:
                    failed |= await self._send(writes, owners)
                if fut is not None:
                    fut.set_result(frozenset(failed))
                    for key in [k for k, p in self.pending.items() if p is fut]:
                        del self.pending[key]
        finally:
            self._writer = None

    async def _send(self, writes: list[Write], owners: list[tuple[Owned, int]]) -> set[str]:
        t0 = time.perf_counter()
        try:
            done = await self.remote.write(writes)
        except StoreDown as exc:
            self.probes.store_errors.inc()
            logger.warning("%s: writing %d sessions failed: %s", self.sched.label, len(writes), exc)  # fmt: skip
            done = [False] * len(writes)
        else:
            self.probes.store_write_seconds.observe(time.perf_counter() - t0)
            fenced = done.count(False)
            if fenced:
                self.probes.store_fenced.inc(fenced)
                logger.info("%s: %d writes fenced (another replica owns them)", self.sched.label, fenced)  # fmt: skip
        failed: set[str] = set()
        for w, (o, gen), ok in zip(writes, owners, done, strict=True):
            if ok:
                o.version += 1
                if w.state is not None:
                    o.written, o.gen = w.state.next_seq, gen
            else:
                failed.add(w.key)
                if w.state is not None:
                    self._poisoned.add(w.key)
                    self._drops.append((w.key, o))
        if failed and not self._closed:
            self.sched._kick()  # the drops apply at the next tick
        return failed

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _store_down(exc: BaseException) -> Unavailable:
    return Unavailable(f"session store unavailable ({exc}); retry later")


def _not_stored() -> Unavailable:
    return Unavailable(
        "the step was not stored (the session moved to another replica, or the session "
        "store failed); retry: it is applied once"
    )
