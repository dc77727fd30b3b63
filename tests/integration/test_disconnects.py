"""Disconnects: streams cut at random points resume without losing or repeating a step.

100 session streams run at once. Some go through a TCP proxy (tests/helpers/proxy.py) that cuts
every open connection at random moments; the others have their channel closed under them at
random points, with requests in flight. Every stream resends what was not answered, with the
same seq; the server answers what it had applied from its replay cache and applies the rest. In
the end every session's outputs and the (h, c) the server keeps equal one pass.

The last tests pin down client-side (service/lstm_serve/client/client.py) resume bugs, found here.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from lstm_serve.client import AsyncClient, Client, session_steps, step_request
from lstm_serve.server.pb import lstm_serve_pb2 as pb
from lstm_serve.server.pb import lstm_serve_pb2_grpc as pb_grpc
from tests.helpers.proxy import TcpProxy, free_port
from tests.helpers.server import ServerThread, inference_blocked, serve
from tests.oracle.one_pass import OnePass

ATOL = 1e-5
LENGTH = 24  # steps per session
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}


@pytest.fixture(scope="module")
def server(tiny_repo: Path) -> Iterator[ServerThread]:
    yield from serve(tiny_repo, metrics_port=-1)


@dataclass
class Session:
    sid: str
    x: np.ndarray
    chunks: list[int]
    outputs: list[np.ndarray] = field(default_factory=list)
    replayed: int = 0

    def requests(self) -> list[pb.StepRequest]:
        starts = np.cumsum([0, *self.chunks[:-1]]).tolist()
        return [
            step_request("tiny", [session_steps(self.sid, self.x[a : a + n], seq=a)])
            for a, n in zip(starts, self.chunks, strict=True)
        ]


def _sessions(prefix: str, n: int, rng: np.random.Generator) -> list[Session]:
    out = []
    for i in range(n):
        cuts = sorted(rng.choice(np.arange(1, LENGTH), size=rng.integers(4, 12), replace=False))
        chunks = np.diff([0, *cuts, LENGTH]).tolist()
        x = rng.normal(size=(LENGTH, 3)).astype(np.float32)
        out.append(Session(f"{prefix}-{i}", x, chunks))
    return out


def _check(server: ServerThread, oracle: OnePass, sessions: list[Session]) -> int:
    """Outputs and the server's final (h, c) equal one pass; returns the states checked."""
    lm = server.engine.model("tiny")
    for s in sessions:
        y, hn, cn = oracle.run(s.x)
        np.testing.assert_allclose(np.concatenate(s.outputs), y, atol=ATOL, err_msg=s.sid)
        slot = lm.store.slot(s.sid)
        assert slot is not None, s.sid
        assert int(lm.store.next_seq[slot]) == LENGTH, s.sid
        np.testing.assert_allclose(lm.store.h[:, slot], hn, atol=ATOL, err_msg=s.sid)
        np.testing.assert_allclose(lm.store.c[:, slot], cn, atol=ATOL, err_msg=s.sid)
    return len(sessions)


def _retryable(exc: grpc.RpcError) -> bool:
    """A cut connection: UNAVAILABLE, CANCELLED, or the local core error of a write on a closed
    channel (never the server's own INTERNAL, whose text is 'internal error')."""
    code = exc.code()
    return code in RETRYABLE or (
        code is grpc.StatusCode.INTERNAL and exc.details() == "Internal error from Core"
    )


class SwappableChannel:
    """An aio channel that can be closed under its calls and replaced (like a reconnect)."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.channel = grpc.aio.insecure_channel(target)
        self.stub = pb_grpc.LstmServeStub(self.channel)
        self.closes = 0

    async def reconnect(self) -> None:
        old = self.channel
        self.channel = grpc.aio.insecure_channel(self.target)
        self.stub = pb_grpc.LstmServeStub(self.channel)
        await old.close(None)  # cancels every call on it, mid-flight
        self.closes += 1

    async def close(self) -> None:
        await self.channel.close(None)


async def pipelined(ch: SwappableChannel, s: Session) -> int:
    """Write every request of s at once on a stream; after a cut, resend the unanswered ones on
    a new stream. Returns the number of resumes."""
    reqs = s.requests()
    acked, resumes, stalls = 0, 0, 0
    while acked < len(reqs):
        call = ch.stub.Stream()
        acked_before = acked

        async def write_all(call: Any, start: int) -> None:
            for r in reqs[start:]:
                await call.write(r)
                await asyncio.sleep(0.003)
            await call.done_writing()

        writer = asyncio.ensure_future(write_all(call, acked))
        try:
            async for resp in call:
                out = resp.sessions[0]
                want = reqs[acked].sessions[0]
                assert (out.session_id, out.seq) == (want.session_id, want.seq)
                s.outputs.append(np.frombuffer(out.y, "<f4").reshape(out.steps, 3))
                s.replayed += out.replayed
                acked += 1
            await writer
        except (grpc.RpcError, asyncio.InvalidStateError, asyncio.CancelledError) as exc:
            # A channel closed under a call ends it with CancelledError (a "local" cancel).
            me = asyncio.current_task()
            if isinstance(exc, asyncio.CancelledError) and me is not None and me.cancelling():
                raise
            if isinstance(exc, grpc.RpcError) and not _retryable(exc):
                raise
            resumes += 1
            # A slow machine may lose many streams before their first answer; only a long run of
            # resumes that each got nothing means the session is stuck.
            stalls = 0 if acked > acked_before else stalls + 1
            assert stalls < 200, f"{s.sid}: no progress in {stalls} resumes"
            await asyncio.sleep(0.01 * min(stalls + 1, 5))
        finally:
            writer.cancel()
            with contextlib.suppress(BaseException):
                await writer
            call.cancel()
    return resumes


def test_cut_streams_lose_and_repeat_nothing(server: ServerThread, oracle: OnePass) -> None:
    rng = np.random.default_rng(2024)
    via_proxy = _sessions("proxy", 35, rng)  # pipelined, through the proxy that drops
    via_close = _sessions("close", 25, rng)  # pipelined, channel closed under them
    via_sync = _sessions("sync", 40, rng)  # lstm_serve.client.SessionStream through the proxy
    cuts = {"proxy drops": 0, "channel closes": 0, "sync channel closes": 0}
    resumes = {"pipelined": 0, "SessionStream": 0}
    errors: list[BaseException] = []

    def sync_worker(target: str, group: list[Session], seed: int) -> None:
        r = np.random.default_rng(seed)
        try:
            with Client(target, timeout=10) as client:
                streams = [
                    client.session("tiny", s.sid, start_seq=0, max_retries=12) for s in group
                ]
                pos = [0] * len(group)
                while any(p < LENGTH for p in pos):
                    for k, s in enumerate(group):
                        if pos[k] == LENGTH:
                            continue
                        n = s.chunks[len(s.outputs)]
                        if r.random() < 0.15:
                            client.reconnect()  # cuts every stream of this client
                            cuts["sync channel closes"] += 1
                        res = streams[k].send(s.x[pos[k] : pos[k] + n])
                        assert (res.seq, res.next_seq) == (pos[k], pos[k] + n)
                        s.outputs.append(res.y)
                        s.replayed += res.replayed
                        pos[k] += n
                for st in streams:
                    resumes["SessionStream"] += st.reconnects
                    st.close()
        except BaseException as exc:
            errors.append(exc)

    async def main(proxy: TcpProxy) -> None:
        done = asyncio.Event()

        async def dropper() -> None:
            r = np.random.default_rng(7)
            while not done.is_set():
                await asyncio.sleep(float(r.uniform(0.03, 0.15)))
                cuts["proxy drops"] += await asyncio.to_thread(proxy.drop_all)

        async def closer(channels: list[SwappableChannel]) -> None:
            r = np.random.default_rng(8)
            while not done.is_set():
                await asyncio.sleep(float(r.uniform(0.02, 0.1)))
                await channels[int(r.integers(len(channels)))].reconnect()
                cuts["channel closes"] += 1

        proxied = [SwappableChannel(proxy.target) for _ in range(5)]
        direct = [SwappableChannel(server.target) for _ in range(3)]
        chaos = [asyncio.create_task(dropper()), asyncio.create_task(closer(direct))]
        try:
            counts = await asyncio.gather(
                *(pipelined(proxied[i % 5], s) for i, s in enumerate(via_proxy)),
                *(pipelined(direct[i % 3], s) for i, s in enumerate(via_close)),
            )
            resumes["pipelined"] += sum(counts)
        finally:
            done.set()
            await asyncio.gather(*chaos)
            for ch in proxied + direct:
                await ch.close()

    with TcpProxy(server.server.port) as proxy:
        threads = [
            threading.Thread(
                target=sync_worker, args=(proxy.target, via_sync[i::4], i), daemon=True
            )
            for i in range(4)
        ]
        for t in threads:
            t.start()
        asyncio.run(main(proxy))
        while any(t.is_alive() for t in threads):  # keep cutting until the sync streams finish
            cuts["proxy drops"] += proxy.drop_all()
            for t in threads:
                t.join(0.1)
        accepted = proxy.accepted
    assert not errors, errors
    sessions = via_proxy + via_close + via_sync
    checked = _check(server, oracle, sessions)
    replayed = sum(s.replayed for s in sessions)
    print(
        f"\ndisconnects: {sum(cuts.values())} connections cut {cuts} ({accepted} accepted by "
        f"the proxy); resumes {resumes}; {replayed} answers replayed; {checked} states checked"
    )
    assert checked == 100
    assert all(n >= 10 for n in cuts.values()), cuts
    assert resumes["pipelined"] > 0 and resumes["SessionStream"] > 0


# -- service/lstm_serve/client/client.py AsyncSessionStream: bugs found by the test above ------------------------


def test_async_session_stream_retries_its_first_connect(tiny_repo: Path) -> None:
    """SessionStream (sync) waits for a server that comes up a moment later; so should this."""
    port = free_port()
    srv = ServerThread(model_repository=tiny_repo, metrics_port=-1, port=port)
    threading.Timer(0.4, srv.start).start()
    try:

        async def main() -> int:
            async with AsyncClient(f"127.0.0.1:{port}", timeout=10) as client:
                stream = client.session("tiny", "late", start_seq=0)
                res = await stream.send(np.ones((2, 3), np.float32))
                await stream.close()
                return res.next_seq

        assert asyncio.run(main()) == 2
    finally:
        for _ in range(100):
            if srv._started.is_set():
                break
            threading.Event().wait(0.05)
        srv.stop()


class _FakeCall:
    """A bidi call that logs the seq of every request written to it."""

    def __init__(self, log: list[int], fail: bool) -> None:
        self.log, self.fail, self.failed = log, fail, False
        self.written: asyncio.Queue[pb.StepRequest] = asyncio.Queue()

    async def write(self, req: pb.StepRequest) -> None:
        if self.failed:
            raise asyncio.InvalidStateError("RPC already finished.")
        self.log.append(req.sessions[0].seq)
        await self.written.put(req)
        await asyncio.sleep(0.02)  # a write yields to the loop, as a real one may

    async def done_writing(self) -> None:
        pass

    async def __aiter__(self) -> AsyncIterator[pb.StepResponse]:
        if self.fail:
            while len(self.log) < 2:
                await asyncio.sleep(0.001)
            self.failed = True
            raise grpc.aio.AioRpcError(
                grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "cut", None
            )
        while True:
            req = await self.written.get()
            s = req.sessions[0]
            n = len(s.x) // 12
            yield pb.StepResponse(
                sessions=[
                    pb.SessionOutput(
                        session_id=s.session_id, seq=s.seq, next_seq=s.seq + n, steps=n, y=s.x
                    )
                ]
            )


def test_async_session_stream_resends_in_seq_order() -> None:
    """After a cut, the new stream must carry the requests in seq order: 0, 1, then 2."""

    async def main() -> list[int]:
        first_log: list[int] = []
        second_log: list[int] = []
        calls = iter([_FakeCall(first_log, fail=True), _FakeCall(second_log, fail=False)])
        stream: Any = None
        pending: list[asyncio.Task[Any]] = []

        class Stub:
            def Stream(self, metadata: Any = None) -> _FakeCall:
                call = next(calls)
                if call.log is second_log:  # a new send() arrives while the resend runs
                    x = np.full((1, 3), 2, np.float32)
                    pending.append(asyncio.ensure_future(stream.send(x)))
                return call

        class FakeClient:
            stub = Stub()

            class conn:
                metadata = ()

            async def reconnect(self) -> None:
                pass

        from lstm_serve.client import AsyncSessionStream

        stream = AsyncSessionStream(FakeClient(), "tiny", "s", start_seq=0, backoff_s=0.001)  # type: ignore[arg-type]
        a = asyncio.ensure_future(stream.send(np.zeros((1, 3), np.float32)))
        b = asyncio.ensure_future(stream.send(np.ones((1, 3), np.float32)))
        results = await asyncio.wait_for(asyncio.gather(a, b, *[]), 5)
        while not pending:
            await asyncio.sleep(0.01)
        third = await asyncio.wait_for(pending[0], 5)
        # Each answer must be the one for its own request.
        for i, r in enumerate([*results, third]):
            assert r.seq == i and float(r.y[0, 0]) == i, (i, r.seq, r.y)
        return second_log

    assert asyncio.run(main()) == [0, 1, 2]


def test_async_session_stream_survives_reconnect_of_its_client(server: ServerThread) -> None:
    async def main() -> int:
        async with AsyncClient(server.target, timeout=10) as client:
            stream = client.session("tiny", "reconnected", start_seq=0)
            pending = asyncio.ensure_future(stream.send(np.ones((2, 3), np.float32)))
            await asyncio.sleep(0.3)  # the request is in flight, its inference held
            await client.reconnect()  # e.g. another stream on this client recovering
            gate.set()
            res = await asyncio.wait_for(pending, 3)
            return res.next_seq

    with inference_blocked(server) as gate:
        assert asyncio.run(main()) == 2
