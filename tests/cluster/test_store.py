"""Replicas sharing sessions through a real redis-server (in-process replicas, direct calls):
continuation across replicas, fencing (split brain), the last reply, GetSession and EndSession
across replicas, a Redis crash mid-load, the early answer mode and drain."""

from __future__ import annotations

import concurrent.futures as cf
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from lstm_serve.bench.procs.redis_server import RedisServer
from lstm_serve.client import Client
from tests.helpers.server import ServerThread, xs
from tests.oracle.one_pass import OnePass

ATOL = 1e-5


def stored(r: RedisServer, session: str) -> tuple[np.ndarray, np.ndarray, int]:
    """h, c and next_seq of a session as Redis holds them."""
    (key,) = r.client().keys(f"lstm-serve:tiny:1:*:{{{session}}}")
    h, c, n = r.client().hmget(key, "h", "c", "n")
    assert h is not None and c is not None and n is not None
    return np.frombuffer(h, "<f4").reshape(2, 16), np.frombuffer(c, "<f4").reshape(2, 16), int(n)


def test_a_session_stepped_on_alternating_replicas_equals_one_pass(
    pair: tuple[ServerThread, ServerThread], redis_server: RedisServer, oracle: OnePass
) -> None:
    a, b = pair
    x = xs(1, 40)
    with Client(a.target) as ca, Client(b.target) as cb:
        ys = []
        for i, client in enumerate([ca, cb, ca, ca, cb, cb, ca, cb, ca, cb]):
            ys.append(client.predict("tiny", "walk", x[4 * i : 4 * i + 4], seq=4 * i).y)
    y, hn, cn = oracle.run(x)
    np.testing.assert_allclose(np.concatenate(ys), y, atol=ATOL)
    h, c, n = stored(redis_server, "walk")
    assert n == 40
    np.testing.assert_allclose(h, hn, atol=ATOL)
    np.testing.assert_allclose(c, cn, atol=ATOL)


def test_split_brain_one_side_is_fenced_and_history_is_one_order(
    pair: tuple[ServerThread, ServerThread], redis_server: RedisServer, oracle: OnePass
) -> None:
    """Both replicas hold the session at seq 4 (B claimed it last). A applies a step 4 on its
    stale copy: its write is fenced (UNAVAILABLE) and its copy dropped; A's retry claims the
    session and applies. B then applies another step 4 on its now stale copy: fenced too, and
    its retry finds A's step (FAILED_PRECONDITION: seq 4 was applied with other inputs)."""
    a, b = pair
    x = xs(2, 4)
    xa, xb = xs(3, 4), xs(4, 4)
    unavailable = grpc.StatusCode.UNAVAILABLE
    with Client(a.target) as ca, Client(b.target) as cb:
        ca.predict("tiny", "brain", x, seq=0)
        assert cb.predict("tiny", "brain", x, seq=0).next_seq == 4  # B claims: the last reply
        with pytest.raises(grpc.RpcError) as info:
            ca.predict("tiny", "brain", xa, seq=4)
        assert info.value.code() == unavailable
        ya = ca.predict("tiny", "brain", xa, seq=4)  # the retry
        with pytest.raises(grpc.RpcError) as info:
            cb.predict("tiny", "brain", xb, seq=4)
        assert info.value.code() == unavailable
        with pytest.raises(grpc.RpcError) as info:
            cb.predict("tiny", "brain", xb, seq=4)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "different inputs" in (info.value.details() or "")
        # The retry of A's step is answered again by B, from the stored last reply.
        again = cb.predict("tiny", "brain", xa, seq=4)
        np.testing.assert_array_equal(again.y, ya.y)
    y, hn, cn = oracle.run(np.concatenate([x, xa]))
    np.testing.assert_allclose(ya.y, y[4:], atol=ATOL)
    h, c, n = stored(redis_server, "brain")
    assert n == 8
    np.testing.assert_allclose(h, hn, atol=ATOL)
    np.testing.assert_allclose(c, cn, atol=ATOL)


def test_concurrent_split_brain_never_mixes_states(
    pair: tuple[ServerThread, ServerThread], redis_server: RedisServer, oracle: OnePass
) -> None:
    """Many rounds of the same seq sent to both replicas at once with different inputs: each
    round exactly one order of history survives; the stored state is one pass over it."""
    a, b = pair
    history: list[np.ndarray] = []
    codes: list[grpc.StatusCode] = []
    with Client(a.target) as ca, Client(b.target) as cb, cf.ThreadPoolExecutor(2) as pool:
        seq = 0
        for r in range(12):
            xa, xb = xs(100 + 2 * r, 2), xs(101 + 2 * r, 2)
            got: dict[str, np.ndarray] = {}

            def go(
                c: Client,
                x: np.ndarray,
                name: str,
                seq: int = seq,
                got: dict[str, np.ndarray] = got,
            ) -> None:
                for _ in range(5):  # retry UNAVAILABLE, as a client does
                    try:
                        c.predict("tiny", "race", x, seq=seq)
                        got[name] = x
                        return
                    except grpc.RpcError as exc:
                        codes.append(exc.code())
                        if exc.code() != grpc.StatusCode.UNAVAILABLE:
                            return
                        time.sleep(0.01)

            list(pool.map(lambda t: go(*t), [(ca, xa, "a"), (cb, xb, "b")]))
            assert len(got) == 1, f"round {r}: both or neither applied seq {seq}: {list(got)}"
            history.append(next(iter(got.values())))
            seq += 2
    _, hn, cn = oracle.run(np.concatenate(history))
    h, c, n = stored(redis_server, "race")
    assert n == seq
    np.testing.assert_allclose(h, hn, atol=ATOL)
    np.testing.assert_allclose(c, cn, atol=ATOL)
    assert grpc.StatusCode.FAILED_PRECONDITION in codes


def test_get_session_and_end_session_see_the_shared_state(
    pair: tuple[ServerThread, ServerThread],
) -> None:
    a, b = pair
    with Client(a.target) as ca, Client(b.target) as cb:
        ca.predict("tiny", "seen", xs(5, 3), seq=0)
        st = cb.get_session("tiny", "seen")
        assert st.exists and st.next_seq == 3
        cb.end_session("tiny", "seen")
        assert not ca.get_session("tiny", "seen").exists  # A's stale copy does not answer
        # A new session under the same id starts from zero on either replica.
        assert ca.predict("tiny", "seen", xs(6, 2), seq=0).next_seq == 2
        with pytest.raises(grpc.RpcError) as info:
            cb.predict("tiny", "nobody", xs(6, 2), seq=5)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_redis_crash_mid_load_gives_unavailable_and_loses_nothing_acknowledged(
    tiny_repo: Path, redis_server: RedisServer, oracle: OnePass
) -> None:
    a = ServerThread(
        model_repository=tiny_repo, state_store=redis_server.url, state_store_timeout_s=0.5
    ).start()
    sessions = [f"load-{i}" for i in range(16)]
    data = {s: xs(200 + i, 60) for i, s in enumerate(sessions)}
    acked: dict[str, int] = dict.fromkeys(sessions, 0)
    codes: list[grpc.StatusCode] = []
    stop = threading.Event()

    def drive(s: str) -> None:
        with Client(a.target, timeout=5) as c:
            while acked[s] < 60 and not stop.is_set():
                n = acked[s]
                try:
                    c.predict("tiny", s, data[s][n : n + 2], seq=n)
                    acked[s] = n + 2
                except grpc.RpcError as exc:
                    codes.append(exc.code())
                    assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc.details()
                    time.sleep(0.05)

    try:
        with cf.ThreadPoolExecutor(len(sessions)) as pool:
            futs = [pool.submit(drive, s) for s in sessions]
            time.sleep(0.3)
            redis_server.kill()
            time.sleep(0.8)
            redis_server.start()
            cf.wait(futs, timeout=60)
            stop.set()
            for f in futs:
                f.result()
        assert codes, "the outage was not seen"
        assert all(n == 60 for n in acked.values())
        for s in sessions:
            _, hn, cn = oracle.run(data[s])
            h, c, n = stored(redis_server, s)
            assert n == 60
            np.testing.assert_allclose(h, hn, atol=ATOL)
            np.testing.assert_allclose(c, cn, atol=ATOL)
    finally:
        a.stop()


def test_early_mode_answers_before_the_write_and_the_store_catches_up(
    tiny_repo: Path, redis_server: RedisServer, oracle: OnePass
) -> None:
    with (
        ServerThread(
            model_repository=tiny_repo, state_store=redis_server.url, state_answer="early"
        ) as a,
        Client(a.target) as c,
    ):
        x = xs(7, 12)
        for i in range(0, 12, 3):
            c.predict("tiny", "early", x[i : i + 3], seq=i)
        sync = a.engine.models["tiny", "1"].sync
        deadline = time.monotonic() + 5
        while sync.pending and time.monotonic() < deadline:
            time.sleep(0.01)
    _, hn, _ = oracle.run(x)
    h, _, n = stored(redis_server, "early")
    assert n == 12
    np.testing.assert_allclose(h, hn, atol=ATOL)


def test_a_drained_replica_hands_its_sessions_over(
    tiny_repo: Path, redis_server: RedisServer, oracle: OnePass
) -> None:
    x = xs(8, 10)
    a = ServerThread(model_repository=tiny_repo, state_store=redis_server.url).start()
    with Client(a.target) as c:
        c.predict("tiny", "handover", x[:6], seq=0)
    a.stop()
    with (
        ServerThread(model_repository=tiny_repo, state_store=redis_server.url) as b,
        Client(b.target) as c,
    ):
        y = c.predict("tiny", "handover", x[6:], seq=6).y
        assert a.engine.models["tiny", "1"].sync is not None
        assert b.engine.models["tiny", "1"].store.__len__() == 1
    np.testing.assert_allclose(y, oracle.run(x)[0][6:], atol=ATOL)


def test_a_triton_sequence_moves_between_replicas_and_its_end_ends_it_everywhere(
    pair: tuple[ServerThread, ServerThread], redis_server: RedisServer, oracle: OnePass
) -> None:
    """The Open Inference Protocol's sequences (sequence_id, start, end) share the space too."""
    from lstm_serve.server.pb import grpc_service_pb2_grpc as ipb_grpc
    from tests.integration.test_kserve_protocol import infer, y_of

    def call(stub: ipb_grpc.GRPCInferenceServiceStub, req: object) -> np.ndarray:
        for _ in range(3):  # UNAVAILABLE is retried, as clients do
            try:
                return y_of(stub.ModelInfer(req))
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
        raise AssertionError("still UNAVAILABLE")

    a, b = pair
    x = xs(9, 6)
    with grpc.insecure_channel(a.target) as ch_a, grpc.insecure_channel(b.target) as ch_b:
        sa, sb = ipb_grpc.GRPCInferenceServiceStub(ch_a), ipb_grpc.GRPCInferenceServiceStub(ch_b)
        y1 = call(sa, infer("tiny", x[None, :2], seq_id="tri", start=True))
        y2 = call(sb, infer("tiny", x[None, 2:4], seq_id="tri"))
        y3 = call(sa, infer("tiny", x[None, 4:], seq_id="tri", end=True))  # A's copy was stale
        ys = np.concatenate([y.reshape(-1, 3) for y in (y1, y2, y3)])
        np.testing.assert_allclose(ys, oracle.run(x)[0], atol=ATOL)
        assert not redis_server.client().keys("lstm-serve:tiny:1:*{tri}*")  # ended: deleted
        with pytest.raises(grpc.RpcError) as info:
            call(sb, infer("tiny", x[None, :1], seq_id="tri"))  # B's copy is stale too
        # Triton's answer for a sequence that does not exist (any more).
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "START" in (info.value.details() or "")
