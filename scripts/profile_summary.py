#!/usr/bin/env python
"""Where each server's event-loop CPU goes, per message, from `lstm-serve bench --profile DIR`.

Each py-spy sample of a server's main thread is put in one bucket by its innermost Python
frame that names a known part (ONNX Runtime, the scheduler and store, the servicer and its
conversions, the interceptors, prometheus-client); samples in no part are gRPC's and asyncio's
own work (their Cython and C code shows up as the Python frame that called it), and samples
in `select` are the loop waiting. The loop's CPU per message (from results.json: main-thread
CPU / messages) is then split in proportion to the busy samples.

    .venv/bin/python scripts/profile_summary.py DIR [--loads streams64,pingpong,gateway256]

Not part of CI; docs/benchmarks.md quotes its output.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

# (bucket, substrings of a frame's file path); the first bucket whose pattern matches the
# innermost matching frame wins.
PARTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("ONNX Runtime", ("onnxruntime",)),
    ("metrics", ("prometheus_client",)),
    ("scheduler, store, plan", ("lstm_serve/core/",)),
    ("servicer, convert", ("lstm_serve/server/servicer.py", "lstm_serve/server/convert.py",
                           "lstm_serve/bench/echo.py", "lstm_serve/bench/naive.py")),
    ("interceptors", ("lstm_serve/server/interceptors.py",)),
)  # fmt: skip
IDLE = "idle (select)"
OTHER = "gRPC and asyncio"


def bucket(stack: list[dict[str, str]]) -> str:
    inner = stack[-1] if stack else {}
    if inner.get("name", "").endswith("select") and "selectors" in inner.get("file", ""):
        return IDLE
    for frame in reversed(stack):
        path = frame.get("file", "")
        for name, patterns in PARTS:
            if any(p in path for p in patterns):
                return name
    return OTHER


def summarise(profile: Path) -> Counter[str]:
    doc = json.loads(profile.read_text())
    frames = doc["shared"]["frames"]
    main = next(p for p in doc["profiles"] if "MainThread" in p["name"])
    counts: Counter[str] = Counter()
    for sample in main["samples"]:
        counts[bucket([frames[i] for i in sample])] += 1
    return counts


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "dir", type=Path, help="the --profile directory (results.json beside it or in it)"
    )
    ap.add_argument("--loads", default="pingpong,streams64,gateway256")
    ap.add_argument("--results", type=Path, default=None, help="results.json of the same run")
    return ap


def main() -> None:
    args = parser().parse_args()
    results_path = args.results or next(
        p for p in (args.dir / "results.json", args.dir.parent / "results.json") if p.exists()
    )
    results = json.loads(results_path.read_text())["servers"]
    names = [OTHER, *(n for n, _ in PARTS)]
    for load in args.loads.split(","):
        print(f"\n{load}: event-loop CPU per message, us (share of the loop's busy samples)")
        print(f"  {'server':<11}{'total':>8}  " + "  ".join(f"{n:>24}" for n in names))
        for server in ("echo", "naive", "lstm-serve", "lstm-serve-echo"):
            prof = args.dir / f"{server}-{load}.speedscope.json"
            r = results.get(server, {}).get("loads", {}).get(load)
            if not prof.exists() or r is None:
                continue
            counts = summarise(prof)
            busy = sum(v for k, v in counts.items() if k != IDLE) or 1
            per_msg_us = r["server_main_thread_cpu_util"] * r["duration_s"] / r["messages"] * 1e6
            cells = [
                f"{per_msg_us * counts[n] / busy:9.1f} ({100 * counts[n] / busy:4.1f}%)"
                for n in names
            ]
            print(f"  {server:<11}{per_msg_us:8.1f}  " + "  ".join(f"{c:>24}" for c in cells))


if __name__ == "__main__":
    main()
