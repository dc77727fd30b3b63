"""The core alone, no gRPC: a scheduler over a store, with a runtime the test controls.

The runtime is a tiny deterministic recurrence (not an LSTM) so that every answer can be
computed by hand: h' = h + x.sum(), c' = c + 1, y = h'. What is checked is the scheduler's
bookkeeping: order, batching, commit only on success, replay, and roll-outs.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import numpy as np
import pytest

from lstm_serve.core import frame as F
from lstm_serve.core.errors import (
    FailedPrecondition,
    NotFound,
    ResourceExhausted,
    SeqGap,
    SessionNotFound,
    Unavailable,
)
from lstm_serve.core.jobs import Limits
from lstm_serve.core.probes import no_probes
from lstm_serve.core.replay import ReplayCache
from lstm_serve.core.rollout import Rollout, Sampling
from lstm_serve.core.scheduler import Scheduler
from lstm_serve.core.store import CapPolicy, SessionStore

LAYERS, HIDDEN, DIM = 1, 1, 1


class Counting:
    """y_t = h_t, h_t = h_{t-1} + x_t; records the batch sizes it saw; can be made to fail."""

    def __init__(self) -> None:
        self.batches: list[tuple[int, int]] = []
        self.fail = False
        self.fatal = False
        self.gate: threading.Event | None = None

    def run(self, x: np.ndarray, h0: np.ndarray, c0: np.ndarray) -> Any:
        if self.gate is not None:
            self.gate.wait(10)
        if self.fail:
            raise RuntimeError("boom")
        if self.fatal:
            raise WorkerDeath("the thread is going down")
        self.batches.append((x.shape[0], x.shape[1]))
        h = h0[0, :, 0][:, None] + np.cumsum(x[:, :, 0], axis=1)  # [B, T]
        y = h[:, :, None].astype(np.float32)
        hn = h[:, -1][None, :, None].astype(np.float32)
        return y, hn, c0 + 1


class WorkerDeath(BaseException):
    """Not an Exception: what no per-batch handler catches, like a thread being torn down."""


def make(limits: Limits | None = None, capacity: int = 64) -> tuple[Scheduler, Counting]:
    rt = Counting()
    store = SessionStore(capacity, LAYERS, HIDDEN, DIM)
    sched = Scheduler(rt, store, ReplayCache(1 << 20), no_probes(), limits or Limits(), "test")
    return sched, rt


def steps(*values: float) -> np.ndarray:
    return np.asarray(values, np.float32).reshape(-1, 1)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_requests_of_one_tick_share_one_inference_call() -> None:
    async def main() -> None:
        sched, rt = make()
        futs = [sched.submit_step(F.single(f"s{i}", steps(i)), [f"s{i}"], None) for i in range(8)]
        results = await asyncio.gather(*futs)
        assert rt.batches == [(8, 1)]
        assert [float(r.y[0, 0, 0]) for r in results] == list(range(8))
        assert sched.ticks == 1

    run(main())


def test_one_session_is_never_in_two_places_of_a_batch_and_keeps_its_order() -> None:
    async def main() -> None:
        sched, rt = make()
        a = [sched.submit_step(F.single("a", steps(1, 1)), ["a"], None) for _ in range(3)]
        b = sched.submit_step(F.single("b", steps(5)), ["b"], None)
        res = await asyncio.gather(*a, b)
        # a's three requests ran in three ticks, in order; b rode the first.
        assert [r.seq.tolist() for r in res[:3]] == [[0], [2], [4]]
        assert [r.y[0, :, 0].tolist() for r in res[:3]] == [[1, 2], [3, 4], [5, 6]]
        assert sched.ticks == 3 and sorted(rt.batches[:2]) == [(1, 1), (1, 2)]

    run(main())


def test_a_failed_inference_changes_nothing() -> None:
    async def main() -> None:
        sched, rt = make()
        await sched.submit_step(F.single("a", steps(1)), ["a"], None)
        before = sched.store.h.copy(), sched.store.next_seq.copy()
        rt.fail = True
        with pytest.raises(RuntimeError):
            await sched.submit_step(F.single("a", steps(1)), ["a"], None)
        with pytest.raises(RuntimeError):
            await sched.submit_step(F.single("new", steps(1)), ["new"], None)
        assert np.array_equal(sched.store.h, before[0])
        assert np.array_equal(sched.store.next_seq, before[1])
        assert sched.store.slot("new") is None
        rt.fail = False
        r = await sched.submit_step(F.single("a", steps(1)), ["a"], None)
        assert r.next_seq.tolist() == [2]

    run(main())


def test_a_frame_is_all_or_nothing() -> None:
    async def main() -> None:
        sched, _ = make()
        await sched.submit_step(F.single("a", steps(1)), ["a"], None)
        fr = F.from_rows(["a", "b"], [steps(1), steps(1)], np.array([5, 0]), np.zeros(2, bool))
        with pytest.raises(SeqGap):
            await sched.submit_step(fr, ["a", "b"], None)
        assert sched.store.slot("b") is None
        fr = F.from_rows(["a", "c"], [steps(1), steps(1)], np.array([1, 3]), np.zeros(2, bool))
        with pytest.raises(NotFound):
            await sched.submit_step(fr, ["a", "c"], None)
        assert int(sched.store.next_seq[sched.store.slot("a")]) == 1

    run(main())


def test_retry_is_replayed_and_other_data_is_refused() -> None:
    async def main() -> None:
        sched, rt = make()
        first = await sched.submit_step(F.single("a", steps(2), seq=0), ["a"], None)
        again = await sched.submit_step(F.single("a", steps(2), seq=0), ["a"], None)
        assert again.replayed.tolist() == [True] and again.y[0].tolist() == first.y[0].tolist()
        assert len(rt.batches) == 1
        with pytest.raises(FailedPrecondition):
            await sched.submit_step(F.single("a", steps(3), seq=0), ["a"], None)

    run(main())


def test_mixed_step_counts_run_in_groups() -> None:
    async def main() -> None:
        sched, rt = make()
        fr = F.from_rows(
            ["a", "b", "c"],
            [steps(1), steps(1, 1), steps(2)],
            np.full(3, F.APPEND),
            np.zeros(3, bool),
        )
        r = await sched.submit_step(fr, ["a", "b", "c"], None)
        assert sorted(rt.batches) == [(1, 2), (2, 1)]
        assert [y[:, 0].tolist() for y in r.y] == [[1.0], [1.0, 2.0], [2.0]]
        assert r.next_seq.tolist() == [1, 2, 1]

    run(main())


def test_forecast_rolls_out_inside_the_ticks_and_commits() -> None:
    async def main() -> None:
        sched, rt = make()
        await sched.submit_step(F.single("a", steps(1)), ["a"], None)
        loop = asyncio.get_running_loop()
        ro = Rollout("a", "a", 3, True, Sampling(), False, None, loop.create_future(), None, 0.0)
        other = sched.submit_step(F.single("b", steps(1)), ["b"], None)
        res = await sched.submit_rollout(ro)
        await other
        # y fed back: h = 1 -> 2 -> 4 -> 8; predictions are the last outputs before each step.
        assert res.y[:, 0].tolist() == [1.0, 2.0, 4.0]
        assert res.next_seq == 4
        assert int(sched.store.next_seq[sched.store.slot("a")]) == 4
        assert (2, 1) in rt.batches  # b's step shared a tick with the roll-out

    run(main())


def test_cap_refuse_and_evict_lru() -> None:
    async def main() -> None:
        sched, _ = make(capacity=2)
        for sid in ("a", "b"):
            await sched.submit_step(F.single(sid, steps(1)), [sid], None)
        with pytest.raises(ResourceExhausted):
            await sched.submit_step(F.single("c", steps(1)), ["c"], None)
        sched.limits = Limits(cap_policy=CapPolicy.evict_lru)
        await sched.submit_step(F.single("a", steps(1)), ["a"], None)  # b is now the LRU
        await sched.submit_step(F.single("c", steps(1)), ["c"], None)
        assert sched.store.slot("b") is None and sched.store.slot("a") is not None

    run(main())


def test_large_batches_run_in_the_executor_and_the_loop_stays_free() -> None:
    async def main() -> None:
        sched, rt = make(Limits(inline_max_steps=0))
        rt.gate = threading.Event()
        fut = sched.submit_step(F.single("a", steps(1)), ["a"], None)
        await asyncio.sleep(0.05)
        assert not fut.done() and sched.busy("a")  # held in the executor; the loop runs on
        rt.gate.set()
        assert (await fut).next_seq.tolist() == [1]
        sched.close()

    run(main())


def test_a_request_behind_a_session_operation_is_not_left_waiting() -> None:
    """A reset admitted in a tick with no inference holds its session; the step queued behind
    it must get a tick of its own (it once waited forever)."""

    async def main() -> None:
        sched, _ = make()
        await sched.submit_step(F.single("a", steps(1)), ["a"], None)
        reset = sched.submit_op("reset", "a", "a", "ResetSession")
        step = sched.submit_step(F.single("a", steps(2)), ["a"], None)
        status = await asyncio.wait_for(reset, 2)
        result = await asyncio.wait_for(step, 2)
        assert status.next_seq == 0
        assert result.seq.tolist() == [0] and result.y[0, 0, 0] == 2.0

    run(main())


def test_a_stalled_worker_fails_waiters_at_once_and_refuses_new_work() -> None:
    async def main() -> None:
        # inline_max_steps 0: every batch goes to the worker thread, where it hangs.
        sched, rt = make(Limits(inline_max_steps=0, stall_s=0.2))
        told: list[str] = []
        sched.on_broken = told.append
        await sched.submit_step(F.single("a", steps(1)), ["a"], None)
        rt.gate = threading.Event()
        running = sched.submit_step(F.single("a", steps(1)), ["a"], None)
        queued = sched.submit_step(F.single("a", steps(2)), ["a"], None)
        t0 = asyncio.get_running_loop().time()
        for fut in (running, queued):
            with pytest.raises(Unavailable, match="stalled"):
                await fut
        assert asyncio.get_running_loop().time() - t0 < 5  # not at the deadline: at once
        assert len(told) == 1 and "model test is not serving" in told[0]
        with pytest.raises(Unavailable):
            sched.submit_step(F.single("b", steps(1)), ["b"], None)
        rt.gate.set()  # the stalled call returns late: nothing of it is committed
        await asyncio.sleep(0.1)
        assert sched.store.next_seq[sched.store.slot("a")] == 1

    run(main())


@pytest.mark.parametrize("inline", [0, 32], ids=["thread", "inline"])
def test_a_worker_that_dies_is_reported(inline: int) -> None:
    async def main() -> None:
        sched, rt = make(Limits(inline_max_steps=inline))
        told: list[str] = []
        sched.on_broken = told.append
        rt.fatal = True
        with pytest.raises(Unavailable, match="worker failed"):
            await sched.submit_step(F.single("a", steps(1)), ["a"], None)
        assert told and sched.broken is not None

    run(main())


def test_continue_never_creates_a_session_and_end_removes_it_after_the_step() -> None:
    """Triton's sequences: CONTINUE refuses an unknown session; `end` removes a session once its
    request is applied, and a queued continuation behind it finds it gone."""

    async def main() -> None:
        sched, _ = make()
        cont = F.Frame(
            ["a"],
            np.array([F.CONTINUE]),
            np.zeros(1, bool),
            [F.Block(np.zeros(1, np.int64), steps(1)[None])],
        )
        with pytest.raises(SessionNotFound):
            await sched.submit_step(cont, ["a"], None)
        assert sched.store.slot("a") is None
        await sched.submit_step(F.single("a", steps(1), reset=True), ["a"], None)
        r = await sched.submit_step(cont, ["a"], None)
        assert r.y[0, :, 0].tolist() == [2] and r.next_seq.tolist() == [2]
        last = F.single("a", steps(3))
        last.end = np.ones(1, bool)
        ended = sched.submit_step(last, ["a"], None)
        behind = sched.submit_step(cont, ["a"], None)
        assert (await ended).y[0, :, 0].tolist() == [5]
        with pytest.raises(SessionNotFound):
            await behind
        assert sched.store.slot("a") is None and len(sched.store) == 0

    run(main())


def test_end_of_a_failed_request_keeps_the_session() -> None:
    async def main() -> None:
        sched, rt = make()
        await sched.submit_step(F.single("a", steps(1)), ["a"], None)
        last = F.single("a", steps(1))
        last.end = np.ones(1, bool)
        rt.fail = True
        with pytest.raises(RuntimeError):
            await sched.submit_step(last, ["a"], None)
        assert sched.store.slot("a") is not None

    run(main())


async def _settle() -> None:
    """Let the loop run the ticks that are due (the executor is held by the test's gate)."""
    for _ in range(5):
        await asyncio.sleep(0.01)


def test_the_next_batch_is_prepared_while_one_runs() -> None:
    """With a batch in the executor, the next tick takes requests of other sessions and queues
    their batch behind it; a request on a session in flight waits for its commit, in order."""

    async def main() -> None:
        sched, rt = make(Limits(inline_max_steps=0))
        await sched.submit_step(F.single("a", steps(1)), ["a"], None)
        rt.gate = threading.Event()
        a2 = sched.submit_step(F.single("a", steps(2)), ["a"], None)
        await _settle()
        b = sched.submit_step(F.single("b", steps(5)), ["b"], None)
        a3 = sched.submit_step(F.single("a", steps(3)), ["a"], None)
        await _settle()
        assert sched.ticks == 3 and sched.busy("b") and sched.in_flight() == 3
        c = sched.submit_step(F.single("c", steps(7)), ["c"], None)
        await _settle()
        assert sched.ticks == 3  # two batches in the executor: the next tick waits
        assert not any(f.done() for f in (a2, b, a3, c))
        rt.gate.set()
        r2, rb, r3, rc = await asyncio.gather(a2, b, a3, c)
        assert (r2.seq.tolist(), r2.y[0, :, 0].tolist()) == ([1], [3.0])
        assert (r3.seq.tolist(), r3.y[0, :, 0].tolist()) == ([2], [6.0])
        assert rb.y[0, :, 0].tolist() == [5.0] and rc.y[0, :, 0].tolist() == [7.0]
        sched.close()

    run(main())


def test_one_batch_in_flight_when_asked() -> None:
    async def main() -> None:
        sched, rt = make(Limits(inline_max_steps=0, max_batches_in_flight=1))
        rt.gate = threading.Event()
        a = sched.submit_step(F.single("a", steps(1)), ["a"], None)
        await _settle()
        b = sched.submit_step(F.single("b", steps(2)), ["b"], None)
        await _settle()
        assert sched.ticks == 1 and not b.done()  # b's tick waits for a's batch
        rt.gate.set()
        assert [float((await f).y[0, 0, 0]) for f in (a, b)] == [1.0, 2.0]
        assert sched.ticks == 2
        sched.close()

    run(main())


def test_a_forecast_waits_for_the_batch_in_flight() -> None:
    """A roll-out's rows follow the previous tick's answer: it never starts beside a batch in
    the executor, and its answer is the same."""

    async def main() -> None:
        sched, rt = make(Limits(inline_max_steps=0))
        await sched.submit_step(F.single("a", steps(1)), ["a"], None)
        rt.gate = threading.Event()
        b = sched.submit_step(F.single("b", steps(1)), ["b"], None)
        await _settle()
        loop = asyncio.get_running_loop()
        ro = Rollout("a", "a", 3, True, Sampling(), False, None, loop.create_future(), None, 0.0)
        fut = sched.submit_rollout(ro)
        await _settle()
        assert not sched.rollouts and not fut.done()  # held, not started
        rt.gate.set()
        res = await fut
        await b
        assert res.y[:, 0].tolist() == [1.0, 2.0, 4.0] and res.next_seq == 4
        sched.close()

    run(main())


def test_lru_eviction_spares_a_session_in_flight() -> None:
    async def main() -> None:
        sched, rt = make(Limits(inline_max_steps=0, cap_policy=CapPolicy.evict_lru), capacity=2)
        for sid in ("a", "b"):  # a is the least recently used
            await sched.submit_step(F.single(sid, steps(1)), [sid], None)
        rt.gate = threading.Event()
        a = sched.submit_step(F.single("a", steps(1)), ["a"], None)
        await _settle()
        c = sched.submit_step(F.single("c", steps(1)), ["c"], None)
        await _settle()
        assert sched.store.slot("b") is None  # evicted in a's place while a runs
        rt.gate.set()
        assert (await a).next_seq.tolist() == [2] and (await c).next_seq.tolist() == [1]
        assert sched.store.slot("a") is not None and sched.store.slot("c") is not None
        assert float(sched.store.h[0, sched.store.slot("a"), 0]) == 2.0
        sched.close()

    run(main())


def test_the_replay_budget_bounds_its_memory() -> None:
    """replay_cache_bytes is a bound on memory, not a count of answer bytes: what entries hold
    beyond their answers is counted, and evicted entries let go of their arrays."""
    import gc
    import tracemalloc

    budget = 1 << 20

    async def main() -> int:
        sched, rt = make(capacity=100)
        sched.replay = ReplayCache(budget)
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for i in range(4000):  # about four times what the budget holds
                key = f"s{i % 50}"
                await sched.submit_step(F.single(key, steps(1)), [key], None)
            rt.batches.clear()  # the test runtime's own record
            gc.collect()
            grown = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        assert sched.replay.bytes <= budget and len(sched.replay) < 4000
        return grown

    assert run(main()) < 1.15 * budget
