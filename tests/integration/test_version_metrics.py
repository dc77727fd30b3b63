"""Metrics of model versions loaded and unloaded on a running server (a real server on a
loopback port, its metrics port scraped over HTTP): lstm_serve_model_versions by state,
lstm_serve_model_load_failures_total, and the series of a freed version removed."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from lstm_serve.client import Client
from lstm_serve.server.pb import grpc_service_pb2 as ipb
from lstm_serve.server.pb import grpc_service_pb2_grpc as ipb_grpc
from tests.helpers.metrics import Samples, eventually, scrape
from tests.helpers.models import add_version
from tests.helpers.server import ServerThread, code_of, serve, xs

VERSIONS = "lstm_serve_model_versions"
FAILURES = "lstm_serve_model_load_failures_total"


def series(samples: Samples, name: str) -> dict[tuple[str, ...], float]:
    """name's samples: (its label values, sorted by label name) -> value."""
    return {
        tuple(v for _, v in sorted(labels.items())): value
        for n, labels, value in samples
        if n == name
    }


def versions(srv: ServerThread) -> dict[tuple[str, str], float]:
    """(model, state) -> lstm_serve_model_versions."""
    return {(m, s): v for (m, s), v in series(scrape(srv), VERSIONS).items()}


def failures(srv: ServerThread) -> dict[str, float]:
    return {m: v for (m,), v in series(scrape(srv), FAILURES).items()}


def models_in_series(samples: Samples) -> set[str]:
    """Every `model` label value of the scrape."""
    return {labels["model"] for _, labels, _ in samples if "model" in labels}


def stub(srv: ServerThread) -> ipb_grpc.GRPCInferenceServiceStub:
    return ipb_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(srv.target))


def load(srv: ServerThread, name: str, version: str = "") -> None:
    params = {"version": ipb.ModelRepositoryParameter(string_param=version)} if version else {}
    req = ipb.RepositoryModelLoadRequest(model_name=name, parameters=params)
    stub(srv).RepositoryModelLoad(req, timeout=60)


def unload(srv: ServerThread, name: str, version: str = "") -> None:
    params = {"version": ipb.ModelRepositoryParameter(int64_param=int(version))} if version else {}
    req = ipb.RepositoryModelUnloadRequest(model_name=name, parameters=params)
    stub(srv).RepositoryModelUnload(req, timeout=10)


async def _reap(srv: ServerThread) -> None:
    await asyncio.sleep(0.05)  # the end's tick
    srv.engine.reap_versions()


@pytest.fixture
def explicit(tiny_repo_copy: Path) -> Iterator[ServerThread]:
    yield from serve(tiny_repo_copy, model_control="explicit", unload_drain_s=3600)


def test_versions_by_state_and_load_failures(explicit: ServerThread, tiny_repo_copy: Path) -> None:
    repo, srv = tiny_repo_copy, explicit
    # Every model directory's series exist from the start; the failure counters at 0.
    assert versions(srv) == {
        ("tiny", "serving"): 1, ("tiny", "draining"): 0,
        ("tinytok", "serving"): 1, ("tinytok", "draining"): 0,
    }  # fmt: skip
    assert failures(srv) == {"tiny": 0, "tinytok": 0}

    add_version(repo, "2")
    load(srv, "tiny", "2")
    assert versions(srv)[("tiny", "serving")] == 2

    add_version(repo, "3", sha="0" * 64)  # its sha256 does not match its graph
    assert code_of(lambda: load(srv, "tiny", "3")) is grpc.StatusCode.FAILED_PRECONDITION
    assert failures(srv) == {"tiny": 1, "tinytok": 0}
    # Names that are no model directory mint no series.
    assert code_of(lambda: load(srv, "nope")) is grpc.StatusCode.NOT_FOUND
    assert code_of(lambda: load(srv, "tiny", "9")) is grpc.StatusCode.NOT_FOUND
    assert failures(srv) == {"tiny": 1, "tinytok": 0}

    with Client(srv.target) as c:
        c.predict("tiny", "old", xs(1, 2), version="1")
        unload(srv, "tiny", "1")  # its session keeps it draining
        assert versions(srv)[("tiny", "serving")] == 1
        assert versions(srv)[("tiny", "draining")] == 1
        samples = scrape(srv)
        assert series(samples, "lstm_serve_sessions")[("tiny:1",)] == 1
        assert "tiny:1" in models_in_series(samples)
        c.end_session("tiny", "old", version="1")
    deadline = time.monotonic() + 20  # version 1 is freed with its last session
    while ("tiny", "1") in srv.engine.models and time.monotonic() < deadline:
        srv.call(_reap(srv))  # on the server's loop, as its reaper does
    assert ("tiny", "1") not in srv.engine.models

    samples = scrape(srv)
    got = series(samples, VERSIONS)
    assert got[("tiny", "serving")] == 1 and got[("tiny", "draining")] == 0
    # The freed version's series are gone, from every per-model metric.
    assert "tiny:1" not in models_in_series(samples)
    assert ("tiny:2",) in series(samples, "lstm_serve_sessions")

    # A model whose only version goes reads 0 in both states, not its last value.
    unload(srv, "tinytok")  # no sessions: freed at once
    samples = scrape(srv)
    got = series(samples, VERSIONS)
    assert got[("tinytok", "serving")] == 0 and got[("tinytok", "draining")] == 0
    assert "tinytok:1" not in models_in_series(samples)
    # ... and loaded again, it has its series back, from 0.
    load(srv, "tinytok")
    samples = scrape(srv)
    assert series(samples, VERSIONS)[("tinytok", "serving")] == 1
    assert series(samples, "lstm_serve_steps_total")[("tinytok:1",)] == 0
    assert series(samples, "lstm_serve_sessions_capacity")[("tinytok:1",)] > 0
    assert failures(srv) == {"tiny": 1, "tinytok": 0}


def test_versions_refused_at_start_are_counted(tiny_repo_copy: Path) -> None:
    repo = tiny_repo_copy
    add_version(repo, "2", sha="0" * 64)
    # A version with several errors counts once.
    broken = add_version(repo, "3")
    manifest = json.loads((broken / "manifest.json").read_text())
    manifest.update(name="other", sha256="0" * 64)
    (broken / "manifest.json").write_text(json.dumps(manifest))
    # A directory that cannot be a model's name is no label value.
    (repo / "Not-A-Model" / "1").mkdir(parents=True)
    with ServerThread(model_repository=repo) as srv:
        assert failures(srv) == {"tiny": 2, "tinytok": 0}
        assert versions(srv)[("tiny", "serving")] == 1
        assert "Not-A-Model" not in {m for m, _ in versions(srv)}


def test_a_broken_version_found_by_poll_counts_once_per_change(tiny_repo_copy: Path) -> None:
    with ServerThread(
        model_repository=tiny_repo_copy, model_control="poll", model_poll_s=0.1
    ) as srv:
        add_version(tiny_repo_copy, "2", sha="0" * 64)
        assert eventually(lambda: failures(srv)["tiny"] == 1, 10.0), failures(srv)
        time.sleep(0.5)  # polls go on: a manifest that did not change is not tried again
        assert failures(srv)["tiny"] == 1
        assert versions(srv)[("tiny", "serving")] == 1
