"""The scheduler's two paths give the same answers and leave the same state.

One appending row of one session runs on the scalar path (Scheduler._single, on plan.plan_one
and store.record); everything else on the general path (batch.build, commit.commit). Random
sequences of requests (new sessions, appends, retries with the same or other inputs, gaps,
resets, ends, frames of several sessions, the session cap) go to two schedulers over the same
runtime, one with the scalar path and one without; every answer, error and session's state
must be equal, bit for bit (the same rows reach the same runtime in both). A third scheduler
keeps its state "on a device" (tests/helpers/device.py: the CUDA path's code over a stand-in
for CuPy) and must agree too.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lstm_serve.core import frame as F
from lstm_serve.core.jobs import Limits, StepResult
from lstm_serve.core.probes import no_probes
from lstm_serve.core.replay import ReplayCache
from lstm_serve.core.scheduler import Scheduler
from lstm_serve.core.store import CapPolicy, SessionStore
from tests.helpers.device import OnDevice, device_arrays

LAYERS, HIDDEN, IN, OUT = 1, 4, 2, 2
POOL = ["a", "b", "c", "d"]
CAPACITY = 3  # below the pool: new sessions meet the cap


class NumpyLstm:
    """A one-layer LSTM (the project's gates) with a linear head, in numpy: deterministic, so
    the same rows give the same bits on both schedulers."""

    def __init__(self) -> None:
        r = np.random.default_rng(0)
        self.w = r.normal(0, 0.5, (4 * HIDDEN, HIDDEN + IN)).astype(np.float32)
        self.b = r.normal(0, 0.1, 4 * HIDDEN).astype(np.float32)
        self.head = r.normal(0, 0.5, (OUT, HIDDEN)).astype(np.float32)

    def run(self, x: np.ndarray, h0: np.ndarray, c0: np.ndarray) -> Any:
        h, c = h0[0].copy(), c0[0].copy()
        ys = []
        for t in range(x.shape[1]):
            z = np.concatenate([h, x[:, t]], axis=1) @ self.w.T + self.b
            f, i, g, o = np.split(z, 4, axis=1)
            sig = lambda v: 1.0 / (1.0 + np.exp(-v))  # noqa: E731
            c = sig(f) * c + sig(i) * np.tanh(g)
            h = sig(o) * np.tanh(c)
            ys.append(h @ self.head.T)
        return np.stack(ys, axis=1).astype(np.float32), h[None], c[None]


@dataclass(frozen=True)
class Op:
    kind: str  # step, frame, reset, end
    sids: tuple[str, ...]
    steps: tuple[int, ...]
    seq: tuple[str, ...]  # per session: append, next, zero, gap, retry, retry_other, continue
    reset: tuple[bool, ...]
    end: bool
    seed: int


seq_kinds = st.sampled_from(
    ["append"] * 3 + ["next"] * 3 + ["zero", "gap", "retry", "retry", "retry_other", "continue"]
)


@st.composite
def ops(draw: Any) -> Op:
    kind = draw(st.sampled_from(["step"] * 8 + ["frame", "reset", "end"]))
    n = draw(st.integers(2, 3)) if kind == "frame" else 1
    sids = tuple(draw(st.permutations(POOL))[:n])
    steps = tuple(draw(st.integers(1, 4)) for _ in range(n))
    seq = tuple(draw(seq_kinds) for _ in range(n))
    reset = tuple(draw(st.integers(0, 9)) == 0 for _ in range(n))
    end = kind == "step" and draw(st.integers(0, 9)) == 0
    return Op(kind, sids, steps, seq, reset, end, draw(st.integers(0, 2**31)))


class Side:
    """One side of the comparison: a scheduler and what the client side remembers (each
    session's next seq as last answered, and its requests, to retry them)."""

    def __init__(self, scalar: bool, policy: CapPolicy, device: bool = False) -> None:
        if device:
            store = SessionStore(CAPACITY, LAYERS, HIDDEN, OUT, device_arrays())
            runtime: Any = OnDevice(NumpyLstm())
        else:
            store = SessionStore(CAPACITY, LAYERS, HIDDEN, OUT)
            runtime = NumpyLstm()
        self.sched = Scheduler(
            runtime,
            store,
            ReplayCache(1 << 20),
            no_probes(),
            Limits(cap_policy=policy),
            "paths",
        )
        self.sched.scalar = scalar
        self.scalar_answers = 0  # requests the scalar path answered
        single = self.sched._single

        def counted(job: Any) -> bool:
            done = single(job)
            self.scalar_answers += done
            return done

        self.sched._single = counted  # type: ignore[method-assign]


def _request(op: Op, history: dict[str, list[tuple[int, np.ndarray, bool]]], nxt: dict[str, int]):
    """The frame of one op, the same on both sides (history and nxt come from the first)."""
    r = np.random.default_rng(op.seed)
    xs, seqs = [], []
    for sid, t, kind, rst in zip(op.sids, op.steps, op.seq, op.reset, strict=True):
        x = r.normal(size=(t, IN)).astype(np.float32)
        seq = F.APPEND
        past = history.get(sid, [])
        if kind == "next":
            seq = nxt.get(sid, 0)
        elif kind == "zero":
            seq = 0
        elif kind == "gap":
            seq = nxt.get(sid, 0) + 1 + int(r.integers(3))
        elif kind == "continue":
            seq = F.CONTINUE
        elif kind in ("retry", "retry_other") and past:
            seq, x, rst = past[int(r.integers(len(past)))]
            if kind == "retry_other":  # the same seq with other inputs or another step count
                x = x + 1.0 if r.random() < 0.5 else np.concatenate([x, x[:1]])
        xs.append(x)
        seqs.append((seq, rst))
    return xs, seqs


def _frame(op: Op, xs: list[np.ndarray], seqs: list[tuple[int, bool]]) -> F.Frame:
    seq = np.array([s for s, _ in seqs], np.int64)
    reset = np.array([r for _, r in seqs], bool)
    if len(xs) == 1:
        fr = F.single(op.sids[0], xs[0], int(seq[0]), bool(reset[0]))
    else:
        fr = F.from_rows(list(op.sids), xs, seq, reset)
    if op.end:
        fr.end = np.ones(len(xs), bool)
    return fr


def _outcome(res: Any) -> tuple[Any, ...]:
    if isinstance(res, BaseException):
        return (type(res).__name__, str(res))
    if isinstance(res, StepResult):
        ys = res.y if isinstance(res.y, list) else list(res.y)
        return (
            "ok",
            res.ids,
            res.seq.tolist(),
            res.next_seq.tolist(),
            res.replayed.tolist(),
            [np.asarray(y).tobytes() for y in ys],
        )
    return ("status", res.session_id, res.exists, res.next_seq)


READS = [0]  # sessions _state read from the device side


def _state(sched: Scheduler) -> dict[str, tuple[Any, ...]]:
    store = sched.store
    out = {}
    for sid in POOL:
        slot = store.slot(sid)
        if slot is not None:
            READS[0] += store.arrays.resident
            h, c = store.read_state(np.array([slot]))
            out[sid] = (
                int(store.next_seq[slot]),
                h.tobytes(),
                c.tobytes(),
                store.last_y[slot].tobytes(),
            )
    return out


async def _drive(op_list: list[Op], policy: CapPolicy) -> tuple[int, int]:
    scalar, general, device = Side(True, policy), Side(False, policy), Side(True, policy, True)
    sides = (scalar, general, device)
    READS[0] = 0
    history: dict[str, list[tuple[int, np.ndarray, bool]]] = {}
    nxt: dict[str, int] = {}
    for op in op_list:
        results = []
        if op.kind in ("reset", "end"):
            for side in sides:
                fut = side.sched.submit_op(op.kind, op.sids[0], op.sids[0], op.kind)
                results.append(await _settle(fut))
        else:
            xs, seqs = _request(op, history, nxt)
            for side in sides:
                ticks = side.sched.ticks
                fut = side.sched.submit_step(_frame(op, xs, seqs), list(op.sids), None)
                results.append(await _settle(fut))
                assert side.sched.ticks == ticks + 1
            ok = results[0]
            if isinstance(ok, StepResult):
                for i, sid in enumerate(op.sids):
                    if not ok.replayed[i]:
                        history.setdefault(sid, []).append((int(ok.seq[i]), xs[i], seqs[i][1]))
                    nxt[sid] = int(ok.next_seq[i])
        a, b, d = (_outcome(r) for r in results)
        assert a == b == d, (op, a, b, d)
        assert _state(scalar.sched) == _state(general.sched) == _state(device.sched), op
        if op.kind == "end" or op.end or isinstance(results[0], BaseException):
            for sid in op.sids:
                if scalar.sched.store.slot(sid) is None:
                    nxt.pop(sid, None)
                    history.pop(sid, None)
    assert general.scalar_answers == 0
    assert device.scalar_answers == scalar.scalar_answers
    # Nothing of the device's state went to the host but what _state read (h and c a session).
    assert device.sched.store.arrays.moved["calls"] == 2 * READS[0], device.sched.store.arrays.moved
    return scalar.scalar_answers, len(op_list)


async def _settle(fut: asyncio.Future[Any]) -> Any:
    try:
        return await fut
    except Exception as exc:
        return exc


@settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(st.lists(ops(), min_size=5, max_size=40), st.sampled_from(list(CapPolicy)))
def test_scalar_and_general_paths_agree(op_list: list[Op], policy: CapPolicy) -> None:
    scalar_answers, _ = asyncio.run(_drive(op_list, policy))
    TAKEN.append(scalar_answers)


TAKEN: list[int] = []  # scalar-path answers per example of the test above


def test_the_random_requests_reached_the_scalar_path() -> None:
    """Run after the property test (same module, in order): most examples used both paths."""
    if not TAKEN:
        test_scalar_and_general_paths_agree()
    assert sum(n > 0 for n in TAKEN) > len(TAKEN) // 2, TAKEN


def test_the_scalar_path_is_taken_and_matches_on_a_stream() -> None:
    """A plain stream of appends: the scalar path answers every one (no general-path build),
    with the same answers and state as the general path."""

    async def main() -> None:
        scalar, general = Side(True, CapPolicy.refuse), Side(False, CapPolicy.refuse)
        r = np.random.default_rng(1)
        for i in range(20):
            x = r.normal(size=(1 + i % 3, IN)).astype(np.float32)
            a = await scalar.sched.submit_step(F.single("s", x), ["s"], None)
            b = await general.sched.submit_step(F.single("s", x), ["s"], None)
            assert _outcome(a) == _outcome(b)
        assert _state(scalar.sched) == _state(general.sched)
        assert (scalar.scalar_answers, general.scalar_answers) == (20, 0)
        # a retry of the last request is answered from the chain the scalar path wrote
        seq = int(a.seq[0])
        again = await scalar.sched.submit_step(F.single("s", x, seq), ["s"], None)
        assert bool(again.replayed[0]) and np.array_equal(again.y[0], a.y[0])

    asyncio.run(main())
