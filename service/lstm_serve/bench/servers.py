"""Each benchmarked server runs in a subprocess of its own, so its CPU time and RSS are its own.

Child: `python -m lstm_serve.bench.servers {echo,naive,lstm-serve,lstm-serve-echo} --repository DIR --model NAME
[--settings JSON]` prints one line `READY {"port": ..., "metrics_port": ...}`, then answers
`stats` lines on stdin with one JSON line, and stops on `quit` or end of input.
Parent: ServerProcess starts one, reads its /proc figures and stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import gc
import json
import logging
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

import numpy as np

from lstm_serve.bench.common import (
    BenchModel,
    cpu_seconds,
    peak_rss_bytes,
    reset_peak_rss,
    rss_bytes,
)

logger = logging.getLogger(__name__)

# lstm-serve-echo: lstm-serve's own server (interceptors, connection options, health,
# reflection, metrics) with echo's answers instead of the engine: what the server costs.
KINDS = ("echo", "naive", "lstm-serve", "lstm-serve-echo")
MAX_MESSAGE = 64 * 1024 * 1024


# -- parent side ------------------------------------------------------------------------------


class ServerProcess:
    """A benchmarked server in its own process."""

    def __init__(
        self,
        kind: str,
        model: BenchModel,
        log_path: Path,
        settings: dict[str, Any] | None = None,
        intra_op_threads: int = 1,
    ) -> None:
        self.kind = kind
        self.model = model
        self.settings = settings or {}
        self.intra_op_threads = intra_op_threads
        self.log_path = log_path
        self.port = 0
        self.metrics_port = 0
        self._proc: subprocess.Popen[str] | None = None
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._log: IO[str] | None = None

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 120.0) -> ServerProcess:
        cmd = [
            sys.executable, "-m", "lstm_serve.bench.servers", self.kind,
            "--repository", str(self.model.repository), "--model", self.model.name,
            "--settings", json.dumps(self.settings),
            "--intra-op-threads", str(self.intra_op_threads),
        ]  # fmt: skip
        self._log = self.log_path.open("a")
        env = dict(os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")
        self._proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True,
            env=env, cwd=str(Path(__file__).resolve().parents[3]),
        )  # fmt: skip
        threading.Thread(target=self._read, daemon=True).start()
        line = self._line(timeout)
        if not line.startswith("READY "):
            self.stop()
            tail = self.log_path.read_text()[-2000:] if self.log_path.exists() else ""
            raise RuntimeError(f"{self.kind} server did not start: {line!r}\n{tail}")
        ready = json.loads(line[len("READY ") :])
        self.port, self.metrics_port = int(ready["port"]), int(ready.get("metrics_port", 0))
        return self

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            self._lines.put(line.strip())
        self._lines.put(None)

    def _line(self, timeout: float) -> str:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            return "<timeout>"
        return "<exited>" if line is None else line

    def _ask(self, command: str, timeout: float) -> dict[str, Any]:
        assert self._proc is not None and self._proc.stdin is not None
        self._proc.stdin.write(command + "\n")
        self._proc.stdin.flush()
        line = self._line(timeout)
        if not line.startswith("STATS "):
            raise RuntimeError(f"{self.kind} server, {command}: {line!r}")
        result: dict[str, Any] = json.loads(line[len("STATS ") :])
        return result

    def stats(self, timeout: float = 60.0) -> dict[str, Any]:
        """The server's own figures (sessions, replay cache) and its RSS."""
        return self._ask("stats", timeout)

    def drop_replay(self, timeout: float = 120.0) -> dict[str, Any]:
        """lstm-serve only: empty the replay cache, give freed memory back, read the RSS."""
        return self._ask("drop-replay", timeout)

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pid)

    def scrape(self) -> dict[str, float]:
        """lstm-serve's batcher counters from its Prometheus endpoint ({} for the others)."""
        if self.metrics_port <= 0:
            return {}
        import urllib.request

        from prometheus_client.parser import text_string_to_metric_families

        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as r:
            text = r.read().decode()
        wanted = {
            "lstm_serve_batch_size_sum", "lstm_serve_batch_size_count",
            "lstm_serve_inference_seconds_sum", "lstm_serve_queue_seconds_sum",
            "lstm_serve_queue_seconds_count", "lstm_serve_steps_total",
            "lstm_serve_step_latency_seconds_sum", "lstm_serve_step_latency_seconds_count",
        }  # fmt: skip
        out: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name in wanted:
                    out[sample.name] = out.get(sample.name, 0.0) + float(sample.value)
        return out

    def rss_bytes(self) -> int:
        return rss_bytes(self.pid)

    def peak_rss_bytes(self) -> int:
        return peak_rss_bytes(self.pid)

    def reset_peak_rss(self) -> bool:
        return reset_peak_rss(self.pid)

    def stop(self, timeout: float = 30.0) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            if proc.stdin is not None:
                proc.stdin.write("quit\n")
                proc.stdin.close()
        except (BrokenPipeError, OSError):
            pass
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            logger.warning("%s server did not stop in %.0fs; killing it", self.kind, timeout)
            proc.kill()
            proc.wait()
        if self._log is not None:
            self._log.close()

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- child side -------------------------------------------------------------------------------


async def _serve(args: argparse.Namespace) -> None:
    import grpc

    from lstm_serve.core.repository import load_repository

    loop = asyncio.get_running_loop()
    repo = load_repository(Path(args.repository))
    mv = repo.get(args.model)
    stats_fn: Any = None
    drop_fn: Any = None
    stop_fn: Any = None
    metrics_port = -1
    if args.kind in ("lstm-serve", "lstm-serve-echo"):
        from lstm_serve.bench.echo import EchoServicer
        from lstm_serve.core.replay import ReplayCache
        from lstm_serve.server.app import LstmServer
        from lstm_serve.server.settings import Settings

        given: dict[str, Any] = {
            "host": "127.0.0.1", "port": 0, "metrics_port": 0, "log_level": "WARNING"
        }  # fmt: skip
        given |= json.loads(args.settings)
        given["model_repository"] = Path(args.repository)
        echo = None
        if args.kind == "lstm-serve-echo":
            echo = EchoServicer(mv.manifest.input_dim, mv.manifest.output_dim)
        lstm = LstmServer(Settings(**given), lstm_servicer=echo)
        await lstm.start()
        port, metrics_port = lstm.port, lstm.metrics_port

        def lstm_stats() -> dict[str, Any]:
            assert lstm.engine is not None
            lm = lstm.engine.model(mv.manifest.name, mv.manifest.version)
            return {
                "sessions": len(lm.store),
                "replay_entries": len(lm.scheduler.replay),
                "replay_accounted_bytes": lm.scheduler.replay.bytes,
                "replay_budget_bytes": lm.scheduler.replay.budget,
                "arena_capacity": lm.store.capacity,
            }

        stats_fn = lstm_stats

        def lstm_drop_replay() -> dict[str, Any]:
            assert lstm.engine is not None
            lm = lstm.engine.model(mv.manifest.name, mv.manifest.version)
            dropped = len(lm.scheduler.replay)
            lm.scheduler.replay = ReplayCache(lm.scheduler.replay.budget)
            lm.store.forget_answers(np.arange(lm.store.capacity))
            gc.collect()
            _malloc_trim()
            return {"replay_entries_dropped": dropped}

        drop_fn = lstm_drop_replay

        async def stop_lstm() -> None:
            await lstm.stop(2.0)

        stop_fn = stop_lstm
    else:
        from lstm_serve.bench.echo import EchoServicer
        from lstm_serve.bench.naive import NaiveServicer
        from lstm_serve.server.pb import lstm_serve_pb2_grpc as pb_grpc

        options = [
            ("grpc.max_receive_message_length", MAX_MESSAGE),
            ("grpc.max_send_message_length", MAX_MESSAGE),
            ("grpc.so_reuseport", 0),
        ]
        server = grpc.aio.server(options=options)
        m = mv.manifest
        servicer: Any
        if args.kind == "echo":
            servicer = EchoServicer(m.input_dim, m.output_dim)
        else:
            servicer = NaiveServicer(mv, args.intra_op_threads)
            stats_fn = lambda: {"sessions": len(servicer.state)}  # noqa: E731
        pb_grpc.add_LstmServeServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()

        async def stop_plain() -> None:
            await server.stop(1.0)

        stop_fn = stop_plain

    print("READY " + json.dumps({"port": port, "metrics_port": metrics_port}), flush=True)
    commands: asyncio.Queue[str] = asyncio.Queue()

    def read_stdin() -> None:
        for line in sys.stdin:
            loop.call_soon_threadsafe(commands.put_nowait, line.strip())
        loop.call_soon_threadsafe(commands.put_nowait, "quit")

    threading.Thread(target=read_stdin, daemon=True).start()
    while (cmd := await commands.get()) != "quit":
        if cmd in ("stats", "drop-replay"):
            t0 = time.perf_counter()
            fn = stats_fn if cmd == "stats" else drop_fn
            st: dict[str, Any] = fn() if fn is not None else {}
            st["rss_bytes"] = rss_bytes(os.getpid())
            st["stats_seconds"] = time.perf_counter() - t0
            print("STATS " + json.dumps(st), flush=True)
    await stop_fn()


def _malloc_trim() -> None:
    """Ask glibc to give freed heap pages back to the kernel, so RSS shows what was freed."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lstm_serve.bench.servers")
    p.add_argument("kind", choices=KINDS)
    p.add_argument("--repository", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--settings", default="{}", help="lstm-serve Settings fields as JSON")
    p.add_argument("--intra-op-threads", type=int, default=1)
    args = p.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    asyncio.run(_serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
