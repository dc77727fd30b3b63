"""Targets, the terminal summary and the Markdown tables of a benchmark result."""

from __future__ import annotations

import math
from typing import Any

from lstm_serve.bench.common import mib

SERVERS = ("echo", "naive", "lstm-serve", "lstm-serve-echo")


def _load(results: dict[str, Any], server: str, load: str) -> dict[str, Any] | None:
    run: dict[str, Any] | None = (
        results.get("servers", {}).get(server, {}).get("loads", {}).get(load)
    )
    return run if run and run.get("steps", 0) > 0 else None


def _raw(
    results: dict[str, Any], batch: int, steps: int = 1, binding: str = ""
) -> dict[str, Any] | None:
    """The raw ORT row; on CUDA the "host" binding (what lstm-serve's runtime does) by default."""
    want = binding or ("host" if results.get("meta", {}).get("device") == "cuda" else "cpu")
    for r in results.get("raw_ort", []):
        if r["batch"] == batch and r["steps_per_call"] == steps and r.get("binding", "cpu") == want:
            return dict(r)
    return None


def _versus(a: dict[str, Any] | None, b: dict[str, Any] | None) -> str:
    """Throughputs, and the ratio of steps per server CPU second (which other load can't skew)."""
    if not a or not b:
        return ""
    eff = b["server_cpu_s_per_1k_steps"] / a["server_cpu_s_per_1k_steps"]
    return (
        f"{a['steps_per_s']:,.0f} / {b['steps_per_s']:,.0f} steps/s; "
        f"per server CPU second: {eff:.2f}x"
    )


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The targets of docs/benchmarks.md, each a ratio from this run (missing data: value None)."""
    out: list[dict[str, Any]] = []

    def add(name: str, value: float | None, op: str, threshold: float, detail: str) -> None:
        ok = None
        if value is not None and math.isfinite(value):
            ok = value >= threshold if op == ">=" else value <= threshold
        out.append({"name": name, "value": value, "op": op, "threshold": threshold,
                    "ok": ok, "detail": detail})  # fmt: skip

    lstm, echo, naive = (_load(results, s, "streams64") for s in ("lstm-serve", "echo", "naive"))
    add(
        "64 streams x 1 step: lstm-serve / echo throughput",
        lstm["steps_per_s"] / echo["steps_per_s"] if lstm and echo else None, ">=", 0.9,
        _versus(lstm, echo),
    )  # fmt: skip
    add(
        "64 streams x 1 step: lstm-serve / naive throughput",
        lstm["steps_per_s"] / naive["steps_per_s"] if lstm and naive else None, ">=", 1.5,
        _versus(lstm, naive),
    )  # fmt: skip
    lp, ep = _load(results, "lstm-serve", "pingpong"), _load(results, "echo", "pingpong")
    add(
        "one stream ping-pong: lstm-serve p50 / echo p50",
        lp["latency_ms"]["p50"] / ep["latency_ms"]["p50"] if lp and ep else None, "<=", 1.3,
        f"{lp['latency_ms']['p50']:.3f} / {ep['latency_ms']['p50']:.3f} ms" if lp and ep else "",
    )  # fmt: skip
    lg, raw = _load(results, "lstm-serve", "gateway256"), _raw(results, 256)
    add(
        "gateway frames of 256 sessions: lstm-serve / raw ORT at batch 256",
        lg["steps_per_s"] / raw["steps_per_s"] if lg and raw else None, ">=", 0.5,
        f"{lg['steps_per_s']:,.0f} / {raw['steps_per_s']:,.0f} steps/s" if lg and raw else "",
    )  # fmt: skip
    for n in (256, 1024):  # CPU per session-step against ORT's own per row (not on a GPU)
        lg, raw = _load(results, "lstm-serve", f"gateway{n}"), _raw(results, n)
        value, detail = None, ""
        if lg and raw and raw.get("binding", "cpu") == "cpu" and "cpu_s_per_1k_steps" in raw:
            server, ort_ = lg["server_cpu_s_per_1k_steps"], raw["cpu_s_per_1k_steps"]
            value, detail = server / ort_, f"{1e3 * server:.2f} / {1e3 * ort_:.2f} us"
        if n == 256 or value is not None:
            add(
                f"gateway frames of {n}: server CPU per session-step / ORT CPU per row",
                value, "<=", 1.5, detail,
            )  # fmt: skip
    lg, raw = _load(results, "lstm-serve", "gateway1024"), _raw(results, 1024)
    if lg and raw:  # the GPU figure: a batch large enough to fill the card
        dev = results.get("meta", {}).get("device", "cpu")
        add(
            f"gateway frames of 1024 sessions: lstm-serve / raw ORT at batch 1024 ({dev})",
            lg["steps_per_s"] / raw["steps_per_s"], ">=", 0.5,
            f"{lg['steps_per_s']:,.0f} / {raw['steps_per_s']:,.0f} steps/s",
        )  # fmt: skip
        resident = _raw(results, 1024, binding="resident")
        if resident:
            add(
                "gateway frames of 1024 sessions: lstm-serve / raw ORT at batch 1024, GPU-resident",
                lg["steps_per_s"] / resident["steps_per_s"], ">=", 0.5,
                f"{lg['steps_per_s']:,.0f} / {resident['steps_per_s']:,.0f} steps/s",
            )  # fmt: skip
    rows = results.get("memory", {}).get("rows", [])
    if rows:
        r = rows[-1]
        add(
            f"{r['sessions']:,} idle sessions: RSS / (1.5 x raw state + 200 MB)",
            r["rss_bytes"] / r["target_bytes"], "<=", 1.0,
            f"RSS {mib(r['rss_bytes']):,.0f} MiB, raw state {mib(r['raw_state_bytes']):,.0f} MiB, "
            f"limit {mib(r['target_bytes']):,.0f} MiB",
        )  # fmt: skip
    else:
        add("idle sessions: RSS / (1.5 x raw state + 200 MB)", None, "<=", 1.0, "not measured")
    return out


def _f(v: float | None, fmt: str) -> str:
    return "-" if v is None or not math.isfinite(v) else format(v, fmt)


def targets_lines(ts: list[dict[str, Any]]) -> list[str]:
    lines = []
    for t in ts:
        verdict = "n/a" if t["ok"] is None else ("ok" if t["ok"] else "MISSED")
        lines.append(
            f"  {t['name']:<66} {_f(t['value'], '.2f'):>6}  (target {t['op']} {t['threshold']})"
            f"  {verdict:<6} {t['detail']}"
        )
    return lines


def markdown(results: dict[str, Any]) -> str:
    """The tables of results.md (`make bench`: docs/bench/results.md), from one result."""
    out: list[str] = []
    out.append("### (a) Raw ONNX Runtime in process\n")
    out.append("| batch | steps/call | binding | steps/s | p50 ms/call | p95 | p99 |")
    out.append("|---:|---:|---|---:|---:|---:|---:|")
    for r in results.get("raw_ort", []):
        lat = r["latency_ms"]
        out.append(
            f"| {r['batch']} | {r['steps_per_call']} | {r.get('binding', 'cpu')} | "
            f"{r['steps_per_s']:,.0f} | "
            f"{lat['p50']:.3f} | {lat['p95']:.3f} | {lat['p99']:.3f} |"
        )
    loads = results.get("loads", [])
    out.append("\n### (b) echo, (c) naive, (d) lstm-serve under load\n")
    out.append(
        "| load | server | steps/s | msgs/s | p50 ms | p95 ms | p99 ms | server CPU s / 1k steps"
        " | server CPU (cores) | peak RSS MiB | loadgen CPU (cores) | errors |"
    )
    out.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for ld in loads:
        for server in SERVERS:
            r = results.get("servers", {}).get(server, {}).get("loads", {}).get(ld["name"])
            if r is None:
                continue
            lat = r["latency_ms"]
            out.append(
                f"| {ld['label']} | {server} | {r['steps_per_s']:,.0f} | "
                f"{r['messages_per_s']:,.0f} | {_f(lat['p50'], '.3f')} | {_f(lat['p95'], '.3f')} | "
                f"{_f(lat['p99'], '.3f')} | {_f(r['server_cpu_s_per_1k_steps'], '.4f')} | "
                f"{r['server_cpu_util']:.2f} | {mib(r['server_peak_rss_bytes']):,.0f} | "
                f"{r['loadgen_cpu_util']:.2f} | {len(r['errors'])} |"
            )
    lstm_runs = results.get("servers", {}).get("lstm-serve", {}).get("loads", {})
    if any(r.get("batcher") for r in lstm_runs.values()):
        out.append("\n### Inside lstm-serve (from its Prometheus metrics, same windows)\n")
        out.append(
            "| load | mean batch (sessions/call) | inference ms/call (gather + ORT + scatter) "
            "| queue ms | engine ms/request | inference thread busy | main thread CPU (cores) |"
        )
        out.append("|---|---:|---:|---:|---:|---:|---:|")
        for ld in loads:
            r = lstm_runs.get(ld["name"])
            if not r or not r.get("batcher"):
                continue
            b = r["batcher"]
            out.append(
                f"| {ld['label']} | {b['mean_batch']:.1f} | {b['mean_inference_ms']:.2f} | "
                f"{b['mean_queue_ms']:.2f} | {b.get('mean_engine_ms', 0.0):.2f} | "
                f"{b['inference_thread_busy']:.2f} | {r['server_main_thread_cpu_util']:.2f} |"
            )
    mem = results.get("memory", {})
    if mem.get("rows"):
        out.append("\n### Memory: idle forecaster sessions\n")
        out.append(
            f"Baseline RSS with no sessions: {mib(mem['baseline_rss_bytes']):,.0f} MiB; "
            f"raw state per session: {mem['state_bytes_per_session']} bytes.\n"
        )
        out.append(
            "| sessions | RSS MiB | raw state MiB | RSS / raw | bytes/session over baseline "
            "| limit MiB (1.5 x raw + 200 MB) | ok | replay entries | replay bytes (accounted) |"
        )
        out.append("|---:|---:|---:|---:|---:|---:|---|---:|---:|")
        for r in mem["rows"]:
            out.append(
                f"| {r['sessions']:,} | {mib(r['rss_bytes']):,.0f} | "
                f"{mib(r['raw_state_bytes']):,.1f} | {r['rss_over_raw']:.2f} | "
                f"{r['bytes_per_session']:,.0f} | {mib(r['target_bytes']):,.0f} | "
                f"{'yes' if r['target_ok'] else 'NO'} | {r['replay_entries'] or 0:,} | "
                f"{mib(r['replay_accounted_bytes'] or 0):,.1f} MiB |"
            )
        d = mem.get("after_dropping_replay_cache")
        if d:
            out.append(
                f"\nAfter dropping the replay cache ({d.get('replay_entries_dropped', 0):,} "
                f"entries): RSS {mib(d['rss_bytes']):,.0f} MiB.\n"
            )
    out.append("\n### Targets\n")
    out.append("| target | measured | goal | met | figures |")
    out.append("|---|---:|---|---|---|")
    for t in results.get("targets", []):
        met = "n/a" if t["ok"] is None else ("yes" if t["ok"] else "**no**")
        out.append(
            f"| {t['name']} | {_f(t['value'], '.2f')} | {t['op']} {t['threshold']} | {met} | "
            f"{t['detail']} |"
        )
    return "\n".join(out) + "\n"
