"""Requests/s of the HTTP/REST port's server library: aiohttp (what lstm-serve uses) against
uvicorn + starlette, both serving the same `kserve_http.HttpFront` over a real engine on the
gRPC server's event loop. Figures: docs/protocol.md ("HTTP/REST").

    .venv/bin/python scripts/http_bench.py [--seconds 5] [--concurrency 16]

uvicorn and starlette are not dependencies: `pip install uvicorn starlette` to measure them too.
The load comes from another process (aiohttp's client, keep-alive connections), so the
figures are the server's, as far as one machine's cores allow: they share the CPU with it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from typing import Any

import aiohttp

from lstm_serve.server import kserve_http
from lstm_serve.server.app import LstmServer
from lstm_serve.server.kserve import InferenceServicer
from lstm_serve.server.settings import Settings

INFER = {"inputs": [{"name": "x", "shape": [1, 1, 2], "datatype": "FP32", "data": [12.1, 8.9]}]}


async def _load(url: str, body: bytes | None, seconds: float, concurrency: int) -> float:
    done = 0
    stop = time.perf_counter() + seconds
    conn = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=conn) as s:

        async def worker() -> None:
            nonlocal done
            while time.perf_counter() < stop:
                if body is None:
                    async with s.get(url) as r:
                        await r.read()
                else:
                    async with s.post(url, data=body) as r:
                        await r.read()
                assert r.status == 200, r.status
                done += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return done / (time.perf_counter() - t0)


def load(port: int, seconds: float, concurrency: int) -> dict[str, float]:
    """Runs in another process: requests/s of each endpoint."""
    cmd = [sys.executable, __file__, "--load", str(port), str(seconds), str(concurrency)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return dict(json.loads(out.strip().splitlines()[-1]))


async def _aiohttp(seconds: float, concurrency: int) -> dict[str, float]:
    server = LstmServer(Settings.model_validate({"port": 0, "metrics_port": -1, "http_port": 0}))
    await server.start()
    try:
        return await asyncio.to_thread(load, server.http_port, seconds, concurrency)
    finally:
        await server.stop(1.0)


async def _uvicorn(seconds: float, concurrency: int) -> dict[str, float]:
    import uvicorn  # type: ignore[import-not-found,unused-ignore]  # not a dependency
    from starlette.requests import Request  # type: ignore[import-not-found,unused-ignore]
    from starlette.responses import Response  # type: ignore[import-not-found,unused-ignore]

    server = LstmServer(Settings.model_validate({"port": 0, "metrics_port": -1}))
    await server.start()
    assert server.engine is not None
    s = server.settings
    front = kserve_http.HttpFront(
        InferenceServicer(server.engine, s.max_inflight_per_stream, s.max_message_bytes), None
    )

    async def app(scope: Any, receive: Any, send: Any) -> None:
        request = Request(scope, receive)
        body = await request.body()
        r = await front.handle(request.method, request.url.path, request.headers, body)
        response = Response(r.body, r.status, dict(r.headers), media_type=r.content_type)
        await response(scope, receive, send)

    sock = kserve_http.bind("127.0.0.1", 0)
    config = uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False)
    uv = uvicorn.Server(config)
    task = asyncio.ensure_future(uv.serve(sockets=[sock]))
    while not uv.started:
        await asyncio.sleep(0.05)
    try:
        return await asyncio.to_thread(load, sock.getsockname()[1], seconds, concurrency)
    finally:
        uv.should_exit = True
        await task
        await server.stop(1.0)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--load":
        port, seconds, conc = int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
        base = f"http://127.0.0.1:{port}"
        figures = {
            "live": asyncio.run(_load(f"{base}/v2/health/live", None, seconds, conc)),
            "infer": asyncio.run(
                _load(
                    f"{base}/v2/models/forecaster/infer", json.dumps(INFER).encode(), seconds, conc
                )
            ),
        }
        print(json.dumps(figures))
        return 0
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--concurrency", type=int, default=16)
    args = p.parse_args()
    candidates = {"aiohttp": _aiohttp, "uvicorn+starlette": _uvicorn}
    print(f"{'server':<20} {'GET /v2/health/live':>20} {'POST infer (1 step)':>20}  (requests/s)")
    for name, run in candidates.items():
        try:
            fig = asyncio.run(run(args.seconds, args.concurrency))
        except ImportError as exc:
            print(f"{name:<20} not installed ({exc.name})")
            continue
        print(f"{name:<20} {fig['live']:>20.0f} {fig['infer']:>20.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
