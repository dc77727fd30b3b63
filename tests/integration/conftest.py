"""Fixtures shared by the integration tests (the oracles come from tests/conftest.py).

`server` and `client` are the defaults: the tiny models with default settings, and a client of
that server for each test. A module that needs other settings defines its own `server` with
`yield from serve(tiny_repo, **settings)`; the shared `client` then connects to that one.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from lstm_serve.client import Client
from tests.helpers.server import ServerThread, connect, serve


@pytest.fixture(scope="module")
def server(tiny_repo: Path) -> Iterator[ServerThread]:
    yield from serve(tiny_repo)


@pytest.fixture
def client(server: ServerThread) -> Iterator[Client]:
    yield from connect(server)
