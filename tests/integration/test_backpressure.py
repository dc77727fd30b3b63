"""Limits and load shedding: what the server refuses, and that a refused request changes nothing.

Limits: message size, steps and sessions per request, the session cap (refuse and evict_lru),
the bounded inference queue, the per-stream in-flight window and client deadlines. The queue,
window and deadline tests hold the inference thread at a gate, so what is queued is exact.
Load shedding: many clients with big frames against a real `lstm-serve serve` subprocess with a
small queue; some requests are shed (RESOURCE_EXHAUSTED), the accepted ones keep a bounded
latency, the server's RSS stays bounded and every session equals one pass over its accepted steps.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import psutil
import pytest

from lstm_serve.client import AsyncClient, Client, session_steps, step_request
from tests.helpers.proxy import ServeProcess
from tests.helpers.server import ServerThread, serve, session_state
from tests.helpers.server import inference_blocked as gated
from tests.oracle.one_pass import OnePass

ATOL = 1e-5
C = grpc.StatusCode


def _code(fn: Any) -> grpc.StatusCode:
    try:
        fn()
    except grpc.RpcError as err:
        return err.code()
    return C.OK


def _wait_for(cond: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


# -- limits ------------------------------------------------------------------------------------


LIMITS: dict[str, Any] = {
    "metrics_port": -1,
    "max_message_bytes": 64 * 1024,
    "max_steps_per_request": 1000,
    "max_sessions_per_request": 4,
    "max_sessions": 64,
    "max_queue": 4,
    "max_batch_size": 8,
    "max_inflight_per_stream": 2,
}


@pytest.fixture(scope="module")
def limited(tiny_repo: Path) -> Iterator[ServerThread]:
    yield from serve(tiny_repo, **LIMITS)


def test_message_size_limit(tiny_repo: Path) -> None:
    with (
        ServerThread(model_repository=tiny_repo, **(LIMITS | {"max_queue": 4000})) as limited,
        Client(limited.target) as c,
    ):
        c.predict("tiny", "big", np.ones((2, 3)), seq=0)
        before = session_state(limited, "big")
        too_big = step_request("tiny", [session_steps("big", np.ones((6000, 3)), seq=2)])  # 72 kB
        assert too_big.ByteSize() > 64 * 1024
        assert _code(lambda: c.stub.Predict(too_big)) is C.RESOURCE_EXHAUSTED
        assert _code(lambda: list(c.stub.Stream(iter([too_big])))) is C.RESOURCE_EXHAUSTED
        assert session_state(limited, "big") == before
        fits = [session_steps("big", np.ones((1000, 3)), seq=2)]
        fits += [session_steps(f"big{i}", np.ones((1000, 3))) for i in range(3)]  # 48 kB each way
        assert [r.next_seq for r in c.step(step_request("tiny", fits))] == [1002, 1000, 1000, 1000]
        for i in range(3):
            c.end_session("tiny", f"big{i}")


def test_steps_and_sessions_per_request(limited: ServerThread) -> None:
    with Client(limited.target) as c:
        c.predict("tiny", "lim", np.ones((1, 3)), seq=0)
        before = session_state(limited, "lim")
        for req, text in (
            (step_request("tiny", [session_steps("lim", np.ones((1001, 3)))]), "at most 1000"),
            (
                step_request("tiny", [session_steps(f"l{i}", np.ones((1, 3))) for i in range(5)]),
                "at most 4",
            ),
        ):
            with pytest.raises(grpc.RpcError) as err:
                c.step(req)
            assert err.value.code() is C.INVALID_ARGUMENT and text in (err.value.details() or "")
        assert session_state(limited, "lim") == before
        assert not c.get_session("tiny", "l0").exists


def test_session_cap_refuse(tiny_repo: Path) -> None:
    with (
        ServerThread(model_repository=tiny_repo, metrics_port=-1, max_sessions=4) as srv,
        Client(srv.target) as c,
    ):
        for i in range(4):
            c.predict("tiny", f"cap{i}", np.ones((1, 3)), seq=0)
        before = {f"cap{i}": session_state(srv, f"cap{i}") for i in range(4)}
        with pytest.raises(grpc.RpcError) as err:
            c.predict("tiny", "cap4", np.ones((1, 3)))
        assert err.value.code() is C.RESOURCE_EXHAUSTED
        assert "0 of its 4 session slots free" in (err.value.details() or "")
        # A frame with an existing session and a new one is refused whole.
        frame = [
            session_steps("cap0", np.ones((1, 3)), seq=1),
            session_steps("cap5", np.ones((1, 3))),
        ]
        with pytest.raises(grpc.RpcError) as err:
            c.step(step_request("tiny", frame))
        assert err.value.code() is C.RESOURCE_EXHAUSTED
        assert {f"cap{i}": session_state(srv, f"cap{i}") for i in range(4)} == before
        assert not c.get_session("tiny", "cap4").exists
        c.end_session("tiny", "cap3")
        assert c.predict("tiny", "cap4", np.ones((1, 3))).next_seq == 1


def test_session_cap_evicts_least_recently_used(tiny_repo: Path) -> None:
    with ServerThread(
        model_repository=tiny_repo, metrics_port=-1, max_sessions=3, cap_policy="evict_lru"
    ) as srv:
        with Client(srv.target) as c:
            for sid in ("e0", "e1", "e2"):
                c.predict("tiny", sid, np.ones((1, 3)))
            c.predict("tiny", "e0", np.ones((1, 3)))  # e1 is now the least recently used
            c.predict("tiny", "e3", np.ones((1, 3)))
            assert [c.get_session("tiny", s).exists for s in ("e0", "e1", "e2", "e3")] == [
                True,
                False,
                True,
                True,
            ]
        evicted = srv.server.metrics.sessions_evicted.labels("tiny:1", "lru")._value.get()
        assert evicted == 1


def test_bounded_queue_sheds_and_changes_nothing(limited: ServerThread) -> None:
    """max_queue=4 sessions waiting: the fifth is refused, nothing of it applied. Two batches
    are in the inference thread's hands first (max_batches_in_flight), and are not waiting."""
    with Client(limited.target) as c:
        c.predict("tiny", "q-old", np.ones((3, 3)), seq=0)
        before = session_state(limited, "q-old")
        with gated(limited) as gate:
            running = c.stub.Predict.future(
                step_request("tiny", [session_steps("q0", np.ones((1, 3)))])
            )
            time.sleep(0.2)  # q0 is in runtime.run, held; the queue is empty
            # q1-q2 becomes the second batch in flight; q3-q6 wait: the queue is full.
            queued = [
                c.stub.Predict.future(
                    step_request(
                        "tiny",
                        [
                            session_steps(f"q{i}", np.ones((1, 3))),
                            session_steps(f"q{i + 1}", np.ones((1, 3))),
                        ],
                    )
                )
                for i in (1, 3, 5)
            ]
            time.sleep(0.2)
            for req in (
                step_request("tiny", [session_steps("q-old", np.ones((2, 3)), seq=3)]),
                step_request("tiny", [session_steps("q-new", np.ones((2, 3)))]),
            ):
                with pytest.raises(grpc.RpcError) as err:
                    c.step(req)
                assert err.value.code() is C.RESOURCE_EXHAUSTED
                assert "queue full" in (err.value.details() or "")
            assert session_state(limited, "q-old") == before
            assert session_state(limited, "q-new") is None
            gate.set()
            assert running.result(10).sessions[0].next_seq == 1
            assert [len(f.result(10).sessions) for f in queued] == [2, 2, 2]
        # Shed, not broken: the same request succeeds once there is room.
        assert c.predict("tiny", "q-old", np.ones((2, 3)), seq=3).next_seq == 5
        for i in range(7):
            c.end_session("tiny", f"q{i}")


def test_stream_in_flight_window(limited: ServerThread) -> None:
    """max_inflight_per_stream=2: a stream with 8 requests queued has at most 2 in the engine."""
    engine = limited.engine
    with Client(limited.target) as c, gated(limited) as gate:
        reqs = [step_request("tiny", [session_steps(f"w{i}", np.ones((1, 3)))]) for i in range(8)]
        responses = c.stub.Stream(iter(reqs), timeout=20)
        time.sleep(0.5)
        in_flight = engine.model("tiny").scheduler.in_flight()
        gate.set()
        assert len(list(responses)) == 8
    for i in range(8):
        with Client(limited.target) as c:
            c.end_session("tiny", f"w{i}")
    assert in_flight == 2


def test_expired_deadline_is_not_applied(limited: ServerThread, oracle: OnePass) -> None:
    """A request whose deadline passed while it waited behind another is never run."""
    x = np.random.default_rng(3).normal(size=(5, 3)).astype(np.float32)
    with Client(limited.target) as c:
        with gated(limited) as gate:
            first = c.stub.Predict.future(step_request("tiny", [session_steps("dl", x[:2], seq=0)]))
            time.sleep(0.2)
            with pytest.raises(grpc.RpcError) as err:
                c.predict("tiny", "dl", x[2:], seq=2, timeout=0.3)
            assert err.value.code() is C.DEADLINE_EXCEEDED
            gate.set()
            assert first.result(10).sessions[0].next_seq == 2
        time.sleep(0.1)
        assert c.get_session("tiny", "dl").next_seq == 2  # the late request did not run
        again = c.predict("tiny", "dl", x[2:], seq=2)  # its retry runs, once
        assert again.next_seq == 5 and not again.replayed
        np.testing.assert_allclose(again.y, oracle.run(x)[0][2:], atol=ATOL)
        c.end_session("tiny", "dl")


# -- load shedding (subprocess) ----------------------------------------------------------------

LANES, PER_LANE, STEPS = 24, 8, 96  # each request: 8 sessions x 96 steps (9 kB)
SHED_SECONDS = 6.0


def test_load_shedding_keeps_latency_memory_and_state_bounded(
    tiny_repo: Path, tmp_path: Path, oracle: OnePass
) -> None:
    proc = ServeProcess(
        tiny_repo,
        tmp_path / "serve.log",
        max_queue=16,
        max_batch_size=16,
        max_steps_per_request=STEPS,
    )
    rng = np.random.default_rng(9)
    accepted: dict[str, list[np.ndarray]] = {}
    outputs: dict[str, list[np.ndarray]] = {}
    latencies: list[float] = []
    codes: dict[str, int] = {}
    rss: list[int] = []

    async def lane(client: AsyncClient, k: int, stop_at: float) -> None:
        sids = [f"lane{k}-{j}" for j in range(PER_LANE)]
        for sid in sids:
            accepted[sid], outputs[sid] = [], []
        seq = 0
        while time.monotonic() < stop_at:
            xs = {sid: rng.normal(size=(STEPS, 3)).astype(np.float32) for sid in sids}
            req = step_request("tiny", [session_steps(s, xs[s], seq=seq) for s in sids])
            t0 = time.perf_counter()
            try:
                results = await client.step(req, timeout=30)
            except grpc.RpcError as err:
                codes[err.code().name] = codes.get(err.code().name, 0) + 1
                assert err.code() is C.RESOURCE_EXHAUSTED, err.details()
                await asyncio.sleep(0.01)
                continue  # next time: other data at the same seq
            latencies.append(time.perf_counter() - t0)
            codes["OK"] = codes.get("OK", 0) + 1
            for r in results:
                assert not r.replayed and r.seq == seq  # a shed request was never applied
                accepted[r.session_id].append(xs[r.session_id])
                outputs[r.session_id].append(r.y)
            seq += STEPS

    async def main() -> None:
        clients = [AsyncClient(proc.target, timeout=30) for _ in range(4)]
        stop_at = time.monotonic() + SHED_SECONDS
        await asyncio.gather(*(lane(clients[k % 4], k, stop_at) for k in range(LANES)))
        for cl in clients:
            await cl.close()

    def sample(p: psutil.Process, done: threading.Event) -> None:
        while not done.is_set():
            with contextlib.suppress(psutil.Error):
                rss.append(p.memory_info().rss)
            time.sleep(0.05)

    with proc:
        p = psutil.Process(proc.pid)
        with Client(proc.target) as c:  # warm up, then the baseline
            c.step(
                step_request(
                    "tiny", [session_steps(f"warm{j}", np.ones((STEPS, 3))) for j in range(16)]
                )
            )
        baseline = p.memory_info().rss
        done = threading.Event()
        sampler = threading.Thread(target=sample, args=(p, done))
        sampler.start()
        try:
            asyncio.run(main())
        finally:
            done.set()
            sampler.join()
        with Client(proc.target) as c:
            for sid in list(accepted)[:: PER_LANE + 1]:
                assert c.get_session("tiny", sid).next_seq == STEPS * len(accepted[sid])
    growth_mb = (max(rss) - baseline) / 2**20
    lat = np.array(latencies)
    p50, p99 = np.percentile(lat, [50, 99])
    print(
        f"\nload shedding: {codes} over {SHED_SECONDS:.0f} s; accepted latency p50 "
        f"{p50 * 1000:.0f} ms p99 {p99 * 1000:.0f} ms max {lat.max() * 1000:.0f} ms; RSS baseline "
        f"{baseline / 2**20:.0f} MiB, growth under load {growth_mb:.1f} MiB"
    )
    assert codes.get("RESOURCE_EXHAUSTED", 0) > 0 and codes.get("OK", 0) > 0
    assert p99 < 2.0 and lat.max() < 5.0
    assert growth_mb < 150
    for sid, xs in accepted.items():  # every session: one pass over its accepted steps
        if xs:
            np.testing.assert_allclose(
                np.concatenate(outputs[sid]), oracle.run(np.concatenate(xs))[0], atol=ATOL
            )
