"""StateSync (core/sync.py) without gRPC or Redis: replicas are real engines (ONNX Runtime on the
tiny model, one scheduler per model version) sharing one MemoryRemote record dict, each with
a StateSync attached as Engine._share attaches it to a RedisRemote. Requests go through the
Engine's own calls (submit_step, end_session, get_session), so answers are gated (acked mode)
exactly as the servicer's are. Outputs and stored states are compared with one pass of the
NumPy oracle (tests/oracle/reference.py).

What is shown: a session continues across replicas like one pass; a replica whose copy is
stale is fenced, its client told UNAVAILABLE, and the retry applies once; acked answers wait
for their write and early ones do not, while an early answer that was not stored refuses the
session's next request; a failed write or claim gives UNAVAILABLE and loses nothing; retries
are answered from the stored replies on another replica; an ended session is deleted; a reset
clears the stored replies and an evicted session's unwritten state is still written."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lstm_serve.core import frame as F
from lstm_serve.core import runtime as R
from lstm_serve.core.engine import Engine, LoadedModel
from lstm_serve.core.errors import FailedPrecondition, ServiceError, Unavailable
from lstm_serve.core.jobs import SessionStatus, StepResult
from lstm_serve.core.memory_remote import MemoryRemote, Record
from lstm_serve.core.probes import no_probes
from lstm_serve.core.repository import load_repository
from lstm_serve.core.store import CapPolicy
from lstm_serve.core.sync import AnswerMode, StateSync
from tests.helpers.device import device_arrays
from tests.helpers.engine import Settings
from tests.oracle.one_pass import OnePass

ATOL = 1e-5
# docs/operations.md, "Redis outage": a failed load, and a failed (or fenced) acked write
STORE_DOWN = "session store unavailable; retry"
NOT_STORED = (
    "the step was not stored (the session moved to another replica, or the session store "
    "failed); retry: it is applied once"
)


class Replica:
    """One replica: an engine whose models write through to `remote` (a MemoryRemote)."""

    def __init__(self, engine: Engine, remote: MemoryRemote) -> None:
        self.engine = engine
        self.remote = remote  # the tiny model's connection (to fail or hold its calls)

    @property
    def lm(self) -> LoadedModel:
        return self.engine.models["tiny", "1"]

    @property
    def sync(self) -> StateSync:
        sync = self.lm.sync
        assert sync is not None
        return sync

    @property
    def inference_calls(self) -> int:
        return sum(self.lm.scheduler.runtime.calls.values())  # type: ignore[attr-defined]

    def submit(
        self, sid: str, x: np.ndarray, seq: int | None = None, reset: bool = False
    ) -> asyncio.Future[StepResult]:
        return self.engine.submit_step("tiny", "", F.single(sid, x, seq, reset))

    async def step(
        self, sid: str, x: np.ndarray, seq: int | None = None, reset: bool = False
    ) -> StepResult:
        return await self.submit(sid, x, seq, reset)

    async def reset(self, sid: str) -> SessionStatus:
        return (await self.engine.reset_session("tiny", "", sid))[1]

    async def end(self, sid: str) -> SessionStatus:
        return (await self.engine.end_session("tiny", "", sid))[1]

    async def get(self, sid: str) -> SessionStatus:
        return (await self.engine.get_session("tiny", "", sid))[1]

    async def settle(self, timeout: float = 10.0) -> None:
        """Until no write is pending or under way, and what a failed one dropped is dropped."""
        sync = self.sync
        deadline = time.monotonic() + timeout
        while sync.pending or not sync.idle:
            assert time.monotonic() < deadline, "writes still pending"
            await asyncio.sleep(0.005)
        for _ in range(3):  # the drops of a failed write apply at the next tick
            await asyncio.sleep(0)


async def start_replica(
    repo: Path, records: dict[str, Record], answer: AnswerMode, replies: int, **settings: Any
) -> Replica:
    s = Settings(state_answer=answer, state_replies=replies, **settings)
    engine = Engine(s, load_repository(repo), lambda label: no_probes())
    await engine.start()
    tiny: MemoryRemote | None = None
    for lm in engine.models.values():  # as Engine._share, with a MemoryRemote
        m = lm.mv.manifest
        remote = MemoryRemote(
            m.layers, m.hidden_size, m.output_dim, s.session_ttl_s, s.state_replies,
            namespace=f"{lm.label}:{m.sha256[:12]}", records=records,
        )  # fmt: skip
        StateSync(
            lm.scheduler, remote, no_probes(), answer is AnswerMode.acked, s.state_replies,
            None, s.session_ttl_s,
        )  # fmt: skip
        if m.name == "tiny":
            tiny = remote
    assert tiny is not None
    return Replica(engine, tiny)


async def stop_replica(r: Replica) -> None:
    if r.remote.gate is not None:  # a test that failed while it held writes
        r.remote.gate.set()
    assert await r.engine.drain(10)
    await r.engine.close()


@asynccontextmanager
async def replicas(
    repo: Path,
    n: int = 2,
    answer: AnswerMode = AnswerMode.acked,
    replies: int = 8,
    **settings: Any,
) -> AsyncIterator[list[Replica]]:
    """n replicas sharing one store; settings: Settings fields to change (all replicas)."""
    records: dict[str, Record] = {}
    rs = [await start_replica(repo, records, answer, replies, **settings) for _ in range(n)]
    try:
        yield rs
    finally:
        for r in rs:
            await stop_replica(r)


def run(body: Callable[[], Any]) -> None:
    asyncio.run(body())


def xs(seed: int, n: int) -> np.ndarray:
    """n random steps for the tiny real model (3 features)."""
    return np.random.default_rng(seed).normal(size=(n, 3)).astype(np.float32)


def y_of(r: StepResult) -> np.ndarray:
    return np.asarray(r.y[0])


def stored_is(remote: MemoryRemote, sid: str, oracle: OnePass, *parts: np.ndarray) -> Record:
    """The store holds sid as one pass over parts: next_seq, h and c."""
    rec = remote.record(sid)
    assert rec is not None, f"{sid!r} is not stored"
    _, hn, cn = oracle.run(np.concatenate(parts))
    assert rec.next_seq == sum(len(p) for p in parts)
    np.testing.assert_allclose(rec.h, hn, atol=ATOL)
    np.testing.assert_allclose(rec.c, cn, atol=ATOL)
    return rec


async def until(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    """Let the loop run until cond() holds."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.002)


async def refused(fut: Any, kind: type[ServiceError]) -> ServiceError:
    with pytest.raises(kind) as info:
        await fut
    return info.value


# -- continuation --------------------------------------------------------------------------------


def test_a_session_stepped_on_alternating_replicas_equals_one_pass(
    tiny_repo: Path, oracle: OnePass
) -> None:
    async def body() -> None:
        async with replicas(tiny_repo) as (a, b):
            x = xs(1, 40)
            ys = []
            for i, r in enumerate([a, b, a, a, b, b, a, b, a, b]):
                res = await r.step("walk", x[4 * i : 4 * i + 4], seq=4 * i)
                assert res.next_seq.tolist() == [4 * i + 4] and not res.replayed.any()
                ys.append(y_of(res))
            y, _, _ = oracle.run(x)
            np.testing.assert_allclose(np.concatenate(ys), y, atol=ATOL)
            rec = stored_is(a.remote, "walk", oracle, x)
            assert rec.version == 10  # one write per answered request (acked)
            # Both replicas read the session where it stands.
            assert (await a.get("walk")).next_seq == 40 and (await b.get("walk")).next_seq == 40

    run(body)


# -- fencing -------------------------------------------------------------------------------------


def test_a_stale_replica_is_fenced_its_client_told_and_the_retry_applies_once(
    tiny_repo: Path, oracle: OnePass
) -> None:
    """A holds the session at seq 4 when B takes it over and steps it to 8. A step without a
    seq reaches A, which applies it to its stale copy: the write is fenced, nothing of it is
    stored, and the client gets UNAVAILABLE (docs/operations.md, "Fencing"). The client's
    retry makes A load the session again and apply the step once, after B's."""

    async def body() -> None:
        async with replicas(tiny_repo) as (a, b):
            x0, x1, xa, xb = xs(2, 4), xs(3, 4), xs(4, 2), xs(5, 3)
            await a.step("s", x0, seq=0)
            await b.step("s", x1, seq=4)  # B claims: A's epoch is stale
            err = await refused(a.submit("s", xa), Unavailable)
            assert err.code == "UNAVAILABLE"
            assert "not stored" in err.message and "retry" in err.message
            stored_is(a.remote, "s", oracle, x0, x1)  # the fenced step changed nothing
            res = await a.step("s", xa)  # the retry
            assert res.seq.tolist() == [8] and res.next_seq.tolist() == [10]
            np.testing.assert_allclose(
                y_of(res), oracle.run(np.concatenate([x0, x1, xa]))[0][8:], atol=ATOL
            )
            stored_is(a.remote, "s", oracle, x0, x1, xa)
            # Now B's copy is the stale one: fenced in turn.
            await refused(b.submit("s", xb), Unavailable)
            res = await b.step("s", xb)
            assert res.seq.tolist() == [10]
            stored_is(b.remote, "s", oracle, x0, x1, xa, xb)

    run(body)


def test_a_replica_whose_copy_is_behind_reloads_for_a_seq_it_has_not_reached(
    tiny_repo: Path, oracle: OnePass
) -> None:
    """A request whose seq is past the copy claimed before it came is not refused as a gap:
    the copy is dropped and the session loaded again (docs/operations.md, "Fencing")."""

    async def body() -> None:
        async with replicas(tiny_repo) as (a, b):
            x = xs(6, 12)
            await a.step("g", x[:4], seq=0)
            await b.step("g", x[4:8], seq=4)
            res = await a.step("g", x[8:], seq=8)
            np.testing.assert_allclose(y_of(res), oracle.run(x)[0][8:], atol=ATOL)
            stored_is(a.remote, "g", oracle, x)

    run(body)


# -- answer modes --------------------------------------------------------------------------------


def test_acked_answers_wait_for_the_write_that_carries_them(
    tiny_repo: Path, oracle: OnePass
) -> None:
    async def body() -> None:
        async with replicas(tiny_repo, n=1) as (a,):
            x = xs(7, 5)
            gate = a.remote.hold()
            fut = a.submit("w", x, seq=0)
            await until(lambda: a.remote.calls["write"] == 1)  # applied, its write sent
            await asyncio.sleep(0.05)
            assert not fut.done()  # applied here, not yet stored: not answered
            assert a.remote.record("w") is None
            gate.set()
            res = await fut
            stored_is(a.remote, "w", oracle, x)  # answered: stored
            np.testing.assert_allclose(y_of(res), oracle.run(x)[0], atol=ATOL)

    run(body)


def test_early_answers_go_out_before_the_write_and_the_store_catches_up(
    tiny_repo: Path, oracle: OnePass
) -> None:
    async def body() -> None:
        async with replicas(tiny_repo, n=1, answer=AnswerMode.early) as (a,):
            x = xs(8, 6)
            gate = a.remote.hold()
            r1 = await asyncio.wait_for(a.step("e", x[:3], seq=0), 10)
            r2 = await asyncio.wait_for(a.step("e", x[3:], seq=3), 10)  # the write is held
            assert a.remote.record("e") is None
            np.testing.assert_allclose(
                np.concatenate([y_of(r1), y_of(r2)]), oracle.run(x)[0], atol=ATOL
            )
            gate.set()
            await a.settle()
            stored_is(a.remote, "e", oracle, x)

    run(body)


def test_an_early_answer_that_was_fenced_refuses_the_next_request(
    tiny_repo: Path, oracle: OnePass
) -> None:
    """Early mode: A answers a step on its stale copy, then its write is fenced. A's client
    must not continue on a history without that step: its next request is refused
    FAILED_PRECONDITION naming the lost seqs (and so is every request already queued behind
    it); after re-reading the session (GetSession) it resends and goes on."""

    async def body() -> None:
        async with replicas(tiny_repo, answer=AnswerMode.early) as (a, b):
            x0, x1, xa, xc = xs(9, 4), xs(10, 4), xs(11, 2), xs(12, 2)
            await a.step("m", x0, seq=0)
            await a.settle()
            await b.step("m", x1, seq=4)  # B takes it over
            await b.settle()
            res = await a.step("m", xa)  # answered at once on A's stale copy
            assert res.next_seq.tolist() == [6]
            await a.settle()  # its write was fenced
            queued = [a.submit("m", xc, seq=6), a.submit("m", xc, seq=8)]
            for fut in queued:
                err = await refused(fut, FailedPrecondition)
                assert err.code == "FAILED_PRECONDITION"
                assert "'m'" in err.message and "seq 4 to 5 were answered here" in err.message
                assert "not stored" in err.message and "GetSession" in err.message
            stored_is(a.remote, "m", oracle, x0, x1)  # neither xa nor the refused ones
            assert (await a.get("m")).next_seq == 8  # the client re-reads the session
            res = await a.step("m", xc, seq=8)
            np.testing.assert_allclose(
                y_of(res), oracle.run(np.concatenate([x0, x1, xc]))[0][8:], atol=ATOL
            )
            await a.settle()
            stored_is(a.remote, "m", oracle, x0, x1, xc)

    run(body)


def test_an_early_answer_whose_write_failed_refuses_the_next_request(
    tiny_repo: Path, oracle: OnePass
) -> None:
    async def body() -> None:
        async with replicas(tiny_repo, n=1, answer=AnswerMode.early) as (a,):
            x = xs(13, 12)
            await a.step("o", x[:4], seq=0)
            await a.settle()
            a.remote.fail_next(ops={"write"})
            assert (await a.step("o", x[4:8], seq=4)).next_seq.tolist() == [8]  # answered
            await a.settle()
            err = await refused(a.submit("o", x[8:], seq=8), FailedPrecondition)
            assert "seq 4 to 7 were answered here but not stored" in err.message
            assert "injected" not in err.message  # the store's error is for the log only
            assert (await a.get("o")).next_seq == 4
            await a.step("o", x[4:8], seq=4)
            await a.step("o", x[8:], seq=8)
            await a.settle()
            stored_is(a.remote, "o", oracle, x)

    run(body)


def test_an_early_reset_needs_no_warning(tiny_repo: Path, oracle: OnePass) -> None:
    async def body() -> None:
        async with replicas(tiny_repo, n=1, answer=AnswerMode.early) as (a,):
            x0, x1, x2 = xs(14, 3), xs(15, 3), xs(16, 3)
            await a.step("r", x0, seq=0)
            await a.settle()
            a.remote.fail_next(ops={"write"})
            await a.step("r", x1, seq=3)
            await a.settle()
            res = await a.step("r", x2, reset=True)  # no history of it continues
            np.testing.assert_allclose(y_of(res), oracle.run(x2)[0], atol=ATOL)
            await a.settle()
            stored_is(a.remote, "r", oracle, x2)

    run(body)


# -- store failures ------------------------------------------------------------------------------


def test_a_failed_write_is_unavailable_and_loses_nothing(tiny_repo: Path, oracle: OnePass) -> None:
    """acked mode: the step whose write failed is answered UNAVAILABLE and is applied nowhere:
    the store keeps the last acknowledged state, the replica drops its copy, and the client's
    retry (on another replica or the same one) applies the step once."""

    async def body() -> None:
        async with replicas(tiny_repo) as (a, b):
            x = xs(17, 16)
            await a.step("f", x[:4], seq=0)
            a.remote.fail_next(ops={"write"})
            err = await refused(a.submit("f", x[4:8], seq=4), Unavailable)
            assert err.code == "UNAVAILABLE" and "retry" in err.message
            assert "injected" not in err.message  # the store's error is for the log only
            stored_is(a.remote, "f", oracle, x[:4])
            assert (await b.get("f")).next_seq == 4
            res = await b.step("f", x[4:8], seq=4)  # the retry, on B: applied, not replayed
            assert not res.replayed.any()
            np.testing.assert_allclose(y_of(res), oracle.run(x)[0][4:8], atol=ATOL)
            b.remote.fail_next(ops={"write"})
            await refused(b.submit("f", x[8:12], seq=8), Unavailable)
            stored_is(b.remote, "f", oracle, x[:8])
            res = await b.step("f", x[8:12], seq=8)  # the retry, on the same replica
            np.testing.assert_allclose(y_of(res), oracle.run(x)[0][8:12], atol=ATOL)
            res = await a.step("f", x[12:], seq=12)  # A kept no copy from before its failure
            np.testing.assert_allclose(y_of(res), oracle.run(x)[0][12:], atol=ATOL)
            stored_is(a.remote, "f", oracle, x)

    run(body)


def test_a_failed_write_gives_the_documented_store_message(tiny_repo: Path) -> None:
    async def body() -> None:
        async with replicas(tiny_repo, n=1) as (a,):
            await a.step("d", xs(18, 2), seq=0)
            a.remote.fail_next(ops={"write"})
            err = await refused(a.submit("d", xs(19, 2), seq=2), Unavailable)
            assert err.message == NOT_STORED

    run(body)


def test_a_write_that_landed_but_whose_answer_was_lost_is_applied_once(
    tiny_repo: Path, oracle: OnePass
) -> None:
    """The store applied the write, but the replica never heard (a timeout on the reply): the
    client is told UNAVAILABLE, and its retry is answered from the stored reply, on this
    replica or another, not applied a second time."""

    async def body() -> None:
        async with replicas(tiny_repo) as (a, b):
            x = xs(20, 8)
            await a.step("l", x[:4], seq=0)
            a.remote.fail_next(applied=True, ops={"write"})
            await refused(a.submit("l", x[4:], seq=4), Unavailable)
            stored_is(a.remote, "l", oracle, x)  # it landed
            calls = b.inference_calls
            res = await b.step("l", x[4:], seq=4)
            assert res.replayed.tolist() == [True] and b.inference_calls == calls
            np.testing.assert_allclose(y_of(res), oracle.run(x)[0][4:], atol=ATOL)
            res = await a.step("l", x[4:], seq=4)  # and on A, which dropped its copy
            assert res.replayed.tolist() == [True]
            stored_is(a.remote, "l", oracle, x)

    run(body)


def test_a_failed_claim_gives_the_fixed_message_and_changes_nothing(
    tiny_repo: Path, oracle: OnePass
) -> None:
    async def body() -> None:
        async with replicas(tiny_repo) as (a, b):
            x = xs(21, 6)
            await a.step("c", x[:3], seq=0)
            b.remote.fail_next(ops={"claim"})
            err = await refused(b.submit("c", x[3:], seq=3), Unavailable)
            assert err.message == STORE_DOWN
            b.remote.fail_next(ops={"peek"})
            assert (await refused(b.get("c"), Unavailable)).message == STORE_DOWN
            stored_is(a.remote, "c", oracle, x[:3])
            res = await b.step("c", x[3:], seq=3)
            np.testing.assert_allclose(y_of(res), oracle.run(x)[0][3:], atol=ATOL)
            stored_is(b.remote, "c", oracle, x)

    run(body)


def test_a_store_that_refuses_the_replica_marks_it_until_it_accepts_again(
    tiny_repo: Path,
) -> None:
    async def body() -> None:
        async with replicas(tiny_repo, n=1) as (a,):
            health = a.sync.health
            health.PROBE_S = 0.01
            changes: list[str | None] = []
            health.on_change = changes.append
            a.remote.fail_next(2, refused=True, ops={"claim", "check"})
            err = await refused(a.submit("z", xs(22, 2)), Unavailable)
            assert err.message == STORE_DOWN
            assert health.refused is not None and "refused" in health.refused
            await until(lambda: health.refused is None)  # the probe retries until accepted
            assert len(changes) == 2 and changes[-1] is None
            await a.step("z", xs(22, 2))

    run(body)


# -- replies -------------------------------------------------------------------------------------


def test_retries_are_answered_from_the_stored_replies_on_another_replica(
    tiny_repo: Path, oracle: OnePass
) -> None:
    async def body() -> None:
        async with replicas(tiny_repo, replies=2) as (a, b):
            x = xs(23, 16)
            first = [await a.step("p", x[i : i + 4], seq=i) for i in (0, 4, 8)]
            calls = b.inference_calls
            for i, want in ((8, first[2]), (4, first[1])):  # a pipelined stream's retries
                res = await b.step("p", x[i : i + 4], seq=i)
                assert res.replayed.tolist() == [True]
                assert res.seq.tolist() == [i] and res.next_seq.tolist() == [i + 4]
                np.testing.assert_array_equal(y_of(res), y_of(want))
            assert b.inference_calls == calls  # answered again, not applied again
            # Other inputs under an applied seq are refused, not applied.
            err = await refused(b.submit("p", x[8:12] + 1, seq=8), FailedPrecondition)
            assert "different inputs" in err.message
            # Two replies are kept: seq 0's is gone (the store trimmed it).
            err = await refused(b.submit("p", x[0:4], seq=0), FailedPrecondition)
            assert "can no longer be replayed" in err.message and "expected seq 12" in err.message
            stored_is(b.remote, "p", oracle, x[:12])
            res = await b.step("p", x[12:], seq=12)
            np.testing.assert_allclose(y_of(res), oracle.run(x)[0][12:], atol=ATOL)
            stored_is(b.remote, "p", oracle, x)

    run(body)


# -- ending --------------------------------------------------------------------------------------


def test_an_ended_session_is_deleted_from_the_store(tiny_repo: Path, oracle: OnePass) -> None:
    async def body() -> None:
        async with replicas(tiny_repo) as (a, b):
            x = xs(24, 4)
            await a.step("end", x, seq=0)
            assert a.remote.record("end") is not None
            status = await b.end("end")  # B loads it to end it
            assert status.exists is False and status.next_seq == 4
            assert a.remote.record("end") is None and "end" not in a.remote.sessions()
            assert not (await a.get("end")).exists
            # A's copy is of the ended session: it never writes it back.
            await refused(a.submit("end", x), Unavailable)
            assert a.remote.record("end") is None
            # The id starts afresh.
            res = await a.step("end", x, seq=0)
            np.testing.assert_allclose(y_of(res), oracle.run(x)[0], atol=ATOL)
            stored_is(a.remote, "end", oracle, x)

    run(body)


def test_a_session_created_and_ended_in_one_request_writes_nothing(tiny_repo: Path) -> None:
    async def body() -> None:
        async with replicas(tiny_repo, n=1) as (a,):
            writes = a.remote.calls["write"]
            fr = F.single("once", xs(25, 3))
            fr.end = np.ones(1, bool)
            res = await a.engine.submit_step("tiny", "", fr)
            assert res.next_seq.tolist() == [3]
            await a.settle()
            assert a.remote.calls["write"] == writes and a.remote.record("once") is None
            assert a.lm.store.slot("once") is None

    run(body)


# -- resets and evictions ------------------------------------------------------------------------


def test_a_reset_clears_the_stored_replies(tiny_repo: Path, oracle: OnePass) -> None:
    """After ResetSession the store holds a zero state at seq 0 and none of the earlier
    answers: another replica never answers a seq of the new history from the old one."""

    async def body() -> None:
        async with replicas(tiny_repo) as (a, b):
            x0, x1 = xs(26, 8), xs(27, 4)
            await a.step("z", x0[:4], seq=0)
            await a.step("z", x0[4:], seq=4)
            status = await a.reset("z")
            assert status.next_seq == 0
            rec = a.remote.record("z")
            assert rec is not None and rec.next_seq == 0 and rec.replies == []
            assert not rec.h.any() and not rec.c.any()
            # A retry of the old history's last request is not answered again.
            err = await refused(b.submit("z", x0[4:], seq=4), FailedPrecondition)
            assert "expected seq 0" in err.message
            res = await b.step("z", x1, seq=0)
            assert not res.replayed.any()
            np.testing.assert_allclose(y_of(res), oracle.run(x1)[0], atol=ATOL)
            # A's copy (at seq 0 too, but of an older claim) is fenced; the retry is answered
            # from B's stored reply.
            await refused(a.submit("z", x1, seq=0), Unavailable)
            again = await a.step("z", x1, seq=0)
            assert again.replayed.tolist() == [True]
            np.testing.assert_array_equal(y_of(again), y_of(res))
            stored_is(a.remote, "z", oracle, x1)

    run(body)


def test_a_session_evicted_before_its_write_is_still_written(
    tiny_repo: Path, oracle: OnePass
) -> None:
    """LRU eviction takes a session whose new state waits for the write in flight: the state
    is kept and written all the same, and the session continues from it on another replica."""

    async def body() -> None:
        async with replicas(
            tiny_repo, answer=AnswerMode.early, max_sessions=2, cap_policy=CapPolicy.evict_lru
        ) as (a, b):
            x, xt = xs(28, 9), xs(29, 2)
            await a.step("v", x[:3], seq=0)
            await a.step("t", xt[:1], seq=0)
            await a.settle()
            gate = a.remote.hold()
            await a.step("t", xt[1:], seq=1)  # its write goes out, and is held
            await a.step("v", x[3:6], seq=3)  # v's write waits behind it
            await a.step("t", xt, seq=2)  # t is the most recently used
            await a.step("u", xt, seq=0)  # at the cap: evicts v, the least recently used
            assert a.lm.store.slot("v") is None
            gate.set()
            await a.settle()
            stored_is(a.remote, "v", oracle, x[:6])
            res = await b.step("v", x[6:], seq=6)
            np.testing.assert_allclose(y_of(res), oracle.run(x)[0][6:], atol=ATOL)

    run(body)


def test_a_reset_session_evicted_before_its_write_is_still_reset_in_the_store(
    tiny_repo: Path,
) -> None:
    """acked mode: ResetSession is answered OK only once the store holds the reset; here the
    session is evicted (LRU, at the cap) while the reset's write waits behind another."""

    async def body() -> None:
        async with replicas(tiny_repo, max_sessions=2, cap_policy=CapPolicy.evict_lru) as (a, b):
            x = xs(30, 4)
            await a.step("s", x, seq=0)
            await a.step("t", x, seq=0)
            gate = a.remote.hold()
            t = a.submit("t", x, seq=4)  # its write goes out, and is held
            await until(lambda: a.remote.calls["write"] == 3)
            slot = a.lm.store.slot("s")
            reset = asyncio.ensure_future(a.reset("s"))  # s is dirty, its write waits
            await until(lambda: int(a.lm.store.next_seq[slot]) == 0)
            u = a.submit("u", x, seq=0)  # at the cap: evicts s, the least recently used
            await until(lambda: a.lm.store.slot("s") is None)
            assert not reset.done()  # acked: waiting for its write
            gate.set()
            await t
            await u
            status = await reset  # answered OK: the reset is acknowledged ...
            assert status.next_seq == 0
            rec = a.remote.record("s")
            assert rec is not None and rec.next_seq == 0  # ... so the store must hold it
            assert (await b.get("s")).next_seq == 0

    run(body)


def test_an_early_end_then_a_new_session_of_that_id_follows_the_delete(
    tiny_repo: Path, oracle: OnePass
) -> None:
    """Early mode: a session ended and started again before the delete went out: the new
    session's first write follows the delete (it is not fenced, and not deleted)."""

    async def body() -> None:
        async with replicas(tiny_repo, n=1, answer=AnswerMode.early) as (a,):
            x0, x1 = xs(31, 4), xs(32, 3)
            await a.step("again", x0, seq=0)
            await a.settle()
            gate = a.remote.hold()
            await a.step("again", x0, seq=4)  # a write in flight, held
            await a.end("again")  # answered at once; the delete waits
            fut = a.submit("again", x1, seq=0)  # a new session of that id
            await asyncio.sleep(0.05)
            gate.set()
            res = await fut
            np.testing.assert_allclose(y_of(res), oracle.run(x1)[0], atol=ATOL)
            await a.settle()
            rec = stored_is(a.remote, "again", oracle, x1)
            assert [r.seq for r in rec.replies] == [0]

    run(body)


def test_a_frame_retried_after_a_partial_fence_is_answered_whole(
    tiny_repo: Path, oracle: OnePass
) -> None:
    """acked mode: one request (a frame) on two sessions, one of which B has taken over: the
    write of the other lands, the fenced one's does not, so the request is UNAVAILABLE. Its
    retry is answered whole: the landed session from its stored reply, the other applied."""

    async def body() -> None:
        async with replicas(tiny_repo) as (a, b):
            xp, xq = xs(33, 6), xs(34, 6)

            def frame(lo: int, hi: int) -> F.Frame:
                rows = [xp[lo:hi], xq[lo:hi]]
                return F.from_rows(["p", "q"], rows, np.array([lo, lo]), np.zeros(2, bool))

            await a.engine.submit_step("tiny", "", frame(0, 3))
            again = await b.step("q", xq[:3], seq=0)  # a retry reaches B: B claims q
            assert again.replayed.tolist() == [True]
            await refused(a.engine.submit_step("tiny", "", frame(3, 6)), Unavailable)
            stored_is(a.remote, "p", oracle, xp)  # p's write landed
            stored_is(a.remote, "q", oracle, xq[:3])  # q's did not
            res = await a.engine.submit_step("tiny", "", frame(3, 6))
            assert res.replayed.tolist() == [True, False]
            y = np.asarray(res.y)
            np.testing.assert_allclose(y[0], oracle.run(xp)[0][3:], atol=ATOL)
            np.testing.assert_allclose(y[1], oracle.run(xq)[0][3:], atol=ATOL)
            stored_is(a.remote, "p", oracle, xp)
            stored_is(a.remote, "q", oracle, xq)

    run(body)


# -- lifecycle -----------------------------------------------------------------------------------


def test_closing_the_engine_closes_every_models_scheduler(tiny_repo: Path) -> None:
    async def body() -> None:
        engine = Engine(Settings(), load_repository(tiny_repo), lambda label: no_probes())
        await engine.start()
        assert await engine.drain(10)
        await engine.close()
        open_ = []
        for key, lm in engine.models.items():
            try:  # a closed scheduler refuses new work
                lm.scheduler.submit_step(F.single("late", xs(0, 1)), ["late"], None).cancel()
                open_.append(key)
            except Unavailable:
                pass
        assert open_ == []

    run(body)


def test_device_state_is_written_in_one_read_and_continues_on_another_replica(
    tiny_repo: Path, oracle: OnePass, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With h and c on a device (tests/helpers/device.py), a write of a frame's sessions reads
    them in one copy of h and one of c; another replica loads them in one copy each and
    continues them as one pass."""
    arrays = device_arrays()
    monkeypatch.setattr(R, "HOST", arrays)
    ids = [f"w{i}" for i in range(16)]
    first = np.stack([xs(i, 2) for i in range(16)])
    then = np.stack([xs(100 + i, 1) for i in range(16)])

    async def body() -> None:
        async with replicas(tiny_repo, 2) as (a, b):
            assert a.lm.store.arrays is arrays
            frame = F.from_rows(ids, list(first), np.full(16, F.APPEND), np.zeros(16, bool))
            before = dict(arrays.moved)
            await a.engine.submit_step("tiny", "", frame)  # acked: answered once written
            assert arrays.moved["calls"] - before["calls"] == 2, arrays.moved
            assert arrays.moved["out"] - before["out"] == 2 * 16 * 2 * 16 * 4
            for i, sid in enumerate(ids):
                stored_is(a.remote, sid, oracle, first[i])
            before = dict(arrays.moved)
            frame = F.from_rows(ids, list(then), np.full(16, F.APPEND), np.zeros(16, bool))
            res = await b.engine.submit_step("tiny", "", frame)
            assert arrays.moved["in"] - before["in"] == 2 * 16 * 2 * 16 * 4  # loaded at once
            for i, sid in enumerate(ids):
                y1, _, _ = oracle.run(np.concatenate([first[i], then[i]]))
                np.testing.assert_allclose(np.asarray(res.y[i]), y1[-1:], atol=ATOL)
                stored_is(b.remote, sid, oracle, first[i], then[i])

    run(body)
