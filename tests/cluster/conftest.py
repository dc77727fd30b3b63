"""Fixtures of the cluster tests: a real redis-server, the tiny model and its NumPy oracle."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.helpers.redis import RedisServer
from tests.oracle.reference import ReferenceModel


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    srv = RedisServer(tmp_path / "redis").start()
    try:
        yield srv
    finally:
        srv.stop()


class Oracle:
    """One pass of the NumPy reference over a whole sequence, from a zero state."""

    def __init__(self, model: Path) -> None:
        self.ref = ReferenceModel.from_onnx(model)

    def run(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        h0, c0 = self.ref.zero_state(1)
        y, hn, cn = self.ref.run(x[None], h0, c0)
        return y[0], hn[:, 0], cn[:, 0]


@pytest.fixture(scope="module")
def oracle(tiny_repo: Path) -> Oracle:
    return Oracle(tiny_repo / "tiny" / "1" / "model.onnx")
