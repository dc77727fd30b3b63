#!/usr/bin/env python
"""Server memory under large messages: RSS of a real `lstm-serve serve` while N clients at once
send one Predict of a given size, for a few rounds.

    .venv/bin/python scripts/message_memory.py --clients 8 --mib 100   # over the limit: refused
    .venv/bin/python scripts/message_memory.py --clients 8 --mib 15    # under it: decoded
    .venv/bin/python scripts/message_memory.py --clients 8 --mib 100 --asyncio  # one channel

Threads send on a channel each; --asyncio sends from one event loop, on one shared channel (one
connection, N streams) unless --channel-each.

Prints VmRSS / VmHWM (peak) of the server in MiB: idle, after each round, and a second later.
Not part of CI; docs/operations.md quotes its figures.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np

from lstm_serve.server.pb import lstm_serve_pb2 as pb
from lstm_serve.server.pb import lstm_serve_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[1]


def memory(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) // 1024
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--mib", type=float, default=15.0, help="size of each request's x")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--model", default="forecaster")
    ap.add_argument("--model-repository", default=str(ROOT / "models"))
    ap.add_argument("--asyncio", action="store_true", help="asyncio senders (grpc.aio)")
    ap.add_argument("--channel-each", action="store_true", help="with --asyncio")
    ap.add_argument("--max-message-bytes", type=int, default=None, help="the server's setting")
    args = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = Path(sys.executable).with_name("lstm-serve")
    proc = subprocess.Popen(
        [str(exe), "serve", "--model-repository", args.model_repository,
         "--port", str(port), "--metrics-port", "-1",
         *(["--max-message-bytes", str(args.max_message_bytes)] if args.max_message_bytes else [])],
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    target = f"127.0.0.1:{port}"
    try:
        with grpc.insecure_channel(target) as ch:
            grpc.channel_ready_future(ch).result(timeout=60)
        time.sleep(1.0)
        print(f"idle: {memory(proc.pid)}")
        x = np.ones(int(args.mib * 2**20) // 4, np.float32).tobytes()
        req = pb.StepRequest(
            model=pb.ModelRef(name=args.model), sessions=[pb.SessionSteps(session_id="m", x=x)]
        )
        codes: list[str] = []

        def one() -> None:
            opts = [("grpc.max_send_message_length", -1)]
            with grpc.insecure_channel(target, options=opts) as ch:
                try:
                    pb_grpc.LstmServeStub(ch).Predict(req, timeout=120)
                    codes.append("OK")
                except grpc.RpcError as exc:
                    codes.append(exc.code().name)

        async def one_async(stub: pb_grpc.LstmServeStub) -> None:
            try:
                await stub.Predict(req, timeout=120)
                codes.append("OK")
            except grpc.RpcError as exc:
                codes.append(exc.code().name)

        async def round_async() -> None:
            opts = [("grpc.max_send_message_length", -1)]
            n = args.clients if args.channel_each else 1
            channels = [grpc.aio.insecure_channel(target, options=opts) for _ in range(n)]
            stubs = [pb_grpc.LstmServeStub(ch) for ch in channels]
            await asyncio.gather(*(one_async(stubs[i % n]) for i in range(args.clients)))
            for ch in channels:
                await ch.close(None)  # grace: None (the stubs have no default)

        for r in range(args.rounds):
            t0 = time.monotonic()
            if args.asyncio:
                asyncio.run(round_async())
            else:
                threads = [threading.Thread(target=one) for _ in range(args.clients)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
            took = time.monotonic() - t0
            print(
                f"round {r}: {args.clients} x {args.mib:g} MiB in {took:.2f}s: {memory(proc.pid)}"
            )
        time.sleep(1.0)
        print(f"a second later: {memory(proc.pid)}; answers: {sorted(set(codes))}")
    finally:
        proc.terminate()
        proc.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
