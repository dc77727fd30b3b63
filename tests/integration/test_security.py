"""Security: TLS, mutual TLS, bearer tokens, per-principal session namespaces, error texts that
carry no internals, and metrics on their own port."""

from __future__ import annotations

import socket
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from lstm_serve.client import Client, Connection, session_steps, step_request
from lstm_serve.server.pb import lstm_serve_pb2 as pb
from tests.helpers.certs import Pki
from tests.helpers.proxy import health_status
from tests.helpers.server import ServerThread
from tests.oracle.one_pass import OnePass

C = grpc.StatusCode
ATOL = 1e-5


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki.create(tmp_path_factory.mktemp("pki"), clients=("alice", "bob"))


@pytest.fixture(scope="module")
def rogue(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """Another CA, with a client called alice too."""
    return Pki.create(tmp_path_factory.mktemp("rogue"), clients=("alice",), ca_cn="rogue CA")


def _code(fn: Any) -> tuple[grpc.StatusCode, str]:
    try:
        fn()
    except grpc.RpcError as err:
        return err.code(), err.details() or ""
    return C.OK, ""


def _predict(conn: Connection, sid: str = "s", timeout: float = 5.0) -> tuple[grpc.StatusCode, str]:
    with Client(conn, timeout=timeout) as c:
        return _code(lambda: c.predict("tiny", sid, np.ones((1, 3))))


# -- TLS -----------------------------------------------------------------------------------------


def test_tls(tiny_repo: Path, pki: Pki, rogue: Pki) -> None:
    with ServerThread(
        model_repository=tiny_repo, tls_cert=pki.server.cert_path, tls_key=pki.server.key_path
    ) as srv:
        assert _predict(Connection(srv.target, root_certificates=pki.ca_pem)) == (C.OK, "")
        # A plaintext client, and a client that trusts another CA, get nowhere.
        assert _predict(Connection(srv.target))[0] is C.UNAVAILABLE
        assert _predict(Connection(srv.target, root_certificates=rogue.ca_pem))[0] is C.UNAVAILABLE
        # The server certificate names 127.0.0.1: a client that checks the name accepts it.
        with Client(Connection(srv.target, root_certificates=pki.ca_pem)) as c:
            assert c.health() == "SERVING"


def test_mutual_tls(tiny_repo: Path, pki: Pki, rogue: Pki) -> None:
    with ServerThread(
        model_repository=tiny_repo,
        tls_cert=pki.server.cert_path,
        tls_key=pki.server.key_path,
        tls_client_ca=pki.ca_path,
        health_port=0,
    ) as srv:

        def conn(client: Any = None) -> Connection:
            return Connection(
                srv.target,
                root_certificates=pki.ca_pem,
                private_key=client.key_pem if client else None,
                certificate_chain=client.cert_pem if client else None,
            )

        assert _predict(conn())[0] is C.UNAVAILABLE  # no client certificate
        assert _predict(conn(rogue.clients["alice"]))[0] is C.UNAVAILABLE  # another CA's "alice"
        assert _predict(conn(pki.clients["alice"]), "mine") == (C.OK, "")
        assert _predict(conn(pki.clients["bob"]), "mine") == (C.OK, "")
        # The principal is the certificate's CN: each client has its own session "mine".
        keys = set(srv.engine.model("tiny").store.slots)
        assert {"cn:alice\x1fmine", "cn:bob\x1fmine"} <= keys and "mine" not in keys
        # A probe without any certificate (the image's HEALTHCHECK, a Kubernetes gRPC probe)
        # asks the plaintext health-only port; that port serves nothing else.
        health_target = f"127.0.0.1:{srv.server.health_port}"
        assert health_status(health_target) == "SERVING"
        assert health_status(health_target, service="tiny") == "SERVING"
        with Client(health_target) as plain:
            with pytest.raises(grpc.RpcError) as info:
                plain.predict("tiny", "mine", np.ones((1, 3)))
            assert info.value.code() is C.UNIMPLEMENTED
        assert health_status(srv.target) == "DOWN"  # the main port wants TLS


# -- bearer tokens -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def token_server(
    tiny_repo: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerThread]:
    tokens = tmp_path_factory.mktemp("auth") / "tokens"
    tokens.write_text("# client-name token\nalice tok-alice-0123456789\n\nbob tok-bob-9876543210\n")
    with pytest.MonkeyPatch.context() as mp:  # Settings read the environment when made
        mp.setenv("LSTM_SERVE_AUTH_TOKENS", "carol:tok-carol-5555")  # added to the file's
        srv = ServerThread(model_repository=tiny_repo, auth_tokens_file=tokens)
    with srv:
        yield srv


def test_tokens(token_server: ServerThread) -> None:
    t = token_server.target
    assert _predict(Connection(t))[0] is C.UNAUTHENTICATED  # no token
    assert _predict(Connection(t, token="tok-alice-012345678"))[0] is C.UNAUTHENTICATED  # wrong
    assert _predict(Connection(t, token="tok-bob-9876543210 x"))[0] is C.UNAUTHENTICATED
    assert _predict(Connection(t, token="tok-alice-0123456789")) == (C.OK, "")
    assert _predict(Connection(t, token="tok-bob-9876543210")) == (C.OK, "")
    assert _predict(Connection(t, token="tok-carol-5555")) == (C.OK, "")  # from the env var
    with Client(t) as c:
        # Every method of the service needs the token, streams too...
        for fn in (
            lambda: c.list_models(),
            lambda: c.get_session("tiny", "s"),
            lambda: list(
                c.stub.Stream(iter([step_request("tiny", [session_steps("s", np.ones((1, 3)))])]))
            ),
            lambda: c.stub.Stream(iter([])).__next__(),
        ):
            assert _code(fn)[0] is C.UNAUTHENTICATED
        # ...but the health check (for load balancers and orchestrators) does not.
        assert c.health() == "SERVING"
        assert c.health("tiny") == "SERVING"


def test_sessions_are_namespaced_by_principal(token_server: ServerThread, tiny_repo: Path) -> None:
    """Client A can never read, advance, reset or end client B's session of the same id."""
    oracle = OnePass(tiny_repo / "tiny" / "1")
    lm = token_server.engine.model("tiny")
    a = Client(Connection(token_server.target, token="tok-alice-0123456789"))
    b = Client(Connection(token_server.target, token="tok-bob-9876543210"))
    x = np.random.default_rng(1).normal(size=(6, 3)).astype(np.float32)

    def b_state() -> tuple[int, bytes]:
        slot = lm.store.slot("bob\x1fshared")
        assert slot is not None
        return int(lm.store.next_seq[slot]), lm.store.h[:, slot].tobytes() + lm.store.c[
            :, slot
        ].tobytes()

    try:
        b.predict("tiny", "shared", np.ones((4, 3)), seq=0)
        before = b_state()
        st = a.get_session("tiny", "shared")
        assert not st.exists and st.next_seq == 0  # A cannot even see it
        for fn in (
            lambda: a.reset_session("tiny", "shared"),
            lambda: a.end_session("tiny", "shared"),
        ):
            assert _code(fn)[0] is C.NOT_FOUND
        # Continuing B's sequence from B's seq: for A there is no such session.
        assert _code(lambda: a.predict("tiny", "shared", np.ones((1, 3)), seq=4))[0] is C.NOT_FOUND
        assert _code(lambda: a.forecast("tiny", "shared", 2))[0] is C.NOT_FOUND
        assert b_state() == before
        # A's steps make A's own session, from a zero state: exactly one pass over A's input.
        ya = a.predict("tiny", "shared", x[:3], seq=0).y
        ya = np.concatenate([ya, a.predict("tiny", "shared", x[3:], seq=3).y])
        np.testing.assert_allclose(ya, oracle.run(x)[0], atol=ATOL)
        a.reset_session("tiny", "shared")
        a.end_session("tiny", "shared")
        assert b_state() == before
        assert b.get_session("tiny", "shared").next_seq == 4
        # A gateway frame naming B's session id also stays in A's namespace.
        frame = [session_steps("shared", np.ones((1, 3))), session_steps("other", np.ones((1, 3)))]
        assert [r.next_seq for r in a.step(step_request("tiny", frame))] == [1, 1]
        assert b_state() == before
    finally:
        a.close()
        b.close()


# -- what errors say -----------------------------------------------------------------------------


def test_error_messages_carry_no_internals(
    tiny_repo: Path, token_server: ServerThread, tmp_path: Path
) -> None:
    leaks = (
        "Traceback",
        'File "',
        "<class",
        "Error:",
        "Exception",
        str(tiny_repo),
        "/tmp",
        "/work",
        "site-packages",
        ".py",
    )
    details: list[str] = []
    with (
        ServerThread(model_repository=tiny_repo, snapshot_dir=tmp_path / "snap") as srv,
        Client(srv.target) as c,
    ):
        stub = c.stub
        calls = [
            lambda: c.predict("nope", "s", np.ones((1, 3))),
            lambda: c.predict("tiny", "s", np.ones((1, 3)), version="9"),
            lambda: c.predict("tiny", "s", np.full((1, 3), np.nan)),
            lambda: c.predict("tiny", "s", np.ones(4)),
            lambda: c.predict("tinytok", "s", tokens=[99]),
            lambda: c.predict("tiny", "", np.ones((1, 3))),
            lambda: c.predict("tiny", "never", np.ones((1, 3)), seq=7),
            lambda: c.forecast("tiny", "never", 3),
            lambda: c.forecast("tiny", "s", 0),
            lambda: c.get_model("nope"),
            lambda: c.end_session("tiny", "never"),
            lambda: stub.Predict(pb.StepRequest(model=pb.ModelRef(name="tiny"))),
            lambda: stub.Predict(
                pb.StepRequest(
                    model=pb.ModelRef(name="tiny"),
                    sessions=[pb.SessionSteps(session_id="s", x=b"\x00" * 5)],
                )
            ),
        ]
        for fn in calls:
            code, text = _code(fn)
            assert code is not C.OK
            details.append(text)
        # An unexpected failure inside the server: INTERNAL with a generic text only.
        lm = srv.engine.model("tiny")
        real = lm.scheduler.runtime

        class Broken:
            mv = real.mv

            def run(self, *a: Any) -> Any:
                raise RuntimeError(f"secret detail from {tiny_repo}/tiny/1/model.onnx")

        lm.scheduler.runtime = Broken()
        try:
            code, text = _code(lambda: c.predict("tiny", "boom", np.ones((1, 3))))
        finally:
            lm.scheduler.runtime = real
        assert (code, text) == (C.INTERNAL, "internal error")
        assert not c.get_session("tiny", "boom").exists  # and it changed nothing
    with Client(token_server.target) as c:
        details.append(_code(lambda: c.list_models())[1])
    with Client(Connection(token_server.target, token="bad")) as c:
        details.append(_code(lambda: c.list_models())[1])
    for text in details:
        assert text, "every refusal says why"
        for leak in leaks:
            assert leak not in text, (leak, text)


# -- metrics -------------------------------------------------------------------------------------


def test_metrics_on_their_own_port(token_server: ServerThread) -> None:
    srv = token_server
    assert srv.server.metrics_port not in (0, srv.server.port)
    body = urllib.request.urlopen(srv.metrics_url, timeout=5).read().decode()
    assert "lstm_serve_requests_total" in body and "grpc_server_handled_total" in body
    # The gRPC port speaks HTTP/2 only: a plain HTTP/1.1 GET /metrics gets no metrics.
    with socket.create_connection(("127.0.0.1", srv.server.port), timeout=5) as s:
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        s.settimeout(2)
        data = b""
        try:
            while chunk := s.recv(65536):
                data += chunk
        except (TimeoutError, ConnectionError):
            pass
    assert b"lstm_serve_" not in data and not data.startswith(b"HTTP/1.1 200")
