"""Concurrency (invariant 5, docs/architecture.md): no output ever mixes two sessions' state.

Many threads step (alone and in frames), reset, end, read and forecast the same few sessions
while the reaper expires them (tiny TTL) and the session cap evicts them (evict_lru), so arena
slots are reused all the time. Mixing is detectable by construction: the input of session s at
seq k is always X[s][k], a fixed function of (s, k), and every session restarts from seq 0 after
a reset, end, expiry or eviction. So whatever the interleaving, a correct server answers a step
of s at seq k with OnePass(X[s])[k], and keeps the one-pass (h, c) of X[s][:next_seq]. Any
leak of another session's state, or of a stale one, breaks that equality.
"""

from __future__ import annotations

import re
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from lstm_serve.client import Client, session_steps, step_request
from lstm_serve.server.pb import lstm_serve_pb2 as pb
from tests.helpers.server import ServerThread, serve
from tests.oracle.one_pass import OnePass

ATOL = 1e-5
SIDS = [f"c{i}" for i in range(10)]
LENGTH = 48  # longest history before a thread resets the session
THREADS, SECONDS = 6, 6.0
C = grpc.StatusCode
SESSION_IN = re.compile(r"session '([^']+)'")
EXPECTED = re.compile(r"expected seq (\d+)")


@pytest.fixture(scope="module")
def server(tiny_repo: Path) -> Iterator[ServerThread]:
    yield from serve(
        tiny_repo,
        metrics_port=-1,
        session_ttl_s=0.08,
        reap_interval_s=0.01,
        max_sessions=6,
        cap_policy="evict_lru",
        max_batch_size=8,
    )


def test_no_output_ever_mixes_sessions(server: ServerThread, tiny_repo: Path) -> None:
    oracle = OnePass(tiny_repo / "tiny" / "1")
    # Inputs of session i at seq k: X[i][k]; offsets keep the sessions far apart.
    X = {
        sid: (np.random.default_rng(100 + i).normal(size=(LENGTH, 3)) + 2 * i - 9).astype(
            np.float32
        )
        for i, sid in enumerate(SIDS)
    }
    Y = {sid: oracle.run(x)[0] for sid, x in X.items()}
    stats: Counter[str] = Counter()
    errors: list[BaseException] = []
    deadline = time.monotonic() + SECONDS
    # On a busy machine the volume the checks below need may take longer: run on until it is
    # reached, up to a hard limit.
    hard_deadline = deadline + 4 * SECONDS

    def running() -> bool:
        now = time.monotonic()
        enough = stats["outputs checked"] > 600 and stats["forecasts checked"] > 30
        return now < deadline or (not enough and now < hard_deadline)

    def check(sid: str, seq: int, y: np.ndarray) -> None:
        np.testing.assert_allclose(y, Y[sid][seq : seq + len(y)], atol=ATOL, err_msg=f"{sid}@{seq}")
        stats["outputs checked"] += 1

    def worker(t: int) -> None:
        rng = np.random.default_rng(t)
        guess = dict.fromkeys(SIDS, 0)  # this thread's idea of each session's next seq

        def learn(err: grpc.RpcError) -> None:
            """A refusal says where a session stands (or that it is gone)."""
            details = err.details() or ""
            m = SESSION_IN.search(details)
            if err.code() is C.FAILED_PRECONDITION and m:
                e = EXPECTED.search(details)
                assert e is not None, details
                guess[m.group(1)] = int(e.group(1))
            elif err.code() is C.NOT_FOUND and m:
                guess[m.group(1)] = 0
            elif err.code() not in (C.RESOURCE_EXHAUSTED, C.INVALID_ARGUMENT):
                raise err
            stats[err.code().name] += 1

        try:
            with Client(server.target, timeout=10) as c:
                while running():
                    k = int(rng.integers(1, 4)) if rng.random() < 0.25 else 1
                    sids = rng.choice(SIDS[: 4 + t % 6], k, replace=False).tolist()
                    op = rng.random()
                    try:
                        if op < 0.62:  # steps (alone or a frame), from where we think it is
                            parts, starts = [], []
                            for sid in sids:
                                n = int(rng.integers(1, 5))
                                seq, reset = guess[sid], False
                                if seq + n > LENGTH or rng.random() < 0.1:
                                    seq, reset = 0, True
                                parts.append(
                                    session_steps(sid, X[sid][seq : seq + n], seq=seq, reset=reset)
                                )
                                starts.append(seq)
                            for r, seq in zip(
                                c.step(step_request("tiny", parts)), starts, strict=True
                            ):
                                assert r.seq == seq
                                check(r.session_id, seq, r.y)
                                guess[r.session_id] = r.next_seq
                                stats["replayed"] += r.replayed
                        elif op < 0.70:
                            st = c.get_session("tiny", sids[0])
                            guess[sids[0]] = st.next_seq if st.exists else 0
                        elif op < 0.78:
                            c.reset_session("tiny", sids[0])
                            guess[sids[0]] = 0
                            stats["resets"] += 1
                        elif op < 0.86:
                            c.end_session("tiny", sids[0])
                            guess[sids[0]] = 0
                            stats["ends"] += 1
                        else:  # a read of the state: forecast 2 steps without committing
                            sid = sids[0]
                            f = c.forecast("tiny", sid, 2)
                            n = f.next_seq
                            assert n >= 1
                            check(sid, n - 1, f.y[:1])
                            fed = np.concatenate([X[sid][:n], f.y[:1]])
                            np.testing.assert_allclose(f.y[1], oracle.run(fed)[0][-1], atol=ATOL)
                            stats["forecasts checked"] += 1
                    except grpc.RpcError as err:
                        learn(err)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(THREADS)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert not errors, errors[:3]

    # Final states: read the whole table at once, on the server's loop (no request in between).
    lm = server.engine.model("tiny")

    async def grab() -> dict[str, tuple[int, np.ndarray, np.ndarray]]:
        a = lm.store
        return {
            k: (int(a.next_seq[s]), a.h[:, s].copy(), a.c[:, s].copy())
            for k, s in lm.store.slots.items()
        }

    final = server.call(grab())
    for sid, (n, h, c) in final.items():
        if n:
            _, hn, cn = oracle.run(X[sid][:n])
            np.testing.assert_allclose(h, hn, atol=ATOL, err_msg=sid)
            np.testing.assert_allclose(c, cn, atol=ATOL, err_msg=sid)
        else:
            assert not h.any() and not c.any(), sid
        stats["final states checked"] += 1
    m = server.server.metrics.sessions_evicted
    evicted = {r: m.labels("tiny:1", r)._value.get() for r in ("ttl", "lru")}
    print(f"\nconcurrency: {dict(stats)}; evicted {evicted}")
    assert stats["outputs checked"] > 500 and stats["forecasts checked"] > 20
    assert stats["NOT_FOUND"] > 0 and stats["FAILED_PRECONDITION"] > 0
    assert evicted["ttl"] > 0 and evicted["lru"] > 0


def test_end_racing_steps_never_lands_in_another_session(server: ServerThread) -> None:
    """Steps queued behind an EndSession of their session never write into the slot that the
    end freed (and another session took): they start the session again, or are refused."""
    lm = server.engine.model("tiny")
    with Client(server.target) as c:
        for round_ in range(30):
            a, b = f"end-a{round_}", f"end-b{round_}"
            c.predict("tiny", a, np.full((2, 3), 1.0), seq=0)
            futures = [
                c.stub.EndSession.future(
                    pb.SessionRef(model=pb.ModelRef(name="tiny"), session_id=a)
                ),
                c.stub.Predict.future(
                    step_request("tiny", [session_steps(a, np.full((1, 3), 1.0))])
                ),
                c.stub.Predict.future(
                    step_request("tiny", [session_steps(b, np.full((1, 3), -1.0), seq=0)])
                ),
            ]
            for f in futures:
                try:
                    f.result(10)
                except grpc.RpcError as err:
                    assert err.code() in (C.NOT_FOUND, C.RESOURCE_EXHAUSTED), err.details()
            sb = lm.store.slot(b)
            if sb is not None:
                assert int(lm.store.next_seq[sb]) == 1  # b got exactly its own one step
            sa = lm.store.slot(a)
            if sa is not None:
                assert sa != sb and int(lm.store.next_seq[sa]) in (1, 3)
