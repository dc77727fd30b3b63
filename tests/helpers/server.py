"""A real lstm-serve on a loopback port, run on its own event loop in a background thread."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from lstm_serve.client import Client
from lstm_serve.server.app import LstmServer
from lstm_serve.server.settings import Settings
from tests.oracle.one_pass import OnePass as OnePass  # re-exported: test_invariants imports it here


class ServerThread:
    """with ServerThread(model_repository=path, **settings) as srv: Client(srv.target)..."""

    def __init__(self, **settings: Any) -> None:
        settings.setdefault("port", 0)
        settings.setdefault("metrics_port", 0)
        settings.setdefault("host", "127.0.0.1")
        self.settings = Settings(**settings)
        self.loop = asyncio.new_event_loop()
        self.server = LstmServer(self.settings)
        self._thread = threading.Thread(target=self._run, name="test-server", daemon=True)
        self._started = threading.Event()
        self._error: BaseException | None = None

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self.server.start())
        except BaseException as exc:
            self._error = exc
            self._started.set()
            return
        self._started.set()
        self.loop.run_forever()

    def start(self) -> ServerThread:
        self._thread.start()
        self._started.wait(60)
        if self._error is not None:
            raise self._error
        return self

    def call(self, coro: Any, timeout: float = 60) -> Any:
        """Run a coroutine on the server's loop (e.g. engine calls) and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self, grace: float = 5.0) -> None:
        if not self._thread.is_alive():
            return
        self.call(self.server.stop(grace))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(30)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.server.metrics_port}/metrics"

    @property
    def engine(self) -> Any:
        return self.server.engine

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve(
    model_repository: Path, setup: Callable[[Client], object] | None = None, **settings: Any
) -> Iterator[ServerThread]:
    """The body of a server fixture, of any scope: `yield from serve(repo, **settings)` yields a
    started ServerThread and stops it at the fixture's teardown. `setup`, when given, runs with a
    client of the started server before the server is yielded (sessions tests expect to find)."""
    with ServerThread(model_repository=model_repository, **settings) as srv:
        if setup is not None:
            with Client(srv.target) as c:
                setup(c)
        yield srv


def connect(srv: ServerThread, setup: Callable[[Client], object] | None = None) -> Iterator[Client]:
    """The body of a client fixture, of any scope: `yield from connect(server)` yields a Client
    of the server and closes it at the fixture's teardown; `setup` runs with it first."""
    with Client(srv.target) as c:
        if setup is not None:
            setup(c)
        yield c


def session_state(srv: ServerThread, sid: str, model: str = "tiny") -> tuple[int, bytes] | None:
    """A session's next_seq and its h and c bytes, read from the store; None when absent."""
    assert srv.engine is not None
    store = srv.engine.model(model).store
    slot = store.slot(sid)
    if slot is None:
        return None
    return int(store.next_seq[slot]), store.h[:, slot].tobytes() + store.c[:, slot].tobytes()


def all_states(srv: ServerThread) -> dict[str, tuple[int, bytes]]:
    """Every session of every model: "label/key" -> (next_seq, h and c bytes)."""
    assert srv.engine is not None
    out = {}
    for lm in srv.engine.models.values():
        for key, slot in lm.store.slots.items():
            out[f"{lm.label}/{key}"] = (
                int(lm.store.next_seq[slot]),
                lm.store.h[:, slot].tobytes() + lm.store.c[:, slot].tobytes(),
            )
    return out


def xs(seed: int, n: int) -> np.ndarray:
    """n random steps for the tiny real model (3 features)."""
    return np.random.default_rng(seed).normal(size=(n, 3)).astype(np.float32)


def code_of(fn: Callable[[], object]) -> grpc.StatusCode:
    """The status code of the gRPC error fn raises (it must raise one)."""
    with pytest.raises(grpc.RpcError) as info:
        fn()
    code: grpc.StatusCode = info.value.code()
    return code


@contextlib.contextmanager
def inference_blocked(
    srv: ServerThread, model: tuple[str, str] = ("tiny", "1")
) -> Iterator[threading.Event]:
    """Hold every inference call of a model until the block ends (or the event is set): its
    steps stay in flight. Batches go to the executor meanwhile, so the event loop runs on."""
    assert srv.engine is not None
    sched = srv.engine.models[model].scheduler
    real, limits = sched.runtime, sched.limits
    gate = threading.Event()

    class Gated:
        def run(self, *a: Any) -> Any:
            gate.wait(30)
            return real.run(*a)

    sched.limits = dataclasses.replace(limits, inline_max_steps=0)
    sched.runtime = Gated()
    try:
        yield gate
    finally:
        gate.set()
        sched.runtime = real
        sched.limits = limits
