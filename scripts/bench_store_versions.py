#!/usr/bin/env python
"""What the shared store's per-session version record costs: RedisRemote writes of 64-session
batches (the forecaster's 2 x 64 state), A/B in one run against the store module as it was
before the record (a file given by --before, e.g. from git), alternating 5 rounds of 300
writes each on a local redis-server. Prints the medians and their ratio.

    git show 2211464:service/lstm_serve/core/redis_store.py > /tmp/redis_store_before.py
    .venv/bin/python scripts/bench_store_versions.py --before /tmp/redis_store_before.py
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from lstm_serve.bench.procs.redis_server import RedisServer
from lstm_serve.core import redis_store
from lstm_serve.core.remote import Reply, State, Write

LAYERS, HIDDEN, OUT, SESSIONS = 2, 64, 2, 64


async def writes(remote: Any, tag: str, n: int) -> list[float]:
    keys = [f"{tag}-{i}" for i in range(SESSIONS)]
    st = State(
        np.ones((LAYERS, HIDDEN), np.float32), np.ones((LAYERS, HIDDEN), np.float32),
        np.ones(OUT, np.float32), 1, (Reply(0, 1, 7, False, np.ones((1, OUT), np.float32)),),
    )  # fmt: skip
    epochs = [c.epoch for c in await remote.claim(keys)]
    times = []
    for version in range(n):
        t0 = time.perf_counter()
        batch = [Write(k, e, version, st) for k, e in zip(keys, epochs, strict=True)]
        done = await remote.write(batch)
        times.append(time.perf_counter() - t0)
        assert all(done)
    return times


async def run(before: Any, rounds: int, n: int) -> None:
    srv = RedisServer(Path(tempfile.mkdtemp())).start()
    try:
        medians: dict[str, list[float]] = {"before": [], "now": []}
        for r in range(rounds):
            for which in ("before", "now"):
                client = redis_store.connect(srv.url, 5.0)
                if which == "before":
                    remote = before.RedisRemote(client, f"m:1:{r}", LAYERS, HIDDEN, OUT, 3600, 8)
                else:
                    remote = redis_store.RedisRemote(
                        client, f"m:1:{r}", LAYERS, HIDDEN, OUT, 3600, 8, f"m{r}", "1"
                    )
                medians[which].append(statistics.median(await writes(remote, f"{which}{r}", n)))
                await client.aclose()
        b, a = statistics.median(medians["before"]), statistics.median(medians["now"])
        print(
            f"write of {SESSIONS} sessions, median of {rounds} rounds x {n}: before "
            f"{b * 1e3:.3f} ms, now {a * 1e3:.3f} ms, now/before {a / b:.3f}"
        )
    finally:
        srv.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, required=True, help="redis_store.py to compare")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--writes", type=int, default=300)
    args = parser.parse_args()
    spec = importlib.util.spec_from_file_location("redis_store_before", args.before)
    assert spec is not None and spec.loader is not None
    before = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(before)
    asyncio.run(run(before, args.rounds, args.writes))


if __name__ == "__main__":
    main()
