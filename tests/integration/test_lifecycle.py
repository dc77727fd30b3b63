"""Lifecycle: graceful stop (in-flight work finishes, new work is refused, health goes
NOT_SERVING), SIGTERM of a real `lstm-serve serve` process, and restart continuity through the
snapshot directory."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lstm_serve.client import Client, StepResult, session_steps, step_request
from lstm_serve.server.pb import lstm_serve_pb2 as pb
from tests.helpers.server import ServerThread, code_of, inference_blocked, xs
from tests.oracle.one_pass import OnePass

ATOL = 1e-5
TINY = ("tiny", "1")
ROOT = Path(__file__).resolve().parents[2]


def wait_until(cond: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


def health_status(target: str, service: str = "") -> int:
    with grpc.insecure_channel(target) as ch:
        resp = health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=2
        )
        status: int = resp.status
        return status


def requests_ok(srv: ServerThread, code: str = "OK") -> float:
    v = srv.server.metrics.registry.get_sample_value(
        "lstm_serve_requests_total", {"model": "tiny:1", "method": "Step", "code": code}
    )
    return v or 0.0


# -- graceful stop, in process ---------------------------------------------------------------


def test_graceful_stop_finishes_in_flight_and_refuses_new(tiny_repo: Path, oracle: OnePass) -> None:
    srv = ServerThread(model_repository=tiny_repo).start()
    try:
        target = srv.target
        first = {f"g{i}": xs(i, 3) for i in range(4)}
        second = {f"g{i}": xs(10 + i, 2) for i in range(4)}
        with Client(target) as c, ThreadPoolExecutor(4) as pool:
            for sid, x in first.items():
                c.predict("tiny", sid, x, seq=0)
            engine = srv.engine
            with inference_blocked(srv):  # requests stay in flight
                futs: dict[str, Future[StepResult]] = {
                    sid: pool.submit(c.predict, "tiny", sid, x, seq=3, timeout=20)
                    for sid, x in second.items()
                }
                assert wait_until(lambda: engine.model("tiny").scheduler.in_flight() == 4)
                stopping = asyncio.run_coroutine_threadsafe(srv.server.stop(10.0), srv.loop)
                assert wait_until(
                    lambda: health_status(target) == health_pb2.HealthCheckResponse.NOT_SERVING
                )
                assert health_status(target, "tiny") == health_pb2.HealthCheckResponse.NOT_SERVING
                # New work is refused while the old finishes.
                assert code_of(lambda: c.predict("tiny", "late", xs(20, 1), timeout=5)) == (
                    grpc.StatusCode.UNAVAILABLE
                )
                assert code_of(lambda: c.predict("tiny", "g0", xs(20, 1), seq=5, timeout=5)) == (
                    grpc.StatusCode.UNAVAILABLE
                )
                assert code_of(lambda: c.forecast("tiny", "g1", 2, timeout=5)) == (
                    grpc.StatusCode.UNAVAILABLE
                )
                assert not stopping.done()
                assert not any(f.done() for f in futs.values())
            for sid, fut in futs.items():
                out = fut.result(20)
                full = np.concatenate([first[sid], second[sid]])
                np.testing.assert_allclose(out.y, oracle.run(full)[0][3:], atol=ATOL)
                assert out.next_seq == 5
            stopping.result(20)
            assert requests_ok(srv) == 8
            assert requests_ok(srv, "CANCELLED") == 0
        # The port is closed now.
        with Client(target, timeout=2) as c:
            assert code_of(lambda: c.health()) == grpc.StatusCode.UNAVAILABLE
    finally:
        srv.stop()


def test_graceful_stop_under_concurrent_streams(tiny_repo: Path, oracle: OnePass) -> None:
    """Streams pipelining many steps when the server stops: every answer they got is right,
    each ends OK or UNAVAILABLE, and every request the engine accepted was answered."""
    n_streams, n_msgs = 4, 400
    srv = ServerThread(model_repository=tiny_repo).start()
    try:
        inputs = {f"st{i}": xs(100 + i, n_msgs) for i in range(n_streams)}
        got: dict[str, list[pb.StepResponse]] = {sid: [] for sid in inputs}
        codes: dict[str, grpc.StatusCode] = {}

        def run(c: Client, sid: str) -> None:
            x = inputs[sid]
            reqs = (
                step_request("tiny", [session_steps(sid, x[i : i + 1], seq=i)])
                for i in range(n_msgs)
            )
            try:
                for resp in c.stub.Stream(reqs, timeout=30):
                    got[sid].append(resp)
                codes[sid] = grpc.StatusCode.OK
            except grpc.RpcError as exc:
                codes[sid] = exc.code()

        with Client(srv.target) as c:
            threads = [threading.Thread(target=run, args=(c, sid)) for sid in inputs]
            for t in threads:
                t.start()
            assert wait_until(lambda: all(len(v) >= 20 for v in got.values()))
            srv.call(srv.server.stop(10.0))
            for t in threads:
                t.join(30)
                assert not t.is_alive()
        assert set(codes.values()) <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}, codes
        assert grpc.StatusCode.UNAVAILABLE in codes.values(), "the stop came too late to test"
        for sid, responses in got.items():
            k = len(responses)
            assert k == n_msgs or codes[sid] == grpc.StatusCode.UNAVAILABLE
            assert [r.sessions[0].seq for r in responses] == list(range(k))
            y = np.concatenate([np.frombuffer(r.sessions[0].y, "<f4") for r in responses])
            np.testing.assert_allclose(y.reshape(k, 3), oracle.run(inputs[sid])[0][:k], atol=ATOL)
        # Nothing the engine accepted was dropped or cancelled on the way out.
        assert requests_ok(srv) == sum(len(v) for v in got.values())
        assert requests_ok(srv, "CANCELLED") == 0
    finally:
        srv.stop()


def test_restart_in_process_continues_sessions(
    tiny_repo: Path, tmp_path: Path, oracle: OnePass, tok_oracle: OnePass
) -> None:
    snap = tmp_path / "snap"
    x = xs(200, 10)
    toks = [1, 2, 3, 4, 5, 6, 7, 8]
    with (
        ServerThread(model_repository=tiny_repo, snapshot_dir=snap) as srv,
        Client(srv.target) as c,
    ):
        c.predict("tiny", "r", x[:6], seq=0)
        c.predict("tinytok", "r", tokens=toks[:3], seq=0)
    assert (snap / "tiny-1.npz").is_file()
    with (
        ServerThread(model_repository=tiny_repo, snapshot_dir=snap) as srv,
        Client(srv.target) as c,
    ):
        assert c.get_session("tiny", "r").next_seq == 6
        assert c.get_session("tinytok", "r").next_seq == 3
        out = c.predict("tiny", "r", x[6:], seq=6)
        np.testing.assert_allclose(out.y, oracle.run(x)[0][6:], atol=ATOL)
        t = c.predict("tinytok", "r", tokens=toks[3:], seq=3)
        np.testing.assert_allclose(t.y, tok_oracle.run(np.array(toks, np.int64))[0][3:], atol=ATOL)
        # A forecast from the restored state uses its last output too.
        fc = c.forecast("tiny", "r", 1)
        np.testing.assert_allclose(fc.y[0], oracle.run(x)[0][-1], atol=ATOL)


def test_concurrent_stops_are_safe(
    tiny_repo: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """stop() says it is safe to call twice, and serve() starts one per signal received: the
    second call must wait for the first, not stop (and snapshot) a second time."""
    caplog.set_level(logging.INFO, logger="lstm_serve")
    snap = tmp_path / "snap"
    srv = ServerThread(model_repository=tiny_repo, snapshot_dir=snap).start()
    try:
        with Client(srv.target) as c:
            for i in range(200):
                c.predict("tiny", f"d{i}", xs(i, 1))

        async def twice() -> list[object]:
            return list(
                await asyncio.gather(
                    srv.server.stop(1.0), srv.server.stop(1.0), return_exceptions=True
                )
            )

        results = srv.call(twice())
    finally:
        srv.stop()
    snapshots = [r for r in caplog.records if "tiny:1: snapshot of" in r.getMessage()]
    with ServerThread(model_repository=tiny_repo, snapshot_dir=snap) as again:
        assert len(again.engine.models[TINY].store) == 200
    assert results == [None, None]
    assert len(snapshots) == 1, [r.getMessage() for r in snapshots]


# -- a real process --------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def lstm_serve() -> list[str]:
    exe = Path(sys.executable).with_name("lstm-serve")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "lstm_serve.cli.main"]


class Process:
    """`lstm-serve serve` on a free port; stderr goes to a file so it can never block."""

    def __init__(self, repo: Path, log: Path, *extra: str) -> None:
        self.port = free_port()
        self.target = f"127.0.0.1:{self.port}"
        self.log = log
        env = {k: v for k, v in os.environ.items() if not k.startswith("LSTM_SERVE_")}
        self._err = log.open("wb")
        self.proc = subprocess.Popen(
            [
                *lstm_serve(), "serve", "--port", str(self.port), "--metrics-port", "-1",
                "--model-repository", str(repo), "--grace-period-s", "5", *extra,
            ],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=self._err,
        )  # fmt: skip

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.stderr()
            try:
                if health_status(self.target) == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"server not ready in {timeout}s:\n{self.stderr()}")

    def terminate(self, timeout: float = 10.0) -> int:
        self.proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        rc = self.proc.wait(timeout)
        assert time.monotonic() - t0 < timeout
        return rc

    def stderr(self) -> str:
        self._err.flush()
        return self.log.read_text(errors="replace")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._err.close()


@pytest.fixture
def process_factory(tmp_path: Path) -> Iterator[Callable[..., Process]]:
    procs: list[Process] = []

    def make(repo: Path, *extra: str) -> Process:
        p = Process(repo, tmp_path / f"server-{len(procs)}.log", *extra)
        procs.append(p)
        p.wait_ready()
        return p

    yield make
    for p in procs:
        p.close()


def test_sigterm_exits_cleanly(
    tiny_repo: Path, oracle: OnePass, process_factory: Callable[..., Process]
) -> None:
    p = process_factory(tiny_repo)
    x = xs(300, 8)
    with Client(p.target) as c:
        with c.session("tiny", "sig", start_seq=0) as stream:
            outs = [stream.send(x[i : i + 2]).y for i in range(0, 8, 2)]
        np.testing.assert_allclose(np.concatenate(outs), oracle.run(x)[0], atol=ATOL)
    assert p.terminate(timeout=10) == 0
    log = p.stderr()
    assert "Traceback" not in log, log
    assert "stopped" in log, log


def test_restart_continuity_through_snapshot_dir(
    tiny_repo: Path, tmp_path: Path, oracle: OnePass, process_factory: Callable[..., Process]
) -> None:
    snap = tmp_path / "snapshots"
    x = xs(400, 24)
    half = 12
    p1 = process_factory(tiny_repo, "--snapshot-dir", str(snap))
    with Client(p1.target) as c, c.session("tiny", "cont", start_seq=0) as stream:
        first = [stream.send(x[i : i + 3]).y for i in range(0, half, 3)]
        assert stream.next_seq == half
    assert p1.terminate() == 0
    assert list(snap.glob("tiny-*.npz")), list(snap.iterdir())

    p2 = process_factory(tiny_repo, "--snapshot-dir", str(snap))
    with Client(p2.target) as c:
        assert c.get_session("tiny", "cont").next_seq == half
        # Starting over at 0 would be a different session history: it is a gap-free retry only
        # of what the restored session expects.
        assert code_of(lambda: c.predict("tiny", "cont", x[half:], seq=half + 1)) == (
            grpc.StatusCode.FAILED_PRECONDITION
        )
        with c.session("tiny", "cont") as stream:  # next_seq asked of the server
            assert stream.next_seq == half
            rest = [stream.send(x[i : i + 4]).y for i in range(half, len(x), 4)]
    np.testing.assert_allclose(np.concatenate(first + rest), oracle.run(x)[0], atol=ATOL)
    assert p2.terminate() == 0


def test_a_stalled_inference_worker_turns_the_model_not_serving(tiny_repo: Path) -> None:
    """A worker that stops answering must not leave callers hanging behind a SERVING health."""
    from tests.helpers.proxy import health_status

    with (
        ServerThread(model_repository=tiny_repo, inference_stall_s=0.3) as srv,
        Client(srv.target) as c,
    ):
        c.predict("tinytok", "other", tokens=[1, 2], seq=0)
        with inference_blocked(srv):
            t0 = time.monotonic()
            assert code_of(lambda: c.predict("tiny", "s", xs(1, 2), seq=0, timeout=20)) == (
                grpc.StatusCode.UNAVAILABLE
            )
            assert time.monotonic() - t0 < 10  # at the stall limit, not the client's deadline
            assert wait_until(lambda: health_status(srv.target) == "NOT_SERVING")
            assert health_status(srv.target, service="tiny") == "NOT_SERVING"
            # New work on the model is refused at once, with the reason.
            with pytest.raises(grpc.RpcError) as info:
                c.predict("tiny", "s2", xs(2, 1), seq=0, timeout=20)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "restart" in (info.value.details() or "")
        registry = srv.server.metrics.registry
        assert (
            registry.get_sample_value("lstm_serve_worker_failures_total", {"model": "tiny:1"}) == 1
        )
        # The other model still answers.
        assert c.predict("tinytok", "other", tokens=[3], seq=2).next_seq == 3


def test_a_session_stream_retry_leaves_the_clients_other_streams_alone(tiny_repo: Path) -> None:
    """One stream retrying (its model answers UNAVAILABLE) must not cut the client's channel
    under its other streams."""
    with (
        ServerThread(model_repository=tiny_repo, inference_stall_s=0.3) as srv,
        Client(srv.target) as c,
    ):
        a = c.session("tiny", "a", start_seq=0, max_retries=2, backoff_s=0.01)
        b = c.session("tinytok", "b", start_seq=0)
        assert a.send(xs(1, 1)).next_seq == 1
        assert b.send(tokens=[1]).next_seq == 1
        with inference_blocked(srv), pytest.raises(grpc.RpcError) as info:
            a.send(xs(2, 1))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE and a.reconnects == 2
        assert b.send(tokens=[2]).next_seq == 2
        assert b.reconnects == 0
        a.close()
        b.close()
