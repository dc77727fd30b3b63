"""The Open Inference Protocol's HTTP/REST form (KServe v2 REST, binary tensor extension) on a
real server with http_port=0: the same engine and sessions as the gRPC forms, outputs checked
against one pass of the NumPy oracle; and through Triton's own `tritonclient.http`."""

from __future__ import annotations

import http.client
import json
import re
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from lstm_serve.server.kserve_http import STATUS
from lstm_serve.server.pb import grpc_service_pb2 as ipb
from lstm_serve.server.pb import grpc_service_pb2_grpc as ipb_grpc
from tests.helpers.certs import Pki
from tests.helpers.server import ServerThread, all_states, serve
from tests.integration.test_kserve import TRITON_PYTHON, need_triton_client
from tests.oracle.one_pass import OnePass

ATOL = 1e-5
HLEN = "Inference-Header-Content-Length"


class Answer:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body

    def json(self) -> Any:
        n = self.headers.get(HLEN.lower())
        return json.loads(self.body[: int(n)] if n is not None else self.body)

    def binary(self) -> bytes:
        return self.body[int(self.headers[HLEN.lower()]) :]


def call(
    port: int,
    method: str,
    path: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
    context: ssl.SSLContext | None = None,
) -> Answer:
    conn: http.client.HTTPConnection = (
        http.client.HTTPSConnection("127.0.0.1", port, timeout=30, context=context)
        if context is not None
        else http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    )
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    try:
        conn.request(method, path, body=data, headers=headers or {})
        r = conn.getresponse()
        return Answer(r.status, {k.lower(): v for k, v in r.getheaders()}, r.read())
    finally:
        conn.close()


def tensor(x: np.ndarray, name: str = "x") -> dict[str, Any]:
    dt = {np.dtype(np.float32): "FP32", np.dtype(np.int64): "INT64", np.dtype(np.int32): "INT32"}
    return {"name": name, "shape": list(x.shape), "datatype": dt[x.dtype], "data": x.tolist()}


def y_of(a: Answer) -> np.ndarray:
    assert a.status == 200, a.body[:500]
    o = a.json()["outputs"][0]
    if "data" in o:
        return np.array(o["data"], np.float32).reshape(o["shape"])
    return np.frombuffer(a.binary(), np.float32).reshape(o["shape"])


def step(port: int, x: np.ndarray, model: str = "tiny", **params: Any) -> Answer:
    return call(port, "POST", f"/v2/models/{model}/infer", {"inputs": [tensor(x)], "parameters": params})  # fmt: skip


def xs(seed: int, n: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def srv(tiny_repo: Path) -> Iterator[ServerThread]:
    yield from serve(tiny_repo, http_port=0, max_sessions=64, max_steps_per_request=50)


@pytest.fixture(scope="module")
def port(srv: ServerThread) -> int:
    assert srv.server.http_port > 0
    return srv.server.http_port


@pytest.fixture(scope="module")
def stub(srv: ServerThread) -> Iterator[ipb_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(srv.target) as ch:
        yield ipb_grpc.GRPCInferenceServiceStub(ch)


def test_health_metadata_and_ready(port: int) -> None:
    for path in ("/v2/health/live", "/v2/health/ready", "/v2/models/tiny/ready"):
        a = call(port, "GET", path)
        assert (a.status, a.body) == (200, b""), path
    assert call(port, "GET", "/v2/models/tiny/versions/1/ready").status == 200
    assert call(port, "GET", "/v2/models/tiny/versions/9/ready").status == 400
    assert call(port, "GET", "/v2/models/nope/ready").status == 400
    server = call(port, "GET", "/v2").json()
    assert server["name"] == "lstm-serve" and "binary_tensor_data" in server["extensions"]
    md = call(port, "GET", "/v2/models/tiny").json()
    assert md == call(port, "GET", "/v2/models/tiny/versions/1").json()
    assert md["name"] == "tiny" and md["versions"] == ["1"]
    assert md["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, -1, 3]}]
    assert md["outputs"] == [{"name": "y", "datatype": "FP32", "shape": [-1, -1, 3]}]
    assert call(port, "GET", "/v2/models/tinytok").json()["inputs"][0]["datatype"] == "INT64"
    config = call(port, "GET", "/v2/models/tiny/config").json()["config"]
    assert config["name"] == "tiny" and "sequence_batching" in config


def test_json_batch_is_each_row_from_zero(port: int, oracle: OnePass) -> None:
    x = np.stack([xs(i, 5) for i in range(3)])
    a = call(
        port, "POST", "/v2/models/tiny/infer",
        {"id": "r1", "inputs": [tensor(x)], "outputs": [{"name": "y"}]},
    )  # fmt: skip
    assert a.headers["content-type"].startswith("application/json")
    doc = a.json()
    assert doc["id"] == "r1" and doc["model_name"] == "tiny" and doc["model_version"] == "1"
    want = np.stack([oracle.run(row)[0] for row in x])
    np.testing.assert_allclose(y_of(a), want, atol=ATOL)
    # Unbatched [steps, input_dim] is answered [steps, output_dim]; nested or flat data alike.
    flat = tensor(x[0]) | {"data": x[0].ravel().tolist()}
    a = call(port, "POST", "/v2/models/tiny/infer", {"inputs": [flat]})
    np.testing.assert_allclose(y_of(a), want[0], atol=ATOL)


def binary_request(x: np.ndarray, dt: str, **params: Any) -> tuple[bytes, dict[str, str]]:
    raw = x.tobytes()
    head = json.dumps(
        {
            "inputs": [{"name": "x", "shape": list(x.shape), "datatype": dt,
                        "parameters": {"binary_data_size": len(raw)}}],
            "outputs": [{"name": "y", "parameters": {"binary_data": True}}],
            "parameters": params,
        }
    ).encode()  # fmt: skip
    return head + raw, {HLEN: str(len(head)), "Content-Type": "application/octet-stream"}


def test_binary_tensors(port: int, oracle: OnePass, tok_oracle: OnePass) -> None:
    x = xs(3, 6)[None]
    body, headers = binary_request(x, "FP32")
    a = call(port, "POST", "/v2/models/tiny/infer", body, headers)
    assert a.status == 200, a.body
    o = a.json()["outputs"][0]
    assert o["parameters"]["binary_data_size"] == 6 * 3 * 4 and "data" not in o
    np.testing.assert_allclose(y_of(a), oracle.run(x[0])[0][None], atol=ATOL)
    ids = np.array([[1, 5, 7, 2]])
    for dt, arr in (("INT64", ids.astype(np.int64)), ("INT32", ids.astype(np.int32))):
        body, headers = binary_request(arr, dt)
        a = call(port, "POST", "/v2/models/tinytok/infer", body, headers)
        np.testing.assert_allclose(y_of(a), tok_oracle.run(ids[0])[0][None], atol=ATOL)
    # JSON in, binary out for every output (binary_data_output), and JSON INT32 ids.
    a = call(
        port, "POST", "/v2/models/tinytok/infer",
        {"inputs": [tensor(ids.astype(np.int32))], "parameters": {"binary_data_output": True}},
    )  # fmt: skip
    assert a.headers["content-type"] == "application/octet-stream"
    np.testing.assert_allclose(y_of(a), tok_oracle.run(ids[0])[0][None], atol=ATOL)


def test_sequence_over_http_and_grpc_is_one_session(
    srv: ServerThread, port: int, stub: ipb_grpc.GRPCInferenceServiceStub, oracle: OnePass
) -> None:
    x = xs(11, 12)
    parts = np.array_split(x, 4)
    for sid in ("http-a", 424242):
        ys = [y_of(step(port, parts[0][None], sequence_id=sid, sequence_start=True))[0]]
        ys.append(y_of(step(port, parts[1][None], sequence_id=sid))[0])
        # The same sequence continues over gRPC's Open Inference Protocol: one session.
        req = ipb.ModelInferRequest(model_name="tiny")
        t = req.inputs.add(name="x", datatype="FP32", shape=[1, len(parts[2]), 3])
        req.raw_input_contents.append(parts[2].tobytes())
        if isinstance(sid, int):
            req.parameters["sequence_id"].int64_param = sid
        else:
            req.parameters["sequence_id"].string_param = sid
        resp = stub.ModelInfer(req)
        assert t.name == "x"
        ys.append(np.frombuffer(resp.raw_output_contents[0], np.float32).reshape(-1, 3))
        a = step(port, parts[3][None], sequence_id=sid, sequence_end=True)
        ys.append(y_of(a)[0])
        params = a.json()["parameters"]
        assert params["lstm_serve_next_seq"] == 12 and params["lstm_serve_replayed"] is False
        np.testing.assert_allclose(np.concatenate(ys), oracle.run(x)[0], atol=ATOL)
        assert srv.engine.model("tiny").store.slot(str(sid)) is None  # ended


def test_seq_parameter_gives_exactly_once(port: int, oracle: OnePass) -> None:
    x = xs(12, 6)
    step(port, x[:3][None], sequence_id="once", sequence_start=True, lstm_serve_seq=0)
    a1 = step(port, x[3:][None], sequence_id="once", lstm_serve_seq=3)
    a2 = step(port, x[3:][None], sequence_id="once", lstm_serve_seq=3)  # a retry
    np.testing.assert_array_equal(y_of(a1), y_of(a2))
    np.testing.assert_allclose(y_of(a1)[0], oracle.run(x)[0][3:], atol=ATOL)
    assert a2.json()["parameters"]["lstm_serve_replayed"] is True
    gap = step(port, x[3:][None], sequence_id="once", lstm_serve_seq=99)
    assert gap.status == 400 and "expected seq 6" in gap.json()["error"]


def _bad(port: int) -> list[tuple[str, Answer, int, str]]:
    one = xs(1, 2)[None]
    body, headers = binary_request(one, "FP32", sequence_id="victim")
    short = (body[:-4], headers)
    return [
        ("unknown model", step(port, one, model="nope"), 404, "Request for unknown model: 'nope' is not found"),
        ("unknown version", call(port, "GET", "/v2/models/tiny/versions/9"), 404, "unknown model"),
        ("never started", step(port, one, sequence_id="ghost"), 400, "must specify the START flag"),
        ("bad shape", step(port, np.zeros((1, 2, 5), np.float32), sequence_id="victim"), 400, "5 features per step"),
        ("too many steps", step(port, xs(2, 51)[None], sequence_id="victim"), 400, "at most 50"),
        ("NaN", step(port, np.full((1, 1, 3), np.nan, np.float32), sequence_id="victim"), 400, "NaN or Inf"),
        ("batch in sequence", step(port, np.zeros((2, 1, 3), np.float32), sequence_id="victim"), 400, "batch-size 1"),
        ("token out of range", step(port, np.array([[1, 99]]), model="tinytok", sequence_id="victim"), 400, "outside the vocabulary"),
        ("not JSON", call(port, "POST", "/v2/models/tiny/infer", b"{nope"), 400, "not valid JSON"),
        ("strings as data", call(port, "POST", "/v2/models/tiny/infer", {"inputs": [tensor(one) | {"data": ["a"]}]}), 400, "array of numbers"),
        ("short binary", call(port, "POST", "/v2/models/tiny/infer", *short), 400, "runs past"),
        ("bad header length", call(port, "POST", "/v2/models/tiny/infer", body, {HLEN: "x"}), 400, HLEN),
        ("list parameter", step(port, one, sequence_id=[1]), 400, "parameter 'sequence_id'"),
        ("wrong method", call(port, "GET", "/v2/models/tiny/infer"), 405, "takes POST"),
        ("no such endpoint", call(port, "GET", "/v3"), 404, "no such endpoint"),
        ("tiny answer limit", call(port, "POST", "/v2/models/tiny/infer", {"inputs": [tensor(one)]}, {"lstm-serve-max-response-bytes": "12"}), 400, "at least 512"),
    ]  # fmt: skip


def test_errors_map_to_http_statuses_and_change_nothing(srv: ServerThread, port: int) -> None:
    assert step(port, xs(0, 3)[None], sequence_id="victim", sequence_start=True).status == 200
    tok = step(port, np.array([[1, 2]]), model="tinytok", sequence_id="victim", sequence_start=True)  # fmt: skip
    assert tok.status == 200
    before = all_states(srv)
    for name, a, status, text in _bad(port):
        assert a.status == status, (name, a.body)
        error = a.json()["error"]
        assert text in error, (name, error)
        assert "Traceback" not in error
    assert all_states(srv) == before


def test_status_table() -> None:
    assert STATUS["INVALID_ARGUMENT"] == STATUS["FAILED_PRECONDITION"] == 400
    assert (STATUS["NOT_FOUND"], STATUS["RESOURCE_EXHAUSTED"], STATUS["UNAVAILABLE"]) == (404, 429, 503)  # fmt: skip
    assert (STATUS["UNAUTHENTICATED"], STATUS["PERMISSION_DENIED"]) == (401, 403)


def test_session_cap_is_429(tiny_repo: Path) -> None:
    with ServerThread(model_repository=tiny_repo, http_port=0, max_sessions=1) as s:
        p = s.server.http_port
        assert step(p, xs(0, 1)[None], sequence_id="a", sequence_start=True).status == 200
        a = step(p, xs(0, 1)[None], sequence_id="b", sequence_start=True)
        assert a.status == 429 and a.json()["error"]


def test_tokens_and_tls(tiny_repo: Path, tmp_path: Path, oracle: OnePass) -> None:
    pki = Pki.create(tmp_path / "pki", clients=())
    ctx = ssl.create_default_context(cafile=str(pki.ca_path))
    with ServerThread(
        model_repository=tiny_repo, http_port=0, auth_tokens="alice:tok-a,bob:tok-b",
        tls_cert=pki.server.cert_path, tls_key=pki.server.key_path,
    ) as s:  # fmt: skip
        p = s.server.http_port
        assert call(p, "GET", "/v2/health/ready", context=ctx).status == 200  # open, as gRPC's
        for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "tok-a"}):
            a = call(p, "GET", "/v2/models/tiny", headers=headers, context=ctx)
            assert a.status == 401 and "token" in a.json()["error"]
        x = xs(5, 4)
        alice, bob = {"Authorization": "Bearer tok-a"}, {"Authorization": "Bearer tok-b"}

        def go(x: np.ndarray, who: dict[str, str], **params: Any) -> Answer:
            body = {"inputs": [tensor(x[None])], "parameters": params}
            return call(p, "POST", "/v2/models/tiny/infer", body, who, context=ctx)

        assert go(x[:2], alice, sequence_id="s", sequence_start=True).status == 200
        # Sessions are namespaced by principal: bob has no sequence "s".
        assert go(x[2:], bob, sequence_id="s").status == 400
        # alice goes on over gRPC (TLS, her token): the same session.
        creds = grpc.ssl_channel_credentials(pki.ca_pem)
        with grpc.secure_channel(s.target, creds) as ch:
            req = ipb.ModelInferRequest(model_name="tiny")
            req.inputs.add(name="x", datatype="FP32", shape=[1, 2, 3])
            req.raw_input_contents.append(x[2:].tobytes())
            req.parameters["sequence_id"].string_param = "s"
            md = (("authorization", "Bearer tok-a"),)
            resp = ipb_grpc.GRPCInferenceServiceStub(ch).ModelInfer(req, metadata=md)
        y = np.frombuffer(resp.raw_output_contents[0], np.float32).reshape(2, 3)
        np.testing.assert_allclose(y, oracle.run(x)[0][2:], atol=ATOL)
        # Plain HTTP to the TLS port gets nowhere.
        with pytest.raises((ConnectionError, http.client.HTTPException, OSError)):
            a = call(p, "GET", "/v2/health/live")
            assert a.status >= 400


def test_stop_closes_the_port_and_readiness_fails_first(tiny_repo: Path) -> None:
    s = ServerThread(model_repository=tiny_repo, http_port=0).start()
    p = s.server.http_port
    front = s.server._http.front  # type: ignore[union-attr]
    assert call(p, "GET", "/v2/health/ready").status == 200
    front.draining = True  # as the first step of stop(): ready fails, live holds
    assert call(p, "GET", "/v2/health/ready").status == 400
    assert call(p, "GET", "/v2/health/live").status == 200
    s.stop()
    with pytest.raises(OSError):
        call(p, "GET", "/v2/health/live")


def test_http_port_is_off_by_default(tiny_repo: Path) -> None:
    with ServerThread(model_repository=tiny_repo) as s:
        assert s.server.http_port == 0 and s.server._http is None


# -- Triton's own HTTP client --------------------------------------------------------------


def test_tritonclient_http(srv: ServerThread, port: int, tmp_path: Path, oracle: OnePass) -> None:
    need_triton_client()
    client = Path(__file__).resolve().parents[1] / "triton" / "http_client.py"
    x = xs(21, 10)
    batch = np.stack([xs(i, 4) for i in range(2)])
    src, dst = tmp_path / "in.npz", tmp_path / "out.npz"
    np.savez(src, seq=x, batch=batch)
    proc = subprocess.run(
        [str(TRITON_PYTHON), str(client), f"127.0.0.1:{port}", str(src), str(dst)],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = dict(np.load(dst))
    facts = json.loads(str(out.pop("facts")))
    assert facts["live"] and facts["ready"] and facts["model_ready"]
    assert facts["server"]["name"] == "lstm-serve"
    assert facts["metadata"]["inputs"][0]["shape"] == [-1, -1, 3]
    assert facts["unknown"]["status"] == "404"
    assert "Request for unknown model: 'nope' is not found" in facts["unknown"]["message"]
    assert facts["never_started"]["status"] == "400"
    want = np.stack([oracle.run(row)[0] for row in batch])
    np.testing.assert_allclose(out["batch_json"], want, atol=ATOL)
    np.testing.assert_allclose(out["batch_binary"], want, atol=ATOL)
    np.testing.assert_allclose(out["seq"], oracle.run(x)[0], atol=ATOL)


def test_protocol_doc_http_examples_run_as_written(shipped_models_dir: Path) -> None:
    """docs/protocol.md's tritonclient.http example (in the tritonclient venv) and its curl
    requests (their JSON bodies, sent as written) against the bundled models."""
    need_triton_client()
    text = (Path(__file__).resolve().parents[2] / "docs" / "protocol.md").read_text()
    code = next(b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "tritonclient.http" in b)  # fmt: skip
    bodies = re.findall(r"/infer -d '(.*?)'", text, re.S)
    assert len(bodies) == 2
    with ServerThread(model_repository=shipped_models_dir, http_port=0) as s:
        p = s.server.http_port
        proc = subprocess.run(
            [str(TRITON_PYTHON), "-c", code.replace("127.0.0.1:8000", f"127.0.0.1:{p}")],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-4000:]
        first, last = (call(p, "POST", "/v2/models/forecaster/infer", b.encode()) for b in bodies)
        assert first.json()["parameters"]["lstm_serve_next_seq"] == 2
        assert y_of(last).shape == (1, 1, 2)
        assert s.engine.model("forecaster").store.slot("station-7") is None
        assert call(p, "GET", "/v2/health/ready").status == 200
