"""The scheduler: one per model version, the only way to its session state.

Requests are appended to a pending FIFO, each with one future. Once per event-loop pass a tick
takes what is pending and, over arrays: admits in arrival order (a request on a session that an
earlier pending request holds waits behind it; nothing overtakes), plans (plan.py), groups rows
by step count, gathers h and c from the store, runs ONNX Runtime (inline when small, in an
executor when large), commits what succeeded, keeps one replay entry per request and resolves
the futures. Roll-outs (rollout.py) add one row per tick. Nothing waits on a timer: batches
form from what queued while the previous tick ran. See docs/architecture.md.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

from lstm_serve.core import plan as P
from lstm_serve.core.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    NotFound,
    ResourceExhausted,
    SeqGap,
    ServiceError,
    SessionNotFound,
    Unavailable,
)
from lstm_serve.core.frame import CONTINUE, Frame, digest
from lstm_serve.core.probes import Probes
from lstm_serve.core.replay import ReplayCache, ReplayEntry
from lstm_serve.core.rollout import ForecastResult, Rollout
from lstm_serve.core.store import CapPolicy, SessionStore

if TYPE_CHECKING:
    from lstm_serve.core.sync import StateSync

logger = logging.getLogger(__name__)

Outputs = tuple[np.ndarray, np.ndarray, np.ndarray]
# The replayed column of every applied one-session answer (read-only: shared).
_NOT_REPLAYED1 = np.zeros(1, bool)
_NOT_REPLAYED1.flags.writeable = False


class Runner(Protocol):
    def run(self, x: np.ndarray, h0: np.ndarray, c0: np.ndarray) -> Outputs: ...


@dataclass(frozen=True, slots=True)
class Limits:
    max_batch: int = 1024  # most rows in one inference call
    max_queue: int = 4096  # most sessions waiting
    inline_max_steps: int = 128  # batches of up to this many session-steps run on the loop
    cap_policy: CapPolicy = CapPolicy.refuse
    stall_s: float = 120.0  # an inference call longer than this is a dead worker
    # Batches in the executor at once: with 2 the loop prepares the next batch (of other
    # sessions) while one runs; 1 runs them strictly one after another.
    max_batches_in_flight: int = 2


@dataclass(slots=True)
class StepResult:
    ids: list[str]
    seq: np.ndarray  # int64 [n]: seq of each session's first step
    next_seq: np.ndarray  # int64 [n]
    replayed: np.ndarray  # bool [n]
    y: np.ndarray | list[np.ndarray]  # per session [steps, output_dim]; an ndarray when uniform


@dataclass(slots=True)
class SessionStatus:
    session_id: str
    exists: bool
    next_seq: int
    idle_seconds: float


@dataclass(eq=False, slots=True)
class StepJob:
    frame: Frame
    keys: list[str]
    future: asyncio.Future[StepResult]
    deadline: float | None
    t0: float
    rows: int
    steps: int  # session-steps
    method: str = "Step"


@dataclass(eq=False, slots=True)
class OpJob:
    """ResetSession or EndSession: applied in its turn, without inference."""

    kind: str  # "reset" | "end"
    session_id: str
    keys: list[str]
    future: asyncio.Future[SessionStatus]
    deadline: float | None
    t0: float
    method: str
    rows: int = 0
    steps: int = 0


Job = StepJob | OpJob | Rollout


@dataclass(eq=False, slots=True)
class _Part:
    """Rows of one tick that share a step count: the step rows first, then roll-out rows."""

    x: np.ndarray
    h: np.ndarray
    c: np.ndarray
    rows: np.ndarray  # global step-row indices of the first len(rows) batch rows
    rollouts: list[Rollout]


@dataclass(eq=False, slots=True)
class _Tick:
    jobs: list[StepJob]
    offsets: np.ndarray  # first global row of each job
    plan: P.Plan
    ok: np.ndarray  # bool [jobs]: planned without error
    keys: list[str]
    digests: np.ndarray
    created: np.ndarray  # rows whose session this tick created
    parts: list[_Part]
    owner: np.ndarray | None  # int64 [rows]: the job of each row (None: one job)
    reset: np.ndarray  # bool [rows]


class Scheduler:
    def __init__(
        self,
        runtime: Runner,
        store: SessionStore,
        replay: ReplayCache,
        probes: Probes,
        limits: Limits,
        label: str,
        token: bool,
        executor: ThreadPoolExecutor | None = None,
    ) -> None:
        self.runtime = runtime
        self.store = store
        self.replay = replay
        self.probes = probes
        self.limits = limits
        self.label = label
        self.token = token
        self._executor = executor or ThreadPoolExecutor(1, thread_name_prefix=f"infer-{label}")
        self._own_executor = executor is None
        self.pending: deque[Job] = deque()
        self.rollouts: list[Rollout] = []
        self.queued = 0  # sessions (rows) pending
        self._scheduled = False
        self._closed = False
        # Batches in the executor, oldest first. Their sessions are disjoint: a request on a
        # session that one of them holds waits until it is committed.
        self._inflight: list[_Tick] = []
        self._admitted: list[Job] = []  # taken from the queue by the current tick
        self._loop: asyncio.AbstractEventLoop | None = None
        self._req_counters: dict[tuple[str, str], object] = {}
        self.ticks = 0
        # Set when the inference worker died or stalled: the model then refuses all work.
        self.broken: str | None = None
        self.on_broken: Callable[[str], None] | None = None
        self._stall_timer: asyncio.TimerHandle | None = None
        # A shared store (core/sync.py) when replicas share sessions; None in the default.
        self.sync: StateSync | None = None

    # -- submitting ----------------------------------------------------------------------------

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    @property
    def idle(self) -> bool:
        return not self.pending and not self.rollouts and not self._inflight

    def _blocked(self) -> bool:
        """Whether a new tick must wait for the batches in the executor. Roll-outs add a row to
        every tick from the previous tick's answer, and the shared store flushes between ticks,
        so both run strictly one batch at a time."""
        n = len(self._inflight)
        if n == 0:
            return False
        return (
            n >= self.limits.max_batches_in_flight or bool(self.rollouts) or self.sync is not None
        )

    def submit_step(
        self, frame: Frame, keys: list[str], deadline: float | None
    ) -> asyncio.Future[StepResult]:
        fut: asyncio.Future[StepResult] = self.loop.create_future()
        self._enqueue(
            StepJob(frame, keys, fut, deadline, time.perf_counter(), len(keys), frame.steps())
        )
        return fut

    def submit_op(
        self, kind: str, session_id: str, key: str, method: str, deadline: float | None = None
    ) -> asyncio.Future[SessionStatus]:
        fut: asyncio.Future[SessionStatus] = self.loop.create_future()
        self._enqueue(OpJob(kind, session_id, [key], fut, deadline, time.perf_counter(), method))
        return fut

    def submit_rollout(self, rollout: Rollout) -> asyncio.Future[ForecastResult]:
        self._enqueue(rollout)
        return rollout.future

    def _enqueue(self, job: Job) -> None:
        if self._closed:
            raise Unavailable("server is shutting down")
        if self.broken is not None:
            raise Unavailable(self.broken)
        # Counted in sessions (a frame's rows); a request alone in the queue always fits.
        if self.queued and self.queued + job.rows > self.limits.max_queue:
            raise ResourceExhausted(
                f"inference queue full ({self.queued} sessions waiting); retry later"
            )
        self.pending.append(job)
        self.queued += job.rows
        self._kick()

    def _kick(self) -> None:
        if not self._scheduled and not self._blocked():
            self._scheduled = True
            self.loop.call_soon(self._tick)

    def busy(self, key: str) -> bool:
        """Whether a request on this session is queued or running."""
        if any(key in job.keys for job in self.pending) or any(r.key == key for r in self.rollouts):
            return True
        return any(key in t.keys for t in self._inflight)

    def in_flight(self) -> int:
        """Requests queued or running."""
        running = sum(len(t.jobs) for t in self._inflight)
        return len(self.pending) + len(self.rollouts) + running

    def close(self) -> None:
        self._closed = True
        if self._own_executor:
            self._executor.shutdown(wait=True)

    # -- the tick ------------------------------------------------------------------------------

    def _tick(self) -> None:
        self._scheduled = False
        if self._blocked():
            return
        self._admitted = []
        try:
            self._tick_once()
        except Exception as exc:  # a bug must not leave callers waiting forever
            logger.exception("%s: a scheduler tick failed", self.label)
            for job in [*self._admitted, *self.rollouts]:
                self._fail(job, exc)
            self.rollouts.clear()
        except BaseException as exc:  # not an error of one batch: the worker itself is gone
            self._break(f"inference worker failed ({type(exc).__name__})", exc)
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
        finally:
            if self.sync is not None and not self._inflight:
                self.sync.flush()
            # Requests held back behind this tick's own need another tick. When it admitted
            # nothing, all that waits is held by a batch in the executor (kicked when it is
            # committed) or by a load (kicked when it ends).
            if self.rollouts or (self._admitted and self.pending and self._runnable()):
                self._kick()

    def _runnable(self) -> bool:
        return self.sync is None or self.sync.runnable(self.pending)

    def _tick_once(self) -> None:
        self.ticks += 1
        sync = self.sync
        if sync is not None:
            sync.before_tick()
        now = time.monotonic()
        taken = {r.key for r in self.rollouts}
        overlapped = bool(self._inflight)  # prepared while a batch runs in the executor
        for t in self._inflight:
            taken.update(t.keys)
        jobs: list[StepJob] = []
        rows = 0
        full = False
        keep: deque[Job] = deque()
        pending = self.pending
        t_admit = time.perf_counter()
        while pending:
            job = pending.popleft()
            self.queued -= job.rows
            if job.future.done():
                continue  # its caller went away before it started
            # A session this replica does not hold waits while sync loads it; a forecast waits
            # for a tick with nothing in the executor (its rows follow the previous tick's).
            if (
                full
                or not taken.isdisjoint(job.keys)
                or (overlapped and isinstance(job, Rollout))
                or (sync is not None and not sync.ready(job))
            ):
                keep.append(job)
                self.queued += job.rows
                taken.update(job.keys)
                continue
            taken.update(job.keys)
            self._admitted.append(job)
            if job.deadline is not None and now >= job.deadline:
                self._fail(
                    job, DeadlineExceeded("the deadline passed before the request could run")
                )
                continue
            if isinstance(job, StepJob):
                jobs.append(job)
                rows += job.rows
                full = rows >= self.limits.max_batch
            elif isinstance(job, OpJob):
                self._run_op(job, now)
            else:
                self._start_rollout(job)
        self.pending = keep
        if jobs:
            t0s = np.fromiter((j.t0 for j in jobs), np.float64, len(jobs))
            self.probes.queue_seconds.observe_many(t_admit - t0s)
        for r in list(self.rollouts):
            if r.deadline is not None and now >= r.deadline:
                self.rollouts.remove(r)
                self._fail(r, DeadlineExceeded("the deadline passed during the forecast"))
        if not jobs and not self.rollouts:
            return
        if len(jobs) == 1 and not self.rollouts and jobs[0].rows == 1 and self._single(jobs[0]):
            return
        tick = self._prepare(jobs, taken)
        if not tick.parts:
            self._finish(tick, [])
            return
        total = sum(p.x.shape[0] * p.x.shape[1] for p in tick.parts)
        if total <= self.limits.inline_max_steps:
            self._finish(tick, self._run_parts(tick.parts))
            return
        fut = self.loop.run_in_executor(self._executor, self._run_parts, tick.parts)
        self._inflight.append(tick)
        if len(self._inflight) == 1:
            self._arm_stall()
        fut.add_done_callback(lambda f: self._done(tick, f))

    def _arm_stall(self) -> None:
        """Watch the oldest batch in the executor (the one running: the worker runs them in
        order), so that a queued batch is not charged for the time of the one before it."""
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None
        if self._inflight:
            self._stall_timer = self.loop.call_later(
                self.limits.stall_s,
                self._break,
                f"inference stalled for over {self.limits.stall_s:g}s",
            )

    def _done(self, tick: _Tick, fut: asyncio.Future[list[Outputs | BaseException]]) -> None:
        if tick not in self._inflight:
            return  # the model was marked broken while this ran: its callers have their answer
        exc = fut.exception()
        if exc is not None:  # _run_parts contains each batch's errors: this is the worker
            self._break(f"inference worker failed ({type(exc).__name__})", exc)
            return
        self._inflight.remove(tick)
        self._arm_stall()
        self._finish(tick, fut.result())

    def _break(self, reason: str, exc: BaseException | None = None) -> None:
        """The worker died or stalled: fail everything waiting at once with UNAVAILABLE, refuse
        new work, and tell the owner (health turns NOT_SERVING) and the metrics."""
        if self.broken is not None:
            return
        self.broken = f"model {self.label} is not serving: {reason}; the server needs a restart"
        logger.error("%s: %s", self.label, self.broken, exc_info=exc)
        self.probes.worker_failures.inc()
        err = Unavailable(self.broken)
        waiting: list[Job] = [*self._admitted, *self.pending, *self.rollouts]
        for t in self._inflight:
            waiting += t.jobs
        for job in waiting:
            if not job.future.done():
                self._fail(job, err)
        self.pending.clear()
        self.rollouts.clear()
        self.queued = 0
        self._inflight = []
        self._arm_stall()
        if self.on_broken is not None:
            self.on_broken(self.broken)

    def _single(self, job: StepJob) -> bool:
        """The streaming case, in scalars: one request of one session that appends (or starts
        the session), small enough to run inline. False leaves it to the general path (which
        also ends sessions)."""
        frame = job.frame
        x = frame.blocks[0].x
        t = x.shape[1]
        if t > self.limits.inline_max_steps or bool(frame.reset[0]):
            return False
        if frame.end is not None and bool(frame.end[0]):
            return False
        store, key = self.store, job.keys[0]
        seq = int(frame.seq[0])
        slot = store.slots.get(key)
        if slot is None:
            if seq > 0 or seq == CONTINUE or store.free == 0:
                return False  # not found, or the cap: the general path says which
            layers, _, hidden = store.h.shape
            h = np.zeros((layers, 1, hidden), np.float32)
            c = h
            base = 0
        else:
            base = int(store.next_seq[slot])
            if seq >= 0 and seq != base:
                return False  # a retry or a gap
            h = store.h[:, slot : slot + 1].copy()
            c = store.c[:, slot : slot + 1].copy()
        digests = digest(x)
        t0 = time.perf_counter()
        try:
            y, hn, cn = self.runtime.run(x, h, c)
        except Exception:
            logger.exception("%s: inference failed for a batch of 1 row", self.label)
            self._fail(job, RuntimeError("inference failed"))
            return True
        finally:
            self.probes.inference_seconds.observe(time.perf_counter() - t0)
            self.probes.batch_size.observe(1)
        self.probes.steps.inc(t)
        now = time.monotonic()
        if slot is None:
            slot = int(store.create([key], now)[0])
            self.probes.sessions.set(len(store))
        slots = np.array([slot], np.int64)
        nxt = np.array([base + t], np.int64)
        store.commit(slots, hn, cn, y[:, -1], nxt)
        seqs = np.array([base], np.int64)
        entry = ReplayEntry(
            y, seqs, store.gen[slots], frame.reset, nxt, store.replay[slots],
            store.replay_row[slots], digests,
        )  # fmt: skip
        if self.replay.add(entry):
            store.replay[slot] = entry
            store.replay_row[slot] = 0
        store.touch(job.keys, slots, now)
        if not job.future.done():
            job.future.set_result(StepResult(frame.ids, seqs, nxt, _NOT_REPLAYED1, y))
        self.probes.step_latency.observe(time.perf_counter() - job.t0)
        self._count(job.method, "OK")
        return True

    def _prepare(self, jobs: list[StepJob], taken: set[str]) -> _Tick:
        store = self.store
        n_jobs = len(jobs)
        if n_jobs == 0:  # roll-outs only
            keys, blocks = [], []
            seq, reset = np.empty(0, np.int64), np.empty(0, bool)
            offsets = np.empty(0, np.int64)
        elif n_jobs == 1:
            f = jobs[0].frame
            keys = jobs[0].keys
            seq, reset = f.seq, f.reset
            blocks = [(b.rows, b.x) for b in f.blocks]
            offsets = np.zeros(1, np.int64)
        else:
            seq = np.concatenate([j.frame.seq for j in jobs])
            reset = np.concatenate([j.frame.reset for j in jobs])
            counts = np.fromiter((j.rows for j in jobs), np.int64, n_jobs)
            if len(seq) == n_jobs:  # streamed sessions: one row (and one block) per job
                keys = [j.keys[0] for j in jobs]
                offsets = np.arange(n_jobs, dtype=np.int64)
                xs = [j.frame.blocks[0].x for j in jobs]
                t0 = xs[0].shape[1]
                if all(x.shape[1] == t0 for x in xs):
                    blocks = [(offsets, np.concatenate(xs))]
                else:
                    blocks = [(offsets[i : i + 1], x) for i, x in enumerate(xs)]
            else:
                keys = [k for j in jobs for k in j.keys]
                offsets = np.zeros(n_jobs, np.int64)
                np.cumsum(counts[:-1], out=offsets[1:])
                blocks = [(b.rows + off, b.x) for j, off in zip(jobs, offsets.tolist(), strict=True) for b in j.frame.blocks]  # fmt: skip
        n = len(keys)
        steps = np.empty(n, np.int64)
        digests = np.empty(n, np.uint64)
        # Step rows grouped by step count: one digest per group (a row's digest is its own),
        # and each group is one part's input below.
        by_t: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}
        for rows_, x in blocks:
            by_t.setdefault(x.shape[1], []).append((rows_, x))
        groups: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for t, group in by_t.items():
            if len(group) == 1:
                rows_, x = group[0]
            else:
                rows_ = np.concatenate([g[0] for g in group])
                x = np.concatenate([g[1] for g in group])
            steps[rows_] = t
            digests[rows_] = digest(x)
            groups[t] = (rows_, x)
        slots = store.lookup(keys)
        plan = P.plan_rows(store, slots, seq, reset, steps, digests)
        owner = None
        if n_jobs > 1:
            owner = offsets if n == n_jobs else np.repeat(np.arange(n_jobs), counts)
        ok = np.ones(n_jobs, bool)
        action = plan.action
        bad = (action == P.GAP) | (action == P.NOT_FOUND) | (action == P.MISMATCH)
        if bad.any():
            for i in np.flatnonzero(bad).tolist():
                j = 0 if owner is None else int(owner[i])
                if ok[j]:
                    ok[j] = False
                    self._fail(jobs[j], self._row_error(plan, jobs[j], i - int(offsets[j]), i))
        # Room for new sessions, request by request in arrival order.
        new = action == P.NEW
        created: list[np.ndarray] = []
        if new.any():
            new_rows = np.flatnonzero(new)
            per_job = (
                np.array([len(new_rows)])
                if owner is None
                else np.bincount(owner[new_rows], minlength=n_jobs)
            )
            for j in np.flatnonzero(per_job).tolist():
                if not ok[j]:
                    continue
                try:
                    evicted = store.make_room(
                        int(per_job[j]), self.limits.cap_policy, taken, self.label
                    )
                except ServiceError as exc:
                    ok[j] = False
                    self._fail(jobs[j], exc)
                    continue
                if evicted:
                    self.probes.evicted_lru.inc(len(evicted))
                mine = new_rows if owner is None else new_rows[owner[new_rows] == j]
                new_keys = [keys[i] for i in mine.tolist()]
                plan.slots[mine] = store.create(new_keys)
                created.append(mine)
        runs = plan.runs
        if not ok.all():
            runs &= ok if owner is None else ok[owner]
        # Parts: step rows grouped by step count, then the roll-outs' rows.
        empty = np.empty(0, np.int64)
        for r in self.rollouts:
            assert r.pending_x is not None
            groups.setdefault(r.pending_x.shape[1], (empty, r.pending_x[:0]))
        parts: list[_Part] = []
        zero = action == P.RESET
        for t, (rows_, x) in groups.items():
            xs, hs, cs = [], [], []
            if len(rows_):
                sel = runs[rows_]
                if not sel.all():
                    rows_, x = rows_[sel], x[sel]
                s = plan.slots[rows_]
                # take, not store.h[:, s]: fancy indexing on the middle axis lays the copy out
                # batch-first, and making that C-contiguous for ONNX Runtime cost 25x the gather.
                h, c = np.take(store.h, s, axis=1), np.take(store.c, s, axis=1)
                z = zero[rows_]
                if z.any():
                    h[:, z] = 0.0
                    c[:, z] = 0.0
                xs, hs, cs = [x], [h], [c]
            rs = [r for r in self.rollouts if r.pending_x is not None and r.pending_x.shape[1] == t]
            if rs:
                xs += [r.pending_x for r in rs if r.pending_x is not None]
                hs.append(np.stack([r.h for r in rs], axis=1))
                cs.append(np.stack([r.c for r in rs], axis=1))
            if not xs or sum(len(a) for a in xs) == 0:
                continue
            if len(xs) == 1:
                parts.append(_Part(xs[0], hs[0], cs[0], rows_, rs))
            else:
                parts.append(
                    _Part(
                        np.concatenate(xs),
                        np.concatenate(hs, axis=1),
                        np.concatenate(cs, axis=1),
                        rows_,
                        rs,
                    )
                )
        created_rows = np.concatenate(created) if created else np.empty(0, np.int64)
        return _Tick(jobs, offsets, plan, ok, keys, digests, created_rows, parts, owner, reset)

    def _run_parts(self, parts: list[_Part]) -> list[Outputs | BaseException]:
        """Run every part (in the executor or inline): outputs, or the exception it raised."""
        out: list[Outputs | BaseException] = []
        mb = self.limits.max_batch
        for p in parts:
            t0 = time.perf_counter()
            b = p.x.shape[0]
            try:
                if b <= mb:
                    res = self.runtime.run(
                        p.x, np.ascontiguousarray(p.h), np.ascontiguousarray(p.c)
                    )
                else:
                    chunks = [
                        self.runtime.run(
                            p.x[i : i + mb],
                            np.ascontiguousarray(p.h[:, i : i + mb]),
                            np.ascontiguousarray(p.c[:, i : i + mb]),
                        )
                        for i in range(0, b, mb)
                    ]
                    res = (
                        np.concatenate([ch[0] for ch in chunks]),
                        np.concatenate([ch[1] for ch in chunks], axis=1),
                        np.concatenate([ch[2] for ch in chunks], axis=1),
                    )
                out.append(res)
            except Exception as exc:
                logger.exception("%s: inference failed for a batch of %d rows", self.label, b)
                out.append(exc)
            finally:
                self.probes.inference_seconds.observe(time.perf_counter() - t0)
                self.probes.batch_size.observe(b)
        return out

    def _finish(self, tick: _Tick, results: list[Outputs | BaseException]) -> None:
        try:
            self._commit(tick, results)
        except Exception as exc:  # a bug here must not leave callers waiting forever
            logger.exception("%s: commit failed", self.label)
            for job in tick.jobs:
                self._fail(job, exc)
        finally:
            if self.sync is not None and not self._inflight:
                self.sync.flush()
            if self.rollouts or (self.pending and self._runnable()):
                self._kick()

    def _commit(self, tick: _Tick, results: list[Outputs | BaseException]) -> None:
        store, plan, jobs = self.store, tick.plan, tick.jobs
        n = len(tick.keys)
        owner = tick.owner
        ok = tick.ok
        # A job fails whole when any of its parts failed: nothing of it is committed.
        row_part = np.full(n, -1, np.int64)
        row_pos = np.zeros(n, np.int64)
        steps_run = 0
        for pi, (part, res) in enumerate(zip(tick.parts, results, strict=True)):
            k = len(part.rows)
            row_part[part.rows] = pi
            row_pos[part.rows] = np.arange(k)
            if isinstance(res, BaseException):
                if k:
                    for j in np.unique(part.rows if owner is None else owner[part.rows]).tolist():
                        j = 0 if owner is None else j
                        if ok[j]:
                            ok[j] = False
                            self._fail(jobs[j], RuntimeError("inference failed"))
                for r in part.rollouts:
                    if r in self.rollouts:
                        self.rollouts.remove(r)
                    self._fail(r, RuntimeError("inference failed"))
            else:
                steps_run += part.x.shape[0] * part.x.shape[1]
        if steps_run:
            self.probes.steps.inc(steps_run)
        # Sessions created for requests that failed are removed again.
        if len(tick.created):
            failed = ~(np.repeat(ok, n) if owner is None else ok[owner])[tick.created]
            if failed.any():
                store.remove([tick.keys[i] for i in tick.created[failed].tolist()])
        now = time.monotonic()
        action = plan.action
        runs = plan.runs & (ok if owner is None else ok[owner])
        for part, res in zip(tick.parts, results, strict=True):
            if isinstance(res, BaseException):
                continue
            y, hn, cn = res
            k = len(part.rows)
            if k:
                sel = runs[part.rows]
                rows_ = part.rows if sel.all() else part.rows[sel]
                pos = slice(None, k) if sel.all() else np.flatnonzero(sel)
                if len(rows_):
                    t = part.x.shape[1]
                    slots = plan.slots[rows_]
                    resets = action[rows_] == P.RESET
                    if resets.any():
                        rs = slots[resets]
                        store.gen[rs] = store.new_generations(len(rs))
                        store.replay[rs] = None
                    store.commit(slots, hn[:, pos], cn[:, pos], y[pos, -1], plan.base[rows_] + t)
            for i, r in enumerate(part.rollouts):
                r.advance(y[k + i], hn[:, k + i], cn[:, k + i])
        # Answers, replay entries and futures.
        observe = self.probes.step_latency.observe
        t_end = time.perf_counter()
        if n and self._answer_all(tick, results, runs, now, t_end):
            jobs = []  # answered together
        for j, job in enumerate(jobs):
            if not ok[j]:
                continue
            off = int(tick.offsets[j])
            sl = slice(off, off + job.rows)
            result = self._answer(job, sl, tick, results, row_part, row_pos, now)
            if not job.future.done():
                job.future.set_result(result)
            observe(t_end - job.t0)
            self._count(job.method, "OK")
        self._end_sessions(tick)
        self._advance_rollouts()
        self.probes.sessions.set(len(store))

    def _end_sessions(self, tick: _Tick) -> None:
        """Remove the sessions that requests applied in this tick asked to end."""
        ended: list[str] = []
        for j, job in enumerate(tick.jobs):
            end = job.frame.end
            if end is not None and tick.ok[j] and end.any():
                ended += [job.keys[i] for i in np.flatnonzero(end).tolist()]
        if ended:
            self.store.remove(ended, ended=True)

    def _answer_all(
        self,
        tick: _Tick,
        results: list[Outputs | BaseException],
        runs: np.ndarray,
        now: float,
        t_end: float,
    ) -> bool:
        """The common case, over the whole tick at once: every row of every request ran, in
        one part, in row order. One replay entry then holds the tick's answers."""
        if len(tick.parts) != 1 or not runs.all() or len(tick.parts[0].rows) != len(runs):
            return False
        res = results[0]
        jobs = tick.jobs
        singles = len(jobs) == len(runs)  # one row per job: uniform by construction
        if isinstance(res, BaseException) or not (singles or all(j.frame.uniform for j in jobs)):
            return False
        store, plan = self.store, tick.plan
        n = len(runs)
        y = res[0][:n]
        slots = plan.slots
        base = plan.base
        next_seq = base + y.shape[1]
        entry = ReplayEntry(
            y, base, store.gen[slots], tick.reset, next_seq, store.replay[slots],
            store.replay_row[slots], tick.digests,
        )  # fmt: skip
        if self.replay.add(entry):
            store.replay[slots] = entry
            store.replay_row[slots] = np.arange(n)
        store.touch(tick.keys, slots, now)
        if singles:
            # One-row views made in C (list() of a reshape) cost less than four slices a job.
            views = list(base[:, None]), list(next_seq[:, None]), list(y[:, None])
            for job, b, ns, yj in zip(jobs, *views, strict=True):
                if not job.future.done():
                    job.future.set_result(StepResult(job.frame.ids, b, ns, _NOT_REPLAYED1, yj))
        else:
            replayed = np.zeros(n, bool)
            for job, off in zip(jobs, tick.offsets.tolist(), strict=True):
                end = off + job.rows
                if not job.future.done():
                    job.future.set_result(
                        StepResult(
                            job.frame.ids, base[off:end], next_seq[off:end], replayed[off:end],
                            y[off:end],
                        )
                    )  # fmt: skip
        t0s = np.fromiter((j.t0 for j in jobs), np.float64, len(jobs))
        self.probes.step_latency.observe_many(t_end - t0s)
        self.probes.requests("Step", "OK").inc(len(jobs))
        return True

    def _answer(
        self,
        job: StepJob,
        sl: slice,
        tick: _Tick,
        results: list[Outputs | BaseException],
        row_part: np.ndarray,
        row_pos: np.ndarray,
        now: float,
    ) -> StepResult:
        store, plan = self.store, tick.plan
        action = plan.action[sl]
        n = job.rows
        parts = row_part[sl]
        pos = row_pos[sl]
        applied = (action == P.APPLY) | (action == P.NEW) | (action == P.RESET)
        y: np.ndarray | list[np.ndarray]
        p0 = int(parts[0])
        if applied.all() and (parts == p0).all() and int(pos[-1]) - int(pos[0]) == n - 1:
            res = results[p0]
            assert not isinstance(res, BaseException)
            y = res[0][int(pos[0]) : int(pos[0]) + n]
        else:
            rows_y: list[np.ndarray] = []
            for i in range(n):
                if applied[i]:
                    res = results[int(parts[i])]
                    assert not isinstance(res, BaseException)
                    rows_y.append(res[0][int(pos[i])])
                else:
                    f = plan.found[sl.start + i]
                    assert f.entry.y is not None
                    rows_y.append(f.entry.y[f.row])
            y = np.stack(rows_y) if job.frame.uniform else rows_y
        slots = plan.slots[sl]
        base = plan.base[sl]
        if isinstance(y, np.ndarray):
            steps = np.full(n, y.shape[1], np.int64)
        else:
            steps = np.fromiter((len(a) for a in y), np.int64, n)
        next_seq = base + steps
        replayed = ~applied
        if replayed.any():
            for i in np.flatnonzero(replayed).tolist():
                f = plan.found[sl.start + i]
                next_seq[i] = int(f.entry.next_seq[f.row])
        if applied.any():
            a_slots = slots if applied.all() else slots[applied]
            entry = ReplayEntry(
                y, base, store.gen[slots].copy(), job.frame.reset, next_seq,
                store.replay[slots].copy(), store.replay_row[slots].copy(),
                tick.digests[sl],
            )  # fmt: skip
            if self.replay.add(entry):
                store.replay[a_slots] = entry
                store.replay_row[a_slots] = np.flatnonzero(applied)
            if applied.all():
                a_keys = job.keys
            else:
                a_keys = [job.keys[i] for i in np.flatnonzero(applied).tolist()]
            store.touch(a_keys, a_slots, now)
        return StepResult(job.frame.ids, base, next_seq, replayed, y)

    @staticmethod
    def _row_error(plan: P.Plan, job: StepJob, i: int, g: int) -> ServiceError:
        """The error of row i of job (row g of the tick)."""
        sid = job.frame.ids[i]
        a = int(plan.action[g])
        if a == P.NOT_FOUND:
            return SessionNotFound(sid)
        if a == P.MISMATCH:
            return FailedPrecondition(
                f"session {sid!r}: seq {int(job.frame.seq[i])} was already applied with "
                f"different inputs (other values or another number of steps); a retry must resend the "
                f"same steps; expected seq {int(plan.expected[g])}"
            )
        return SeqGap(sid, int(plan.expected[g]), int(job.frame.seq[i]))

    # -- roll-outs, session operations, expiry ------------------------------------------------

    def _start_rollout(self, r: Rollout) -> None:
        try:
            x = r.start(self.store)
        except ServiceError as exc:
            self._fail(r, exc)
            return
        if x is None:
            self._complete_rollout(r)
            return
        r.pending_x = x
        self.rollouts.append(r)
        self.probes.queue_seconds.observe(time.perf_counter() - r.t0)

    def _advance_rollouts(self) -> None:
        for r in list(self.rollouts):
            if r.future.done() and not r.commit:
                self.rollouts.remove(r)  # nobody is waiting for an uncommitted forecast
                continue
            x = r.feed()
            if x is None:
                self.rollouts.remove(r)
                self._complete_rollout(r)
            else:
                r.pending_x = x

    def _complete_rollout(self, r: Rollout) -> None:
        store = self.store
        slot = store.slot(r.key)
        if r.commit:
            try:
                if slot is None:
                    evicted = store.make_room(1, self.limits.cap_policy, {r.key}, self.label)
                    if evicted:
                        self.probes.evicted_lru.inc(len(evicted))
                    slot = int(store.create([r.key])[0])
                elif r.reset:
                    store.reset(slot)
            except ServiceError as exc:
                self._fail(r, exc)
                return
            assert r.last_y is not None
            s = np.array([slot], np.int64)
            store.commit(s, r.h[:, None], r.c[:, None], r.last_y[None], np.array([r.next_seq]))
            store.replay[s] = None  # committed roll-out steps are not replayable
            store.touch([r.key], s, time.monotonic())
            self.probes.sessions.set(len(store))
        current = 0 if slot is None else int(store.next_seq[slot])
        if not r.future.done():
            r.future.set_result(r.result(current))
        self._count(r.method, "OK")

    def _run_op(self, job: OpJob, now: float) -> None:
        store = self.store
        slot = store.slot(job.keys[0])
        if slot is None:
            self._fail(job, NotFound(f"session {job.session_id!r} not found"))
            return
        idle = max(now - float(store.last_used[slot]), 0.0)
        if job.kind == "reset":
            store.reset(slot)
            status = SessionStatus(job.session_id, True, 0, idle)
        else:
            status = SessionStatus(job.session_id, False, int(store.next_seq[slot]), idle)
            store.remove(job.keys, ended=True)
            self.probes.sessions.set(len(store))
        if not job.future.done():
            job.future.set_result(status)
        self._count(job.method, "OK")

    def status(self, key: str, session_id: str) -> SessionStatus:
        store = self.store
        slot = store.slot(key)
        if slot is None:
            return SessionStatus(session_id, False, 0, 0.0)
        idle = max(time.monotonic() - float(store.last_used[slot]), 0.0)
        return SessionStatus(session_id, True, int(store.next_seq[slot]), idle)

    def reap(self, ttl_s: float, now: float | None = None) -> int:
        """Expire sessions idle for longer than ttl_s; never one with a request queued or
        running (the batch in the executor writes its sessions' slots when it returns)."""
        now = time.monotonic() if now is None else now
        protect = {r.key for r in self.rollouts}
        for job in self.pending:
            protect.update(job.keys)
        for t in self._inflight:
            protect.update(t.keys)
        expired = self.store.expired(ttl_s, now, protect)
        if expired:
            self.store.remove(expired)
            self.probes.evicted_ttl.inc(len(expired))
            self.probes.sessions.set(len(self.store))
            logger.info("%s: %d idle sessions expired", self.label, len(expired))
        return len(expired)

    # -- outcomes ------------------------------------------------------------------------------

    def _fail(self, job: Job, exc: BaseException) -> None:
        code = exc.code if isinstance(exc, ServiceError) else "INTERNAL"
        if not job.future.done():
            job.future.set_exception(exc)
        self._count(job.method, code)

    def _count(self, method: str, code: str) -> None:
        self.probes.requests(method, code).inc()
