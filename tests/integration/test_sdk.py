"""The Python SDK (lstm_serve.client, docs/client.md): AsyncClient has every call of Client and
answers as it does, refusals raise typed errors, Connection keeps its secrets out of repr, the
package ships py.typed and its version, and the docs' examples run as written."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import io
import pickle
import re
import socket
import tomllib
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

import lstm_serve
import lstm_serve.client as sdk
from lstm_serve.client import (
    AsyncClient,
    AsyncSessionStream,
    Client,
    Connection,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    LstmServeError,
    NotFound,
    ResourceExhausted,
    SessionStream,
    Unauthenticated,
    Unavailable,
    session_steps,
    step_request,
)
from tests.helpers.server import ServerThread, inference_blocked, serve
from tests.oracle.one_pass import OnePass

ROOT = Path(__file__).resolve().parents[2]
ATOL = 1e-5
C = grpc.StatusCode


def xs(seed: int, n: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 3)).astype(np.float32)


def _public(cls: type) -> dict[str, Any]:
    return {n: f for n, f in vars(cls).items() if not n.startswith("_") and callable(f)}


# -- the API surface -----------------------------------------------------------------------------


def test_async_client_has_every_call_of_client() -> None:
    sync, aio = _public(Client), _public(AsyncClient)
    assert set(sync) == set(aio)
    for name, fn in sync.items():
        want = inspect.signature(fn)
        got = inspect.signature(aio[name])
        assert list(got.parameters.values()) == list(want.parameters.values()), name
        if name != "session":
            assert inspect.iscoroutinefunction(aio[name]), name


def test_public_calls_have_docstrings() -> None:
    for cls in (Client, AsyncClient, SessionStream, AsyncSessionStream, Connection):
        assert cls.__doc__, cls
        for name, fn in _public(cls).items():
            assert inspect.getdoc(fn), f"{cls.__name__}.{name}"
    for name in sdk.__all__:
        obj = getattr(sdk, name)
        if inspect.isfunction(obj) or inspect.isclass(obj):
            assert inspect.getdoc(obj), name


def test_exports() -> None:
    assert {"Connection", "LstmServeError", "FailedPrecondition", "AsyncClient"} <= set(sdk.__all__)
    assert all(hasattr(sdk, n) for n in sdk.__all__)
    assert {"Client", "AsyncClient", "Connection", "LstmServeError", "__version__"} <= set(
        lstm_serve.__all__
    )
    assert lstm_serve.Connection is Connection


def test_version_is_the_package_metadata() -> None:
    assert lstm_serve.__version__ == version("lstm-serve")


def test_py_typed_is_shipped() -> None:
    pkg = Path(lstm_serve.__file__).parent
    assert (pkg / "py.typed").is_file()
    conf = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "py.typed" in conf["tool"]["setuptools"]["package-data"]["lstm_serve"]


def test_connection_repr_hides_secrets() -> None:
    conn = Connection(
        "lstm.example.com:443",
        root_certificates=b"-----BEGIN CERTIFICATE-----\nCA\n-----END CERTIFICATE-----\n",
        private_key=b"-----BEGIN PRIVATE KEY-----\nsecret-key-material\n",
        certificate_chain=b"-----BEGIN CERTIFICATE-----\nme\n",
        token="tok-alice-0123456789",
    )
    for text in (repr(conn), str(conn), f"{conn}", repr([conn])):
        assert "tok-alice" not in text and "secret-key-material" not in text
        assert "PRIVATE KEY" not in text and "BEGIN" not in text
        assert "lstm.example.com:443" in text and "<redacted>" in text
    assert "token=None" in repr(Connection("h:1"))
    # The token still travels with every call.
    assert ("authorization", "Bearer tok-alice-0123456789") in conn.metadata


def test_errors_are_grpc_errors() -> None:
    err = sdk.from_rpc_error(
        grpc.aio.AioRpcError(
            C.FAILED_PRECONDITION,
            grpc.aio.Metadata(),
            grpc.aio.Metadata(),
            "session 's': seq 9 is ahead; expected seq 7",
            None,
        )
    )
    assert type(err) is FailedPrecondition and err.expected_seq == 7
    assert isinstance(err, grpc.RpcError) and isinstance(err, LstmServeError)
    assert isinstance(err, grpc.aio.AioRpcError)  # as AsyncClient raised before
    assert err.code() is C.FAILED_PRECONDITION
    assert "expected seq 7" in err.details() and str(err).startswith("FAILED_PRECONDITION: ")
    assert sdk.from_rpc_error(err) is err
    again = pickle.loads(pickle.dumps(err))
    assert type(again) is FailedPrecondition and again.expected_seq == 7
    assert FailedPrecondition(C.FAILED_PRECONDITION, "different inputs").expected_seq is None
    assert sdk.error_class(C.ABORTED) is LstmServeError
    for code in (C.INVALID_ARGUMENT, C.PERMISSION_DENIED, C.INTERNAL, C.UNIMPLEMENTED):
        assert sdk.error_class(code).status is code


# -- AsyncClient against a real server -----------------------------------------------------------


def test_every_async_call(server: ServerThread, client: Client, oracle: OnePass) -> None:
    x = xs(1, 6)
    want = oracle.run(x)[0]

    async def main() -> None:
        async with AsyncClient(server.target) as c:
            assert await c.health() == "SERVING"
            assert await c.health("tiny") == "SERVING"
            assert {m.name for m in await c.list_models()} >= {"tiny", "tinytok"}
            info = await c.get_model("tiny")
            assert (info.name, info.input_dim, info.output_dim) == ("tiny", 3, 3)

            out = await c.predict("tiny", "aio-1", x[:2], seq=0)
            np.testing.assert_allclose(out.y, want[:2], atol=ATOL)
            assert (out.seq, out.next_seq, out.replayed) == (0, 2, False)
            [again] = await c.step(step_request("tiny", [session_steps("aio-1", x[:2], seq=0)]))
            assert again.replayed and again.next_seq == 2
            np.testing.assert_allclose(again.y, out.y)

            fc = await c.forecast("tiny", "aio-1", horizon=4)
            assert fc.y.shape == (4, 3) and fc.next_seq == 2
            np.testing.assert_allclose(fc.y, client.forecast("tiny", "aio-1", horizon=4).y)

            fr = await c.step_frame("tiny", ["aio-1", "aio-2"], np.stack([x[2:4], x[:2]]))
            np.testing.assert_allclose(fr.y[0], want[2:4], atol=ATOL)
            np.testing.assert_allclose(fr.y[1], want[:2], atol=ATOL)
            assert fr.next_seq.tolist() == [4, 2]

            tok = await c.predict("tinytok", "aio-tok", tokens=[1, 2, 3], top_k=2)
            assert len(tok.top_k) == 3 and all(len(k) == 2 for k in tok.top_k)

            state = await c.get_session("tiny", "aio-1")
            assert state.exists and state.next_seq == 4
            sync_state = client.get_session("tiny", "aio-1")
            assert (sync_state.exists, sync_state.next_seq) == (True, 4)
            assert (await c.reset_session("tiny", "aio-1")).next_seq == 0
            out = await c.predict("tiny", "aio-1", x[:1], seq=0)
            np.testing.assert_allclose(out.y, want[:1], atol=ATOL)  # from a zero state again

            async with c.session("tiny", "aio-3") as stream:
                got = [await stream.send(x[i : i + 2]) for i in (0, 2, 4)]
            assert [r.seq for r in got] == [0, 2, 4]
            np.testing.assert_allclose(np.concatenate([r.y for r in got]), want, atol=ATOL)

            for sid in ("aio-1", "aio-2", "aio-3"):
                assert not (await c.end_session("tiny", sid)).exists
            assert not (await c.get_session("tiny", "aio-1")).exists

    asyncio.run(main())


# -- typed errors from real refusals -------------------------------------------------------------


def test_refusals_raise_typed_errors(client: Client) -> None:
    with pytest.raises(InvalidArgument) as bad:
        client.predict("tiny", "e-1", np.ones((2, 2)))  # 4 values are not steps of 3
    assert bad.value.code() is C.INVALID_ARGUMENT and bad.value.details()
    with pytest.raises(InvalidArgument):
        client.predict("tiny", "e-1", [[np.nan, 0.0, 0.0]])
    with pytest.raises(NotFound) as nf:
        client.predict("no-such-model", "e-1", xs(2, 1))
    assert nf.value.code() is C.NOT_FOUND
    with pytest.raises(NotFound):
        client.end_session("tiny", "never-was")
    with pytest.raises(NotFound):
        client.get_model("tiny", "99")

    client.predict("tiny", "e-gap", xs(3, 3), seq=0)
    with pytest.raises(FailedPrecondition) as gap:
        client.predict("tiny", "e-gap", xs(4, 1), seq=7)
    assert gap.value.expected_seq == 3 and gap.value.code() is C.FAILED_PRECONDITION
    with pytest.raises(FailedPrecondition) as other:
        client.predict("tiny", "e-gap", xs(5, 3), seq=0)  # a "retry" with other inputs
    assert "different inputs" in other.value.details()
    # Old code that catches grpc.RpcError (or grpc.aio.AioRpcError) still catches these.
    with pytest.raises(grpc.RpcError) as raw:
        client.predict("tiny", "e-gap", xs(4, 1), seq=9)
    assert raw.value.code() is C.FAILED_PRECONDITION
    assert isinstance(raw.value, grpc.aio.AioRpcError)
    assert raw.value.debug_error_string()  # gRPC core's text, for bug reports


def test_async_refusals_raise_typed_errors(server: ServerThread) -> None:
    async def main() -> None:
        async with AsyncClient(server.target) as c:
            with pytest.raises(InvalidArgument):
                await c.predict("tiny", "ae-1", np.ones((1, 5)))
            with pytest.raises(NotFound):
                await c.forecast("no-such-model", "ae-1", horizon=2)
            with pytest.raises(NotFound):
                await c.reset_session("tiny", "never-was")
            await c.predict("tiny", "ae-gap", xs(6, 2), seq=0)
            with pytest.raises(FailedPrecondition) as gap:
                await c.predict("tiny", "ae-gap", xs(7, 1), seq=4)
            assert gap.value.expected_seq == 2
            # A stream gives up on a status not worth a retry with the same typed error.
            async with c.session("tiny", "ae-new", start_seq=5) as stream:
                with pytest.raises(NotFound):
                    await stream.send(xs(8, 1))

    asyncio.run(main())


def test_session_stream_raises_typed_errors(client: Client) -> None:
    with client.session("tiny", "se-new", start_seq=5) as stream, pytest.raises(NotFound):
        stream.send(xs(9, 1))  # seq 5 of a session the server does not have


def test_session_cap_raises_resource_exhausted(tiny_repo: Path) -> None:
    with (
        ServerThread(model_repository=tiny_repo, max_sessions=2, cap_policy="refuse") as srv,
        Client(srv.target) as c,
    ):
        c.predict("tiny", "cap-0", xs(10, 1))
        c.predict("tiny", "cap-1", xs(11, 1))
        with pytest.raises(ResourceExhausted) as full:
            c.predict("tiny", "cap-2", xs(12, 1))
        assert full.value.code() is C.RESOURCE_EXHAUSTED

        async def main() -> None:
            async with AsyncClient(srv.target) as ac:
                with pytest.raises(ResourceExhausted):
                    await ac.predict("tiny", "cap-3", xs(13, 1))

        asyncio.run(main())


@pytest.fixture(scope="module")
def token_server(tiny_repo: Path) -> Iterator[ServerThread]:
    yield from serve(tiny_repo, auth_tokens="alice:tok-alice-0123456789")


def test_tokens_and_unauthenticated(token_server: ServerThread) -> None:
    t = token_server.target
    for conn in (Connection(t), Connection(t, token="tok-wrong")):
        with Client(conn) as c:
            with pytest.raises(Unauthenticated) as info:
                c.predict("tiny", "auth-1", xs(14, 1))
            assert info.value.code() is C.UNAUTHENTICATED
            assert c.health() == "SERVING"  # the health service is open
    with Client(Connection(t, token="tok-alice-0123456789")) as c:
        assert c.predict("tiny", "auth-1", xs(14, 1)).next_seq == 1

    async def main() -> None:
        async with AsyncClient(Connection(t)) as c:
            with pytest.raises(Unauthenticated):
                await c.list_models()
        async with AsyncClient(Connection(t, token="tok-alice-0123456789")) as c:
            assert (await c.get_session("tiny", "auth-1")).next_seq == 1

    asyncio.run(main())


def test_deadline_exceeded(server: ServerThread, client: Client) -> None:
    with inference_blocked(server):
        with pytest.raises(DeadlineExceeded):
            client.predict("tiny", "slow-1", xs(15, 1), timeout=0.3)

        async def main() -> None:
            async with AsyncClient(server.target) as c:
                with pytest.raises(DeadlineExceeded):
                    await c.predict("tiny", "slow-2", xs(16, 1), timeout=0.3)

        asyncio.run(main())


def test_no_server_is_unavailable() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        target = f"127.0.0.1:{s.getsockname()[1]}"  # a port nobody listens on
    with Client(target, timeout=2) as c, pytest.raises(Unavailable):
        c.list_models()


# -- the docs' examples --------------------------------------------------------------------------

DOC = (ROOT / "docs" / "client.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", DOC, re.S)


def test_every_doc_example_compiles() -> None:
    assert len(BLOCKS) >= 3
    for block in BLOCKS:
        compile(block, "docs/client.md", "exec")


@pytest.fixture(scope="module")
def shipped_server(shipped_models_dir: Path) -> Iterator[ServerThread]:
    yield from serve(shipped_models_dir)


def _run_doc(block: str, target: str) -> list[str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(block.replace("127.0.0.1:50051", target), "docs/client.md", "exec"), {})
    return out.getvalue().splitlines()


def test_doc_examples_run(shipped_server: ServerThread) -> None:
    runnable = [b for b in BLOCKS if "127.0.0.1:50051" in b]
    assert len(runnable) == 2
    sync, aio = runnable
    assert _run_doc(sync, shipped_server.target) == [
        "SERVING",
        "['charlm', 'forecaster']",
        "(2, 2) 2",
        "FAILED_PRECONDITION 2",
        "(24, 2)",
    ]
    assert _run_doc(aio, shipped_server.target) == [
        "SERVING",
        "0 (1, 2)",
        "1 (1, 2)",
        "2 (1, 2)",
        "[(True, 3), (False, 0)]",
    ]
    store = shipped_server.engine.model("forecaster").store
    assert store.slot("sdk-1") is None and store.slot("sdk-2") is None  # the examples clean up
