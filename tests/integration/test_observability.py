"""Observability of a real server: Prometheus metrics scraped over HTTP, the standard gRPC health
service, server reflection, and the startup logs."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from lstm_serve.client import Client, session_steps, step_request
from lstm_serve.core.runtime import choose_device
from tests.helpers.metrics import eventually, scrape, value
from tests.helpers.server import ServerThread, xs

SERVICE = "lstm_serve.v1.LstmServe"
TINY = {"model": "tiny:1"}
PREDICT = {"grpc_service": SERVICE, "grpc_method": "Predict", "grpc_type": "unary"}
STREAM = {"grpc_service": SERVICE, "grpc_method": "Stream", "grpc_type": "bidi_stream"}

# -- metrics ---------------------------------------------------------------------------------


def test_metrics_count_the_steps_just_made(server: ServerThread, client: Client) -> None:
    before = scrape(server)
    client.predict("tiny", "obs-steps-a", xs(1, 5), seq=0)  # 5 steps, 1 session
    client.predict("tiny", "obs-steps-a", xs(2, 2), seq=5)  # 2 steps
    frame = step_request("tiny", [session_steps(f"obs-frame-{i}", xs(3 + i, 3)) for i in range(4)])
    client.step(frame)  # one batch of 4 sessions x 3 steps
    client.predict("tinytok", "obs-steps-t", tokens=[1, 2, 3])
    after = scrape(server)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("lstm_serve_steps_total", **TINY) == 5 + 2 + 4 * 3
    assert delta("lstm_serve_steps_total", model="tinytok:1") == 3
    # One observation per batch: three batches of sizes 1, 1 and 4.
    assert delta("lstm_serve_batch_size_count", **TINY) == 3
    assert delta("lstm_serve_batch_size_sum", **TINY) == 1 + 1 + 4
    assert delta("lstm_serve_batch_size_bucket", le="1.0", **TINY) == 2
    assert delta("lstm_serve_batch_size_bucket", le="4.0", **TINY) == 3
    assert delta("lstm_serve_inference_seconds_count", **TINY) == 3
    assert delta("lstm_serve_queue_seconds_count", **TINY) == 3
    # One latency observation per successful Step request.
    assert delta("lstm_serve_step_latency_seconds_count", **TINY) == 3
    assert delta("lstm_serve_step_latency_seconds_sum", **TINY) > 0
    assert delta("lstm_serve_requests_total", method="Step", code="OK", **TINY) == 3
    assert delta("grpc_server_handled_total", grpc_code="OK", **PREDICT) == 4
    assert delta("grpc_server_started_total", **PREDICT) == 4
    assert delta("grpc_server_handling_seconds_count", **PREDICT) == 4
    assert delta("grpc_server_msg_received_total", **PREDICT) == 4
    assert delta("grpc_server_msg_sent_total", **PREDICT) == 4


def test_metrics_count_a_bad_request_by_code(server: ServerThread, client: Client) -> None:
    before = scrape(server)
    nan = np.full((2, 3), np.nan, np.float32)
    with pytest.raises(grpc.RpcError) as info:
        client.predict("tiny", "obs-bad", nan)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as info:
        client.predict("tiny", "obs-bad", xs(9, 1), seq=5)  # an unknown session past seq 0
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    # The interceptor counts a call once its status is sent, which can be just after the
    # client has it: wait (bounded) for the second call's count before reading the rest.
    handled = {"grpc_code": "NOT_FOUND", **PREDICT}
    deadline = time.monotonic() + 5
    after = scrape(server)
    while (
        value(after, "grpc_server_handled_total", **handled)
        == value(before, "grpc_server_handled_total", **handled)
        and time.monotonic() < deadline
    ):
        time.sleep(0.01)
        after = scrape(server)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    bad = {"method": "Step", "code": "INVALID_ARGUMENT", **TINY}
    assert delta("lstm_serve_requests_total", **bad) == 1
    assert delta("lstm_serve_requests_total", method="Step", code="NOT_FOUND", **TINY) == 1
    assert delta("lstm_serve_requests_total", method="Step", code="OK", **TINY) == 0
    assert delta("lstm_serve_steps_total", **TINY) == 0
    assert delta("lstm_serve_step_latency_seconds_count", **TINY) == 0
    assert delta("grpc_server_handled_total", grpc_code="INVALID_ARGUMENT", **PREDICT) == 1
    assert delta("grpc_server_handled_total", grpc_code="NOT_FOUND", **PREDICT) == 1
    assert delta("grpc_server_handled_total", grpc_code="OK", **PREDICT) == 0


def test_unknown_model_names_do_not_become_metric_labels(
    server: ServerThread, client: Client
) -> None:
    """A client must not be able to mint label values: one series per bogus name would let any
    caller blow up the server's memory and Prometheus's."""
    names = [f"no-such-model-{i}" for i in range(3)]
    for name in names:
        with pytest.raises(grpc.RpcError) as info:
            client.predict(name, "s", xs(1, 1))
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
    samples = scrape(server)
    assert value(samples, "lstm_serve_requests_total", code="NOT_FOUND", method="Step") >= 3
    labels = {lab.get("model") for _, lab, _ in samples}
    assert not labels & set(names)


def test_sessions_gauge_follows_live_sessions(server: ServerThread, client: Client) -> None:
    def gauge() -> float:
        return value(scrape(server), "lstm_serve_sessions", **TINY)

    start = gauge()
    for i in range(3):
        client.predict("tiny", f"obs-gauge-{i}", xs(10 + i, 1))
    assert gauge() == start + 3
    client.predict("tiny", "obs-gauge-0", xs(13, 1))  # an existing session: no change
    assert gauge() == start + 3
    client.end_session("tiny", "obs-gauge-0")
    assert gauge() == start + 2
    client.end_session("tiny", "obs-gauge-1")
    client.end_session("tiny", "obs-gauge-2")
    assert gauge() == start


def test_capacity_gauge_states_the_session_cap(server: ServerThread) -> None:
    # The near-cap alert and the dashboard divide by it: it must exist for every loaded model.
    cap = server.settings.max_sessions
    assert value(scrape(server), "lstm_serve_sessions_capacity", **TINY) == cap


def test_stream_metrics(server: ServerThread, client: Client) -> None:
    before = scrape(server)
    x = xs(20, 6)
    reqs = [
        step_request("tiny", [session_steps("obs-stream", x[i : i + 2], seq=i)])
        for i in range(0, 6, 2)
    ]
    responses = list(client.stub.Stream(iter(reqs), timeout=10))
    assert [r.sessions[0].next_seq for r in responses] == [2, 4, 6]

    def handled() -> float:
        return value(scrape(server), "grpc_server_handled_total", grpc_code="OK", **STREAM)

    # The server records a stream when it finishes, which may be just after the client saw it.
    base = value(before, "grpc_server_handled_total", grpc_code="OK", **STREAM)
    assert eventually(lambda: handled() == base + 1)
    after = scrape(server)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("grpc_server_started_total", **STREAM) == 1
    assert delta("grpc_server_msg_received_total", **STREAM) == 3
    assert delta("grpc_server_msg_sent_total", **STREAM) == 3
    assert delta("grpc_server_handling_seconds_count", **STREAM) == 1
    assert delta("lstm_serve_steps_total", **TINY) == 6
    assert delta("lstm_serve_requests_total", method="Step", code="OK", **TINY) == 3

    # A stream that ends on an error is counted with that error's code.
    bad = [
        step_request("tiny", [session_steps("obs-stream-bad", xs(21, 1), seq=0)]),
        step_request("tiny", [session_steps("obs-stream-bad", xs(22, 1), seq=7)]),
    ]
    with pytest.raises(grpc.RpcError) as info:
        list(client.stub.Stream(iter(bad), timeout=10))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert eventually(
        lambda: (
            value(
                scrape(server),
                "grpc_server_handled_total",
                grpc_code="FAILED_PRECONDITION",
                **STREAM,
            )
            == value(before, "grpc_server_handled_total", grpc_code="FAILED_PRECONDITION", **STREAM)
            + 1
        )
    )


def test_metrics_use_base_units_and_histograms(server: ServerThread) -> None:
    samples = scrape(server)
    names = {n for n, _, _ in samples}
    for hist in (
        "lstm_serve_step_latency_seconds",
        "lstm_serve_queue_seconds",
        "lstm_serve_inference_seconds",
        "lstm_serve_batch_size",
        "grpc_server_handling_seconds",
    ):
        assert {f"{hist}_bucket", f"{hist}_count", f"{hist}_sum"} <= names, hist
    for metric in ("lstm_serve_steps_total", "lstm_serve_requests_total"):
        assert metric in names
    # Every lstm_serve_* series carries a model label, but the process's own build info
    # (tests/integration/test_build_info.py).
    for n, lab, _ in samples:
        if n.startswith("lstm_serve_") and n != "lstm_serve_build_info":
            assert "model" in lab, n


# -- health ----------------------------------------------------------------------------------


def test_health_service(server: ServerThread) -> None:
    with grpc.insecure_channel(server.target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", SERVICE, "tiny", "tinytok"):
            resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING, service
        with pytest.raises(grpc.RpcError) as info:
            stub.Check(health_pb2.HealthCheckRequest(service="no-such-model"), timeout=5)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
    with Client(server.target) as c:
        assert c.health() == "SERVING"
        assert c.health("tinytok") == "SERVING"


@pytest.mark.filterwarnings("ignore:coroutine .* was never awaited:RuntimeWarning")
def test_health_watch(server: ServerThread) -> None:
    """grpc.health.v1 Watch (used by Envoy and other load balancers) streams the status."""
    with grpc.insecure_channel(server.target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        watch = stub.Watch(health_pb2.HealthCheckRequest(service="tiny"), timeout=5)
        try:
            first = next(watch)
            assert first.status == health_pb2.HealthCheckResponse.SERVING
        finally:
            watch.cancel()


# -- reflection ------------------------------------------------------------------------------


def test_reflection_lists_and_describes_the_service(server: ServerThread) -> None:
    with grpc.insecure_channel(server.target) as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        services = set(db.get_services())
        assert SERVICE in services
        assert "grpc.health.v1.Health" in services
        fdp = db.FindFileContainingSymbol(SERVICE)
        assert isinstance(fdp, descriptor_pb2.FileDescriptorProto)
        assert fdp.package == "lstm_serve.v1"
        assert fdp.name.endswith("lstm_serve.proto")
        pool = descriptor_pool.DescriptorPool(db)
        svc = pool.FindServiceByName(SERVICE)
        assert {
            "Stream",
            "Predict",
            "Forecast",
            "GetSession",
            "ResetSession",
            "EndSession",
            "ListModels",
            "GetModel",
        } <= set(svc.methods_by_name)
        stream = svc.methods_by_name["Stream"]
        assert stream.input_type.full_name == "lstm_serve.v1.StepRequest"
        assert stream.output_type.full_name == "lstm_serve.v1.StepResponse"
        steps = pool.FindMessageTypeByName("lstm_serve.v1.SessionSteps")
        assert {"session_id", "seq", "reset", "x", "tokens"} <= set(steps.fields_by_name)


# -- logs ------------------------------------------------------------------------------------


def test_startup_logs_device_once_and_no_errors(
    tiny_repo: Path, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.INFO)
    choose_device.cache_clear()  # the decision is made once per process; make it here
    with ServerThread(model_repository=tiny_repo) as srv, Client(srv.target) as c:
        c.predict("tiny", "log", xs(30, 1))
        device = srv.engine.device
    records = [r for r in caplog.records if r.name.startswith("lstm_serve")]
    decisions = [r for r in records if "inference device" in r.getMessage()]
    assert len(decisions) == 1, [r.getMessage() for r in decisions]
    assert device in decisions[0].getMessage()
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]
    # Both models were loaded and logged, each with the device it runs on.
    loaded = [r.getMessage() for r in records if "loaded" in r.getMessage()]
    assert any("tiny:1" in m for m in loaded) and any("tinytok:1" in m for m in loaded)
    # ONNX Runtime's own (C++) logger must not print errors either (e.g. a failed CUDA probe).
    _, err = capfd.readouterr()
    assert "[E:onnxruntime" not in err, err
