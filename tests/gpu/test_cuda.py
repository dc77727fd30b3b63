"""The CUDA path, where a GPU is usable (skipped elsewhere: CI has none; run on a GPU machine
with `pytest tests/gpu`). Small batches run on the CPU session, large ones on CUDA, and a
session whose steps move between the two still ends equal to one pass over its sequence."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lstm_serve.client import Client
from lstm_serve.core.repository import load_repository
from lstm_serve.core.runtime import Device, ModelRuntime, choose_device
from tests.helpers.server import ServerThread, session_state, xs
from tests.oracle.one_pass import OnePass


def _cuda_usable() -> bool:
    try:
        return choose_device(Device.auto).device == "cuda"
    except RuntimeError:
        return False


pytestmark = pytest.mark.skipif(not _cuda_usable(), reason="no usable GPU (CUDA) here")

ATOL = 1e-4  # cuDNN's LSTM and the CPU kernel differ in summation order only


def test_small_batches_run_on_the_cpu_and_large_ones_on_cuda(tiny_repo: Path) -> None:
    mv = load_repository(tiny_repo).get("tiny")
    rt = ModelRuntime(mv, choose_device(Device.cuda), 1, cpu_max_steps=16)
    assert rt.device == "cuda" and rt.cpu_session is not None
    rt.warm_up()
    oracle = OnePass(tiny_repo / "tiny" / "1")
    for batch, where in ((1, "cpu"), (16, "cpu"), (17, "cuda"), (512, "cuda")):
        before = dict(rt.calls)
        x = np.stack([xs(seed, 1) for seed in range(batch)])  # [batch, 1, 3]
        h = np.zeros((2, batch, 16), np.float32)
        y, hn, _ = rt.run(x, h, h)
        assert rt.calls[where] == before[where] + 1, (batch, rt.calls)
        for i in (0, batch - 1):
            y1, h1, _ = oracle.run(x[i])
            np.testing.assert_allclose(y[i], y1, atol=ATOL)
            np.testing.assert_allclose(hn[:, i], h1, atol=ATOL)


def test_a_session_moving_between_cpu_and_gpu_batches_equals_one_pass(tiny_repo: Path) -> None:
    """One session steps alone (a CPU batch), then inside frames of 300 sessions (CUDA batches),
    then alone again: its state equals one pass over all its steps."""
    oracle = OnePass(tiny_repo / "tiny" / "1")
    steps = xs(7, 12)
    others = [f"other-{i}" for i in range(299)]
    with ServerThread(model_repository=tiny_repo, device="cuda", cuda_cpu_max_steps=128) as srv:
        with Client(srv.target) as c:
            ys = []
            for t in range(12):
                if 4 <= t < 8:  # in a frame: 300 rows, above the CPU limit
                    ids = ["mover", *others]
                    x = np.concatenate([steps[t][None, None], np.stack([xs(t, 1)] * 299)])
                    r = c.step_frame("tiny", ids, x)
                    ys.append(r.y[0, 0])
                else:
                    ys.append(c.predict("tiny", "mover", steps[t][None]).y[0])
        runtime = srv.engine.model("tiny").scheduler.runtime
        assert runtime.calls["cpu"] > 0 and runtime.calls["cuda"] > 0, runtime.calls
        got = session_state(srv, "mover")
    y1, h1, c1 = oracle.run(steps)
    np.testing.assert_allclose(np.stack(ys), y1, atol=ATOL)
    assert got is not None and got[0] == 12
    state = np.frombuffer(got[1], np.float32)
    np.testing.assert_allclose(state, np.concatenate([h1.ravel(), c1.ravel()]), atol=ATOL)
