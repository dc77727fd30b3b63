"""The early answer mode (LSTM_SERVE_STATE_ANSWER=early) against a real redis-server: a client
whose answered steps were not stored (fenced by another replica, or the store failed) learns so
on its next request to that replica, instead of continuing on a history without them."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import redis.asyncio as aioredis

from lstm_serve.bench.procs.redis_server import RedisServer
from lstm_serve.client import Client
from lstm_serve.core import frame as F
from lstm_serve.core.errors import FailedPrecondition
from lstm_serve.core.jobs import Limits
from lstm_serve.core.probes import no_probes
from lstm_serve.core.redis_store import RedisRemote
from lstm_serve.core.replay import ReplayCache
from lstm_serve.core.scheduler import Scheduler
from lstm_serve.core.store import SessionStore
from lstm_serve.core.sync import StateSync
from tests.cluster.test_store import stored
from tests.helpers.server import ServerThread, xs
from tests.oracle.one_pass import OnePass

ATOL = 1e-5


def settled(srv: ServerThread, timeout: float = 10) -> None:
    """Until the replica has no write pending or under way (its answers are all sent)."""
    sync = srv.engine.models["tiny", "1"].sync
    deadline = time.monotonic() + timeout
    while sync.pending or sync._writer is not None:
        assert time.monotonic() < deadline, "writes still pending"
        time.sleep(0.01)


@pytest.fixture
def early_pair(
    tiny_repo: Path, redis_server: RedisServer
) -> Iterator[tuple[ServerThread, ServerThread]]:
    common = {"model_repository": tiny_repo, "state_store": redis_server.url}
    a = ServerThread(**common, state_answer="early").start()
    b = ServerThread(**common, state_answer="early").start()
    try:
        yield a, b
    finally:
        a.stop()
        b.stop()


def test_a_fenced_early_answer_is_told_on_the_next_request(
    early_pair: tuple[ServerThread, ServerThread], redis_server: RedisServer, oracle: OnePass
) -> None:
    """Two replicas reached directly hold one session at seq 4; B (which claimed it last)
    applies xa at seq 4, then A applies xb at seq 4 on its stale copy and answers at once: its
    write is fenced. A's client must not have its next step (seq 6) applied after xa: it is
    refused FAILED_PRECONDITION naming the lost steps, once; after re-reading the session it
    continues on the stored history."""
    a, b = early_pair
    x, xa, xb, xc = xs(2, 4), xs(3, 2), xs(4, 2), xs(5, 2)
    with Client(a.target) as ca, Client(b.target) as cb:
        ca.predict("tiny", "mixed", x, seq=0)
        settled(a)
        assert cb.predict("tiny", "mixed", x, seq=0).next_seq == 4  # B claims it
        cb.predict("tiny", "mixed", xa, seq=4)
        settled(b)
        assert ca.predict("tiny", "mixed", xb, seq=4).next_seq == 6  # answered, then fenced
        settled(a)
        with pytest.raises(grpc.RpcError) as info:
            ca.predict("tiny", "mixed", xc, seq=6)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        details = info.value.details() or ""
        assert "'mixed'" in details and "seq 4 to 5" in details and "GetSession" in details
        assert "not stored" in details
        # Nothing of xb is stored, and the refused step was not applied either.
        _, hn, cn = oracle.run(np.concatenate([x, xa]))
        h, c, n = stored(redis_server, "mixed")
        assert n == 6
        np.testing.assert_allclose(h, hn, atol=ATOL)
        np.testing.assert_allclose(c, cn, atol=ATOL)
        # Told once: the client re-reads the session and goes on from there.
        assert ca.get_session("tiny", "mixed").next_seq == 6
        y = ca.predict("tiny", "mixed", xc, seq=6).y
    full = np.concatenate([x, xa, xc])
    np.testing.assert_allclose(y, oracle.run(full)[0][6:], atol=ATOL)
    h, c, n = stored(redis_server, "mixed")
    assert n == 8
    np.testing.assert_allclose(h, oracle.run(full)[1], atol=ATOL)


def test_an_early_answer_whose_write_failed_is_told_on_the_next_request(
    tiny_repo: Path, redis_server: RedisServer, oracle: OnePass
) -> None:
    """Redis goes away after a step was answered: the step is lost with Redis's copy, and the
    client's next step is refused (FAILED_PRECONDITION naming the lost seqs, no internals), so
    it resends from what the store holds."""
    x = xs(6, 12)
    with (
        ServerThread(
            model_repository=tiny_repo, state_store=redis_server.url, state_answer="early",
            state_store_timeout_s=0.5,
        ) as a,
        Client(a.target) as c,
    ):  # fmt: skip
        c.predict("tiny", "outage", x[:4], seq=0)
        settled(a)
        redis_server.kill()
        assert c.predict("tiny", "outage", x[4:8], seq=4).next_seq == 8  # answered at once
        settled(a)
        redis_server.start()
        with pytest.raises(grpc.RpcError) as info:
            c.predict("tiny", "outage", x[8:], seq=8)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        details = info.value.details() or ""
        assert "seq 4 to 7" in details and "GetSession" in details
        assert "Error" not in details and "127.0.0.1" not in details
        assert c.get_session("tiny", "outage").next_seq == 4
        c.predict("tiny", "outage", x[4:8], seq=4)
        c.predict("tiny", "outage", x[8:], seq=8)
        settled(a)
    _, hn, _ = oracle.run(x)
    h, _, n = stored(redis_server, "outage")
    assert n == 12
    np.testing.assert_allclose(h, hn, atol=ATOL)


# -- the core alone: two schedulers (replicas) on one loop, a real Redis ------------------------


class Sum:
    """y_t = h_t = h_{t-1} + x_t (one layer, one unit): answers computable by hand."""

    def run(
        self, x: np.ndarray, h0: np.ndarray, c0: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        h = h0[0, :, 0][:, None] + np.cumsum(x[:, :, 0], axis=1)
        return h[:, :, None].astype(np.float32), h[:, -1][None, :, None].astype(np.float32), c0


def replica(client: aioredis.Redis) -> tuple[Scheduler, StateSync]:
    sched = Scheduler(
        Sum(), SessionStore(16, 1, 1, 1), ReplayCache(1 << 20), no_probes(), Limits(), "t"
    )
    remote = RedisRemote(client, "early-core", 1, 1, 1, 60.0, 8)
    return sched, StateSync(sched, remote, no_probes(), acked=False, replies=8)


async def quiet(sync: StateSync) -> None:
    for _ in range(500):
        if not sync.pending and sync._writer is None:
            await asyncio.sleep(0.01)  # the drops apply at the next tick
            return
        await asyncio.sleep(0.01)
    raise AssertionError("writes still pending")


def one(v: float) -> np.ndarray:
    return np.full((1, 1), v, np.float32)


def test_requests_queued_behind_the_refused_one_are_refused_too(redis_server: RedisServer) -> None:
    """A pipelined stream's next requests were queued before the client could learn of the
    loss: they are refused with it, not applied; the first request after the refusal goes on."""

    async def main() -> None:
        client = aioredis.Redis.from_url(redis_server.url)
        (sa, ya), (sb, yb) = replica(client), replica(client)
        await sa.submit_step(F.single("p", one(1), seq=0), ["p"], None)
        await quiet(ya)
        await sb.submit_step(F.single("p", one(1), seq=0), ["p"], None)  # B claims p
        await sb.submit_step(F.single("p", one(10), seq=1), ["p"], None)
        await quiet(yb)
        r = await sa.submit_step(F.single("p", one(100), seq=1), ["p"], None)
        assert r.next_seq.tolist() == [2]  # answered on A's stale copy; the write is fenced
        await quiet(ya)
        queued = [sa.submit_step(F.single("p", one(v), seq=s), ["p"], None) for s, v in ((2, 5), (3, 7))]  # fmt: skip
        for fut in queued:
            with pytest.raises(FailedPrecondition, match="seq 1 to 1 were answered here"):
                await fut
        # Sent after the refusal: the client has re-read the session (next_seq 2, h = 11).
        r = await sa.submit_step(F.single("p", one(5), seq=2), ["p"], None)
        assert float(np.asarray(r.y).ravel()[0]) == 16.0
        await quiet(ya)
        sa.close()
        sb.close()
        await client.aclose()

    asyncio.run(main())


def test_a_reset_clears_what_was_lost(redis_server: RedisServer) -> None:
    """Starting the session over needs no warning: no history of it continues."""

    async def main() -> None:
        client = aioredis.Redis.from_url(redis_server.url)
        (sa, ya), (sb, yb) = replica(client), replica(client)
        await sa.submit_step(F.single("r", one(1), seq=0), ["r"], None)
        await quiet(ya)
        await sb.submit_step(F.single("r", one(1), seq=0), ["r"], None)
        await sb.submit_step(F.single("r", one(2), seq=1), ["r"], None)
        await quiet(yb)
        await sa.submit_step(F.single("r", one(3), seq=1), ["r"], None)
        await quiet(ya)
        assert "r" in ya.lost
        r = await sa.submit_step(F.single("r", one(4), reset=True), ["r"], None)
        assert float(np.asarray(r.y).ravel()[0]) == 4.0
        assert "r" not in ya.lost
        await quiet(ya)
        sa.close()
        sb.close()
        await client.aclose()

    asyncio.run(main())
