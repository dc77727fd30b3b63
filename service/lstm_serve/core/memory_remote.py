"""A shared session store in process memory, with the Redis store's semantics.

Why it exists: tests and single-process development. It lets two replicas (two schedulers, two
StateSyncs) in one process, on one event loop or on several threads, share one session space
without a redis-server, and it lets a test make the store fail on cue (the next N calls raise
StoreDown, optionally `refused`, before or after the change lands), hold writes back (a slow
store) and change a record "from another replica" (a second instance's claim, or `take`). It
is not a production store: nothing survives the process, and replicas in other processes see
nothing of it.

It keeps what core/redis_store.py keeps, with the same rules (its Lua scripts are the
specification; tests/core/test_remote_contract.py runs the same cases against both):

- per session: epoch, version, h, c, last output, next_seq, and the last `replies` replies
  (oldest first), all float32 copies, never views of the caller's arrays;
- claim: a stored session is taken over under a new random 62-bit epoch (its version stays)
  and its TTL is refreshed; an unknown session is left alone (nothing is stored) and claimed
  at version 0;
- write: applied only if the stored epoch and version are the ones named (version 0: only if
  the store holds no such session); a write stores the state under the writer's epoch at
  version + 1, drops the kept replies first when `clear`, appends the new ones and keeps the
  last `replies`; a delete removes the session (a delete at version 0 of a session the store
  does not hold is applied, and changes nothing);
- the writes and claims of one call are applied in order, at once (as one script call);
- per session id of the model, the version whose record it is: set (with the TTL) by every
  write, deleted by a delete when it names this version; while it names another version, a
  claim says which (Claim.elsewhere), takes nothing and deletes this version's record of the
  id (superseded), and a write that is not a creation is fenced;
- peek reads next_seq without claiming or refreshing the TTL;
- every claim and write refreshes the session's TTL; an expired session is gone.

Several instances share sessions by sharing one `records` dict (`MemoryRemote.peer()`); each
instance has its own namespace prefix, as RedisRemote has, its own fault injection and its own
call counts. Every call gives the event loop a turn first (a round trip never completes
synchronously), and the changes of one call happen under one lock, so replicas on different
threads see each call whole.
"""

from __future__ import annotations

import asyncio
import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

import numpy as np

from lstm_serve.core.remote import Claim, Reply, State, StoreDown, Write

F32 = np.dtype("<f4")
OPS = frozenset({"claim", "write", "peek", "check"})
_U64 = 1 << 64
_I64 = 1 << 63

# One lock for every record dict: a call's changes are atomic across threads (a Lua script's
# are across clients). Calls are short and never await while holding it.
_LOCK = threading.Lock()


@dataclass(slots=True)
class Record:
    """One stored session: what the Redis store's hash and reply list hold."""

    epoch: int
    version: int
    h: np.ndarray  # [layers, hidden] float32
    c: np.ndarray
    last_y: np.ndarray  # [output_dim]
    next_seq: int
    replies: list[Reply] = field(default_factory=list)  # oldest first
    expires: float = float("inf")  # the clock's time at which the session expires


@dataclass(slots=True)
class _Faults:
    left: int = 0  # calls still to fail
    refused: bool = False
    applied: bool = False  # the change lands, then the call fails (a reply lost on the way)
    ops: frozenset[str] = OPS


class MemoryRemote:
    """One model's sessions under `namespace`, in `records` (shared with peer instances).

    layers, hidden, output_dim, ttl_s and replies are RedisRemote's. clock gives the time
    that TTLs are counted in (time.monotonic by default; a test may pass its own).
    """

    def __init__(
        self,
        layers: int,
        hidden: int,
        output_dim: int,
        ttl_s: float = 3600.0,
        replies: int = 32,
        *,
        namespace: str = "",
        records: dict[str, Record] | None = None,
        clock: Callable[[], float] = time.monotonic,
        model: str = "",
        version: str = "",
        where: dict[str, tuple[str, float]] | None = None,
    ) -> None:
        self.records: dict[str, Record] = {} if records is None else records
        # model-level key of a session id -> (the version whose record it is, expiry)
        self.where: dict[str, tuple[str, float]] = {} if where is None else where
        self.namespace = namespace
        self.prefix = f"lstm-serve:{namespace}:"
        self.where_prefix = f"lstm-serve:{model or namespace}:where:"
        self.model = model
        self.own = version or namespace
        self.shape = (layers, hidden)
        self.output_dim = output_dim
        self.ttl_s = max(int(ttl_s * 1000), 1) / 1000  # whole milliseconds, as Redis's PEXPIRE
        self.replies = max(replies, 1)
        self.clock = clock
        # When set to an event, writes (and only writes) wait for it to be set: a slow store.
        self.gate: asyncio.Event | None = None
        self.calls: Counter[str] = Counter()  # calls made, by op (failed ones too)
        self.closed = False
        self._faults = _Faults()

    # -- test controls -------------------------------------------------------------------------

    def peer(self, namespace: str | None = None, version: str | None = None) -> MemoryRemote:
        """Another replica's connection to the same store (same records, shape, TTL, replies);
        with namespace and version: to another version of the same model."""
        return MemoryRemote(
            self.shape[0], self.shape[1], self.output_dim, self.ttl_s, self.replies,
            namespace=self.namespace if namespace is None else namespace,
            records=self.records, clock=self.clock, model=self.model,
            version=self.own if version is None else version, where=self.where,
        )  # fmt: skip

    def fail_next(
        self,
        n: int = 1,
        *,
        refused: bool = False,
        applied: bool = False,
        ops: Collection[str] = OPS,
    ) -> None:
        """Make this instance's next n calls among ops raise StoreDown (refused: the store
        refuses this replica, as for a wrong password; else it is down). applied: a write or
        claim lands first and only its answer is lost, as when a reply times out."""
        unknown = set(ops) - OPS
        if unknown:
            raise ValueError(f"unknown store operations {sorted(unknown)}; known: {sorted(OPS)}")
        self._faults = _Faults(n, refused, applied, frozenset(ops))

    def hold(self) -> asyncio.Event:
        """Hold this instance's writes until the returned event is set (a slow store)."""
        self.gate = asyncio.Event()
        return self.gate

    def take(self, key: str) -> Claim:
        """Claim key now, as another replica would (synchronous, no faults, not counted)."""
        with _LOCK:
            return self._claim_one(key, secrets.randbits(62) + 1, self.clock())

    def record(self, key: str) -> Record | None:
        """A copy of what the store holds for key (None: nothing, or expired)."""
        with _LOCK:
            rec = self._live(self._key(key), self.clock())
            if rec is None:
                return None
            return Record(
                rec.epoch, rec.version, rec.h.copy(), rec.c.copy(), rec.last_y.copy(),
                rec.next_seq, [_reply_copy(r) for r in rec.replies], rec.expires,
            )  # fmt: skip

    def sessions(self) -> list[str]:
        """The sessions this namespace holds (live ones), in the order they were first stored."""
        now = self.clock()
        p = self.prefix
        with _LOCK:
            live = [k for k in list(self.records) if k.startswith(p) and self._live(k, now)]
        return [k[len(p) + 1 : -1] for k in live]  # prefix{session}

    # -- the Remote protocol -------------------------------------------------------------------

    async def claim(self, keys: list[str]) -> list[Claim]:
        # Random epochs (62 bits, never 0), as RedisRemote: never reused, so a delete needs no
        # marker and an old claim never matches a later session of the same id.
        epochs = [secrets.randbits(62) + 1 for _ in keys]
        fault = await self._enter("claim")
        with _LOCK:
            now = self.clock()
            out = [self._claim_one(k, e, now) for k, e in zip(keys, epochs, strict=True)]
        self._after(fault)
        return out

    async def write(self, writes: list[Write]) -> list[bool]:
        """Whether each write was applied (False: fenced by another epoch or version)."""
        fault = await self._enter("write")
        encoded = [(w, None if w.state is None else self._copy(w.state)) for w in writes]
        if self.gate is not None:
            await self.gate.wait()
        with _LOCK:
            now = self.clock()
            done = [self._write_one(w, s, now) for w, s in encoded]
        self._after(fault)
        return done

    async def peek(self, key: str) -> int | None:
        await self._enter("peek")  # a peek fails before it reads
        with _LOCK:
            rec = self._live(self._key(key), self.clock())
            return None if rec is None else rec.next_seq

    async def check(self) -> None:
        await self._enter("check")

    async def close(self) -> None:
        self.closed = True

    # -- the rules (the Redis store's scripts) -------------------------------------------------

    def _key(self, session: str) -> str:
        return f"{self.prefix}{{{session}}}"

    def _live(self, k: str, now: float) -> Record | None:
        rec = self.records.get(k)
        if rec is not None and rec.expires <= now:
            del self.records[k]
            return None
        return rec

    def _where(self, session: str, now: float) -> tuple[str, str | None]:
        k = f"{self.where_prefix}{{{session}}}"
        w = self.where.get(k)
        if w is not None and w[1] <= now:
            del self.where[k]
            w = None
        return k, None if w is None else w[0]

    def _claim_one(self, key: str, epoch: int, now: float) -> Claim:
        rec = self._live(self._key(key), now)
        wk, w = self._where(key, now)
        if w is not None and w != self.own:
            self.records.pop(self._key(key), None)  # superseded: it lives on version w
            return Claim(epoch, 0, None, w)
        if rec is None:
            return Claim(epoch, 0, None)
        rec.epoch = epoch
        rec.expires = now + self.ttl_s
        if w is not None:
            self.where[wk] = (w, now + self.ttl_s)
        state = State(
            rec.h.copy(), rec.c.copy(), rec.last_y.copy(), rec.next_seq,
            tuple(_reply_copy(r) for r in rec.replies),
        )  # fmt: skip
        return Claim(epoch, rec.version, state)

    def _write_one(self, w: Write, state: State | None, now: float) -> bool:
        k = self._key(w.key)
        rec = self._live(k, now)
        wk, holder = self._where(w.key, now)
        if w.version == 0:
            ok = rec is None
        else:
            ok = (
                rec is not None and rec.epoch == w.epoch and rec.version == w.version
                and holder in (None, self.own)
            )  # fmt: skip
        if not ok:
            return False
        if state is None:
            self.records.pop(k, None)
            if holder == self.own:
                del self.where[wk]
            return True
        self.where[wk] = (self.own, now + self.ttl_s)
        replies = [] if rec is None or state.clear else rec.replies
        replies.extend(state.replies)
        del replies[: max(len(replies) - self.replies, 0)]
        self.records[k] = Record(
            w.epoch, w.version + 1, state.h, state.c, state.last_y, state.next_seq, replies,
            now + self.ttl_s,
        )  # fmt: skip
        return True

    def _copy(self, s: State) -> State:
        """s as the store keeps it: float32 copies in the store's shapes (a wrong size is the
        caller's bug, raised here rather than at the next claim as Redis would)."""
        h = np.array(s.h, F32).reshape(self.shape)
        c = np.array(s.c, F32).reshape(self.shape)
        y = np.array(s.last_y, F32).reshape(-1)
        replies = []
        for r in s.replies:
            if not (-_I64 <= r.seq < _I64 and -_I64 <= r.next_seq < _I64 and 0 <= r.digest < _U64):
                raise ValueError(f"reply out of range: seq {r.seq}, digest {r.digest}")
            ry = np.array(r.y, F32).reshape(-1, self.output_dim)
            replies.append(Reply(int(r.seq), int(r.next_seq), int(r.digest), bool(r.reset), ry))
        return State(h, c, y, int(s.next_seq), tuple(replies), bool(s.clear))

    # -- faults --------------------------------------------------------------------------------

    async def _enter(self, op: str) -> _Faults | None:
        """Count the call, give the loop a turn; raise now if it is to fail before landing,
        return the fault if it is to fail after."""
        self.calls[op] += 1
        await asyncio.sleep(0)
        f = self._faults
        if f.left <= 0 or op not in f.ops:
            return None
        f.left -= 1
        if f.applied and op in ("claim", "write"):
            return f
        raise self._down(f, op)

    def _after(self, fault: _Faults | None) -> None:
        if fault is not None:
            raise self._down(fault, "reply")

    @staticmethod
    def _down(f: _Faults, op: str) -> StoreDown:
        if f.refused:
            return StoreDown(f"memory store: {op} refused (injected)", refused=True)
        return StoreDown(f"memory store: {op} failed (injected)")


def _reply_copy(r: Reply) -> Reply:
    return Reply(r.seq, r.next_seq, r.digest, r.reset, r.y.copy())
