#!/usr/bin/env python
"""Where ONNX Runtime should run: inline on the event loop, or in the scheduler's worker thread.

For frames of B sessions x T steps, times scheduler ticks of the bundled forecaster with the
batch run inline and with it run in the executor, alternating in one process, and prints the
median tick time of each, their ratio, and how long an inline tick holds the loop (which is
what every other stream waits for meanwhile).

    .venv/bin/python scripts/inline_threshold.py

Not part of CI; docs/bench/hot-path/README.md quotes its output. inline_max_steps (the setting) is the
largest B x T for which inline is chosen.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from pathlib import Path

import numpy as np

from lstm_serve.core import frame as F
from lstm_serve.core.jobs import Limits
from lstm_serve.core.probes import no_probes
from lstm_serve.core.replay import ReplayCache
from lstm_serve.core.repository import load_repository
from lstm_serve.core.runtime import ModelRuntime, choose_device
from lstm_serve.core.scheduler import Scheduler
from lstm_serve.core.store import SessionStore

ROOT = Path(__file__).resolve().parents[1]


async def ticks(sched: Scheduler, frame: F.Frame, keys: list[str], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        await sched.submit_step(frame, keys, None)
        out.append(time.perf_counter() - t0)
    return out


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="forecaster")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--ticks", type=int, default=40)
    args = ap.parse_args()
    mv = load_repository(ROOT / "models").get(args.model)
    m = mv.manifest
    rt = ModelRuntime(mv, choose_device("cpu"), 1)
    rt.warm_up()
    print(f"{'B x T':>10} {'inline ms':>10} {'thread ms':>10} {'thread/inline':>14}")
    for b, t in [(1, 1), (8, 1), (32, 1), (64, 1), (128, 1), (256, 1), (1, 32), (8, 32), (32, 8)]:
        scheds = {}
        for mode, inline in (("inline", 1 << 30), ("thread", 0)):
            store = SessionStore(4096, m.layers, m.hidden_size, m.output_dim)
            scheds[mode] = Scheduler(
                rt, store, ReplayCache(64 << 20), no_probes(), Limits(inline_max_steps=inline),
                mode,
            )  # fmt: skip
        ids = [f"s{i}" for i in range(b)]
        x = np.random.default_rng(0).normal(size=(b, t, m.input_dim)).astype(np.float32)
        frame = F.Frame(
            ids, np.full(b, F.APPEND, np.int64), np.zeros(b, bool),
            [F.Block(np.arange(b, dtype=np.int64), x)],
        )  # fmt: skip
        times: dict[str, list[float]] = {"inline": [], "thread": []}
        for _ in range(args.rounds):  # alternate, so both see the same machine
            for mode, sched in scheds.items():
                times[mode] += await ticks(sched, frame, ids, args.ticks)
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        print(
            f"{f'{b} x {t}':>10} {med['inline']:10.3f} {med['thread']:10.3f}"
            f" {med['thread'] / med['inline']:14.2f}"
        )
        for sched in scheds.values():
            sched.close()


if __name__ == "__main__":
    asyncio.run(main())
