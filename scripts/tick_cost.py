#!/usr/bin/env python
"""What one request costs lstm-serve's event loop without gRPC: decode, submit, the scheduler
tick (with ONNX Runtime), the answer and its encoding, for N one-step requests of N sessions
per tick, on the bundled forecaster.

Prints the median per request of four variants, best of --rounds alternating rounds: the
full path, without metrics, with a runtime that does nothing (so ONNX Runtime's share shows),
and without encoding the response.

    .venv/bin/python scripts/tick_cost.py --sessions 1,8,32,128

With --frame N it measures instead one columnar frame of N sessions per tick (a gateway's
message): decoding the serialized request, the tick, and encoding the answer, in us per session.

    .venv/bin/python scripts/tick_cost.py --frame 1024

Not part of CI; docs/benchmarks.md quotes its output.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from lstm_serve.core.jobs import Limits, Runner
from lstm_serve.core.probes import Probes, no_probes
from lstm_serve.core.replay import ReplayCache
from lstm_serve.core.repository import ModelVersion, load_repository
from lstm_serve.core.runtime import Device, ModelRuntime, choose_device
from lstm_serve.core.scheduler import Scheduler
from lstm_serve.core.store import SessionStore
from lstm_serve.server import convert
from lstm_serve.server.metrics import Metrics
from lstm_serve.server.pb import lstm_serve_pb2 as pb

ROOT = Path(__file__).resolve().parents[1]


class Idle:
    """A runtime that answers zeros at once: the scheduler's own cost."""

    def __init__(self, output_dim: int) -> None:
        self.output_dim = output_dim

    def run(self, x: np.ndarray, h0: np.ndarray, c0: np.ndarray) -> Any:
        return np.zeros((x.shape[0], x.shape[1], self.output_dim), np.float32), h0, c0


async def per_request_us(
    mv: ModelVersion, n: int, runtime: Runner, probes: Probes, encode: bool, ticks: int
) -> float:
    m = mv.manifest
    store = SessionStore(max(4096, n), m.layers, m.hidden_size, m.output_dim)
    sched = Scheduler(runtime, store, ReplayCache(1 << 26), probes, Limits(), "bench")
    x = np.ones(m.input_dim, np.float32).tobytes()
    reqs = [pb.StepRequest(sessions=[pb.SessionSteps(session_id=f"s{i}", x=x)]) for i in range(n)]
    keys = [[f"s{i}"] for i in range(n)]
    times = []
    for _ in range(ticks):
        t0 = time.perf_counter()
        futs = [
            sched.submit_step(convert.frame_of(r, m), k, None)
            for r, k in zip(reqs, keys, strict=True)
        ]
        results = await asyncio.gather(*futs)
        if encode:
            for res in results:
                convert.step_response(mv, res, "", 0, False)
        times.append(time.perf_counter() - t0)
    sched.close()
    return statistics.median(times[ticks // 5 :]) * 1e6 / n


async def per_session_us_frame(
    mv: ModelVersion, n: int, runtime: Runner, probes: Probes, ticks: int
) -> float:
    """One frame of n sessions per tick, from its bytes to the answer's bytes."""
    from lstm_serve.client import frame_request

    m = mv.manifest
    store = SessionStore(max(4096, n), m.layers, m.hidden_size, m.output_dim)
    sched = Scheduler(runtime, store, ReplayCache(1 << 26), probes, Limits(), "bench")
    ids = [f"gateway-7/s{i}" for i in range(n)]
    data = frame_request(
        m.name, ids, np.full((n, 1, m.input_dim), 0.5, np.float32)
    ).SerializeToString()
    times = []
    for _ in range(ticks):
        t0 = time.perf_counter()
        req = pb.StepRequest.FromString(data)
        frame = convert.frame_of(req, m)
        result = await sched.submit_step(frame, frame.ids, None)
        convert.step_response(mv, result, "", 0, True).SerializeToString()
        times.append(time.perf_counter() - t0)
    sched.close()
    return statistics.median(times[ticks // 5 :]) * 1e6 / n


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sessions", default="1,8,32,128", help="requests per tick")
    ap.add_argument(
        "--frame", type=int, default=0, help="instead: one frame of this many sessions per tick"
    )
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--ticks", type=int, default=300)
    return ap


def main() -> None:
    args = parser().parse_args()
    mv = load_repository(ROOT / "models").get("forecaster")
    ort_runtime = ModelRuntime(mv, choose_device(Device.cpu))
    ort_runtime.warm_up()
    variants: dict[str, tuple[Runner, bool, bool]] = {
        "full path": (ort_runtime, True, True),
        "no metrics": (ort_runtime, False, True),
        "no ONNX Runtime": (Idle(mv.manifest.output_dim), True, True),
        "no encoding": (ort_runtime, True, False),
    }
    if args.frame:
        best = dict.fromkeys(variants, float("inf"))
        for _ in range(args.rounds):
            for name, (runtime, metrics, _encode) in variants.items():
                if name == "no encoding":
                    continue
                probes = Metrics.create().probes("bench") if metrics else no_probes()
                us = asyncio.run(per_session_us_frame(mv, args.frame, runtime, probes, args.ticks))
                best[name] = min(best[name], us)
        print(f"us per session, one frame of {args.frame} sessions per tick (best of rounds)")
        for name, us in best.items():
            if name != "no encoding":
                print(f"  {name:<18} {us:8.2f}")
        return
    print("us per request (event loop, in process, best of rounds)")
    print(f"{'requests/tick':>14}" + "".join(f"{v:>18}" for v in variants))
    for n in (int(s) for s in args.sessions.split(",")):
        best = dict.fromkeys(variants, float("inf"))
        for _ in range(args.rounds):
            for name, (runtime, metrics, encode) in variants.items():
                probes = Metrics.create().probes("bench") if metrics else no_probes()
                us = asyncio.run(per_request_us(mv, n, runtime, probes, encode, args.ticks))
                best[name] = min(best[name], us)
        print(f"{n:>14}" + "".join(f"{best[v]:>18.1f}" for v in variants))


if __name__ == "__main__":
    main()
