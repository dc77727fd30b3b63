"""A real redis-server on a loopback port, with an append-only file fsynced on every write (the
configuration under which an acknowledged step survives a Redis crash); optionally with a
password (--requirepass) and TLS only (any object with the CA and server certificate paths, e.g.
the test PKI of tests/helpers/certs.py)."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path
from typing import Protocol

import redis

from lstm_serve.bench.procs.process import free_port, stop_process


class CertFiles(Protocol):
    """A certificate and its private key, as PEM files."""

    @property
    def cert_path(self) -> Path: ...

    @property
    def key_path(self) -> Path: ...


class TlsFiles(Protocol):
    """What a TLS-only redis-server needs: its certificate and the CA that issued it."""

    @property
    def ca_path(self) -> Path: ...

    @property
    def server(self) -> CertFiles: ...


class RedisServer:
    def __init__(
        self,
        directory: Path,
        port: int | None = None,
        fsync: str = "always",
        password: str | None = None,
        tls: TlsFiles | None = None,
    ) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (.ci/run installs it)")
        self.binary = binary
        self.dir = directory
        self.port = port or free_port()
        self.fsync = fsync
        self.password = password
        self.tls = tls
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        if self.tls is not None:
            return f"rediss://{auth}127.0.0.1:{self.port}/0?ssl_ca_certs={self.tls.ca_path}"
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.dir.mkdir(parents=True, exist_ok=True)
        args = [
            self.binary, "--bind", "127.0.0.1", "--dir", str(self.dir), "--save", "",
            "--appendonly", "yes", "--appendfsync", self.fsync, "--protected-mode", "no",
        ]  # fmt: skip
        if self.password:
            args += ["--requirepass", self.password]
        if self.tls is None:
            args += ["--port", str(self.port)]
        else:
            s = self.tls.server
            args += [
                "--port", "0", "--tls-port", str(self.port), "--tls-cert-file", str(s.cert_path),
                "--tls-key-file", str(s.key_path), "--tls-ca-cert-file", str(self.tls.ca_path),
                "--tls-auth-clients", "no",
            ]  # fmt: skip
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 15
        while True:
            try:
                if self.client().ping():
                    return self
            except redis.exceptions.ConnectionError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise
                time.sleep(0.02)

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_timeout=5)

    def kill(self) -> None:
        """SIGKILL: what was acknowledged is in the fsynced append-only file."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        stop_process(self.proc)
