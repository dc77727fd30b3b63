"""The shared store's contract (core/remote.py), run alike against MemoryRemote and the real
RedisRemote on a redis-server: what a claim of an unknown or stored session gives, that the
first write creates (at version 0, and only once), that a write naming a stale epoch or version
is fenced and changes nothing, deletes, peek, the replies kept, trimmed and cleared, and the
TTL. Two connections in one namespace play two replicas.

The Redis case needs redis-server (as tests/cluster does) and is skipped where it is not
installed. The MemoryRemote's own test controls (faults, held writes) are checked at the end."""

from __future__ import annotations

import asyncio
import shutil
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any

import numpy as np
import pytest

from lstm_serve.core.memory_remote import MemoryRemote
from lstm_serve.core.remote import Claim, Remote, Reply, State, StoreDown, Write

LAYERS, HIDDEN, OUT = 2, 3, 2
REPLIES = 3  # kept per session
EPOCH_MAX = 1 << 62

Pair = tuple[Remote, Remote]
Opener = Callable[..., Any]


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    from lstm_serve.bench.procs.redis_server import RedisServer

    srv = RedisServer(tmp_path_factory.mktemp("redis")).start()
    try:
        yield srv.url
    finally:
        srv.stop()


@pytest.fixture(params=["memory", "redis"])
def backend(request: pytest.FixtureRequest) -> Opener:
    """opens(ttl_s=..., versions=False) -> an async context of two connections (replicas) to
    one fresh namespace of the store; with versions, to the stores of versions 1 and 2 of one
    model."""
    if request.param == "memory":

        @asynccontextmanager
        async def memory(ttl_s: float = 60.0, versions: bool = False) -> AsyncIterator[Pair]:
            if versions:
                a = MemoryRemote(
                    LAYERS, HIDDEN, OUT, ttl_s, REPLIES, namespace="contract:1",
                    model="contract", version="1",
                )  # fmt: skip
                b = a.peer("contract:2", "2")
            else:
                a = MemoryRemote(LAYERS, HIDDEN, OUT, ttl_s, REPLIES, namespace="contract")
                b = a.peer()
            yield a, b
            await a.close()
            await b.close()

        return memory
    url: str = request.getfixturevalue("redis_url")

    @asynccontextmanager
    async def redis(ttl_s: float = 60.0, versions: bool = False) -> AsyncIterator[Pair]:
        from lstm_serve.core.redis_store import RedisRemote, connect

        space = f"contract-{uuid.uuid4().hex}"  # one fresh namespace per test
        ca, cb = connect(url, 5.0), connect(url, 5.0)
        if versions:
            a = RedisRemote(ca, f"{space}:1", LAYERS, HIDDEN, OUT, ttl_s, REPLIES, space, "1")
            b = RedisRemote(cb, f"{space}:2", LAYERS, HIDDEN, OUT, ttl_s, REPLIES, space, "2")
        else:
            a = RedisRemote(ca, space, LAYERS, HIDDEN, OUT, ttl_s, REPLIES)
            b = RedisRemote(cb, space, LAYERS, HIDDEN, OUT, ttl_s, REPLIES)
        try:
            yield a, b
        finally:
            await a.close()
            await b.close()

    return redis


def run(opens: Opener, body: Callable[[Remote, Remote], Awaitable[None]], **kw: Any) -> None:
    async def main() -> None:
        async with opens(**kw) as (a, b):
            await body(a, b)

    asyncio.run(main())


def reply(seq: int, steps: int = 1, reset: bool = False, digest: int | None = None) -> Reply:
    y = (np.arange(steps * OUT, dtype=np.float32).reshape(steps, OUT) + seq) / 8
    return Reply(seq, seq + steps, (seq * 7919 + 1) if digest is None else digest, reset, y)


def state(
    next_seq: int, seed: float = 0.0, replies: tuple[Reply, ...] = (), clear: bool = False
) -> State:
    base = np.arange(LAYERS * HIDDEN, dtype=np.float32).reshape(LAYERS, HIDDEN) + seed
    return State(base, -base, np.full(OUT, seed, np.float32), next_seq, replies, clear)


def same_state(got: State | None, want: State) -> None:
    """got (a claim's state) holds want's values; its replies are checked by the caller."""
    assert got is not None
    assert got.h.dtype == np.float32 and got.h.shape == (LAYERS, HIDDEN)
    np.testing.assert_array_equal(got.h, want.h)
    np.testing.assert_array_equal(got.c, want.c)
    np.testing.assert_array_equal(got.last_y, want.last_y)
    assert got.next_seq == want.next_seq
    assert got.clear is False


def seqs(c: Claim) -> list[int]:
    assert c.state is not None
    return [r.seq for r in c.state.replies]


async def create(a: Remote, key: str, s: State) -> Claim:
    """Claim an unknown key on a and write its first state; the claim it was written under."""
    (cl,) = await a.claim([key])
    assert cl.state is None and cl.version == 0
    assert await a.write([Write(key, cl.epoch, 0, s)]) == [True]
    return cl


# -- claims --------------------------------------------------------------------------------------


def test_a_claim_of_an_unknown_session_stores_nothing(backend: Opener) -> None:
    async def body(a: Remote, b: Remote) -> None:
        c1, c2 = await a.claim(["nobody", "nobody"])
        (c3,) = await b.claim(["nobody"])
        for c in (c1, c2, c3):
            assert c.state is None and c.version == 0
            assert 1 <= c.epoch <= EPOCH_MAX
        assert len({c1.epoch, c2.epoch, c3.epoch}) == 3  # random, never counted
        assert await a.peek("nobody") is None
        assert await b.peek("nobody") is None
        await a.check()

    run(backend, body)


def test_the_first_write_creates_the_session_at_version_1(backend: Opener) -> None:
    async def body(a: Remote, b: Remote) -> None:
        first = state(5, 1.5, (reply(0, 2), reply(2, 3, reset=True, digest=(1 << 64) - 1)))
        cl = await create(a, "s", first)
        assert await b.peek("s") == 5
        (got,) = await b.claim(["s"])
        assert got.version == 1 and got.epoch != cl.epoch
        same_state(got.state, first)
        assert got.state is not None
        assert got.state.replies == tuple(got.state.replies)  # oldest first
        r0, r1 = got.state.replies
        assert (r0.seq, r0.next_seq, r0.reset) == (0, 2, False)
        assert (r1.seq, r1.next_seq, r1.digest, r1.reset) == (2, 5, (1 << 64) - 1, True)
        np.testing.assert_array_equal(r0.y, first.replies[0].y)
        np.testing.assert_array_equal(r1.y, first.replies[1].y)
        assert r1.y.shape == (3, OUT) and r1.y.dtype == np.float32

    run(backend, body)


def test_only_one_first_write_lands(backend: Opener) -> None:
    """Two replicas claimed an unknown session and both write it first: the later is fenced,
    whatever epoch it names."""

    async def body(a: Remote, b: Remote) -> None:
        (ca,) = await a.claim(["race"])
        (cb,) = await b.claim(["race"])
        assert await a.write([Write("race", ca.epoch, 0, state(1, 1.0))]) == [True]
        assert await b.write([Write("race", cb.epoch, 0, state(9, 9.0))]) == [False]
        assert await b.write([Write("race", ca.epoch, 0, state(9, 9.0))]) == [False]
        (got,) = await b.claim(["race"])
        assert got.version == 1
        same_state(got.state, state(1, 1.0))

    run(backend, body)


def test_a_claim_takes_the_session_over_and_keeps_its_version(backend: Opener) -> None:
    async def body(a: Remote, b: Remote) -> None:
        ca = await create(a, "k", state(2, 0.5))
        assert await a.write([Write("k", ca.epoch, 1, state(3, 0.5))]) == [True]
        (cb,) = await b.claim(["k"])
        assert cb.version == 2
        (cb2,) = await b.claim(["k"])  # claiming again: a new epoch, the same version
        assert cb2.version == 2 and cb2.epoch != cb.epoch
        assert await b.write([Write("k", cb.epoch, 2, state(4))]) == [False]
        assert await b.write([Write("k", cb2.epoch, 2, state(4))]) == [True]

    run(backend, body)


# -- fencing -------------------------------------------------------------------------------------


def test_a_write_with_a_stale_epoch_or_version_is_fenced_and_changes_nothing(
    backend: Opener,
) -> None:
    async def body(a: Remote, b: Remote) -> None:
        ca = await create(a, "f", state(1, 1.0, (reply(0),)))
        (cb,) = await b.claim(["f"])  # B takes it over: A's epoch is stale
        stale = state(2, 2.0, (reply(1),))
        assert await a.write([Write("f", ca.epoch, 1, stale)]) == [False]
        assert await a.write([Write("f", ca.epoch, 1, None)]) == [False]  # nor a delete
        assert await b.write([Write("f", cb.epoch, 1, state(2, 3.0, (reply(1),)))]) == [True]
        # B's epoch, but the version it followed is gone (a write of B's that was lost)
        assert await b.write([Write("f", cb.epoch, 1, state(3, 4.0))]) == [False]
        assert await b.write([Write("f", cb.epoch, 3, state(3, 4.0))]) == [False]
        assert await b.write([Write("f", cb.epoch, 0, state(3, 4.0))]) == [False]
        assert await a.peek("f") == 2
        (got,) = await a.claim(["f"])
        assert got.version == 2
        same_state(got.state, state(2, 3.0))
        assert seqs(got) == [0, 1]

    run(backend, body)


def test_a_batch_applies_each_write_on_its_own(backend: Opener) -> None:
    """One call, many sessions: each write is applied or fenced by its own epoch and version,
    in order (a second write of a key in the call follows the first)."""

    async def body(a: Remote, b: Remote) -> None:
        ck = await create(a, "keep", state(1))
        cl = await create(a, "lose", state(1))
        await b.claim(["lose"])
        (cn,) = await a.claim(["new"])
        done = await a.write(
            [
                Write("keep", ck.epoch, 1, state(2, 1.0)),
                Write("lose", cl.epoch, 1, state(2, 1.0)),
                Write("new", cn.epoch, 0, state(1, 2.0)),
                Write("keep", ck.epoch, 2, state(3, 1.0)),
                Write("keep", ck.epoch, 2, state(4, 1.0)),
            ]
        )
        assert done == [True, False, True, True, False]
        assert [await b.peek(k) for k in ("keep", "lose", "new")] == [3, 1, 1]
        claims = await b.claim(["keep", "nothing", "new"])
        assert [c.version for c in claims] == [3, 0, 1]
        assert claims[1].state is None

    run(backend, body)


# -- deletes -------------------------------------------------------------------------------------


def test_a_delete_removes_the_session_and_a_later_one_of_that_id_starts_afresh(
    backend: Opener,
) -> None:
    async def body(a: Remote, b: Remote) -> None:
        ca = await create(a, "d", state(4, 1.0, (reply(3),)))
        (cb,) = await b.claim(["d"])
        assert await a.write([Write("d", ca.epoch, 1, None)]) == [False]  # fenced: stays
        assert await a.peek("d") == 4
        assert await b.write([Write("d", cb.epoch, 1, None)]) == [True]
        assert await a.peek("d") is None
        (gone,) = await a.claim(["d"])
        assert gone.state is None and gone.version == 0
        # B's old claim never matches the session's next life, though its version may.
        assert await b.write([Write("d", cb.epoch, 1, state(5))]) == [False]
        cn = await create(a, "d", state(1, 7.0))
        assert await b.write([Write("d", cb.epoch, 1, state(5))]) == [False]
        (got,) = await b.claim(["d"])
        assert got.version == 1 and seqs(got) == []  # nothing of the ended session
        same_state(got.state, state(1, 7.0))
        assert cn.epoch != cb.epoch

    run(backend, body)


def test_a_delete_at_version_0_applies_only_where_nothing_is_stored(backend: Opener) -> None:
    """A session created and ended before its first write landed: its delete names version 0
    and is applied (it changes nothing) unless another replica stored the session."""

    async def body(a: Remote, b: Remote) -> None:
        (ca,) = await a.claim(["never"])
        assert await a.write([Write("never", ca.epoch, 0, None)]) == [True]
        assert await a.peek("never") is None
        await create(b, "other", state(2))
        (co,) = await a.claim(["x"])
        assert await a.write([Write("other", co.epoch, 0, None)]) == [False]
        assert await a.peek("other") == 2

    run(backend, body)


# -- peek ----------------------------------------------------------------------------------------


def test_peek_reads_next_seq_without_claiming(backend: Opener) -> None:
    async def body(a: Remote, b: Remote) -> None:
        ca = await create(a, "p", state(7))
        assert await b.peek("p") == 7
        assert await b.peek("P") is None  # keys are exact
        # A peek took nothing over: A's epoch still holds.
        assert await a.write([Write("p", ca.epoch, 1, state(8))]) == [True]
        assert await b.peek("p") == 8

    run(backend, body)


# -- replies -------------------------------------------------------------------------------------


def test_replies_are_appended_trimmed_to_the_last_n_and_cleared(backend: Opener) -> None:
    async def body(a: Remote, b: Remote) -> None:
        c = await create(a, "r", state(2, replies=(reply(0), reply(1))))
        e, v = c.epoch, 1

        async def put(s: State) -> None:
            nonlocal v
            assert await a.write([Write("r", e, v, s)]) == [True]
            v += 1

        async def stored() -> list[int]:
            out = seqs((await b.claim(["r"]))[0])
            nonlocal e
            (again,) = await a.claim(["r"])  # A takes it back to go on writing
            e = again.epoch
            return out

        assert await stored() == [0, 1]
        await put(state(4, replies=(reply(2), reply(3))))
        assert await stored() == [1, 2, 3]  # the oldest trimmed: REPLIES kept
        await put(state(4))
        assert await stored() == [1, 2, 3]  # a write without replies keeps them
        await put(state(9, replies=tuple(reply(s) for s in range(4, 9))))
        assert await stored() == [6, 7, 8]  # more new ones than kept: the last of them
        await put(state(1, replies=(reply(0, reset=True),), clear=True))
        got = (await b.claim(["r"]))[0]
        assert seqs(got) == [0] and got.state is not None and got.state.replies[0].reset
        (again,) = await a.claim(["r"])
        e = again.epoch
        await put(state(0, clear=True))  # a reset without a reply yet: none kept
        assert await stored() == []
        await put(state(1, replies=(reply(0),)))
        assert await stored() == [0]

    run(backend, body)


def test_values_are_stored_as_float32_copies(backend: Opener) -> None:
    async def body(a: Remote, b: Remote) -> None:
        s = state(1, 0.25, (reply(0),))
        h64 = s.h.astype(np.float64) + 1e-9  # not representable: rounds to float32
        src = State(h64, s.c.copy(), s.last_y.copy(), 1, (reply(0),))
        await create(a, "copy", src)
        src.c[:] = 99.0  # the caller's arrays change after the write
        src.replies[0].y[:] = 99.0
        (got,) = await b.claim(["copy"])
        assert got.state is not None
        assert got.state.h.dtype == np.float32
        np.testing.assert_array_equal(got.state.h, h64.astype(np.float32))
        np.testing.assert_array_equal(got.state.c, s.c)
        np.testing.assert_array_equal(got.state.replies[0].y, reply(0).y)
        got.state.h[:] = -1.0  # nor do a claim's arrays alias the store
        (again,) = await a.claim(["copy"])
        assert again.state is not None
        np.testing.assert_array_equal(again.state.h, h64.astype(np.float32))

    run(backend, body)


# -- TTL -----------------------------------------------------------------------------------------


def test_a_session_expires_after_the_ttl_unless_claimed_or_written(backend: Opener) -> None:
    async def body(a: Remote, b: Remote) -> None:
        ca = await create(a, "old", state(1))
        await create(a, "kept", state(1))
        await asyncio.sleep(0.9)
        (ck,) = await b.claim(["kept"])  # refreshed
        assert ck.state is not None
        assert await b.peek("old") == 1  # a peek does not refresh
        await asyncio.sleep(0.9)
        assert await b.peek("old") is None
        assert await a.write([Write("old", ca.epoch, 1, state(2))]) == [False]
        assert await b.peek("kept") == 1
        (gone,) = await b.claim(["old"])
        assert gone.state is None

    run(backend, body, ttl_s=1.5)


# -- MemoryRemote's test controls ----------------------------------------------------------------


def test_memory_remote_fails_the_next_calls_on_cue() -> None:
    async def main() -> None:
        a = MemoryRemote(LAYERS, HIDDEN, OUT, replies=REPLIES)
        b = a.peer()
        a.fail_next(2, ops={"claim", "write"})
        for _ in range(2):
            with pytest.raises(StoreDown) as info:
                await a.claim(["k"])
            assert not info.value.refused
        await a.check()
        cl = await create(a, "k", state(1))  # the faults are used up
        b.fail_next(refused=True)
        with pytest.raises(StoreDown) as info:
            await b.check()
        assert info.value.refused
        assert await b.peek("k") == 1
        # A write that fails before it lands changes nothing ...
        a.fail_next(ops={"write"})
        with pytest.raises(StoreDown):
            await a.write([Write("k", cl.epoch, 1, state(2))])
        assert await b.peek("k") == 1
        # ... and one whose answer is lost has landed.
        a.fail_next(applied=True)
        with pytest.raises(StoreDown):
            await a.write([Write("k", cl.epoch, 1, state(2))])
        assert await b.peek("k") == 2
        rec = a.record("k")
        assert rec is not None and rec.version == 2 and rec.epoch == cl.epoch
        assert a.calls["write"] == 3 and a.calls["claim"] == 3 and b.calls["check"] == 1
        with pytest.raises(ValueError, match="unknown store operations"):
            a.fail_next(ops={"evalsha"})

    asyncio.run(main())


def test_memory_remote_can_hold_writes_and_take_sessions_as_another_replica() -> None:
    async def main() -> None:
        records: dict[str, Any] = {}
        a = MemoryRemote(LAYERS, HIDDEN, OUT, records=records, namespace="m")
        other = MemoryRemote(LAYERS, HIDDEN, OUT, records=records, namespace="n")
        cl = await create(a, "k", state(1))
        assert a.sessions() == ["k"] and other.sessions() == []  # namespaces share the dict only
        gate = a.hold()
        w = asyncio.ensure_future(a.write([Write("k", cl.epoch, 1, state(2))]))
        await asyncio.sleep(0.01)
        assert not w.done() and await a.peek("k") == 1
        gate.set()
        assert await w == [True]
        taken = a.take("k")  # another replica claims it
        assert taken.version == 2 and taken.state is not None and taken.state.next_seq == 2
        assert await a.write([Write("k", cl.epoch, 2, state(3))]) == [False]

    asyncio.run(main())


# -- versions of one model -----------------------------------------------------------------------


def test_a_claim_on_another_version_says_where_the_session_is_and_takes_nothing(
    backend: Opener,
) -> None:
    async def body(v1: Remote, v2: Remote) -> None:
        cl = await create(v1, "s", state(3, 1.0))
        (other,) = await v2.claim(["s"])
        assert other.state is None and other.version == 0 and other.elsewhere == "1"
        (none,) = await v2.claim(["nobody"])
        assert none.elsewhere == ""
        # v1's owner was not disturbed: its next write, under its claim, lands
        assert await v1.write([Write("s", cl.epoch, 1, state(4, 2.0))]) == [True]
        (own,) = await v1.claim(["s"])
        assert own.elsewhere == "" and own.version == 2
        same_state(own.state, state(4, 2.0))
        # a reset onto version 2 creates it there; from then on the id is version 2's: v1's
        # owner is fenced, and v1's claim says where the id lives and drops v1's old record
        assert await v2.write([Write("s", other.epoch, 0, state(1, 5.0))]) == [True]
        assert await v1.write([Write("s", own.epoch, 2, state(5, 3.0))]) == [False]
        (back,) = await v1.claim(["s"])
        assert back.state is None and back.elsewhere == "2"
        (again,) = await v1.claim(["s"])
        assert again.state is None and again.elsewhere == "2"
        (on2,) = await v2.claim(["s"])
        same_state(on2.state, state(1, 5.0))
        # the holder's delete clears the mark: the id is free for any version
        assert await v2.write([Write("s", on2.epoch, 1, None)]) == [True]
        (free,) = await v1.claim(["s"])
        assert free.state is None and free.elsewhere == ""

    run(backend, body, versions=True)
