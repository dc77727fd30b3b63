"""Session lifecycle against a real server: TTL expiry, the session cap (refuse / evict_lru),
ResetSession, EndSession and per-model namespacing. Outputs are checked against one pass of
the NumPy oracle over the whole sequence (OnePass)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from lstm_serve.client import Client, StepResult, session_steps, step_request
from tests.helpers.server import ServerThread, code_of, inference_blocked, xs
from tests.oracle.one_pass import OnePass

ATOL = 1e-5
TINY = ("tiny", "1")


def evicted(srv: ServerThread, reason: str, model: str = "tiny:1") -> float:
    v = srv.server.metrics.registry.get_sample_value(
        "lstm_serve_sessions_evicted_total", {"model": model, "reason": reason}
    )
    return v or 0.0


def live_sessions(srv: ServerThread, model: str = "tiny:1") -> float | None:
    v: float | None = srv.server.metrics.registry.get_sample_value(
        "lstm_serve_sessions", {"model": model}
    )
    return v


def on_loop(srv: ServerThread, fn: Callable[[], Any]) -> Any:
    """Run a plain function on the server's event loop (the engine is loop-only)."""

    async def run() -> Any:
        return fn()

    return srv.call(run())


def wait_until(cond: Callable[[], bool], timeout: float = 5.0, every: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(every)
    return cond()


# -- TTL -------------------------------------------------------------------------------------


def test_idle_session_expires_after_ttl(tiny_repo: Path, oracle: OnePass) -> None:
    with (
        ServerThread(model_repository=tiny_repo, session_ttl_s=0.3, reap_interval_s=0.1) as srv,
        Client(srv.target) as c,
    ):
        before = evicted(srv, "ttl")
        out = c.predict("tiny", "idle", xs(1, 3), seq=0)
        assert out.next_seq == 3
        st = c.get_session("tiny", "idle")
        assert st.exists and st.next_seq == 3
        assert live_sessions(srv) == 1

        assert wait_until(lambda: not c.get_session("tiny", "idle").exists, timeout=5.0)
        assert c.get_session("tiny", "idle").next_seq == 0
        assert evicted(srv, "ttl") == before + 1
        assert live_sessions(srv) == 0
        # Its state is gone: continuing is refused, starting over gives a fresh session.
        assert code_of(lambda: c.predict("tiny", "idle", xs(2, 1), seq=3)) == (
            grpc.StatusCode.NOT_FOUND
        )
        fresh = c.predict("tiny", "idle", xs(2, 2), seq=0)
        np.testing.assert_allclose(fresh.y, oracle.run(xs(2, 2))[0], atol=ATOL)


def test_active_session_outlives_ttl(tiny_repo: Path, oracle: OnePass) -> None:
    """Each step refreshes the idle clock: a session used more often than the TTL survives."""
    with (
        ServerThread(model_repository=tiny_repo, session_ttl_s=0.5, reap_interval_s=0.05) as srv,
        Client(srv.target) as c,
    ):
        c.predict("tiny", "idle", xs(3, 1), seq=0)
        x = xs(4, 15)
        outs = []
        for i in range(len(x)):  # ~1.5 s in all, three TTLs
            outs.append(c.predict("tiny", "busy", x[i : i + 1], seq=i).y)
            time.sleep(0.1)
        assert not c.get_session("tiny", "idle").exists
        assert c.get_session("tiny", "busy").next_seq == len(x)
        np.testing.assert_allclose(np.concatenate(outs), oracle.run(x)[0], atol=ATOL)
        assert evicted(srv, "ttl") == 1


def test_session_with_request_in_flight_is_never_reaped(tiny_repo: Path, oracle: OnePass) -> None:
    with (
        ServerThread(model_repository=tiny_repo) as srv,  # default TTL: reaped only by hand
        Client(srv.target) as c,
        ThreadPoolExecutor(2) as pool,
    ):
        lm = srv.engine.models[TINY]
        a, b = xs(5, 4), xs(6, 3)
        c.predict("tiny", "inflight", a, seq=0)
        c.predict("tiny", "idle", xs(7, 2), seq=0)
        with inference_blocked(srv):
            fut = pool.submit(c.predict, "tiny", "inflight", b, seq=4)
            assert wait_until(lambda: on_loop(srv, lambda: lm.scheduler.busy("inflight")))
            # Every session is far past its TTL now; only the idle one may go.
            reaped = on_loop(srv, lambda: srv.engine.reap(time.monotonic() + 1e6))
            assert reaped == 1
            assert not fut.done()
        out = fut.result(10)
        np.testing.assert_allclose(out.y, oracle.run(np.concatenate([a, b]))[0][4:], atol=ATOL)
        assert out.next_seq == 7
        assert c.get_session("tiny", "inflight").exists
        assert c.get_session("tiny", "inflight").next_seq == 7
        assert not c.get_session("tiny", "idle").exists
        assert evicted(srv, "ttl") == 1


# -- session cap -----------------------------------------------------------------------------


def test_cap_refuse_keeps_existing_sessions(tiny_repo: Path, oracle: OnePass) -> None:
    with (
        ServerThread(model_repository=tiny_repo, max_sessions=4, cap_policy="refuse") as srv,
        Client(srv.target) as c,
    ):
        first = {f"s{i}": xs(10 + i, 2) for i in range(4)}
        second = {f"s{i}": xs(20 + i, 3) for i in range(4)}
        for sid, x in first.items():
            c.predict("tiny", sid, x, seq=0)
        assert code_of(lambda: c.predict("tiny", "s4", xs(9, 1), seq=0)) == (
            grpc.StatusCode.RESOURCE_EXHAUSTED
        )
        assert not c.get_session("tiny", "s4").exists
        # A frame with an existing session and a new one is refused as a whole...
        frame = step_request(
            "tiny",
            [session_steps("s0", second["s0"], seq=2), session_steps("s5", xs(8, 1), seq=0)],
        )
        assert code_of(lambda: c.step(frame)) == grpc.StatusCode.RESOURCE_EXHAUSTED
        # ... and a forecast that would create a session is refused too.
        prefix = session_steps("s6", xs(8, 2))
        assert code_of(lambda: c.forecast("tiny", "s6", 2, prefix=prefix, commit=True)) == (
            grpc.StatusCode.RESOURCE_EXHAUSTED
        )
        assert live_sessions(srv) == 4
        # The four sessions continue exactly where they were.
        for sid in first:
            assert c.get_session("tiny", sid).next_seq == 2
            out = c.predict("tiny", sid, second[sid], seq=2)
            full = np.concatenate([first[sid], second[sid]])
            np.testing.assert_allclose(out.y, oracle.run(full)[0][2:], atol=ATOL)
        assert evicted(srv, "lru") == 0


def test_cap_evict_lru_evicts_least_recently_used(tiny_repo: Path, oracle: OnePass) -> None:
    with (
        ServerThread(model_repository=tiny_repo, max_sessions=4, cap_policy="evict_lru") as srv,
        Client(srv.target) as c,
    ):
        hist: dict[str, list[np.ndarray]] = {}

        def send(sid: str, x: np.ndarray) -> StepResult:
            seq = sum(len(h) for h in hist.get(sid, []))
            out = c.predict("tiny", sid, x, seq=seq)
            hist.setdefault(sid, []).append(x)
            full = np.concatenate(hist[sid])
            np.testing.assert_allclose(out.y, oracle.run(full)[0][seq:], atol=ATOL)
            return out

        for i in range(4):
            send(f"s{i}", xs(30 + i, 2))
        send("s0", xs(40, 1))  # s0 is now the most recently used; s1 the least
        send("s4", xs(41, 2))
        assert not c.get_session("tiny", "s1").exists
        assert evicted(srv, "lru") == 1
        assert live_sessions(srv) == 4
        for sid in ("s0", "s2", "s3", "s4"):
            assert c.get_session("tiny", sid).exists
        assert code_of(lambda: c.predict("tiny", "s1", xs(42, 1), seq=2)) == (
            grpc.StatusCode.NOT_FOUND
        )
        # The survivors keep their state exactly.
        for k, sid in enumerate(("s0", "s2", "s3", "s4")):
            send(sid, xs(50 + k, 3))
        # Next in line: s0, the first survivor stepped above.
        hist.pop("s1")
        send("s5", xs(60, 1))
        assert not c.get_session("tiny", "s0").exists
        assert evicted(srv, "lru") == 2


def test_a_refused_frame_evicts_nothing(tiny_repo: Path) -> None:
    """A frame of more new sessions than the cap can hold is refused before any eviction."""
    with (
        ServerThread(model_repository=tiny_repo, max_sessions=20, cap_policy="evict_lru") as srv,
        Client(srv.target) as c,
    ):
        for i in range(20):
            c.predict("tiny", f"old{i}", xs(i, 1), seq=0)
        frame = [session_steps(f"new{i}", xs(100 + i, 1), seq=0) for i in range(21)]
        with pytest.raises(grpc.RpcError) as info:
            c.step(step_request("tiny", frame))
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "21 new sessions" in (info.value.details() or "")
        assert evicted(srv, "lru") == 0
        assert live_sessions(srv) == 20
        assert all(c.get_session("tiny", f"old{i}").exists for i in range(20))
        assert not c.get_session("tiny", "new0").exists


def test_cap_evict_lru_never_evicts_a_busy_session(tiny_repo: Path, oracle: OnePass) -> None:
    with (
        ServerThread(model_repository=tiny_repo, max_sessions=2, cap_policy="evict_lru") as srv,
        Client(srv.target) as c,
        ThreadPoolExecutor(2) as pool,
    ):
        lm = srv.engine.models[TINY]
        a0, b0, a1, b1 = xs(70, 2), xs(71, 2), xs(72, 2), xs(73, 2)
        c.predict("tiny", "a", a0, seq=0)
        c.predict("tiny", "b", b0, seq=0)
        futs: list[Future[StepResult]] = []
        with inference_blocked(srv):
            futs.append(pool.submit(c.predict, "tiny", "a", a1, seq=2))
            futs.append(pool.submit(c.predict, "tiny", "b", b1, seq=2))
            assert wait_until(
                lambda: on_loop(srv, lambda: lm.scheduler.busy("a") and lm.scheduler.busy("b"))
            )
            # A new session waits for the batch in flight: nothing is planned (or evicted)
            # while a and b run.
            fc = pool.submit(c.predict, "tiny", "c", xs(74, 1), seq=0, timeout=10)
            time.sleep(0.3)
            assert not fc.done()
            assert evicted(srv, "lru") == 0
        ra, rb = (f.result(10) for f in futs)
        np.testing.assert_allclose(ra.y, oracle.run(np.concatenate([a0, a1]))[0][2:], atol=ATOL)
        np.testing.assert_allclose(rb.y, oracle.run(np.concatenate([b0, b1]))[0][2:], atol=ATOL)
        # Then c evicts the least recently used of the two, now idle.
        assert fc.result(10).next_seq == 1
        assert evicted(srv, "lru") == 1
        assert not c.get_session("tiny", "a").exists and c.get_session("tiny", "b").exists


# -- reset / end -----------------------------------------------------------------------------


def test_reset_session_zeroes_state(client: Client, oracle: OnePass) -> None:
    c = client
    c.predict("tiny", "rs", xs(80, 4), seq=0)
    st = c.reset_session("tiny", "rs")
    assert st.exists and st.next_seq == 0
    st = c.get_session("tiny", "rs")
    assert st.exists and st.next_seq == 0
    # The old numbering is gone: continuing at 4 is a gap.
    assert code_of(lambda: c.predict("tiny", "rs", xs(81, 1), seq=4)) == (
        grpc.StatusCode.FAILED_PRECONDITION
    )
    y = xs(82, 3)
    out = c.predict("tiny", "rs", y, seq=0)
    assert (out.seq, out.next_seq, out.replayed) == (0, 3, False)
    np.testing.assert_allclose(out.y, oracle.run(y)[0], atol=ATOL)


def test_reset_flag_on_a_step_starts_from_zero(client: Client, oracle: OnePass) -> None:
    c = client
    c.predict("tiny", "rf", xs(83, 5), seq=0)
    y = xs(84, 2)
    out = c.predict("tiny", "rf", y, seq=0, reset=True)
    assert out.next_seq == 2
    np.testing.assert_allclose(out.y, oracle.run(y)[0], atol=ATOL)
    z = xs(85, 2)
    out = c.predict("tiny", "rf", z, seq=2)
    np.testing.assert_allclose(out.y, oracle.run(np.concatenate([y, z]))[0][2:], atol=ATOL)


def test_end_session_frees_it(client: Client, oracle: OnePass) -> None:
    c = client
    c.predict("tiny", "end", xs(86, 3), seq=0)
    st = c.end_session("tiny", "end")
    assert not st.exists and st.next_seq == 3
    assert not c.get_session("tiny", "end").exists
    assert code_of(lambda: c.predict("tiny", "end", xs(87, 1), seq=3)) == (
        grpc.StatusCode.NOT_FOUND
    )
    assert code_of(lambda: c.end_session("tiny", "end")) == grpc.StatusCode.NOT_FOUND
    y = xs(88, 2)
    out = c.predict("tiny", "end", y, seq=0)
    np.testing.assert_allclose(out.y, oracle.run(y)[0], atol=ATOL)


def test_unknown_session_end_and_reset_are_not_found(client: Client) -> None:
    assert not client.get_session("tiny", "never-was").exists
    assert code_of(lambda: client.end_session("tiny", "never-was")) == grpc.StatusCode.NOT_FOUND
    assert code_of(lambda: client.reset_session("tiny", "never-was")) == (grpc.StatusCode.NOT_FOUND)
    assert not client.get_session("tiny", "never-was").exists
    assert code_of(lambda: client.end_session("no-such-model", "x")) == (grpc.StatusCode.NOT_FOUND)


def test_end_session_frees_a_slot_under_the_cap(tiny_repo: Path) -> None:
    with (
        ServerThread(model_repository=tiny_repo, max_sessions=2, cap_policy="refuse") as srv,
        Client(srv.target) as c,
    ):
        c.predict("tiny", "a", xs(90, 1))
        c.predict("tiny", "b", xs(91, 1))
        assert code_of(lambda: c.predict("tiny", "c", xs(92, 1))) == (
            grpc.StatusCode.RESOURCE_EXHAUSTED
        )
        assert live_sessions(srv) == 2
        c.end_session("tiny", "a")
        assert live_sessions(srv) == 1
        assert c.predict("tiny", "c", xs(92, 1)).next_seq == 1
        assert live_sessions(srv) == 2
        assert c.get_session("tiny", "b").next_seq == 1


def test_sessions_are_namespaced_per_model(
    client: Client, oracle: OnePass, tok_oracle: OnePass
) -> None:
    c = client
    x = xs(93, 3)
    toks = [1, 5, 7, 2]
    ry = c.predict("tiny", "shared-id", x, seq=0)
    rt = c.predict("tinytok", "shared-id", tokens=toks, seq=0)
    assert (ry.next_seq, rt.next_seq) == (3, 4)
    assert c.get_session("tiny", "shared-id").next_seq == 3
    assert c.get_session("tinytok", "shared-id").next_seq == 4
    np.testing.assert_allclose(rt.y, tok_oracle.run(np.array(toks, np.int64))[0], atol=ATOL)
    c.end_session("tiny", "shared-id")
    assert not c.get_session("tiny", "shared-id").exists
    st = c.get_session("tinytok", "shared-id")
    assert st.exists and st.next_seq == 4
    more = [3, 3]
    rt2 = c.predict("tinytok", "shared-id", tokens=more, seq=4)
    full = np.array(toks + more, np.int64)
    np.testing.assert_allclose(rt2.y, tok_oracle.run(full)[0][4:], atol=ATOL)
    # The tiny session starts over; the token session's state did not leak into it.
    ry2 = c.predict("tiny", "shared-id", x, seq=0)
    np.testing.assert_allclose(ry2.y, oracle.run(x)[0], atol=ATOL)


def test_concurrent_end_and_steps_never_corrupt_other_sessions(
    tiny_repo: Path, oracle: OnePass
) -> None:
    """Invariant 5: ending sessions (and reusing their slots) while others step is safe."""
    with (
        ServerThread(model_repository=tiny_repo, max_sessions=8) as srv,
        Client(srv.target) as c,
    ):
        x = xs(95, 40)
        stop = threading.Event()
        errors: list[BaseException] = []

        def churn() -> None:
            i = 0
            try:
                while not stop.is_set():
                    sid = f"churn-{i % 3}"
                    c.predict("tiny", sid, xs(96 + i, 2), seq=0, reset=True)
                    c.end_session("tiny", sid)
                    i += 1
            except BaseException as exc:  # surfaced below
                errors.append(exc)

        t = threading.Thread(target=churn)
        t.start()
        try:
            outs = [c.predict("tiny", "steady", x[i : i + 2], seq=i).y for i in range(0, 40, 2)]
        finally:
            stop.set()
            t.join(10)
        assert not errors
        np.testing.assert_allclose(np.concatenate(outs), oracle.run(x)[0], atol=ATOL)
