"""The Open Inference Protocol through the generated stubs (no tritonclient): bad input, one core
under both protocols, restarts, what is not implemented, authentication."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from lstm_serve.client import Client
from lstm_serve.server.pb import grpc_service_pb2 as ipb
from lstm_serve.server.pb import grpc_service_pb2_grpc as ipb_grpc
from tests.helpers.server import ServerThread, all_states, code_of, inference_blocked, serve, xs
from tests.oracle.one_pass import OnePass

INVALID = grpc.StatusCode.INVALID_ARGUMENT


def infer(
    model: str,
    x: np.ndarray,
    *,
    seq_id: str | int | None = None,
    start: bool = False,
    end: bool = False,
    raw: bool = True,
    datatype: str = "FP32",
    **params: int,
) -> ipb.ModelInferRequest:
    req = ipb.ModelInferRequest(model_name=model)
    t = req.inputs.add(name="x", datatype=datatype, shape=list(x.shape))
    if raw:
        req.raw_input_contents.append(x.tobytes())
    elif datatype == "FP32":
        t.contents.fp32_contents.extend(x.ravel().tolist())
    elif datatype == "INT32":
        t.contents.int_contents.extend(x.ravel().tolist())
    else:
        t.contents.int64_contents.extend(x.ravel().tolist())
    if seq_id is not None:
        if isinstance(seq_id, str):
            req.parameters["sequence_id"].string_param = seq_id
        else:
            req.parameters["sequence_id"].uint64_param = seq_id
        req.parameters["sequence_start"].bool_param = start
        req.parameters["sequence_end"].bool_param = end
    for k, v in params.items():
        req.parameters[k].int64_param = v
    return req


def y_of(resp: ipb.ModelInferResponse) -> np.ndarray:
    o = resp.outputs[0]
    if resp.raw_output_contents:
        return np.frombuffer(resp.raw_output_contents[0], "<f4").reshape(list(o.shape))
    return np.array(o.contents.fp32_contents, np.float32).reshape(list(o.shape))


@pytest.fixture(scope="module")
def server(tiny_repo: Path) -> Iterator[ServerThread]:
    yield from serve(tiny_repo, max_steps_per_request=50, max_sessions_per_request=4)


@pytest.fixture(scope="module")
def stub(server: ServerThread) -> Iterator[ipb_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(server.target) as ch:
        yield ipb_grpc.GRPCInferenceServiceStub(ch)


def _bad() -> list[tuple[str, ipb.ModelInferRequest, str]]:
    one = xs(1, 2)
    cases = [
        ("no inputs", ipb.ModelInferRequest(model_name="tiny"), "expects one input, 'x'; got none"),
        ("wrong datatype", infer("tiny", one[None].astype(np.float64), datatype="FP64", seq_id="victim"), "datatype FP64"),
        ("wrong rank", infer("tiny", one.ravel(), seq_id="victim"), "expected [batch, steps, input_dim]"),
        ("NaN", infer("tiny", np.full((1, 2, 3), np.nan, np.float32), seq_id="victim"), "NaN or Inf"),
        ("too many steps", infer("tiny", xs(2, 51)[None], seq_id="victim"), "at most 50"),
        ("batch over the limit", infer("tiny", np.zeros((5, 1, 3), np.float32)), "at most 4"),
        ("empty", infer("tiny", np.zeros((1, 0, 3), np.float32), seq_id="victim"), "no steps"),
        ("start at seq 3", infer("tiny", one[None], seq_id="victim", start=True, lstm_serve_seq=3), "sequence_start begins at lstm_serve_seq 0"),
        ("seq without sequence", infer("tiny", one[None], lstm_serve_seq=0), "need a sequence_id"),
        ("token out of range", infer("tinytok", np.array([[1, 99]], np.int64), datatype="INT64", seq_id="victim"), "outside the vocabulary"),
        ("tokens as floats", infer("tinytok", np.array([[1.0, 2.0]], np.float32), seq_id="victim"), "takes INT64 or INT32"),
    ]  # fmt: skip
    short = infer("tiny", one[None], seq_id="victim")
    short.raw_input_contents[0] = short.raw_input_contents[0][:-4]
    cases.append(("raw bytes short", short, "needs 24"))
    typed = infer("tiny", one[None], seq_id="victim", raw=False)
    del typed.inputs[0].contents.fp32_contents[-1]
    cases.append(("typed values short", typed, "shape [1, 2, 3] needs 6"))
    other = infer("tiny", one[None], seq_id="victim")
    other.outputs.add(name="hn")
    cases.append(("unknown output", other, "unexpected inference output 'hn'"))
    bad_k = infer("tinytok", np.array([[1]], np.int64), datatype="INT64", seq_id="victim")
    bad_k.outputs.add(name="y").parameters["classification"].int64_param = 0
    cases.append(("classification 0", bad_k, "classification must be an integer >= 1"))
    return cases


@pytest.mark.parametrize(("name", "req", "text"), _bad(), ids=[c[0] for c in _bad()])
def test_bad_input_is_refused_and_changes_nothing(
    server: ServerThread,
    stub: ipb_grpc.GRPCInferenceServiceStub,
    name: str,
    req: ipb.ModelInferRequest,
    text: str,
) -> None:
    for model, x, dt in (
        ("tiny", xs(0, 4)[None], "FP32"),
        ("tinytok", np.array([[1, 2]]), "INT64"),
    ):
        stub.ModelInfer(infer(model, x, seq_id="victim", start=True, datatype=dt))
    before = all_states(server)
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(req)
    assert info.value.code() == INVALID, info.value.details()
    assert text in (info.value.details() or "")
    assert all_states(server) == before


def test_one_core_under_both_protocols(
    server: ServerThread, stub: ipb_grpc.GRPCInferenceServiceStub, oracle: OnePass
) -> None:
    """A Triton sequence is a session: v1 continues it, Triton ends it; one pass throughout."""
    x = xs(3, 9)
    first = stub.ModelInfer(infer("tiny", x[:3][None], seq_id="shared", start=True))
    with Client(server.target) as c:
        mid = c.predict("tiny", "shared", x[3:6], seq=3)
    last = stub.ModelInfer(infer("tiny", x[6:][None], seq_id="shared", end=True))
    got = np.concatenate([y_of(first)[0], mid.y, y_of(last)[0]])
    np.testing.assert_allclose(got, oracle.run(x)[0], atol=1e-5)
    assert last.parameters["lstm_serve_next_seq"].int64_param == 9
    assert server.engine.models[("tiny", "1")].store.slot("shared") is None  # ended


def test_typed_token_input_and_output(
    stub: ipb_grpc.GRPCInferenceServiceStub, tok_oracle: OnePass
) -> None:
    ids = np.array([[3, 1, 4, 1, 5]], np.int32)
    resp = stub.ModelInfer(infer("tinytok", ids, raw=False, datatype="INT32"))
    assert not resp.raw_output_contents  # typed in, typed out
    assert list(resp.outputs[0].shape) == [1, 5, 12]
    np.testing.assert_allclose(y_of(resp)[0], tok_oracle.run(ids[0].astype(np.int64))[0], atol=1e-5)
    unbatched = stub.ModelInfer(infer("tinytok", ids[0].astype(np.int64), datatype="INT64"))
    assert list(unbatched.outputs[0].shape) == [5, 12]


def test_stream_refuses_a_bad_message_and_goes_on(
    stub: ipb_grpc.GRPCInferenceServiceStub, oracle: OnePass
) -> None:
    x = xs(4, 4)
    reqs = [
        infer("tiny", x[:2][None], seq_id=31, start=True),
        infer("tiny", np.zeros((1, 1, 5), np.float32), seq_id=31),
        infer("nope", x[:1][None]),
        infer("tiny", x[2:][None], seq_id=31, end=True),
    ]
    out = list(stub.ModelStreamInfer(iter(reqs)))
    assert [bool(r.error_message) for r in out] == [False, True, True, False]
    assert "5 features per step" in out[1].error_message
    assert out[2].error_message == "Request for unknown model: 'nope' is not found"
    got = np.concatenate([y_of(out[0].infer_response)[0], y_of(out[3].infer_response)[0]])
    np.testing.assert_allclose(got, oracle.run(x)[0], atol=1e-5)


def test_unimplemented_rpcs_say_so(stub: ipb_grpc.GRPCInferenceServiceStub) -> None:
    # ModelStatistics is served: tests/integration/test_statistics.py.
    assert code_of(lambda: stub.TraceSetting(ipb.TraceSettingRequest())) == (
        grpc.StatusCode.UNIMPLEMENTED
    )


def test_sequences_survive_a_restart(tiny_repo: Path, tmp_path: Path, oracle: OnePass) -> None:
    x = xs(5, 6)
    snap = tmp_path / "snap"
    ys = []
    for part, kw in ((x[:4], {"start": True}), (x[4:], {"end": True})):
        with (
            ServerThread(model_repository=tiny_repo, snapshot_dir=snap, metrics_port=-1) as srv,
            grpc.insecure_channel(srv.target) as ch,
        ):
            stub = ipb_grpc.GRPCInferenceServiceStub(ch)
            ys.append(y_of(stub.ModelInfer(infer("tiny", part[None], seq_id=2**64 - 1, **kw)))[0])
    np.testing.assert_allclose(np.concatenate(ys), oracle.run(x)[0], atol=1e-5)


def test_authentication_applies(tiny_repo: Path) -> None:
    with (
        ServerThread(
            model_repository=tiny_repo, auth_tokens="alice:s3cret", metrics_port=-1
        ) as srv,
        grpc.insecure_channel(srv.target) as ch,
    ):
        stub = ipb_grpc.GRPCInferenceServiceStub(ch)
        req = infer("tiny", xs(6, 1)[None])
        assert code_of(lambda: stub.ModelInfer(req)) == grpc.StatusCode.UNAUTHENTICATED
        resp = stub.ModelInfer(req, metadata=[("authorization", "Bearer s3cret")])
        assert list(resp.outputs[0].shape) == [1, 1, 3]


def test_readiness_follows_the_models_and_draining(tiny_repo: Path) -> None:
    with (
        ServerThread(model_repository=tiny_repo, inference_stall_s=0.3, metrics_port=-1) as srv,
        grpc.insecure_channel(srv.target) as ch,
    ):
        stub = ipb_grpc.GRPCInferenceServiceStub(ch)

        def ready(name: str = "") -> bool:
            if not name:
                return stub.ServerReady(ipb.ServerReadyRequest()).ready
            return stub.ModelReady(ipb.ModelReadyRequest(name=name)).ready

        assert ready() and ready("tiny") and ready("tinytok")
        assert not ready("nope")
        assert not stub.ModelReady(ipb.ModelReadyRequest(name="tiny", version="9")).ready
        with inference_blocked(srv):
            req = infer("tiny", xs(1, 2)[None])
            assert code_of(lambda: stub.ModelInfer(req, timeout=20)) == grpc.StatusCode.UNAVAILABLE
            # A stalled worker: that model and the server are not ready; the other model is.
            assert not ready("tiny") and not ready()
            assert ready("tinytok")
        srv.engine.stop_accepting()  # draining
        assert not ready("tinytok") and not ready()
        assert stub.ServerLive(ipb.ServerLiveRequest()).live


def test_ping_pong_bench_runs(tiny_repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The command behind docs/benchmarks.md's OIP figures, on a few rounds."""
    from lstm_serve.bench import oip

    args = ["--repository", str(tiny_repo), "--model", "tiny", "--rounds", "40", "--warmup", "10"]
    assert oip.main(args) == 0
    res = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert res["rounds"] == 40
    assert res["oip"]["p50"] > 0 and res["v1"]["p50"] > 0
    assert res["ratio_p50"] == pytest.approx(res["oip"]["p50"] / res["v1"]["p50"])
