"""State where the model runs (core/device_arrays.py), on the CPU: the CUDA path's code with a
stand-in for CuPy (tests/helpers/device.py) and ONNX Runtime bound by pointer.

What is shown: a bound run equals a plain one; an engine whose state is "on the device" gives
one pass over each session's steps through frames, single steps, resets, roll-outs, LRU
eviction, a snapshot and a restart; on the way, no state crosses to the host while stepping, and
a snapshot or a shared-store write reads all its sessions in one copy of h and one of c. The
same tests with CuPy on a GPU are in tests/gpu/test_device_state.py; a shared store's writes
from device state in tests/core/test_sync.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lstm_serve.core import frame as F
from lstm_serve.core import runtime as R
from lstm_serve.core.device_arrays import StateArrays
from lstm_serve.core.engine import Engine
from lstm_serve.core.repository import load_repository
from lstm_serve.core.runtime import Device, ModelRuntime, choose_device
from lstm_serve.core.store import CapPolicy
from tests.helpers.device import DeviceArray, device_arrays, host
from tests.helpers.engine import run_engine, step_tiny
from tests.oracle.one_pass import OnePass

ATOL = 1e-5


@pytest.fixture
def on_device(monkeypatch: pytest.MonkeyPatch) -> StateArrays:
    """Engines started in this test keep their state in the stand-in device's arrays."""
    arrays = device_arrays()
    monkeypatch.setattr(R, "HOST", arrays)
    return arrays


def test_a_pointer_bound_run_equals_a_plain_run(tiny_repo: Path) -> None:
    mv = load_repository(tiny_repo).get("tiny")
    cpu = choose_device(Device.cpu)
    plain = ModelRuntime(mv, cpu)
    arrays = device_arrays()
    bound = ModelRuntime(mv, cpu, arrays=arrays)
    assert not plain.arrays.resident and bound.arrays is arrays
    r = np.random.default_rng(0)
    for batch, steps in ((1, 1), (7, 3), (300, 1)):
        x = r.normal(size=(batch, steps, 3)).astype(np.float32)
        h = r.normal(size=(2, batch, 16)).astype(np.float32)
        c = r.normal(size=(2, batch, 16)).astype(np.float32)
        y0, h0, c0 = plain.run(x, h, c)
        y1, h1, c1 = bound.run(x, arrays.xp.asarray(h), arrays.xp.asarray(c))
        assert isinstance(h1, DeviceArray) and not isinstance(y1, DeviceArray)
        np.testing.assert_allclose(y1, y0, atol=1e-6)
        np.testing.assert_allclose(host(h1), h0, atol=1e-6)
        np.testing.assert_allclose(host(c1), c0, atol=1e-6)


def _state(engine: Engine, sid: str) -> tuple[np.ndarray, np.ndarray]:
    store = engine.model("tiny").store
    slot = store.slot(sid)
    assert slot is not None, sid
    h, c = store.read_state(np.array([slot]))
    return h[:, 0], c[:, 0]


def test_sessions_on_the_device_equal_one_pass_and_state_stays_there(
    tiny_repo: Path, tmp_path: Path, on_device: StateArrays
) -> None:
    oracle = OnePass(tiny_repo / "tiny" / "1")
    r = np.random.default_rng(1)
    history: dict[str, list[np.ndarray]] = {}
    ids = [f"s{i}" for i in range(12)]

    def check(sid: str, y: np.ndarray) -> None:
        y1, _, _ = oracle.run(np.concatenate(history[sid]))
        np.testing.assert_allclose(y, y1[-len(y) :], atol=ATOL)

    async def body(engine: Engine) -> None:
        lm = engine.model("tiny")
        assert lm.store.arrays is on_device and isinstance(lm.store.h, DeviceArray)
        moved = dict(on_device.moved)
        seen: set[str] = set()
        evicted: set[str] = set()
        for t in range(6):
            # a frame of eight sessions (the general path), two to three steps each
            sids = ids[t % 4 : t % 4 + 8]
            for sid in sids:  # evicted (LRU, memory store): the id starts over
                if sid not in lm.store.slots:
                    history.pop(sid, None)
                    evicted.add(sid) if sid in seen else seen.add(sid)
            xs = [r.normal(size=(2 + (i + t) % 2, 3)).astype(np.float32) for i in range(8)]
            seq = np.full(8, F.APPEND, np.int64)
            res = await engine.submit_step(
                "tiny", "", F.from_rows(sids, xs, seq, np.zeros(8, bool))
            )
            for i, sid in enumerate(sids):
                history.setdefault(sid, []).append(xs[i])
                check(sid, np.asarray(res.y[i]))
            # one session alone (the scalar path)
            x = r.normal(size=(1, 3)).astype(np.float32)
            history.setdefault("solo", []).append(x)
            check("solo", (await step_tiny(engine, "solo", x)).y[0])
        # a reset starts over from a zero state
        x = r.normal(size=(2, 3)).astype(np.float32)
        history["s5"] = [x]
        check("s5", (await step_tiny(engine, "s5", x, reset=True)).y[0])
        # a committed roll-out continues the session with its own predictions
        _, fc = await engine.forecast("tiny", "", "solo", 3, commit=True)
        for k in range(3):
            history["solo"].append(fc.y[k][None])
            if k < 2:
                y1, _, _ = oracle.run(np.concatenate(history["solo"]))
                np.testing.assert_allclose(fc.y[k + 1], y1[-1], atol=ATOL)
        # nothing of h and c went to the host while stepping
        assert on_device.moved == moved, (on_device.moved, moved)
        for sid in [*lm.store.slots]:
            _, h1, c1 = oracle.run(np.concatenate(history[sid]))
            h, c = _state(engine, sid)
            np.testing.assert_allclose(h, h1, atol=ATOL)
            np.testing.assert_allclose(c, c1, atol=ATOL)
        # LRU eviction made room (capacity 10, 13 sessions seen), and evicted ids came back
        assert len(lm.store) == 10 and evicted
        on_device.moved.update(calls=0, out=0)

    run_engine(
        body, tiny_repo, max_sessions=10, cap_policy=CapPolicy.evict_lru,
        snapshot_dir=tmp_path, cuda_cpu_max_steps=0,
    )  # fmt: skip
    # the snapshot at close read all ten sessions in one copy of h and one of c (and tinytok's
    # none in one each)
    assert on_device.moved["calls"] == 4, on_device.moved
    assert on_device.moved["out"] == 2 * 10 * 2 * 16 * 4

    async def again(engine: Engine) -> None:
        lm = engine.model("tiny")
        assert len(lm.store) == 10
        for sid in [*lm.store.slots]:
            x = r.normal(size=(1, 3)).astype(np.float32)
            history[sid].append(x)
            check(sid, (await step_tiny(engine, sid, x)).y[0])
            _, h1, c1 = oracle.run(np.concatenate(history[sid]))
            h, c = _state(engine, sid)
            np.testing.assert_allclose(h, h1, atol=ATOL)
            np.testing.assert_allclose(c, c1, atol=ATOL)

    on_device.moved.update(calls=0, out=0, **{"in": 0})
    run_engine(again, tiny_repo, max_sessions=10, snapshot_dir=tmp_path)
    assert on_device.moved["in"] == 2 * 10 * 2 * 16 * 4  # restored in one copy each
