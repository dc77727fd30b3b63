"""Invariants 1, 2, 4, 5, 6 (docs/architecture.md) against a real server on a loopback port."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from lstm_serve.client import AsyncClient, Client, session_steps, step_request
from lstm_serve.server.pb import lstm_serve_pb2 as pb
from tests.helpers.server import OnePass, ServerThread

ATOL = 1e-5


@pytest.fixture(scope="module")
def server(tiny_repo: Path) -> Iterator[ServerThread]:
    with ServerThread(model_repository=tiny_repo, max_batch_size=64) as srv:
        yield srv


@pytest.fixture
def client(server: ServerThread) -> Iterator[Client]:
    with Client(server.target) as c:
        yield c


def _chunks(rng: np.random.Generator, n: int) -> list[int]:
    cuts = sorted(rng.choice(np.arange(1, n), size=rng.integers(1, 8), replace=False).tolist())
    return [b - a for a, b in zip([0, *cuts], [*cuts, n], strict=True)]


def test_continuation_32_sessions_interleaved_on_concurrent_streams(
    server: ServerThread, oracle: OnePass
) -> None:
    """Invariant 1: any chunking, interleaved with other sessions, equals one pass."""
    rng = np.random.default_rng(1)
    n_sessions, length = 32, 40
    seqs = {f"cont-{i}": rng.normal(size=(length, 3)).astype(np.float32) for i in range(n_sessions)}

    async def one_session(
        client: AsyncClient, sid: str, x: np.ndarray, chunks: list[int]
    ) -> np.ndarray:
        stream = client.session("tiny", sid, start_seq=0)
        outs, pos = [], 0
        async with stream:
            for n in chunks:
                result = await stream.send(x[pos : pos + n])
                assert result.seq == pos
                outs.append(result.y)
                pos += n
        return np.concatenate(outs)

    async def main() -> dict[str, np.ndarray]:
        async with AsyncClient(server.target) as client:
            chunkings = {sid: _chunks(rng, length) for sid in seqs}
            results = await asyncio.gather(
                *(one_session(client, sid, x, chunkings[sid]) for sid, x in seqs.items())
            )
            return dict(zip(seqs, results, strict=True))

    got = asyncio.run(main())
    with Client(server.target) as c:
        for sid, x in seqs.items():
            y, _, _ = oracle.run(x)
            np.testing.assert_allclose(got[sid], y, atol=ATOL)
            assert c.get_session("tiny", sid).next_seq == length


def test_final_state_equals_one_pass(server: ServerThread, client: Client, oracle: OnePass) -> None:
    """The state the server keeps is the one pass's (h, c), not only the outputs."""
    x = np.random.default_rng(2).normal(size=(17, 3)).astype(np.float32)
    for a, b in ((0, 5), (5, 6), (6, 17)):
        client.predict("tiny", "state-check", x[a:b], seq=a)
    _, hn, cn = oracle.run(x)
    lm = server.engine.model("tiny")
    slot = lm.store.slot("state-check")
    np.testing.assert_allclose(lm.store.h[:, slot], hn, atol=ATOL)
    np.testing.assert_allclose(lm.store.c[:, slot], cn, atol=ATOL)


def test_batch_invariance(client: Client) -> None:
    """Invariant 2: a session's outputs do not depend on who shared its batch."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(6, 3)).astype(np.float32)
    alone = client.predict("tiny", "inv-alone", x).y
    others = [session_steps(f"inv-other-{i}", rng.normal(size=(6, 3)) * 5) for i in range(50)]
    frame = [*others[:20], session_steps("inv-shared", x), *others[20:]]
    results = client.step(step_request("tiny", frame))
    shared = next(r for r in results if r.session_id == "inv-shared")
    np.testing.assert_allclose(shared.y, alone, atol=1e-6)


def test_gateway_frame_equals_one_by_one(client: Client) -> None:
    """A frame of many sessions answers exactly what the same steps sent one by one would."""
    rng = np.random.default_rng(4)
    xs = {f"gw-{i}": rng.normal(size=(3, 3)).astype(np.float32) for i in range(40)}
    for step in range(3):
        frame = [session_steps(sid, x[step : step + 1], seq=step) for sid, x in xs.items()]
        framed = {r.session_id: r for r in client.step(step_request("tiny", frame))}
        for sid, x in xs.items():
            single = client.predict("tiny", sid + "-single", x[step : step + 1], seq=step)
            np.testing.assert_allclose(framed[sid].y, single.y, atol=1e-6)
            assert framed[sid].next_seq == single.next_seq == step + 1


def test_mixed_step_counts_in_one_frame(client: Client, oracle: OnePass) -> None:
    """Requests with different step counts batched together are each right."""
    rng = np.random.default_rng(5)
    xs = {f"mix-{n}": rng.normal(size=(n, 3)).astype(np.float32) for n in (1, 2, 5, 9, 9, 1)}
    results = client.step(step_request("tiny", [session_steps(s, x) for s, x in xs.items()]))
    for r in results:
        np.testing.assert_allclose(r.y, oracle.run(xs[r.session_id])[0], atol=ATOL)


def test_retry_is_answered_again_not_applied_twice(client: Client, oracle: OnePass) -> None:
    """Invariant 4: a retried request is replayed, the state advances once."""
    x = np.random.default_rng(6).normal(size=(6, 3)).astype(np.float32)
    first = client.predict("tiny", "retry", x[:4], seq=0)
    again = client.predict("tiny", "retry", x[:4], seq=0)
    assert again.replayed and not first.replayed
    np.testing.assert_array_equal(again.y, first.y)
    assert client.get_session("tiny", "retry").next_seq == 4
    rest = client.predict("tiny", "retry", x[4:], seq=4)
    np.testing.assert_allclose(np.concatenate([first.y, rest.y]), oracle.run(x)[0], atol=ATOL)


def test_gap_is_refused_with_expected_seq(client: Client) -> None:
    x = np.ones((2, 3), np.float32)
    client.predict("tiny", "gap", x, seq=0)
    with pytest.raises(grpc.RpcError) as err:
        client.predict("tiny", "gap", x, seq=5)
    assert err.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert "expected seq 2" in err.value.details()
    assert client.get_session("tiny", "gap").next_seq == 2


def test_concurrent_writers_never_interleave(server: ServerThread, oracle: OnePass) -> None:
    """Invariant 5: concurrent requests on one session apply one at a time, whole."""
    rng = np.random.default_rng(7)
    n_threads, per_thread = 8, 12
    applied: list[tuple[int, np.ndarray, np.ndarray]] = []
    lock = threading.Lock()
    errors: list[BaseException] = []

    def writer(t: int) -> None:
        try:
            with Client(server.target) as c:
                for _ in range(per_thread):
                    x = rng.normal(size=(2, 3)).astype(np.float32) + t
                    r = c.predict("tiny", "writers", x)
                    with lock:
                        applied.append((r.seq, x, r.y))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    applied.sort(key=lambda a: a[0])
    assert [a[0] for a in applied] == list(range(0, 2 * n_threads * per_thread, 2))
    x_all = np.concatenate([a[1] for a in applied])
    y_all = np.concatenate([a[2] for a in applied])
    np.testing.assert_allclose(y_all, oracle.run(x_all)[0], atol=ATOL)


def test_failed_step_leaves_state_unchanged(client: Client, oracle: OnePass) -> None:
    """Invariant 6: a refused step changes nothing; the sequence continues as if it never came."""
    x = np.random.default_rng(8).normal(size=(5, 3)).astype(np.float32)
    client.predict("tiny", "fail", x[:3])
    bad = x[3:4].copy()
    bad[0, 1] = np.nan
    with pytest.raises(grpc.RpcError) as err:
        client.predict("tiny", "fail", bad)
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert client.get_session("tiny", "fail").next_seq == 3
    rest = client.predict("tiny", "fail", x[3:])
    np.testing.assert_allclose(rest.y, oracle.run(x)[0][3:], atol=ATOL)


def test_frame_is_all_or_nothing(client: Client) -> None:
    """One session's gap refuses the whole frame: no other session in it advances."""
    x = np.ones((1, 3), np.float32)
    client.predict("tiny", "frame-a", x, seq=0)
    frame = [session_steps("frame-a", x, seq=1), session_steps("frame-b", x, seq=3)]
    with pytest.raises(grpc.RpcError) as err:
        client.step(step_request("tiny", frame))
    assert err.value.code() in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND)
    assert client.get_session("tiny", "frame-a").next_seq == 1
    assert not client.get_session("tiny", "frame-b").exists


def test_stream_pipelines_in_order(server: ServerThread, oracle: OnePass) -> None:
    """Many requests written at once on one stream are answered in order, each exactly once."""
    x = np.random.default_rng(9).normal(size=(64, 3)).astype(np.float32)

    async def main() -> list[pb.StepResponse]:
        async with AsyncClient(server.target) as client:
            reqs = [
                step_request(
                    "tiny", [session_steps("pipe", x[i : i + 1], seq=i)], request_id=str(i)
                )
                for i in range(64)
            ]

            async def gen():  # type: ignore[no-untyped-def]
                for r in reqs:
                    yield r

            return [r async for r in client.stub.Stream(gen())]

    responses = asyncio.run(main())
    assert [r.request_id for r in responses] == [str(i) for i in range(64)]
    y = np.concatenate([np.frombuffer(r.sessions[0].y, "<f4").reshape(1, 3) for r in responses])
    np.testing.assert_allclose(y, oracle.run(x)[0], atol=ATOL)


def test_token_model_continuation(server: ServerThread, tiny_repo: Path) -> None:
    oracle = OnePass(tiny_repo / "tinytok" / "1")
    ids = np.random.default_rng(10).integers(0, 12, size=30)
    with Client(server.target) as c:
        outs = [
            c.predict("tinytok", "tok", tokens=ids[a:b].tolist(), seq=a).y
            for a, b in ((0, 7), (7, 8), (8, 30))
        ]
        top = c.predict("tinytok", "tok-top", tokens=ids[:5].tolist(), top_k=3)
    y = oracle.run(ids.astype(np.int64))[0]
    np.testing.assert_allclose(np.concatenate(outs), y, atol=ATOL)
    assert top.y.size == 0 and len(top.top_k) == 5
    best = [t for t, _ in top.top_k[-1]]
    assert best == np.argsort(-y[4], kind="stable")[:3].tolist()
