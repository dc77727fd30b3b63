"""Fixtures of the cluster tests: a real redis-server and two replicas sharing it (the tiny model
and its oracle come from tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from lstm_serve.bench.procs.redis_server import RedisServer
from tests.helpers.server import ServerThread


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    srv = RedisServer(tmp_path / "redis").start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def pair(tiny_repo: Path, redis_server: RedisServer) -> Iterator[tuple[ServerThread, ServerThread]]:
    """Two in-process replicas on one Redis, reached directly (no Envoy)."""
    a = ServerThread(model_repository=tiny_repo, state_store=redis_server.url).start()
    b = ServerThread(model_repository=tiny_repo, state_store=redis_server.url).start()
    try:
        yield a, b
    finally:
        a.stop()
        b.stop()
