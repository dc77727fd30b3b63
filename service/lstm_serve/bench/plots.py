"""The benchmark's PNG plots (matplotlib, Agg backend)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

SERVERS = ("echo", "naive", "lstm-serve")
COLOURS = {"raw ORT": "#444444", "echo": "#1f77b4", "naive": "#d62728", "lstm-serve": "#2ca02c"}


def draw(
    results: dict[str, Any], latencies: dict[str, dict[str, np.ndarray]], out_dir: Path
) -> list[Path]:
    """throughput.png, latency.png and memory.png (those the results have data for)."""
    import matplotlib

    matplotlib.use("Agg")
    written = []
    for fn in (_throughput, _latency, _memory):
        path = fn(results, latencies, out_dir)
        if path is not None:
            written.append(path)
    return written


def _throughput(
    results: dict[str, Any], latencies: dict[str, dict[str, np.ndarray]], out_dir: Path
) -> Path | None:
    import matplotlib.pyplot as plt

    loads = {ld["name"]: ld for ld in results.get("loads", [])}
    fig, ax = plt.subplots(figsize=(8, 5.5))
    raw = [r for r in results.get("raw_ort", []) if r["steps_per_call"] == 1]
    if raw:
        ax.plot(
            [r["batch"] for r in raw], [r["steps_per_s"] for r in raw], "s--",
            color=COLOURS["raw ORT"], label="(a) raw ONNX Runtime, batch = concurrency",
        )  # fmt: skip
    letters = {"echo": "(b)", "naive": "(c)", "lstm-serve": "(d)"}
    for server in SERVERS:
        runs = results.get("servers", {}).get(server, {}).get("loads", {})
        sweep = sorted(
            (loads[n]["streams"], r["steps_per_s"])
            for n, r in runs.items()
            if n in loads and loads[n]["group"] == "streams" and r["steps"] > 0
        )
        if sweep:
            ax.plot(*zip(*sweep, strict=True), "o-", color=COLOURS[server],
                    label=f"{letters[server]} {server}, streams x 1 step")  # fmt: skip
        gw = sorted(
            (loads[n]["streams"] * loads[n]["sessions"], r["steps_per_s"])
            for n, r in runs.items()
            if n in loads and loads[n]["group"] == "gateway" and r["steps"] > 0
        )
        if gw:
            ax.plot(*zip(*gw, strict=True), "^:", color=COLOURS[server], markersize=9,
                    label=f"{server}, gateway frames")  # fmt: skip
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("concurrency: streams (or sessions in flight; raw ORT: batch size)")
    ax.set_ylabel("steps / s")
    ax.set_title("Throughput against concurrency, one step per session per message")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out_dir / "throughput.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _latency(
    results: dict[str, Any], latencies: dict[str, dict[str, np.ndarray]], out_dir: Path
) -> Path | None:
    import matplotlib.pyplot as plt

    shown = [n for n in ("pingpong", "streams64", "gateway256") if any(
        n in latencies.get(s, {}) for s in SERVERS)]  # fmt: skip
    if not shown:
        return None
    loads = {ld["name"]: ld for ld in results.get("loads", [])}
    fig, axes = plt.subplots(1, len(shown), figsize=(5 * len(shown), 4.5), squeeze=False)
    for ax, name in zip(axes[0], shown, strict=True):
        for server in SERVERS:
            lat = latencies.get(server, {}).get(name)
            if lat is None or lat.size == 0:
                continue
            ms = np.sort(lat) * 1e3
            ax.plot(ms, np.arange(1, ms.size + 1) / ms.size, color=COLOURS[server], label=server)
        ax.set_xscale("log")
        ax.set_xlabel("latency per message (ms)")
        ax.set_ylabel("fraction of messages")
        ax.set_title(loads.get(name, {}).get("label", name), fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Latency distribution (CDF)")
    fig.tight_layout()
    path = out_dir / "latency.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _memory(
    results: dict[str, Any], latencies: dict[str, dict[str, np.ndarray]], out_dir: Path
) -> Path | None:
    import matplotlib.pyplot as plt

    rows = results.get("memory", {}).get("rows", [])
    if not rows:
        return None
    n = np.array([r["sessions"] for r in rows], np.float64)
    mb = 1e6
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(n, [r["rss_bytes"] / mb for r in rows], "o-", color=COLOURS["lstm-serve"],
            label="lstm-serve RSS")  # fmt: skip
    ax.plot(n, [r["raw_state_bytes"] / mb for r in rows], "s--", color="#444444",
            label="raw state bytes (h, c)")  # fmt: skip
    ax.plot(n, [r["target_bytes"] / mb for r in rows], ":", color="#ff7f0e",
            label="target: 1.5 x raw + 200 MB")  # fmt: skip
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("idle sessions")
    ax.set_ylabel("MB")
    ax.set_title("Memory of idle sessions")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out_dir / "memory.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
