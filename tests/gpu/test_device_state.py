"""Session state in GPU memory (CuPy), where a GPU and the gpu extra are usable (skipped
elsewhere: CI has neither; run on a GPU machine with `pytest tests/gpu`). The same checks on the
CPU, with a stand-in for CuPy, are tests/core/test_device_state.py.

What is shown: state lives in CuPy arrays; frames, single steps (on the CPU session and on
CUDA), a reset, a committed roll-out and a snapshot with a restart give one pass over each
session's steps; no state crosses to the host while stepping on CUDA.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lstm_serve.core import frame as F
from lstm_serve.core.engine import Engine
from lstm_serve.core.runtime import Device, choose_device
from tests.helpers.engine import run_engine, step_tiny
from tests.oracle.one_pass import OnePass

ATOL = 1e-4  # cuDNN's LSTM and the CPU kernel differ in summation order only


def _usable() -> bool:
    try:
        import cupy  # type: ignore[import-not-found,unused-ignore]  # noqa: F401

        return choose_device(Device.auto).device == "cuda"
    except (ImportError, RuntimeError):
        return False


pytestmark = pytest.mark.skipif(not _usable(), reason="no usable GPU (CUDA) with CuPy here")


def test_state_in_gpu_memory_equals_one_pass(tiny_repo: Path, tmp_path: Path) -> None:
    oracle = OnePass(tiny_repo / "tiny" / "1")
    r = np.random.default_rng(0)
    ids = [f"g{i}" for i in range(300)]  # frames above cuda_cpu_max_steps run on CUDA
    history: dict[str, list[np.ndarray]] = {sid: [] for sid in [*ids, "solo"]}

    async def body(engine: Engine) -> None:
        lm = engine.model("tiny")
        arrays = lm.store.arrays
        assert arrays.where == "cuda" and type(lm.store.h).__module__.startswith("cupy")
        moved = dict(arrays.moved)
        for _ in range(4):
            xs = r.normal(size=(300, 2, 3)).astype(np.float32)
            frame = F.from_rows(ids, list(xs), np.full(300, F.APPEND), np.zeros(300, bool))
            res = await engine.submit_step("tiny", "", frame)
            for i in (0, 150, 299):
                history[ids[i]].append(xs[i])
                y1, _, _ = oracle.run(np.concatenate(history[ids[i]]))
                np.testing.assert_allclose(np.asarray(res.y[i]), y1[-2:], atol=ATOL)
            for i in set(range(300)) - {0, 150, 299}:
                history[ids[i]].append(xs[i])
        assert arrays.moved == moved, (arrays.moved, moved)  # CUDA batches only: none moved
        for _ in range(3):  # one row: the CPU session (state copied over and back)
            x = r.normal(size=(1, 3)).astype(np.float32)
            history["solo"].append(x)
            y = (await step_tiny(engine, "solo", x)).y[0]
            y1, _, _ = oracle.run(np.concatenate(history["solo"]))
            np.testing.assert_allclose(y, y1[-1:], atol=ATOL)
        x = r.normal(size=(2, 3)).astype(np.float32)
        history["g7"] = [x]
        await step_tiny(engine, "g7", x, reset=True)
        _, fc = await engine.forecast("tiny", "", "solo", 3, commit=True)
        history["solo"] += [fc.y[k][None] for k in range(3)]
        runtime = lm.scheduler.runtime
        assert runtime.calls["cpu"] > 0 and runtime.calls["cuda"] > 0  # type: ignore[attr-defined]

    run_engine(
        body, tiny_repo, device=Device.cuda, max_sessions=512, snapshot_dir=tmp_path,
        cuda_cpu_max_steps=128,
    )  # fmt: skip

    async def again(engine: Engine) -> None:
        store = engine.model("tiny").store
        assert len(store) == 301
        for sid in ("g0", "g7", "g299", "solo"):
            slot = store.slot(sid)
            assert slot is not None
            h, c = store.read_state(np.array([slot]))
            _, h1, c1 = oracle.run(np.concatenate(history[sid]))
            np.testing.assert_allclose(h[:, 0], h1, atol=ATOL)
            np.testing.assert_allclose(c[:, 0], c1, atol=ATOL)

    run_engine(again, tiny_repo, device=Device.cuda, max_sessions=512, snapshot_dir=tmp_path)
