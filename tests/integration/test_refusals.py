"""Requests the server must refuse before applying anything, with a message that says why:
answers over a receive limit (every method, both protocols), top_k where it does not apply,
receive limits that are not limits, retries that are not retries, and a full session cap."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from lstm_serve.client import Client, frame_request, session_steps, step_request
from lstm_serve.server.pb import grpc_service_pb2_grpc as ipb_grpc
from lstm_serve.server.pb import lstm_serve_pb2 as pb
from tests.helpers.server import ServerThread, all_states, connect, serve, xs
from tests.integration.test_kserve_protocol import infer

INVALID = grpc.StatusCode.INVALID_ARGUMENT
LIMIT_KEY = "lstm-serve-max-response-bytes"


@pytest.fixture(scope="module")
def server(tiny_repo: Path) -> Iterator[ServerThread]:
    yield from serve(tiny_repo, max_message_bytes=64 * 1024, max_forecast_horizon=100_000)


@pytest.fixture(scope="module")
def client(server: ServerThread) -> Iterator[Client]:
    yield from connect(server)


def _refused(fn: object, code: grpc.StatusCode = INVALID) -> str:
    with pytest.raises(grpc.RpcError) as err:
        fn()  # type: ignore[operator]
    assert err.value.code() is code, err.value.details()
    return err.value.details() or ""


def test_a_forecast_over_the_clients_limit_is_refused_and_not_applied(
    server: ServerThread, client: Client
) -> None:
    client.predict("tiny", "fc-big", xs(1, 2), seq=0)
    before = all_states(server)
    req = pb.ForecastRequest(
        model=pb.ModelRef(name="tiny"), session_id="fc-big", horizon=4096, commit=True
    )
    md = ((LIMIT_KEY, "10000"),)  # 4096 x 3 float32 = 48 kB > 10 kB
    msg = _refused(lambda: client.stub.Forecast(req, metadata=md))
    assert "10000 allowed" in msg and "shorter horizon" in msg
    assert all_states(server) == before
    assert client.get_session("tiny", "fc-big").next_seq == 2
    # Under the limit, the same call is answered and applied.
    small = pb.ForecastRequest(
        model=pb.ModelRef(name="tiny"), session_id="fc-big", horizon=500, commit=True
    )
    assert client.stub.Forecast(small, metadata=md).next_seq == 502


def test_a_forecast_over_the_servers_message_limit_is_refused(
    server: ServerThread, client: Client
) -> None:
    client.predict("tiny", "fc-big2", xs(2, 1), seq=0)
    before = all_states(server)
    # 8,000 x 3 float32 = 96 kB against the server's 64 KiB.
    msg = _refused(lambda: client.forecast("tiny", "fc-big2", 8000, commit=True))
    assert str(64 * 1024) in msg
    assert all_states(server) == before


def test_the_open_inference_protocol_honours_the_clients_limit(server: ServerThread) -> None:
    with grpc.insecure_channel(server.target) as ch:
        stub = ipb_grpc.GRPCInferenceServiceStub(ch)
        stub.ModelInfer(infer("tiny", xs(3, 2)[None], seq_id="oip-lim", start=True))
        before = all_states(server)
        x = xs(4, 1000)[None]  # 1000 x 3 float32 = 12 kB out
        md = ((LIMIT_KEY, "5000"),)
        req = infer("tiny", x, seq_id="oip-lim")
        msg = _refused(lambda: stub.ModelInfer(req, metadata=md))
        assert "5000 allowed" in msg
        assert all_states(server) == before
        # Without the client's limit, the server's 64 KiB allows it.
        assert stub.ModelInfer(req).outputs[0].shape == [1, 1000, 3]


@pytest.mark.parametrize("value", ["0", "-5", "100", "lots", "1.5e3x", "nan"])
def test_a_receive_limit_that_is_no_limit_is_refused(
    server: ServerThread, client: Client, value: str
) -> None:
    before = all_states(server)
    req = step_request("tiny", [session_steps("lim-bad", xs(5, 1), seq=0)])
    msg = _refused(lambda: client.stub.Predict(req, metadata=((LIMIT_KEY, value),)))
    assert LIMIT_KEY in msg and repr(value) in msg
    assert all_states(server) == before


def test_a_receive_limit_in_float_notation_is_a_number(client: Client) -> None:
    req = step_request("tiny", [session_steps("lim-1e6", xs(6, 2), seq=0)])
    out = client.stub.Predict(req, metadata=((LIMIT_KEY, "1e6"),))
    assert out.sessions[0].next_seq == 2


def test_top_k_on_a_real_valued_model_is_refused(server: ServerThread, client: Client) -> None:
    before = all_states(server)
    one = step_request("tiny", [session_steps("topk-real", xs(7, 1), seq=0)], top_k=3)
    assert "real-valued" in _refused(lambda: client.step(one))
    frame = frame_request("tiny", ["topk-a", "topk-b"], np.ones((2, 1, 3), np.float32), top_k=3)
    assert "real-valued" in _refused(lambda: client.step(frame))
    assert all_states(server) == before


def test_top_k_over_the_vocabulary_is_refused(server: ServerThread, client: Client) -> None:
    before = all_states(server)  # tinytok has 12 tokens
    one = step_request("tinytok", [session_steps("topk-tok", tokens=[1, 2], seq=0)], top_k=13)
    assert "vocabulary of 12" in _refused(lambda: client.step(one))
    msg = _refused(lambda: client.forecast("tinytok", "topk-tok", 3, temperature=1.0, top_k=13))
    assert "vocabulary of 12" in msg
    assert all_states(server) == before
    # k equal to the vocabulary is every token, most likely first.
    out = client.predict("tinytok", "topk-tok", tokens=[1, 2], seq=0, top_k=12)
    assert [len(t) for t in out.top_k] == [12, 12]


def test_a_retry_with_another_number_of_steps_says_it_was_applied(client: Client) -> None:
    client.predict("tiny", "retry-n", xs(8, 3), seq=0)
    client.predict("tiny", "retry-n", xs(9, 2), seq=3)
    with pytest.raises(grpc.RpcError) as err:
        client.predict("tiny", "retry-n", xs(9, 3), seq=3)
    assert err.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    msg = err.value.details() or ""
    assert "seq 3 was already applied with different inputs" in msg and "expected seq 5" in msg
    # A seq inside an earlier request (not where one began) cannot be answered again either.
    with pytest.raises(grpc.RpcError) as err:
        client.predict("tiny", "retry-n", xs(9, 1), seq=1)
    msg = err.value.details() or ""
    assert "seq 1 was already applied" in msg and "expected seq 5" in msg
    assert client.get_session("tiny", "retry-n").next_seq == 5


def test_a_full_cap_says_what_was_asked_and_what_is_free(tiny_repo: Path) -> None:
    with (
        ServerThread(model_repository=tiny_repo, max_sessions=20, cap_policy="refuse") as srv,
        Client(srv.target) as c,
    ):
        c.predict("tiny", "only", xs(10, 1), seq=0)
        ids = [f"cap-{i}" for i in range(21)]
        with pytest.raises(grpc.RpcError) as err:
            c.step_frame("tiny", ids, np.ones((21, 1, 3), np.float32))
        assert err.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        msg = err.value.details() or ""
        assert "starts 21 new sessions" in msg and "19 of its 20" in msg


@pytest.mark.parametrize(
    ("name", "symbol"),
    [
        ("grpc/health/v1/health.proto", "grpc.health.v1.Health"),
        ("grpc/reflection/v1alpha/reflection.proto", "grpc.reflection.v1alpha.ServerReflection"),
        ("lstm_serve/v1/lstm_serve.proto", "lstm_serve.v1.LstmServe"),
    ],
)
def test_reflection_answers_every_service_file_by_name(
    server: ServerThread, name: str, symbol: str
) -> None:
    from google.protobuf import descriptor_pb2
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(server.target) as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        req = reflection_pb2.ServerReflectionRequest(file_by_filename=name)
        resp = next(iter(stub.ServerReflectionInfo(iter([req]))))
    assert resp.WhichOneof("message_response") == "file_descriptor_response", resp
    files = [
        descriptor_pb2.FileDescriptorProto.FromString(b)
        for b in resp.file_descriptor_response.file_descriptor_proto
    ]
    package, service = symbol.rsplit(".", 1)
    assert any(f.package == package and service in [s.name for s in f.service] for f in files)
