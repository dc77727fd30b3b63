"""Loopback networking for tests: a TCP proxy that can cut connections, free ports, and a real
`lstm-serve serve` subprocess.

    with TcpProxy(server_port) as proxy:
        client = Client(proxy.target)
        ...
        proxy.drop_all()      # every open connection is cut; new ones are still accepted

    with ServeProcess(repo, snapshot_dir=d) as proc:   # waits until it answers health checks
        Client(proc.target)...
        proc.terminate()      # SIGTERM (graceful) or proc.kill() (SIGKILL); proc.start() again
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

HOST = "127.0.0.1"
ROOT = Path(__file__).resolve().parents[2]
LSTM_SERVE = Path(sys.executable).parent / "lstm-serve"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


class TcpProxy:
    """Forwards HOST:port to HOST:upstream_port on an asyncio loop in a background thread."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = 0
        self.accepted = 0  # connections accepted so far
        self.dropped = 0  # connections cut by drop_all()
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._open: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="tcp-proxy", daemon=True
        )

    @property
    def target(self) -> str:
        return f"{HOST}:{self.port}"

    def _call(self, coro: Any, timeout: float = 10.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def start(self) -> TcpProxy:
        self._thread.start()

        async def listen() -> int:
            self._server = await asyncio.start_server(self._handle, HOST, 0)
            return int(self._server.sockets[0].getsockname()[1])

        self.port = self._call(listen())
        return self

    async def _handle(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        try:
            u_reader, u_writer = await asyncio.open_connection(HOST, self.upstream_port)
        except OSError:
            c_writer.transport.abort()
            return
        pair = (c_writer, u_writer)
        self._open.add(pair)
        try:
            await asyncio.gather(_pipe(c_reader, u_writer), _pipe(u_reader, c_writer))
        finally:
            self._open.discard(pair)
            for w in pair:
                w.transport.abort()

    def drop_all(self) -> int:
        """Cut every open connection at once (no goodbye on either side); returns how many."""

        async def drop() -> int:
            pairs = list(self._open)
            self._open.clear()
            for c_writer, u_writer in pairs:
                c_writer.transport.abort()
                u_writer.transport.abort()
            self.dropped += len(pairs)
            return len(pairs)

        return int(self._call(drop()))

    @property
    def open_connections(self) -> int:
        return len(self._open)

    def stop(self) -> None:
        if not self._thread.is_alive():
            return

        async def close() -> None:
            if self._server is not None:
                self._server.close()
            for c_writer, u_writer in list(self._open):
                c_writer.transport.abort()
                u_writer.transport.abort()

        self._call(close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.write_eof()


def health_status(target: str, timeout: float = 1.0, service: str = "") -> str:
    """The server's gRPC health status ('SERVING', ...), or 'DOWN' when it does not answer."""
    with grpc.insecure_channel(target) as channel:
        try:
            resp = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.RpcError:
            return "DOWN"
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status))


class ServeProcess:
    """A real `lstm-serve serve` subprocess on a free loopback port, its log in a file.

    Settings are passed as flags (`snapshot_interval_s=0.5` -> `--snapshot-interval-s 0.5`).
    The port is kept across restarts, so clients can reconnect to the same target.
    """

    def __init__(
        self,
        model_repository: Path,
        log_path: Path,
        *,
        port: int | None = None,
        metrics_port: int = -1,
        env: dict[str, str] | None = None,
        **settings: object,
    ) -> None:
        self.model_repository = model_repository
        self.log_path = log_path
        self.port = port or free_port()
        self.metrics_port = free_port() if metrics_port == 0 else metrics_port
        self.settings = settings
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def target(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def command(self) -> list[str]:
        cmd = [
            str(LSTM_SERVE),
            "serve",
            "--host",
            HOST,
            "--port",
            str(self.port),
            "--metrics-port",
            str(self.metrics_port),
            "--model-repository",
            str(self.model_repository),
        ]
        for name, value in self.settings.items():
            cmd += ["--" + name.replace("_", "-"), str(value)]
        return cmd

    def start(self, timeout: float = 60.0) -> ServeProcess:
        """Start and wait until the server answers SERVING to a health check."""
        self.starts += 1
        log = self.log_path.open("ab")
        log.write(f"--- start {self.starts}: {' '.join(self.command())}\n".encode())
        log.flush()
        self.proc = subprocess.Popen(
            self.command(), stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=ROOT
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"lstm-serve exited with {self.proc.returncode}:\n{self.log()}")
            if _port_open(self.port) and health_status(self.target) == "SERVING":
                return self
            time.sleep(0.05)
        self.kill()
        raise TimeoutError(f"lstm-serve did not become healthy in {timeout}s:\n{self.log()}")

    def cli_health(self) -> tuple[int, str]:
        """`lstm-serve health --target` (the exit status and what it printed)."""
        r = subprocess.run(
            [str(LSTM_SERVE), "health", "--target", self.target],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
        )
        return r.returncode, (r.stdout + r.stderr).strip()

    def terminate(self, timeout: float = 60.0) -> int:
        """SIGTERM (graceful: drain, snapshot, exit); returns the exit status."""
        return self._signal(signal.SIGTERM, timeout)

    def kill(self) -> int:
        """SIGKILL: no drain, no final snapshot."""
        return self._signal(signal.SIGKILL, 30.0)

    def _signal(self, sig: signal.Signals, timeout: float) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc is not None else 0
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def __enter__(self) -> ServeProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.terminate(timeout=20)


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex((HOST, port)) == 0
