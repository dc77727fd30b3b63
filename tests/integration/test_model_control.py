"""Model versions loaded and unloaded on a running server: the Open Inference Protocol's
repository calls (through Triton's own client too), the CLI, polling, admin-only access, and
sessions that stay on their version (a real server on a loopback port)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from lstm_serve.client import Client, Connection, session_steps, step_request
from lstm_serve.server.pb import grpc_service_pb2 as ipb
from lstm_serve.server.pb import grpc_service_pb2_grpc as ipb_grpc
from tests.helpers.models import add_version
from tests.helpers.server import ServerThread, serve
from tests.oracle.one_pass import OnePass

ATOL = 1e-5
ROOT = Path(__file__).resolve().parents[2]
TRITON_PYTHON = ROOT / ".venv-triton" / "bin" / "python"
SCRIPT = ROOT / "tests" / "triton" / "repository.py"


def xs(seed: int, n: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 3)).astype(np.float32)


def stub(srv: ServerThread) -> ipb_grpc.GRPCInferenceServiceStub:
    return ipb_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(srv.target))


def index(srv: ServerThread) -> dict[tuple[str, str], str]:
    resp = stub(srv).RepositoryIndex(ipb.RepositoryIndexRequest(), timeout=10)
    return {(m.name, m.version): m.state for m in resp.models}


def load(srv: ServerThread, name: str, version: str = "", meta: tuple = ()) -> None:
    params = {"version": ipb.ModelRepositoryParameter(string_param=version)} if version else {}
    req = ipb.RepositoryModelLoadRequest(model_name=name, parameters=params)
    stub(srv).RepositoryModelLoad(req, timeout=60, metadata=meta)


def unload(srv: ServerThread, name: str, version: str = "") -> None:
    params = {"version": ipb.ModelRepositoryParameter(int64_param=int(version))} if version else {}
    stub(srv).RepositoryModelUnload(
        ipb.RepositoryModelUnloadRequest(model_name=name, parameters=params), timeout=10
    )


def code_of(fn) -> grpc.StatusCode:  # type: ignore[no-untyped-def]
    try:
        fn()
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


@pytest.fixture
def explicit(tiny_repo_copy: Path) -> Iterator[ServerThread]:
    yield from serve(tiny_repo_copy, model_control="explicit", unload_drain_s=3600)


def test_load_and_unload_while_streams_go_on(explicit: ServerThread, tiny_repo_copy: Path) -> None:
    repo, srv = tiny_repo_copy, explicit
    v1 = OnePass(repo / "tiny" / "1")
    x = xs(1, 8)
    with Client(srv.target) as c:
        c.predict("tiny", "old", x[:3])
        assert index(srv)[("tiny", "1")] == "READY"
        v2 = OnePass(add_version(repo, "2"))
        assert index(srv)[("tiny", "2")] == "UNAVAILABLE"
        load(srv, "tiny", "2")
        assert index(srv)[("tiny", "2")] == "READY"
        assert c.get_model("tiny").version == "2"
        out = c.predict("tiny", "old", x[3:5])  # names no version: stays on 1
        np.testing.assert_allclose(out.y, v1.run(x)[0][3:5], atol=ATOL)
        assert out.version == "1"  # the answer names the version that ran it
        out = c.predict("tiny", "new", x[:2])
        np.testing.assert_allclose(out.y, v2.run(x[:2])[0], atol=ATOL)
        assert out.version == "2"
        # a frame and a per-session request over both versions: each session's version named
        fr = c.step_frame("tiny", ["new", "old"], np.stack([x[2:3], x[5:6]]))
        assert fr.versions == ["2", "1"]
        np.testing.assert_allclose(fr.y[0], v2.run(x[:3])[0][2:], atol=ATOL)
        np.testing.assert_allclose(fr.y[1], v1.run(x)[0][5:6], atol=ATOL)
        both = c.step(
            step_request("tiny", [session_steps("new", x[3:4]), session_steps("z", x[:1])])
        )
        assert [(r.session_id, r.version) for r in both] == [("new", "2"), ("z", "2")]
        np.testing.assert_allclose(both[0].y, v2.run(x[:4])[0][3:], atol=ATOL)
        unload(srv, "tiny", "1")
        assert index(srv)[("tiny", "1")] == "UNLOADING"
        out = c.predict("tiny", "old", x[6:])  # goes on during the drain
        np.testing.assert_allclose(out.y, v1.run(x)[0][6:], atol=ATOL)
        with pytest.raises(grpc.RpcError) as err:
            c.predict("tiny", "fresh", x[:1], version="1")
        assert err.value.code() is grpc.StatusCode.FAILED_PRECONDITION
        assert "being unloaded" in (err.value.details() or "")
        assert c.health("tiny") == "SERVING"
        c.end_session("tiny", "old")
    deadline = time.monotonic() + 20  # version 1 is freed with its last session
    while ("tiny", "1") in srv.engine.models and time.monotonic() < deadline:
        srv.call(_reap(srv))  # on the server's loop, as its reaper does
    assert ("tiny", "1") not in srv.engine.models
    assert index(srv)[("tiny", "1")] == "UNAVAILABLE"


async def _reap(srv: ServerThread) -> None:
    import asyncio

    await asyncio.sleep(0.05)  # the end's tick
    srv.engine.reap_versions()


def test_bad_loads_are_refused_and_serving_goes_on(
    explicit: ServerThread, tiny_repo_copy: Path
) -> None:
    add_version(tiny_repo_copy, "2", sha="0" * 64)
    assert code_of(lambda: load(explicit, "tiny", "2")) is grpc.StatusCode.FAILED_PRECONDITION
    assert code_of(lambda: load(explicit, "nope")) is grpc.StatusCode.NOT_FOUND
    assert code_of(lambda: load(explicit, "")) is grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(lambda: unload(explicit, "tiny", "7")) is grpc.StatusCode.NOT_FOUND
    idx = index(explicit)
    assert idx[("tiny", "2")] == "UNAVAILABLE" and idx[("tiny", "1")] == "READY"
    with Client(explicit.target) as c:
        assert c.predict("tiny", "s", xs(2, 1)).next_seq == 1


def test_without_explicit_control_loads_are_refused(tiny_repo_copy: Path) -> None:
    with ServerThread(model_repository=tiny_repo_copy) as srv:
        add_version(tiny_repo_copy, "2")
        assert code_of(lambda: load(srv, "tiny")) is grpc.StatusCode.FAILED_PRECONDITION
        assert index(srv)[("tiny", "2")] == "UNAVAILABLE"  # the index is always served


def test_only_admin_clients_may_load(tiny_repo_copy: Path) -> None:
    tokens = "alice:tok-alice-0123456789,bob:tok-bob-9876543210"
    with ServerThread(
        model_repository=tiny_repo_copy, model_control="explicit", auth_tokens=tokens,
        admin_clients="alice",
    ) as srv:  # fmt: skip
        add_version(tiny_repo_copy, "2")
        bob = Connection(srv.target, token="tok-bob-9876543210").metadata
        alice = Connection(srv.target, token="tok-alice-0123456789").metadata
        assert code_of(lambda: load(srv, "tiny", meta=bob)) is grpc.StatusCode.PERMISSION_DENIED
        assert code_of(lambda: load(srv, "tiny")) is grpc.StatusCode.UNAUTHENTICATED
        load(srv, "tiny", meta=alice)
        assert ("tiny", "2") in srv.engine.models


def test_polling_follows_the_repository(tiny_repo_copy: Path) -> None:
    with ServerThread(
        model_repository=tiny_repo_copy, model_control="poll", model_poll_s=0.1,
        unload_drain_s=0,
    ) as srv, Client(srv.target) as c:  # fmt: skip
        add_version(tiny_repo_copy, "2")
        deadline = time.monotonic() + 20
        while c.get_model("tiny").version != "2":
            assert time.monotonic() < deadline, "version 2 never loaded"
            time.sleep(0.05)
        shutil.rmtree(tiny_repo_copy / "tiny" / "2")
        while c.get_model("tiny").version != "1":
            assert time.monotonic() < deadline, "version 2 never unloaded"
            time.sleep(0.05)
        assert code_of(lambda: load(srv, "tiny")) is grpc.StatusCode.FAILED_PRECONDITION


def test_the_cli_and_tritons_client_drive_the_repository(
    explicit: ServerThread, tiny_repo_copy: Path
) -> None:
    add_version(tiny_repo_copy, "2")

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "lstm_serve.cli.main", "models", *args]
        return subprocess.run(
            [*cmd, "--target", explicit.target], capture_output=True, text=True, timeout=60
        )

    out = cli("index")
    assert out.returncode == 0 and "UNAVAILABLE" in out.stdout, out.stderr
    out = cli("load", "--model", "tiny", "--version", "2")
    assert out.returncode == 0 and "loaded tiny version 2" in out.stdout, out.stderr
    out = cli("load")
    assert out.returncode == 2 and "needs --model" in out.stderr
    out = cli("load", "--model", "nope")
    assert out.returncode == 1 and "NOT_FOUND" in out.stderr
    if not TRITON_PYTHON.exists():
        pytest.skip("no tritonclient venv: run `make triton-client`")

    def triton(step: str) -> dict:  # type: ignore[type-arg]
        proc = subprocess.run(
            [str(TRITON_PYTHON), str(SCRIPT), explicit.target, step],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-2000:]
        return json.loads(proc.stdout)

    got = triton("index")
    states = {(m["name"], m["version"]): m["state"] for m in got["index"]}
    assert states[("tiny", "1")] == states[("tiny", "2")] == "READY"
    got = triton("unload:tinytok")
    states = {(m["name"], m["version"]): m.get("state") for m in got["index"]}
    assert states[("tinytok", "1")] == "UNAVAILABLE"  # no session on it: freed at once
    assert got["ready"]["tinytok"] is False and got["ready"]["tiny"] is True
    assert "error" in triton("load:nope")
    got = triton("load:tinytok")
    assert {(m["name"], m["version"]): m.get("state") for m in got["index"]}[
        ("tinytok", "1")
    ] == "READY"
