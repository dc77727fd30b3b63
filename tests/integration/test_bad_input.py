"""Invariant 8: bad input gets a clear status, never crashes the server, never touches state."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from lstm_serve.client import Client, session_steps
from lstm_serve.server.pb import lstm_serve_pb2 as pb
from tests.helpers.server import ServerThread, all_states, connect, serve

INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND


@pytest.fixture(scope="module")
def server(tiny_repo: Path) -> Iterator[ServerThread]:
    yield from serve(
        tiny_repo, max_steps_per_request=50, max_sessions_per_request=8,
        max_message_bytes=64 * 1024,
    )  # fmt: skip


def _victims(c: Client) -> None:
    c.predict("tiny", "victim", np.ones((4, 3)), seq=0)
    c.predict("tinytok", "victim", tokens=[1, 2, 3], seq=0)


@pytest.fixture(scope="module")
def client(server: ServerThread) -> Iterator[Client]:
    yield from connect(server, setup=_victims)


def _raw(model: str, *steps: pb.SessionSteps, version: str = "") -> pb.StepRequest:
    return pb.StepRequest(model=pb.ModelRef(name=model, version=version), sessions=list(steps))


BAD_REQUESTS: list[tuple[str, pb.StepRequest, grpc.StatusCode, str]] = [
    ("x not whole floats", _raw("tiny", pb.SessionSteps(session_id="victim", x=b"\x00" * 7)), INVALID, "float32"),
    ("x not whole steps", _raw("tiny", session_steps("victim", np.ones(4))), INVALID, "multiple of input_dim 3"),
    ("NaN", _raw("tiny", session_steps("victim", [[1.0, np.nan, 0.0]])), INVALID, "NaN or Inf at step 0"),
    ("Inf", _raw("tiny", session_steps("victim", [[1, 1, 1], [1.0, np.inf, 0.0]])), INVALID, "NaN or Inf at step 1"),
    ("empty x", _raw("tiny", pb.SessionSteps(session_id="victim")), INVALID, "no steps"),
    ("no sessions", _raw("tiny"), INVALID, "no sessions"),
    ("too many steps", _raw("tiny", session_steps("victim", np.ones((51, 3)))), INVALID, "at most 50"),
    ("too many sessions", _raw("tiny", *[session_steps(f"s{i}", np.ones((1, 3))) for i in range(9)]), INVALID, "at most 8"),
    ("tokens to a real model", _raw("tiny", session_steps("victim", tokens=[1])), INVALID, "takes x"),
    ("x to a token model", _raw("tinytok", session_steps("victim", np.ones((1, 1)))), INVALID, "takes tokens"),
    ("token id too big", _raw("tinytok", session_steps("victim", tokens=[1, 12])), INVALID, "token id 12 at step 1"),
    ("negative token id", _raw("tinytok", session_steps("victim", tokens=[-1])), INVALID, "token id -1"),
    ("empty session id", _raw("tiny", session_steps("", np.ones((1, 3)))), INVALID, "session_id is empty"),
    ("10 kB session id", _raw("tiny", session_steps("s" * 10_000, np.ones((1, 3)))), INVALID, "at most 256"),
    ("control characters", _raw("tiny", session_steps("a\x00b", np.ones((1, 3)))), INVALID, "control"),
    ("duplicate session", _raw("tiny", session_steps("victim", np.ones((1, 3))), session_steps("victim", np.ones((1, 3)))), INVALID, "twice"),
    ("reset with seq", _raw("tiny", session_steps("victim", np.ones((1, 3)), seq=3, reset=True)), INVALID, "reset starts at seq 0"),
    ("unknown model", _raw("nope", session_steps("victim", np.ones((1, 3)))), NOT_FOUND, "model 'nope' not found"),
    ("unknown version", _raw("tiny", session_steps("victim", np.ones((1, 3))), version="7"), NOT_FOUND, "no version '7'"),
    ("unknown session with seq", _raw("tiny", session_steps("never-seen", np.ones((1, 3)), seq=5)), NOT_FOUND, "not found"),
    ("gap", _raw("tiny", session_steps("victim", np.ones((1, 3)), seq=99)), grpc.StatusCode.FAILED_PRECONDITION, "expected seq 4"),
    ("stale seq, no replay", _raw("tiny", session_steps("victim", np.ones((2, 3)), seq=1)), grpc.StatusCode.FAILED_PRECONDITION, "expected seq 4"),
    ("oversized message", _raw("tiny", session_steps("victim", np.ones((8000, 3)))), grpc.StatusCode.RESOURCE_EXHAUSTED, ""),
]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "request_", "code", "text"), BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS]
)
def test_bad_request_gets_clear_status_and_changes_nothing(
    server: ServerThread,
    client: Client,
    name: str,
    request_: pb.StepRequest,
    code: grpc.StatusCode,
    text: str,
) -> None:
    before = all_states(server)
    for call in (client.stub.Predict, lambda r: next(iter(client.stub.Stream(iter([r]))))):
        with pytest.raises(grpc.RpcError) as err:
            call(request_)
        assert err.value.code() is code, err.value.details()
        assert text in (err.value.details() or "")
        assert "Traceback" not in (err.value.details() or "")
    assert all_states(server) == before
    # ...and the server keeps serving.
    assert client.get_session("tiny", "victim").next_seq == 4


def test_bad_session_calls(client: Client) -> None:
    for call in (client.reset_session, client.end_session):
        with pytest.raises(grpc.RpcError) as err:
            call("tiny", "nobody")
        assert err.value.code() is NOT_FOUND
    with pytest.raises(grpc.RpcError) as err:
        client.get_model("nope")
    assert err.value.code() is NOT_FOUND
    with pytest.raises(grpc.RpcError) as err:
        client.get_session("tiny", "")
    assert err.value.code() is INVALID
