"""Cross-session dynamic batching on an inference thread.

The event loop submits one Job per request (the steps of one or many sessions). The thread
takes what is queued, up to max_batch sessions, groups the work by step count, gathers h/c
from the arena, runs ONNX Runtime, scatters the new state, and resolves the jobs' futures
with one call back into the event loop per batch. There is no fixed wait when idle.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from lstm_serve.core.errors import ResourceExhausted, ServiceError, Unavailable
from lstm_serve.core.runtime import ModelRuntime
from lstm_serve.core.state import Arena
from lstm_serve.server.metrics import Metrics

logger = logging.getLogger(__name__)


@dataclass(eq=False, slots=True)
class Work:
    """One session's steps. Outputs are filled in by the inference thread."""

    x: np.ndarray  # [T, input_dim] float32, or [T] int64 for token models
    slot: int = -1  # arena slot to read (unless h0/c0 given) and to write when commit
    h0: np.ndarray | None = None  # [layers, hidden] explicit initial state (reset, forecast)
    c0: np.ndarray | None = None
    commit: bool = False  # scatter the new state into slot, and set next_seq
    new_seq: int = 0
    y: np.ndarray | None = None  # [T, output_dim]
    hn: np.ndarray | None = None  # [layers, hidden], only when not commit
    cn: np.ndarray | None = None


Outputs = tuple[np.ndarray, np.ndarray, np.ndarray]


@dataclass(eq=False, slots=True)
class Job:
    work: list[Work]
    future: asyncio.Future[None]
    enqueued: float = field(default_factory=time.perf_counter)


class Batcher:
    def __init__(
        self,
        runtime: ModelRuntime,
        arena: Arena,
        metrics: Metrics,
        label: str,
        max_batch: int,
        max_queue: int,
        max_delay_s: float = 0.0,
    ) -> None:
        self.runtime = runtime
        self.arena = arena
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.max_delay_s = max_delay_s
        self._queue: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._queued = 0  # sessions queued; guarded by _count_lock
        self._count_lock = threading.Lock()
        self._carry: Job | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._closed = False
        m = metrics
        self._m_queue = m.queue_seconds.labels(label)
        self._m_infer = m.inference_seconds.labels(label)
        self._m_batch = m.batch_size.labels(label)
        self._m_steps = m.steps.labels(label)
        self._label = label
        mf = runtime.mv.manifest
        self._layers, self._hidden = mf.layers, mf.hidden_size

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._thread = threading.Thread(target=self._run, name=f"infer-{self._label}", daemon=True)
        self._thread.start()

    def submit(self, work: list[Work]) -> asyncio.Future[None]:
        """Queue one request's work; the future resolves when all of it has run."""
        if self._closed:
            raise Unavailable("server is shutting down")
        n = len(work)
        with self._count_lock:
            if self._queued + n > self.max_queue and self._queued > 0:
                raise ResourceExhausted(
                    f"inference queue full ({self._queued} sessions waiting); retry later"
                )
            self._queued += n
        assert self._loop is not None
        job = Job(work, self._loop.create_future())
        self._queue.put(job)
        return job.future

    def close(self, timeout: float = 5.0) -> None:
        """Stop after the queued work has run."""
        self._closed = True
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join(timeout)

    # -- inference thread --------------------------------------------------------------------

    def _take(self) -> list[Job] | None:
        first = self._carry or self._queue.get()
        self._carry = None
        if first is None:
            return None
        jobs, size = [first], len(first.work)
        deadline = time.perf_counter() + self.max_delay_s
        while size < self.max_batch:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                wait = deadline - time.perf_counter()
                if wait <= 0:
                    break
                try:
                    job = self._queue.get(timeout=wait)
                except queue.Empty:
                    break
            if job is None:
                self._queue.put(None)  # keep the stop marker for the next round
                break
            if size + len(job.work) > self.max_batch:
                self._carry = job
                break
            jobs.append(job)
            size += len(job.work)
        return jobs

    def _run(self) -> None:
        while True:
            jobs = self._take()
            if jobs is None:
                return
            n = sum(len(j.work) for j in jobs)
            with self._count_lock:
                self._queued -= n
            now = time.perf_counter()
            for job in jobs:
                self._m_queue.observe(now - job.enqueued)
            errors: dict[int, BaseException] = {}
            groups: dict[int, list[tuple[int, Work]]] = defaultdict(list)
            for i, job in enumerate(jobs):
                for w in job.work:
                    groups[w.x.shape[0]].append((i, w))
            done: list[tuple[list[tuple[int, Work]], Outputs]] = []
            for group in groups.values():
                for start in range(0, len(group), self.max_batch):
                    chunk = group[start : start + self.max_batch]
                    try:
                        done.append((chunk, self._infer([w for _, w in chunk])))
                    except Exception as exc:
                        logger.exception("inference failed for %s", self._label)
                        for i, _ in chunk:
                            errors[i] = exc
            # Commit only after every group ran, so a failed job changes no session's state.
            for chunk, outputs in done:
                self._commit([w for _, w in chunk], [i not in errors for i, _ in chunk], outputs)
            assert self._loop is not None
            try:
                self._loop.call_soon_threadsafe(_resolve, jobs, errors)
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                return

    def _infer(self, work: list[Work]) -> Outputs:
        t0 = time.perf_counter()
        b = len(work)
        x = np.stack([w.x for w in work])
        h = np.empty((self._layers, b, self._hidden), np.float32)
        c = np.empty_like(h)
        a = self.arena
        from_arena = [j for j, w in enumerate(work) if w.h0 is None]
        if from_arena:
            slots = np.fromiter((work[j].slot for j in from_arena), np.int64, len(from_arena))
            with a.lock:
                h[:, from_arena] = a.h[slots].transpose(1, 0, 2)
                c[:, from_arena] = a.c[slots].transpose(1, 0, 2)
        for j, w in enumerate(work):
            if w.h0 is not None:
                h[:, j] = w.h0
                c[:, j] = w.c0
        y, hn, cn = self.runtime.run(x, h, c)
        self._m_infer.observe(time.perf_counter() - t0)
        self._m_batch.observe(b)
        self._m_steps.inc(b * x.shape[1])
        return y, hn, cn

    def _commit(self, work: list[Work], ok: list[bool], outputs: Outputs) -> None:
        """Hand outputs to each Work; write committed sessions' state, output and seq together."""
        y, hn, cn = outputs
        commit = [j for j, w in enumerate(work) if w.commit and ok[j]]
        if commit:
            a = self.arena
            slots = np.fromiter((work[j].slot for j in commit), np.int64, len(commit))
            with a.lock:
                a.h[slots] = hn[:, commit].transpose(1, 0, 2)
                a.c[slots] = cn[:, commit].transpose(1, 0, 2)
                a.last_y[slots] = y[commit, -1]
                for j in commit:
                    a.next_seq[work[j].slot] = work[j].new_seq
        for j, w in enumerate(work):
            w.y = y[j].copy()
            if not w.commit:
                w.hn, w.cn = hn[:, j].copy(), cn[:, j].copy()


def _resolve(jobs: list[Job], errors: dict[int, BaseException]) -> None:
    for i, job in enumerate(jobs):
        if job.future.done():
            continue
        exc = errors.get(i)
        if exc is None:
            job.future.set_result(None)
        elif isinstance(exc, ServiceError):
            job.future.set_exception(exc)
        else:
            job.future.set_exception(RuntimeError(f"inference failed: {type(exc).__name__}"))
