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
When an early answer's write is refused or fails, this replica remembers the session's
answered but unstored seqs and refuses its next request (FAILED_PRECONDITION), so that the
client re-reads the session instead of continuing on a history that lacks its steps.

Sessions that live for one request only (the Open Inference Protocol without a sequence id:
reset and ended in the request that made them, under ids no client chooses) never touch the
store. Store errors reach clients as one fixed message; their detail goes to the log, and
StoreHealth tells the server when the store refuses this replica (credentials, TLS).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from enum import StrEnum
from typing import Any, Protocol, TypeVar

import numpy as np

from lstm_serve.core.errors import Elsewhere, FailedPrecondition, ServiceError, Unavailable
from lstm_serve.core.frame import ONE_REQUEST, Frame
from lstm_serve.core.jobs import Job, Limits, OpJob, StepJob
from lstm_serve.core.probes import Probes
from lstm_serve.core.remote import Claim, Remote, Reply, State, StoreDown, Write
from lstm_serve.core.replay import ReplayCache, ReplayEntry
from lstm_serve.core.store import SessionStore

logger = logging.getLogger(__name__)


class Host(Protocol):
    """What sync needs of the scheduler it is attached to (core/scheduler.py): its store and
    replay cache, a way to answer a job with an error, and a way to ask for a tick."""

    store: SessionStore
    replay: ReplayCache
    limits: Limits
    label: str
    version: str  # the model version it runs
    sync: StateSync | None

    def fail(self, job: Job, exc: BaseException) -> None: ...

    def kick(self) -> None: ...


T = TypeVar("T")


class AnswerMode(StrEnum):
    """When a step is answered, with a shared store."""

    acked = "acked"  # after the store acknowledged its write
    early = "early"  # at once; the write follows


Failed = frozenset[str]  # the keys of a batch whose write did not land

# Sessions whose answered steps were not stored, remembered (early mode) until the client is
# told; the oldest are forgotten past this many.
LOST_MAX = 65_536


class Owned:
    """This replica's claim on a session: the epoch, and the store's version of it."""

    __slots__ = ("claimed", "epoch", "gen", "sent", "version", "written")

    def __init__(self, epoch: int, version: int, claimed: float, written: int) -> None:
        self.epoch = epoch
        self.version = version
        self.claimed = claimed  # perf_counter() when the claim was sent
        self.written = written  # next_seq as the store has it: newer replies are to write
        self.gen = -1  # the store's replies are of this local generation (-1: none yet)
        self.sent = False  # a write of it has gone out under this claim


class Lost:
    """Answers of one session that were given (early mode) but not stored."""

    __slots__ = ("at", "end", "ended", "first", "reset", "told")

    def __init__(self, first: int, end: int, ended: bool, reset: bool) -> None:
        self.first = first  # the store's next_seq: the first answered seq it lacks
        self.end = end  # the next_seq the answers reached
        self.ended = ended  # an EndSession (or sequence end) was answered, not stored
        self.reset = reset  # a reset was among the answers
        self.at = time.monotonic()
        self.told = 0.0  # perf_counter() of the first refusal (0: not yet)

    def message(self, session_id: str) -> str:
        if self.ended:
            what = "its end was answered here but not stored"
        elif self.reset or self.end <= self.first:
            what = f"the steps answered here up to seq {self.end - 1} were not stored"
        else:
            what = f"seq {self.first} to {self.end - 1} were answered here but not stored"
        return (
            f"session {session_id!r}: {what}, because another replica took the session over "
            f"or the session store failed; read the session (GetSession) and resend from the "
            f"seq it gives (or reset it)"
        )


class StoreHealth:
    """How the replica gets on with its shared store (one per engine, shared by its models).

    Store errors are logged here, each distinct message once a minute; clients only ever get
    a fixed message. When the store refuses this replica (credentials, TLS, permissions) the
    replica is misconfigured: `refused` says why and on_change tells the server, which turns
    its health NOT_SERVING so that the load balancer routes elsewhere; a probe then retries
    the store every PROBE_S until it accepts the replica again. A plain connection failure is
    the store's outage, shared by every replica: health stays as it is."""

    PROBE_S = 2.0
    LOG_EVERY_S = 60.0

    def __init__(self, probe: Callable[[], Awaitable[None]]) -> None:
        self.refused: str | None = None
        self.on_change: Callable[[str | None], None] | None = None
        self._probe = probe
        self._logged: dict[str, float] = {}
        self._task: asyncio.Task[None] | None = None

    def failed(self, what: str, exc: StoreDown) -> None:
        now = time.monotonic()
        msg = str(exc)
        last = self._logged.get(msg)
        if last is None or now - last >= self.LOG_EVERY_S:
            if len(self._logged) >= 256:  # distinct messages (ports, addresses) stay bounded
                self._logged.clear()
            self._logged[msg] = now
            logger.warning("session store: %s failed: %s", what, msg)
        if exc.refused and self.refused is None:
            self.refused = msg
            logger.error(
                "the session store refuses this replica (%s): health is NOT_SERVING until it "
                "accepts it again (checked every %gs)", msg, self.PROBE_S,
            )  # fmt: skip
            if self._task is None:
                self._task = asyncio.ensure_future(self._probe_until_accepted())
            self._changed()

    async def check(self) -> None:
        """Ask the store now; raises StoreDown when it fails."""
        await self._probe()
        self.ok()

    def ok(self) -> None:
        """A store call succeeded."""
        if self.refused is not None:
            logger.warning("the session store accepts this replica again")
            self.refused = None
            self._changed()

    async def _probe_until_accepted(self) -> None:
        try:
            while self.refused is not None:
                await asyncio.sleep(self.PROBE_S)
                try:
                    await self._probe()
                except StoreDown as exc:
                    if exc.refused:
                        continue
                    self.failed("a check", exc)  # down now, not refusing: an outage
                self.ok()
        finally:
            self._task = None

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change(self.refused)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


class StateSync:
    def __init__(
        self,
        scheduler: Host,
        remote: Remote,
        probes: Probes,
        acked: bool,
        replies: int,
        health: StoreHealth | None = None,
        ttl_s: float = 3600.0,
    ) -> None:
        self.sched = scheduler
        self.store = scheduler.store
        self.remote = remote
        self.probes = probes
        self.acked_mode = acked
        self.replies = replies  # kept per session in the store
        self.health = health or StoreHealth(remote.check)
        self.ttl_s = ttl_s
        self.owned: dict[str, Owned] = {}
        # early mode: key -> answers given but not stored, until the client is told
        self.lost: OrderedDict[str, Lost] = OrderedDict()
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
        # claimed, not in this version's store but in another version's: key -> that version
        self._moved: dict[str, str] = {}
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
        evicted: list[tuple[str, Owned, int]] = []
        for key in keys:
            o = self.owned.pop(key, None)
            if o is None:
                continue
            if ended:
                self._dirty.pop(key, None)
                if o.version == 0 and not o.sent:
                    # Created here and never written: nothing to delete, no write to wait for.
                    self.pending.pop(key, None)
                    continue
                self._ended[key] = o
                self._mark(key)
            elif key in self._dirty:
                # Evicted before its write went out: keep the state to write (unless an
                # earlier write of it failed: then nothing after it may land). A session at
                # seq 0 needs it too when the store holds an older history (a reset).
                slot = self.store.slot(key)
                del self._dirty[key]
                stored = o.version > 0 or o.sent
                if (
                    slot is not None
                    and (self.store.next_seq[slot] > 0 or stored)
                    and key not in self._poisoned
                ):
                    evicted.append((key, o, slot))
        if evicted:  # one read of their state (one copy where state is on a GPU)
            hs, cs = self.store.read_state(np.fromiter((s for *_, s in evicted), np.int64))
            for i, (key, o, slot) in enumerate(evicted):
                self._captured[key] = (self._state(slot, o, hs[:, i].copy(), cs[:, i].copy()), o)

    # -- the scheduler's hooks -----------------------------------------------------------------

    def ready(self, job: Job) -> bool:
        """Whether this replica owns every session of job; if not, loads them and says wait."""
        keys = job.keys
        if self.lost and self._tell_lost(job):
            return False
        owned = self.owned
        if all(k in owned for k in keys) and not self._stale(job):
            return not (self._moved and self._elsewhere(job))
        if self._failed_now:
            for k in keys:
                exc = self._failed_now.get(k)
                if exc is not None:
                    self._refuse(job, exc)
                    return False
        missing = [k for k in keys if k not in owned]
        if isinstance(job, StepJob) and job.frame.end is not None:
            missing = self._needed(job.frame, keys, missing)
            if not missing:
                return True
        for k in missing:
            if k not in self._loading:
                self._loading.add(k)
                self._want.append(k)
        if self._want and not self._load_soon:
            self._load_soon = True
            self._spawn(self._load())
        return False

    @staticmethod
    def _needed(frame: Frame, keys: list[str], missing: list[str]) -> list[str]:
        """The missing sessions that must be claimed: not the private one-request sessions
        (reset and ended by this request; nothing of them is read or written)."""
        assert frame.end is not None
        once = frame.reset & frame.end
        if not once.any():
            return missing
        skip = {
            keys[i] for i in np.flatnonzero(once).tolist() if frame.ids[i].startswith(ONE_REQUEST)
        }
        return [k for k in missing if k not in skip]

    def _elsewhere(self, job: Job) -> bool:
        """Refuse a job on sessions that live on another version of the model (unless it
        starts them over here: a reset); True when refused. Their claims are forgotten, so
        that a later request claims again."""
        moved: dict[str, str] = {}
        first = -1
        for i, key in enumerate(job.keys):
            version = self._moved.pop(key, None)
            if version is None or (_restarts(job, i) and not _ends(job)):
                continue
            moved[key] = version
            self.owned.pop(key, None)
            first = i if first < 0 else first
        if not moved:
            return False
        sid, version = _session_id(job, first), moved[job.keys[first]]
        self._refuse(
            job,
            Elsewhere(
                f"session {sid[:64]!r} is on version {version} of the model, not on "
                f"{self.sched.version}: name version {version}, or send the step with reset "
                f"to start it again on {self.sched.version}",
                moved,
            ),
        )
        return True

    def _tell_lost(self, job: Job) -> bool:
        """Early mode: refuse a request on a session whose answered steps were not stored,
        and every request on it that was already queued then (a stream's pipeline); the first
        request that comes after the refusal, or one that resets or ends the session, goes on."""
        lost = self.lost
        now = time.monotonic()
        for i, key in enumerate(job.keys):
            entry = lost.get(key)
            if entry is None:
                continue
            if now - entry.at > self.ttl_s or _restarts(job, i) or (0 < entry.told < job.t0):
                del lost[key]
                continue
            if not entry.told:
                entry.told = time.perf_counter()
            self._refuse(job, FailedPrecondition(entry.message(_session_id(job, i))))
            return True
        return False

    def _refuse(self, job: Job, exc: ServiceError) -> None:
        """Fail a job at admission. It stays queued, done, until the next tick drops it; that
        tick, kicked now, then looks at the jobs behind it on its sessions."""
        self.sched.fail(job, exc)
        self.sched.kick()

    def _lose(self, key: str, o: Owned, state: State | None) -> None:
        """Early mode: remember that key's answers since o.written were not stored."""
        if state is None:
            entry = Lost(o.written, o.written, True, False)
        else:
            entry = Lost(o.written, state.next_seq, False, state.clear and o.gen >= 0)
        old = self.lost.pop(key, None)
        if old is not None and not old.told:  # a later batch of the same loss
            entry.first, entry.reset = old.first, entry.reset or old.reset
            entry.ended = entry.ended or old.ended
        self.lost[key] = entry
        while len(self.lost) > LOST_MAX:
            self.lost.popitem(last=False)

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
                if self.lost:  # steps answered on the copy since its write failed are lost too
                    for key in gone:
                        entry, slot = self.lost.get(key), self.store.slot(key)
                        if entry is not None and slot is not None:
                            entry.end = max(entry.end, int(self.store.next_seq[slot]))
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
                    self._moved.pop(key, None)
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
            n = await self.remote.peek(key)
        except StoreDown as exc:
            self.probes.store_errors.inc()
            self.health.failed("reading a session", exc)
            raise _store_down() from exc
        self.health.ok()
        return n

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
                self.health.failed(f"{self.sched.label}: claiming sessions", exc)
                err = _store_down()
                for k in keys:
                    self._load_failed[k] = err
            else:
                self.health.ok()
                self.probes.store_claim_seconds.observe(time.perf_counter() - t0)
                self._loaded.extend((k, c, t0) for k, c in zip(keys, claims, strict=True))
        finally:
            self._loading.difference_update(keys)
            self.sched.kick()

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
                if claim.elsewhere:
                    self._moved[key] = claim.elsewhere
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
        prev: ReplayEntry | None = None
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
            store.chain(slot, prev)

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

    def _state(self, slot: int, o: Owned, h: np.ndarray, c: np.ndarray) -> State:
        """A session's state now (h, c [layers, hidden], read from the store in one batch),
        with the replies the store does not have yet."""
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
            h, c, store.last_y[slot].copy(),
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
                o.sent = True
        live: list[tuple[str, Owned, int]] = []
        for key in dirty:
            o2 = self.owned.get(key)
            slot = self.store.slot(key)
            if o2 is None or slot is None or key in self._poisoned:
                failed.add(key)
                continue
            live.append((key, o2, slot))
        if live:
            # One read of every written session's state: one copy where state is on a GPU.
            hs, cs = self.store.read_state(np.fromiter((s for *_, s in live), np.int64, len(live)))
            for i, (key, o2, slot) in enumerate(live):
                state = self._state(slot, o2, hs[:, i].copy(), cs[:, i].copy())
                writes.append(Write(key, o2.epoch, o2.version, state))
                owners.append((o2, int(self.store.gen[slot])))
                o2.sent = True
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
            self.health.failed(f"{self.sched.label}: writing sessions", exc)
            done = [False] * len(writes)
        else:
            self.health.ok()
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
                if not self.acked_mode:  # answered already: the client must learn it
                    self._lose(w.key, o, w.state)
                if w.state is not None:
                    self._poisoned.add(w.key)
                    self._drops.append((w.key, o))
        if failed and not self._closed:
            self.sched.kick()  # the drops apply at the next tick
        return failed

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _store_down() -> Unavailable:
    # The cause is in the log (StoreHealth): its text names hosts, ports and libraries.
    return Unavailable("session store unavailable; retry")


def _restarts(job: Job, i: int) -> bool:
    """Whether job's i-th session starts over (reset) or ends: no history of it continues."""
    if isinstance(job, StepJob):
        return bool(job.frame.reset[i])
    if isinstance(job, OpJob):
        return job.kind in ("reset", "end")
    return job.prefix is not None and bool(job.prefix.reset[0])  # a forecast's prefix


def _ends(job: Job) -> bool:
    return isinstance(job, OpJob) and job.kind == "end"


def _session_id(job: Job, i: int) -> str:
    return job.frame.ids[i] if isinstance(job, StepJob) else job.session_id


def _not_stored() -> Unavailable:
    return Unavailable(
        "the step was not stored (the session moved to another replica, or the session "
        "store failed); retry: it is applied once"
    )
