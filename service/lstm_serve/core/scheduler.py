"""The scheduler: one per model version, the only way to its session state.

Requests are appended to a pending FIFO, each with one future. Once per event-loop pass a tick
takes what is pending and admits it in arrival order (a request on a session that an earlier
pending request holds waits behind it; nothing overtakes). The tick then runs in phases, each
in a module of its own that resolves no future: batch.build (plan over arrays, room for new
sessions, gather by step count), batch.run_parts (ONNX Runtime: inline when small, in an
executor when large), commit.commit (write what succeeded, replay entries, outcomes). The
scheduler alone resolves futures, counts and calls the shared store's hooks. Roll-outs
(rollout.py) add one row per tick. Nothing waits on a timer: batches form from what queued
while the previous tick ran. See docs/architecture.md.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import numpy as np

from lstm_serve.core import plan as P
from lstm_serve.core.batch import Part, Tick, build, run_parts
from lstm_serve.core.commit import NOT_REPLAYED1, Outcome, commit
from lstm_serve.core.errors import (
    DeadlineExceeded,
    NotFound,
    ResourceExhausted,
    ServiceError,
    Unavailable,
)
from lstm_serve.core.frame import Frame, digest
from lstm_serve.core.jobs import (
    Job,
    Limits,
    OpJob,
    Outputs,
    Runner,
    SessionStatus,
    StepJob,
    StepResult,
)
from lstm_serve.core.probes import Probes
from lstm_serve.core.replay import ReplayCache
from lstm_serve.core.rollout import ForecastResult, Rollout
from lstm_serve.core.store import SessionStore

if TYPE_CHECKING:
    from lstm_serve.core.sync import StateSync

logger = logging.getLogger(__name__)

STEP = "Step"  # the method every step request is counted under


class Scheduler:
    def __init__(
        self,
        runtime: Runner,
        store: SessionStore,
        replay: ReplayCache,
        probes: Probes,
        limits: Limits,
        label: str,
        executor: ThreadPoolExecutor | None = None,
    ) -> None:
        self.runtime = runtime
        self.store = store
        self.replay = replay
        self.probes = probes
        self.limits = limits
        self.label = label
        self.version = ""  # the model version this scheduler runs, named in its answers
        self._executor = executor or ThreadPoolExecutor(1, thread_name_prefix=f"infer-{label}")
        self._own_executor = executor is None
        self.pending: deque[Job] = deque()
        self.rollouts: list[Rollout] = []
        self.queued = 0  # sessions (rows) pending
        self._scheduled = False
        self._closed = False
        # Batches in the executor, oldest first. Their sessions are disjoint: a request on a
        # session that one of them holds waits until it is committed.
        self._inflight: list[Tick] = []
        self._admitted: list[Job] = []  # taken from the queue by the current tick
        self._loop: asyncio.AbstractEventLoop | None = None
        self.ticks = 0
        # Set when the inference worker died or stalled: the model then refuses all work.
        self.broken: str | None = None
        self.on_broken: Callable[[str], None] | None = None
        self._stall_timer: asyncio.TimerHandle | None = None
        # A shared store (core/sync.py) when replicas share sessions; None in the default.
        self.sync: StateSync | None = None
        # One appending row of one session runs on the scalar path (_single); the general
        # path gives the same answers and state (tests/core/test_paths.py turns this off).
        self.scalar = True

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
        self.kick()

    def kick(self) -> None:
        """Schedule a tick on the next event-loop pass (unless one is scheduled or blocked)."""
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
                self.fail(job, exc)
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
                self.kick()

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
                self.fail(job, DeadlineExceeded("the deadline passed before the request could run"))
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
                self.fail(r, DeadlineExceeded("the deadline passed during the forecast"))
        if not jobs and not self.rollouts:
            return
        if (
            self.scalar
            and len(jobs) == 1
            and not self.rollouts
            and jobs[0].rows == 1
            and self._single(jobs[0])
        ):
            return
        tick = build(self.store, jobs, self.rollouts, taken, self.limits.cap_policy, self.label)
        if tick.evicted:
            self.probes.evicted_lru.inc(tick.evicted)
        for j, exc in tick.failures:
            self.fail(jobs[j], exc)
        if not tick.parts:
            self._finish(tick, [])
            return
        total = sum(p.x.shape[0] * p.x.shape[1] for p in tick.parts)
        if total <= self.limits.inline_max_steps:
            self._finish(tick, self._run(tick.parts))
            return
        fut = self.loop.run_in_executor(self._executor, self._run, tick.parts)
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

    def _run(self, parts: list[Part]) -> list[Outputs | BaseException]:
        return run_parts(
            self.runtime, parts, self.limits.max_batch, self.probes, self.label,
            self.store.arrays.xp,
        )  # fmt: skip

    def _done(self, tick: Tick, fut: asyncio.Future[list[Outputs | BaseException]]) -> None:
        if tick not in self._inflight:
            return  # the model was marked broken while this ran: its callers have their answer
        exc = fut.exception()
        if exc is not None:  # run_parts contains each batch's errors: this is the worker
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
                self.fail(job, err)
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
        slot = store.slots.get(key)
        action = P.plan_one(store, slot, int(frame.seq[0]))
        if action < 0 or (action == P.NEW and store.free == 0):
            return False  # a retry, a gap, not found or the cap: the general path says which
        if slot is None:
            h, c = store.zero_state(1)
            base = 0
        else:
            base = int(store.next_seq[slot])
            h, c = store.gather_one(slot)
        digests = digest(x)
        t0 = time.perf_counter()
        try:
            y, hn, cn = self.runtime.run(x, h, c)
        except Exception:
            logger.exception("%s: inference failed for a batch of 1 row", self.label)
            self.fail(job, RuntimeError("inference failed"))
            return True
        finally:
            self.probes.inference_seconds.observe(time.perf_counter() - t0)
            self.probes.batch_size.observe(1)
        self.probes.steps.inc(t)
        now = time.monotonic()
        if slot is None:
            slot = int(store.create([key], now)[0])
            self.probes.sessions.set(len(store))
        # The general path's commit, on one row: state, replay entry, recency.
        slots = np.array([slot], np.int64)
        nxt = np.array([base + t], np.int64)
        seqs = np.array([base], np.int64)
        store.commit(slots, hn, cn, y[:, -1], nxt)
        store.record(self.replay, slots, y, seqs, frame.reset, nxt, digests)
        store.touch(job.keys, slots, now)
        if not job.future.done():
            job.future.set_result(StepResult(frame.ids, seqs, nxt, NOT_REPLAYED1, y, self.version))
        self.probes.step_latency.observe(time.perf_counter() - job.t0)
        self._count(job.method, "OK")
        return True

    def _finish(self, tick: Tick, results: list[Outputs | BaseException]) -> None:
        try:
            self._resolve(commit(self.store, self.replay, tick, results, time.monotonic()))
        except Exception as exc:  # a bug here must not leave callers waiting forever
            logger.exception("%s: commit failed", self.label)
            for job in tick.jobs:
                self.fail(job, exc)
        finally:
            if self.sync is not None and not self._inflight:
                self.sync.flush()
            if self.rollouts or (self.pending and self._runnable()):
                self.kick()

    def _resolve(self, out: Outcome) -> None:
        """What a commit decided: failures, answers, their latencies and counts."""
        if out.steps_run:
            self.probes.steps.inc(out.steps_run)
        inference_failed = RuntimeError("inference failed")
        for job in out.failed:
            self.fail(job, inference_failed)
        for r in out.failed_rollouts:
            if r in self.rollouts:
                self.rollouts.remove(r)
            self.fail(r, inference_failed)
        if out.answered:
            t_end = time.perf_counter()
            for job, result in out.answered:
                if not job.future.done():
                    result.version = self.version
                    job.future.set_result(result)
            n = len(out.answered)
            t0s = np.fromiter((job.t0 for job, _ in out.answered), np.float64, n)
            self.probes.step_latency.observe_many(t_end - t0s)
            self.probes.requests(STEP, "OK").inc(n)
        self._advance_rollouts()
        self.probes.sessions.set(len(self.store))

    # -- roll-outs, session operations, expiry ------------------------------------------------

    def _start_rollout(self, r: Rollout) -> None:
        try:
            x = r.start(self.store)
        except ServiceError as exc:
            self.fail(r, exc)
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
                self.fail(r, exc)
                return
            assert r.last_y is not None
            s = np.array([slot], np.int64)
            store.commit(s, r.h[:, None], r.c[:, None], r.last_y[None], np.array([r.next_seq]))
            store.forget_answers(s)  # committed roll-out steps are not replayable
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
            self.fail(job, NotFound(f"session {job.session_id!r} not found"))
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

    def fail(self, job: Job, exc: BaseException) -> None:
        """Answer a job with an error and count it."""
        code = exc.code if isinstance(exc, ServiceError) else "INTERNAL"
        if not job.future.done():
            job.future.set_exception(exc)
        if not getattr(exc, "counted_by_engine", False):
            self._count(job.method, code)

    def _count(self, method: str, code: str) -> None:
        self.probes.requests(method, code).inc()
