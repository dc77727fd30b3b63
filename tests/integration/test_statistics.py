"""The Open Inference Protocol's statistics extension on a real server: `ModelStatistics` over gRPC,
`GET /v2/models[/{name}[/versions/{v}]]/stats` over HTTP/REST and Triton's own client. Its
figures are the Prometheus series scraped from the metrics port for `model="name:version"`,
one version apart from the other; docs/protocol.md ("Statistics") says what each counts."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from lstm_serve.client import Client
from lstm_serve.server.pb import grpc_service_pb2 as ipb
from lstm_serve.server.pb import grpc_service_pb2_grpc as ipb_grpc
from tests.helpers.metrics import Samples, scrape, value
from tests.helpers.models import add_version
from tests.helpers.server import ServerThread, code_of, serve, xs
from tests.integration.test_http import call, step
from tests.integration.test_kserve import TRITON_PYTHON, need_triton_client
from tests.integration.test_kserve_protocol import infer
from tests.integration.test_model_control import SCRIPT, load

DURATIONS = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")
# One version's figures, flat: "inference_count", "execution_count", "success.count", ...
Figures = dict[str, int]


def _ns(seconds: float) -> int:
    return round(seconds * 1e9)


def metric_figures(samples: Samples, label: str) -> Figures:
    """What the statistics must say for one version, from a scrape of the metrics port."""

    def v(name: str, **labels: str) -> float:
        return value(samples, name, model=label, **labels)

    ok = v("lstm_serve_requests_total", method="Step", code="OK")
    every = v("lstm_serve_requests_total", method="Step")
    return {
        "inference_count": int(v("lstm_serve_steps_total")),
        "execution_count": int(v("lstm_serve_inference_seconds_count")),
        "success.count": int(ok),
        "success.ns": _ns(v("lstm_serve_step_latency_seconds_sum")),
        "fail.count": int(every - ok),
        "fail.ns": 0,
        "queue.count": int(v("lstm_serve_queue_seconds_count")),
        "queue.ns": _ns(v("lstm_serve_queue_seconds_sum")),
        "compute_input.count": 0,
        "compute_input.ns": 0,
        "compute_infer.count": int(v("lstm_serve_inference_seconds_count")),
        "compute_infer.ns": _ns(v("lstm_serve_inference_seconds_sum")),
        "compute_output.count": 0,
        "compute_output.ns": 0,
    }


def figures_of(doc: dict[str, Any]) -> Figures:
    """One model_stats entry, from the gRPC message (as a dict), Triton's client's JSON (uint64
    as strings, zeros left out) or the HTTP/REST form's JSON, flat."""
    out = {k: int(doc.get(k, 0)) for k in ("inference_count", "execution_count")}
    st = doc.get("inference_stats", {})
    for d in DURATIONS:
        for k in ("count", "ns"):
            out[f"{d}.{k}"] = int(st.get(d, {}).get(k, 0))
    return out


def grpc_figures(ms: ipb.ModelStatistics) -> Figures:
    st = ms.inference_stats
    out = {"inference_count": ms.inference_count, "execution_count": ms.execution_count}
    for d in DURATIONS:
        out[f"{d}.count"] = getattr(st, d).count
        out[f"{d}.ns"] = getattr(st, d).ns
    return out


def stats(
    stub: ipb_grpc.GRPCInferenceServiceStub, name: str = "", version: str = ""
) -> dict[str, ipb.ModelStatistics]:
    """ModelStatistics by "name:version"."""
    resp = stub.ModelStatistics(ipb.ModelStatisticsRequest(name=name, version=version), timeout=10)
    return {f"{m.name}:{m.version}": m for m in resp.model_stats}


def delta(after: Figures, before: Figures) -> Figures:
    return {k: after[k] - before[k] for k in after}


@pytest.fixture(scope="module")
def srv(tiny_repo: Path) -> Iterator[ServerThread]:
    yield from serve(tiny_repo, http_port=0)


@pytest.fixture(scope="module")
def stub(srv: ServerThread) -> Iterator[ipb_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(srv.target) as ch:
        yield ipb_grpc.GRPCInferenceServiceStub(ch)


def workload(srv: ServerThread, stub: ipb_grpc.GRPCInferenceServiceStub, tag: str) -> None:
    """On tiny:1, over both protocols: 6 requests answered (22 steps), 3 refused."""
    x = xs(1, 8)
    with Client(srv.target) as c:
        c.predict("tiny", f"{tag}-n", x[:3])  # 3 steps
        c.predict("tiny", f"{tag}-n", x[3:5])  # 2
        c.step_frame("tiny", [f"{tag}-f1", f"{tag}-f2"], np.stack([x[:4], x[4:]]))  # 8
        with pytest.raises(grpc.RpcError):  # refused before it queues
            c.predict("tiny", f"{tag}-bad", np.zeros((2, 5), np.float32))
        with pytest.raises(grpc.RpcError):  # a seq gap: refused by its tick's plan
            c.predict("tiny", f"{tag}-n", x[:1], seq=99)
    stub.ModelInfer(infer("tiny", x[:2][None], seq_id=f"{tag}-t", start=True), timeout=10)  # 2
    stub.ModelInfer(infer("tiny", x[2:3][None], seq_id=f"{tag}-t", end=True), timeout=10)  # 1
    with pytest.raises(grpc.RpcError):  # a continuation of no sequence: refused by its plan
        stub.ModelInfer(infer("tiny", x[:1][None], seq_id=f"{tag}-none"), timeout=10)
    assert step(srv.server.http_port, np.stack([x[:2]] * 3)).status == 200  # 3 rows x 2 steps


def test_figures_are_the_scraped_metrics(
    srv: ServerThread, stub: ipb_grpc.GRPCInferenceServiceStub
) -> None:
    before = grpc_figures(stats(stub, "tiny", "1")["tiny:1"])
    t0 = int(time.time() * 1000)
    workload(srv, stub, "a")
    got = stats(stub, "tiny", "1")
    t1 = int(time.time() * 1000)
    assert list(got) == ["tiny:1"]
    ms = got["tiny:1"]
    assert grpc_figures(ms) == metric_figures(scrape(srv), "tiny:1")
    d = delta(grpc_figures(ms), before)
    assert (d["success.count"], d["fail.count"], d["inference_count"]) == (6, 3, 22)
    # Each answered request ran alone in its tick, as one batch (its rows share a step count);
    # queue counts those that reached a tick: the 6 and the 2 its plan refused.
    assert d["execution_count"] == d["compute_infer.count"] == 6
    assert d["queue.count"] == 8
    assert d["success.ns"] > 0 and d["compute_infer.ns"] > 0 and d["queue.ns"] >= 0
    assert t0 <= ms.last_inference <= t1
    # Reading changes nothing: asked again, the same figures and time.
    again = stats(stub, "tiny", "1")["tiny:1"]
    assert grpc_figures(again) == grpc_figures(ms)
    assert again.last_inference == ms.last_inference


def test_names_select_versions_and_unknown_ones_are_not_found(
    srv: ServerThread, stub: ipb_grpc.GRPCInferenceServiceStub
) -> None:
    assert list(stats(stub)) == ["tiny:1", "tinytok:1"]
    assert list(stats(stub, "tinytok")) == ["tinytok:1"]
    for name, version in (("nope", ""), ("tiny", "9"), ("nope", "1")):
        with pytest.raises(grpc.RpcError) as err:
            stats(stub, name, version)
        assert err.value.code() is grpc.StatusCode.NOT_FOUND, (name, version)
    assert code_of(lambda: stats(stub, "", "1")) is grpc.StatusCode.INVALID_ARGUMENT
    md = stub.ServerMetadata(ipb.ServerMetadataRequest(), timeout=10)
    assert "statistics" in md.extensions


def test_http_form_gives_the_same_figures(
    srv: ServerThread, stub: ipb_grpc.GRPCInferenceServiceStub
) -> None:
    p = srv.server.http_port
    workload(srv, stub, "h")
    want = stats(stub)
    for path, labels in (
        ("/v2/models/tiny/versions/1/stats", ["tiny:1"]),
        ("/v2/models/tiny/stats", ["tiny:1"]),
        ("/v2/models/stats", ["tiny:1", "tinytok:1"]),
    ):
        a = call(p, "GET", path)
        assert a.status == 200, a.body[:300]
        entries = a.json()["model_stats"]
        assert [f"{e['name']}:{e['version']}" for e in entries] == labels
        for e, label in zip(entries, labels, strict=True):
            assert figures_of(e) == grpc_figures(want[label])
            assert e["last_inference"] == want[label].last_inference
            assert isinstance(e["inference_count"], int) and e["batch_stats"] == []
    assert figures_of(call(p, "GET", "/v2/models/tiny/stats").json()["model_stats"][0]) == (
        metric_figures(scrape(srv), "tiny:1")
    )
    for path, what in (
        ("/v2/models/nope/stats", "'nope' is not found"),
        ("/v2/models/tiny/versions/9/stats", "'tiny' version 9 is not found"),
    ):
        a = call(p, "GET", path)
        assert a.status == 404 and what in a.json()["error"], a.body
    assert call(p, "POST", "/v2/models/tiny/stats", b"{}").status == 405


def test_each_version_has_its_own_figures(tiny_repo_copy: Path) -> None:
    with ServerThread(model_repository=tiny_repo_copy, model_control="explicit") as srv:
        st = ipb_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(srv.target))
        add_version(tiny_repo_copy, "2")
        # On disk, not loaded: not found.
        assert code_of(lambda: stats(st, "tiny", "2")) is grpc.StatusCode.NOT_FOUND
        load(srv, "tiny", "2")
        before = {k: grpc_figures(v) for k, v in stats(st, "tiny").items()}
        assert list(before) == ["tiny:1", "tiny:2"]
        x = xs(3, 6)
        with Client(srv.target) as c:
            c.predict("tiny", "on-1", x[:3], version="1")
            c.predict("tiny", "on-2", x[:2], version="2")
            c.predict("tiny", "on-2", x[2:6], version="2")
            with pytest.raises(grpc.RpcError):
                c.predict("tiny", "on-2", x[:1], version="2", seq=0)  # a retry with other data
        after = stats(st, "tiny")
        samples = scrape(srv)
        for label in ("tiny:1", "tiny:2"):
            assert grpc_figures(after[label]) == metric_figures(samples, label)
        d1 = delta(grpc_figures(after["tiny:1"]), before["tiny:1"])
        d2 = delta(grpc_figures(after["tiny:2"]), before["tiny:2"])
        assert (d1["success.count"], d1["fail.count"], d1["inference_count"]) == (1, 0, 3)
        assert (d2["success.count"], d2["fail.count"], d2["inference_count"]) == (2, 1, 6)
        assert stats(st, "tiny", "2")["tiny:2"] == after["tiny:2"]


def test_statistics_need_a_token_when_auth_is_on(tiny_repo: Path) -> None:
    # Read-only, so any client with a token may ask (no admin_clients needed); none may not.
    with ServerThread(model_repository=tiny_repo, http_port=0, auth_tokens="alice:tok-a") as s:
        st = ipb_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(s.target))
        req = ipb.ModelStatisticsRequest(name="tiny")
        code = code_of(lambda: st.ModelStatistics(req, timeout=10))
        assert code is grpc.StatusCode.UNAUTHENTICATED
        resp = st.ModelStatistics(req, timeout=10, metadata=(("authorization", "Bearer tok-a"),))
        assert [m.name for m in resp.model_stats] == ["tiny"]
        p = s.server.http_port
        assert call(p, "GET", "/v2/models/tiny/stats").status == 401
        ok = call(p, "GET", "/v2/models/tiny/stats", headers={"Authorization": "Bearer tok-a"})
        assert ok.status == 200


def test_triton_client_reads_the_statistics(
    srv: ServerThread, stub: ipb_grpc.GRPCInferenceServiceStub
) -> None:
    need_triton_client()
    workload(srv, stub, "c")

    def triton(step: str) -> dict[str, Any]:
        proc = subprocess.run(
            [str(TRITON_PYTHON), str(SCRIPT), srv.target, step],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-2000:]
        out: dict[str, Any] = json.loads(proc.stdout)
        return out

    want = stats(stub)
    got = triton("stats:tiny:1")["stats"]["model_stats"]
    assert [(e["name"], e["version"]) for e in got] == [("tiny", "1")]
    assert figures_of(got[0]) == grpc_figures(want["tiny:1"])
    assert figures_of(got[0]) == metric_figures(scrape(srv), "tiny:1")
    assert int(got[0]["last_inference"]) == want["tiny:1"].last_inference
    every = triton("stats")["stats"]["model_stats"]
    assert [(e["name"], e["version"]) for e in every] == [("tiny", "1"), ("tinytok", "1")]
    assert "NOT_FOUND" in triton("stats:nope")["error"]
