"""The load generator: worker processes, each running grpc.aio clients on one channel.

Every load is a number of bidi streams, each sending one message and waiting for its answer
(ping-pong) for a fixed time; a message carries `sessions` sessions of `steps` steps each.
Requests are serialised once per stream and sent as bytes, and answers are counted as bytes
(the first answer of every stream is parsed and checked), so the clients spend their CPU on
the transport, not on protobuf. The parent reads the workers' CPU time from /proc.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing as mp
import time
from array import array
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection
from typing import Any, cast

from lstm_serve.bench.common import BenchModel, cpu_seconds, latency_summary, machine_busy_seconds
from lstm_serve.client import ROUTE_HEADER

logger = logging.getLogger(__name__)

STREAM_METHOD = "/lstm_serve.v1.LstmServe/Stream"
MAX_MESSAGE = 64 * 1024 * 1024
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE),
    ("grpc.max_send_message_length", MAX_MESSAGE),
]


@dataclass(frozen=True)
class Load:
    name: str
    streams: int  # concurrent bidi streams, each ping-pong
    sessions: int = 1  # sessions per message (> 1: a gateway frame)
    steps: int = 1  # steps per session per message
    group: str = "streams"  # streams | chunked | gateway

    @property
    def label(self) -> str:
        if self.sessions > 1:
            return f"gateway frames of {self.sessions} sessions x {self.steps} step, {self.streams} streams"
        if self.streams == 1 and self.steps == 1:
            return "one stream ping-pong, 1 step/message"
        return f"{self.streams} streams x {self.steps} step{'s' if self.steps > 1 else ''}/message"

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "label": self.label}


# The concurrency sweep (streams x 1 step), then chunked messages and gateway frames.
SWEEP = (1, 4, 16, 64, 256)
LOADS: tuple[Load, ...] = (
    Load("pingpong", 1),
    Load("streams4", 4),
    Load("streams16", 16),
    Load("streams64", 64),
    Load("streams256", 256),
    Load("chunk32", 64, steps=32, group="chunked"),
    Load("gateway64", 4, sessions=64, group="gateway"),
    Load("gateway256", 4, sessions=256, group="gateway"),
    Load("gateway1024", 4, sessions=1024, group="gateway"),
)
QUICK_LOADS = ("pingpong", "streams64", "gateway256")
# Batches big enough to fill a GPU: run by default only with --device cuda.
GPU_LOADS = ("gateway1024",)


def split(n: int, parts: int) -> list[int]:
    return [n // parts + (1 if i < n % parts else 0) for i in range(parts)]


# -- parent side ------------------------------------------------------------------------------


class LoadGen:
    """Worker processes kept for the whole benchmark; one load at a time."""

    def __init__(self, workers: int = 2) -> None:
        ctx = mp.get_context("spawn")
        self._conns: list[Connection] = []
        self._procs: list[Any] = []
        for i in range(workers):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_worker_main, args=(child, i), name=f"loadgen-{i}", daemon=True)
            p.start()
            child.close()
            self._conns.append(parent)
            self._procs.append(p)

    @property
    def pids(self) -> list[int]:
        return [int(p.pid) for p in self._procs]

    def cpu_seconds(self) -> float:
        return sum(cpu_seconds(pid) for pid in self.pids)

    def close(self) -> None:
        for c in self._conns:
            with contextlib.suppress(BrokenPipeError, OSError):
                c.send(None)
        for p in self._procs:
            p.join(10)
            if p.is_alive():
                p.kill()

    def __enter__(self) -> LoadGen:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def run(
        self,
        target: str,
        model: BenchModel,
        load: Load,
        *,
        warmup: float,
        duration: float,
        server: Any = None,
        timeout: float = 120.0,
    ) -> dict[str, Any]:
        """Run one load against target; server (a ServerProcess) gets its CPU and RSS read."""
        shares = split(load.streams, len(self._conns))
        active = [(i, n) for i, n in enumerate(shares) if n > 0]
        for i, n in active:
            self._conns[i].send(
                {
                    "op": "load", "target": target, "model": model.name, "kind": model.kind,
                    "input_dim": model.input_dim, "output_dim": model.output_dim,
                    "streams": n, "sessions": load.sessions, "steps": load.steps,
                    "prefix": f"{load.name}-w{i}",
                }
            )  # fmt: skip
        errors: list[str] = []
        ready = []
        for i, _ in active:
            msg = self._recv(i, timeout)
            if msg.get("ready"):
                ready.append(i)
            else:
                errors.append(str(msg.get("error", msg)))
        go = time.monotonic()
        start, end = go + warmup, go + warmup + duration
        for i in ready:
            self._conns[i].send((start, end))
        if server is not None:
            server.reset_peak_rss()
        _sleep_until(start)
        s_cpu0 = server.cpu_seconds() if server is not None else 0.0
        s_main0 = _main_thread_cpu(server.pid) if server is not None else 0.0
        l_cpu0 = self.cpu_seconds()
        m_cpu0 = machine_busy_seconds()
        scrape0 = server.scrape() if server is not None else {}
        _sleep_until(end)
        m_cpu1 = machine_busy_seconds()
        scrape1 = server.scrape() if server is not None else {}
        s_cpu1 = server.cpu_seconds() if server is not None else 0.0
        s_main1 = _main_thread_cpu(server.pid) if server is not None else 0.0
        l_cpu1 = self.cpu_seconds()
        peak = server.peak_rss_bytes() if server is not None else 0
        lat = array("d")
        msgs = 0
        for i in ready:
            res = self._recv(i, timeout + duration)
            if "error" in res:
                errors.append(str(res["error"]))
            msgs += int(res.get("msgs", 0))
            lat.frombytes(res.get("latencies", b""))
        steps = msgs * load.sessions * load.steps
        server_cpu = s_cpu1 - s_cpu0
        batcher: dict[str, float] = {}
        if scrape0 and scrape1:
            d = {k: scrape1.get(k, 0.0) - scrape0.get(k, 0.0) for k in scrape1}
            calls = d.get("lstm_serve_batch_size_count", 0.0)
            jobs = d.get("lstm_serve_queue_seconds_count", 0.0)
            reqs = d.get("lstm_serve_step_latency_seconds_count", 0.0)
            batcher = {
                "inference_calls": calls,
                "mean_batch": d.get("lstm_serve_batch_size_sum", 0.0) / calls if calls else 0.0,
                "mean_inference_ms": d.get("lstm_serve_inference_seconds_sum", 0.0) / calls * 1e3
                if calls else 0.0,
                "mean_queue_ms": d.get("lstm_serve_queue_seconds_sum", 0.0) / jobs * 1e3
                if jobs else 0.0,
                "inference_thread_busy": d.get("lstm_serve_inference_seconds_sum", 0.0) / duration,
                # engine time per request: arrival at the engine to outputs (no gRPC)
                "mean_engine_ms": d.get("lstm_serve_step_latency_seconds_sum", 0.0) / reqs * 1e3
                if reqs else 0.0,
            }  # fmt: skip
        return {
            "load": load.name,
            "duration_s": duration,
            "messages": msgs,
            "steps": steps,
            "messages_per_s": msgs / duration,
            "steps_per_s": steps / duration,
            "latency_ms": latency_summary(lat),
            "server_cpu_s": server_cpu,
            "server_cpu_util": server_cpu / duration,
            "server_main_thread_cpu_util": (s_main1 - s_main0) / duration,
            "server_cpu_s_per_1k_steps": server_cpu / steps * 1000 if steps else float("nan"),
            "server_peak_rss_bytes": peak,
            "loadgen_cpu_s": l_cpu1 - l_cpu0,
            "loadgen_cpu_util": (l_cpu1 - l_cpu0) / duration,
            "machine_cpu_util": (m_cpu1 - m_cpu0) / duration,
            # other processes on the machine (not the server, not the load generator)
            "other_cpu_util": max(0.0, (m_cpu1 - m_cpu0) - server_cpu - (l_cpu1 - l_cpu0))
            / duration,
            "batcher": batcher,
            "errors": errors,
            "latencies_s": lat,  # dropped from the JSON; kept for the plots
        }

    def create_sessions(
        self,
        target: str,
        model: BenchModel,
        first: int,
        last: int,
        *,
        frame: int = 1024,
        streams_per_worker: int = 1,
        timeout: float = 900.0,
    ) -> tuple[int, list[str]]:
        """Start sessions mem-<first>..mem-<last - 1> with one step each, in gateway frames."""
        shares = split(last - first, len(self._conns))
        lo = first
        active = []
        for i, n in enumerate(shares):
            if n == 0:
                continue
            self._conns[i].send(
                {
                    "op": "create", "target": target, "model": model.name, "kind": model.kind,
                    "input_dim": model.input_dim, "first": lo, "last": lo + n, "frame": frame,
                    "streams": streams_per_worker,
                }
            )  # fmt: skip
            active.append(i)
            lo += n
        created, errors = 0, []
        for i in active:
            res = self._recv(i, timeout)
            created += int(res.get("created", 0))
            if "error" in res:
                errors.append(str(res["error"]))
        return created, errors

    def _recv(self, i: int, timeout: float) -> dict[str, Any]:
        conn = self._conns[i]
        if not conn.poll(timeout):
            raise RuntimeError(f"load generator worker {i} did not answer in {timeout:.0f}s")
        msg: dict[str, Any] = conn.recv()
        return msg


def _sleep_until(t: float) -> None:
    while (left := t - time.monotonic()) > 0:
        time.sleep(min(left, 0.5))


def _main_thread_cpu(pid: int) -> float:
    try:
        return cpu_seconds(pid, tid=pid)
    except OSError:
        return 0.0


# -- worker side ------------------------------------------------------------------------------


def _worker_main(conn: Connection, index: int) -> None:
    logging.basicConfig(level=logging.WARNING)
    while True:
        try:
            cmd = conn.recv()
        except EOFError:
            return
        if cmd is None:
            return
        result: dict[str, Any] | None
        try:
            if cmd["op"] == "load":
                result = asyncio.run(_run_load(conn, cmd))
            else:
                result = asyncio.run(_create(cmd))
        except Exception as exc:
            result = {"error": f"{type(exc).__name__}: {exc}"}
        if result is not None:
            conn.send(result)


def _session_steps(cmd: dict[str, Any], session_id: str, steps: int) -> Any:
    from lstm_serve.server.pb import lstm_serve_pb2 as pb

    s = pb.SessionSteps(session_id=session_id)
    if cmd["kind"] == "token":
        s.tokens.extend([1] * steps)
    else:
        s.x = array("f", [0.5] * (steps * int(cmd["input_dim"]))).tobytes()
    return s


def _request(cmd: dict[str, Any], session_ids: list[str], steps: int) -> bytes:
    from lstm_serve.server.pb import lstm_serve_pb2 as pb

    if len(session_ids) > 1:  # a gateway frame, in the columnar form
        import numpy as np

        from lstm_serve.client import frame_request

        shape = (
            (len(session_ids), steps)
            if cmd["kind"] == "token"
            else (len(session_ids), steps, int(cmd["input_dim"]))
        )
        fill = (
            np.ones(shape, np.int64) if cmd["kind"] == "token" else np.full(shape, 0.5, np.float32)
        )
        req = frame_request(cmd["model"], session_ids, fill)
    else:
        req = pb.StepRequest(
            model=pb.ModelRef(name=cmd["model"]),
            sessions=[_session_steps(cmd, sid, steps) for sid in session_ids],
        )
    data: bytes = req.SerializeToString()
    return data


def _check(cmd: dict[str, Any], data: bytes) -> None:
    from lstm_serve.server.pb import lstm_serve_pb2 as pb

    resp = pb.StepResponse.FromString(data)
    want = int(cmd["steps"]) * int(cmd["output_dim"]) * 4
    if resp.HasField("frame"):
        if len(resp.frame.y) != want * int(cmd["sessions"]) or resp.frame.steps != int(
            cmd["steps"]
        ):
            raise RuntimeError(f"frame answer has {len(resp.frame.y)} bytes of y")
        return
    if len(resp.sessions) != int(cmd["sessions"]):
        raise RuntimeError(f"answer has {len(resp.sessions)} sessions, not {cmd['sessions']}")
    for s in resp.sessions:
        if len(s.y) != want or s.steps != int(cmd["steps"]):
            raise RuntimeError(f"answer for {s.session_id} has {len(s.y)} bytes of y, not {want}")


async def _run_load(conn: Connection, cmd: dict[str, Any]) -> dict[str, Any] | None:
    import grpc

    EOF = cast(Any, grpc.aio).EOF
    loop = asyncio.get_running_loop()
    channel: Any
    async with grpc.aio.insecure_channel(cmd["target"], options=CHANNEL_OPTIONS) as channel:
        await asyncio.wait_for(channel.channel_ready(), 30)
        method = channel.stream_stream(STREAM_METHOD)  # bytes in, bytes out
        n, sessions, steps = int(cmd["streams"]), int(cmd["sessions"]), int(cmd["steps"])
        payloads = [
            _request(cmd, [f"{cmd['prefix']}-s{k}-{j}" for j in range(sessions)], steps)
            for k in range(n)
        ]
        # The routing key a proxy hashes on (docs/operations.md): the session id, or for a
        # frame the gateway id; each stream here is one gateway.
        calls = [method(metadata=((ROUTE_HEADER, f"{cmd['prefix']}-s{k}"),)) for k in range(n)]
        try:

            async def first(call: Any, payload: bytes) -> None:
                await call.write(payload)
                _check(cmd, await call.read())

            await asyncio.gather(*(first(c, p) for c, p in zip(calls, payloads, strict=True)))
        except Exception as exc:
            conn.send({"error": f"{type(exc).__name__}: {exc}"})
            for c in calls:
                c.cancel()
            return None  # the error was the answer
        conn.send({"ready": True})
        start, end = await loop.run_in_executor(None, conn.recv)
        lat = array("d")
        errors: list[str] = []

        async def pingpong(call: Any, payload: bytes) -> int:
            mono = time.monotonic
            done = 0
            try:
                while True:
                    t0 = mono()
                    await call.write(payload)
                    resp = await call.read()
                    t1 = mono()
                    if resp is EOF:
                        raise RuntimeError("the server ended the stream")
                    if t0 >= start and t1 <= end:
                        lat.append(t1 - t0)
                        done += 1
                    if t1 >= end:
                        break
                await call.done_writing()
            except Exception as exc:
                # A failed write hides why the call ended: ask the call for its status.
                status = ""
                with contextlib.suppress(Exception):
                    code = await asyncio.wait_for(call.code(), 1.0)
                    status = f" (call ended {code}: {await call.details()})"
                errors.append(f"{type(exc).__name__}: {exc}{status}")
                call.cancel()
            return done

        counts = await asyncio.gather(
            *(pingpong(c, p) for c, p in zip(calls, payloads, strict=True))
        )
    result: dict[str, Any] = {"msgs": sum(counts), "latencies": lat.tobytes()}
    if errors:
        result["error"] = f"{len(errors)} streams failed, first: {errors[0][:300]}"
    return result


async def _create(cmd: dict[str, Any]) -> dict[str, Any]:
    import grpc

    EOF = cast(Any, grpc.aio).EOF
    first, last, frame = int(cmd["first"]), int(cmd["last"]), int(cmd["frame"])
    starts = list(range(first, last, frame))
    created = 0
    errors: list[str] = []
    channel: Any
    async with grpc.aio.insecure_channel(cmd["target"], options=CHANNEL_OPTIONS) as channel:
        await asyncio.wait_for(channel.channel_ready(), 30)
        method = channel.stream_stream(STREAM_METHOD)
        todo: asyncio.Queue[int] = asyncio.Queue()
        for s in starts:
            todo.put_nowait(s)

        async def one_stream() -> None:
            nonlocal created
            call = method()
            while not todo.empty():
                lo = todo.get_nowait()
                hi = min(lo + frame, last)
                await call.write(_request(cmd, [f"mem-{i}" for i in range(lo, hi)], 1))
                resp = await call.read()
                if resp is EOF:
                    code = await call.code()
                    details = await call.details()
                    raise RuntimeError(f"stream ended: {code} {details}")
                created += hi - lo
            await call.done_writing()

        try:
            await asyncio.gather(*(one_stream() for _ in range(int(cmd["streams"]))))
        except Exception as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
    result: dict[str, Any] = {"created": created}
    if errors:
        result["error"] = errors[0][:500]
    return result
