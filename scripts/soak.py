#!/usr/bin/env python
"""Soak test: mixed load against a real lstm-serve for a long time, sampling the server's RSS,
the live sessions and the request latency (p50/p99) every second; writes a CSV and a PNG plot.

    .venv/bin/python scripts/soak.py --minutes 10 --out docs/soak
    .venv/bin/python scripts/soak.py --target 127.0.0.1:50051 --pid 1234 --metrics-url http://127.0.0.1:9400/metrics

Without --target it starts `lstm-serve serve` itself (on free ports, with a short session TTL)
on --model-repository (default: the shipped models/). The load mixes resumable streams (ended,
or left to expire), gateway frames of many new sessions, resets and ends. When the load stops,
sampling goes on until the sessions gauge is back to 0 (every session ended or expired).
Not part of CI: tests/integration/test_soak.py runs the same load for 30 seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import psutil

from lstm_serve.bench.procs.process import free_port
from lstm_serve.client import Client, session_steps, step_request

# the checkout: its models/ is the default, and a started server runs in it
ROOT = Path(__file__).resolve().parent.parent

FIELDS = ["t_s", "phase", "rss_mib", "sessions", "requests", "errors", "p50_ms", "p99_ms"]


@dataclass
class Sample:
    t_s: float
    phase: str  # load | cooldown
    rss_mib: float
    sessions: float  # lstm_serve_sessions summed over models (nan without a metrics URL)
    requests: int  # requests finished in this second
    errors: int
    p50_ms: float
    p99_ms: float


@dataclass
class Summary:
    samples: list[Sample] = field(default_factory=list)
    requests: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    sessions_drained_s: float | None = None  # seconds after the load until sessions == 0

    def rss_at(self, t_s: float) -> float:
        return next(s.rss_mib for s in self.samples if s.t_s >= t_s)

    @property
    def load_samples(self) -> list[Sample]:
        return [s for s in self.samples if s.phase == "load"]


class Load:
    """Worker threads sending a mix of streams, frames, resets and ends, timing every call."""

    def __init__(self, target: str, model: str, workers: int, seed: int = 0) -> None:
        self.target, self.model, self.workers = target, model, workers
        self.seed = seed
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.latencies: list[float] = []  # finished since the sampler last took them
        self.errors: Counter[str] = Counter()
        self.requests = 0
        self.threads: list[threading.Thread] = []
        with Client(target) as c:
            info = c.get_model(model)
        self.token = info.kind == "token"
        self.dim = info.vocab_size if self.token else info.input_dim

    def start(self) -> None:
        for w in range(self.workers):
            t = threading.Thread(target=self._work, args=(w,), name=f"soak-{w}", daemon=True)
            t.start()
            self.threads.append(t)

    def join(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)

    def take(self) -> tuple[list[float], int]:
        with self.lock:
            lat, self.latencies = self.latencies, []
            errors = sum(self.errors.values())
        return lat, errors

    def _steps(self, rng: np.random.Generator, n: int) -> dict[str, Any]:
        if self.token:
            return {"tokens": rng.integers(0, self.dim, n).tolist()}
        return {"x": rng.normal(size=(n, self.dim)).astype(np.float32)}

    def _timed(self, fn: Callable[..., object], *args: Any, **kwargs: Any) -> object:
        t0 = time.perf_counter()
        try:
            out = fn(*args, **kwargs)
        except grpc.RpcError as err:
            with self.lock:
                self.errors[err.code().name] += 1
            return None
        with self.lock:
            self.latencies.append(time.perf_counter() - t0)
            self.requests += 1
        return out

    def _work(self, w: int) -> None:
        rng = np.random.default_rng(self.seed * 1000 + w)
        n, model = 0, self.model
        with Client(self.target, timeout=30) as c:
            while not self.stop.is_set():
                n += 1
                sid = f"soak-{w}-{n}"
                kind = rng.random()
                if kind < 0.45:  # a stream of small chunks; ended or left to expire
                    stream = c.session(model, sid, start_seq=0)
                    for _ in range(int(rng.integers(5, 30))):
                        if self.stop.is_set():
                            break
                        self._timed(stream.send, **self._steps(rng, int(rng.integers(1, 4))))
                    stream.close()
                    if rng.random() < 0.6:
                        self._timed(c.end_session, model, sid)
                elif kind < 0.75:  # a gateway frame of many new sessions, left to expire
                    frame = [
                        session_steps(f"{sid}-{i}", **self._steps(rng, int(rng.integers(1, 3))))
                        for i in range(int(rng.integers(16, 65)))
                    ]
                    self._timed(c.step, step_request(model, frame))
                else:  # steps, a reset (RPC or flag), more steps, end
                    self._timed(c.predict, model, sid, seq=0, **self._steps(rng, 4))
                    if rng.random() < 0.5:
                        self._timed(c.reset_session, model, sid)
                    else:
                        self._timed(c.predict, model, sid, seq=0, reset=True, **self._steps(rng, 2))
                    self._timed(c.predict, model, sid, **self._steps(rng, 3))
                    self._timed(c.end_session, model, sid)


def scrape_sessions(metrics_url: str | None) -> float:
    """lstm_serve_sessions summed over models, from the Prometheus text."""
    if not metrics_url:
        return float("nan")
    try:
        text = urllib.request.urlopen(metrics_url, timeout=2).read().decode()
    except OSError:
        return float("nan")
    return sum(float(m) for m in re.findall(r"^lstm_serve_sessions\{[^}]*\} (\S+)$", text, re.M))


def run_soak(
    target: str,
    pid: int,
    model: str,
    seconds: float,
    *,
    metrics_url: str | None = None,
    workers: int = 6,
    cooldown_s: float = 30.0,
    on_sample: Callable[[Sample], object] | None = None,
) -> Summary:
    """Load for `seconds`, then keep sampling until sessions == 0 or cooldown_s has passed."""
    proc = psutil.Process(pid)
    load = Load(target, model, workers)
    summary = Summary()
    t0 = time.monotonic()
    load.start()
    load_end: float | None = None
    next_tick = t0 + 1.0
    while True:
        time.sleep(max(0.0, next_tick - time.monotonic()))
        next_tick += 1.0
        now = time.monotonic()
        phase = "load" if load_end is None else "cooldown"  # of the second just past
        if load_end is None and now - t0 >= seconds:
            load.join()
            load_end = time.monotonic()
        lat, errors = load.take()
        prev_errors = sum(s.errors for s in summary.samples)
        sessions = scrape_sessions(metrics_url)
        a = np.array(lat) * 1000
        s = Sample(
            t_s=round(now - t0, 2),
            phase=phase,
            rss_mib=proc.memory_info().rss / 2**20,
            sessions=sessions,
            requests=len(lat),
            errors=errors - prev_errors,
            p50_ms=float(np.percentile(a, 50)) if a.size else float("nan"),
            p99_ms=float(np.percentile(a, 99)) if a.size else float("nan"),
        )
        summary.samples.append(s)
        if on_sample is not None:
            on_sample(s)
        if load_end is not None:
            if sessions == 0 and summary.sessions_drained_s is None:
                summary.sessions_drained_s = time.monotonic() - load_end
                break
            if not metrics_url or time.monotonic() - load_end > cooldown_s:
                break
    summary.requests = load.requests
    summary.errors = load.errors
    return summary


def write_csv(summary: Summary, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        for s in summary.samples:
            w.writerow({k: getattr(s, k) for k in FIELDS})


def plot(summary: Summary, path: Path, title: str = "lstm-serve soak") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s.t_s for s in summary.samples]
    end = next((s.t_s for s in summary.samples if s.phase == "cooldown"), None)
    fig, axes = plt.subplots(3, 1, figsize=(9, 8), sharex=True)
    axes[0].plot(t, [s.rss_mib for s in summary.samples])
    axes[0].set_ylabel("server RSS (MiB)")
    axes[1].plot(t, [s.p50_ms for s in summary.samples], label="p50")
    axes[1].plot(t, [s.p99_ms for s in summary.samples], label="p99")
    axes[1].set_ylabel("latency (ms)")
    axes[1].legend()
    axes[2].plot(t, [s.sessions for s in summary.samples])
    axes[2].set_ylabel("live sessions")
    axes[2].set_xlabel("seconds")
    for ax in axes:
        ax.grid(alpha=0.3)
        if end is not None:
            ax.axvline(end, color="grey", linestyle="--", linewidth=1)
    axes[0].set_title(f"{title} ({summary.requests} requests; dashed: load stops)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


@contextlib.contextmanager
def _server(repo: Path, ttl_s: float, log: Path) -> Iterator[tuple[str, int, str]]:
    port, metrics_port = free_port(), free_port()
    cmd = [
        str(Path(sys.executable).parent / "lstm-serve"),
        "serve",
        "--port",
        str(port),
        "--metrics-port",
        str(metrics_port),
        "--model-repository",
        str(repo),
        "--session-ttl-s",
        str(ttl_s),
        "--reap-interval-s",
        "1",
    ]
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as f:
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    target = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if p.poll() is not None:
                raise SystemExit(f"lstm-serve exited; see {log}")
            try:
                with Client(target, timeout=1) as c:
                    if c.health() == "SERVING":
                        break
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"lstm-serve did not start; see {log}")
            time.sleep(0.2)
        yield target, p.pid, f"http://127.0.0.1:{metrics_port}/metrics"
    finally:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--minutes", type=float, default=10.0, help="load duration (default 10)")
    ap.add_argument(
        "--out", type=Path, default=Path("soak-out"), help="directory for soak.csv and soak.png"
    )
    ap.add_argument("--target", help="an already running server (else one is started)")
    ap.add_argument("--pid", type=int, help="its process id, for RSS (with --target)")
    ap.add_argument(
        "--metrics-url", help="its /metrics URL, for the sessions gauge (with --target)"
    )
    ap.add_argument("--model-repository", type=Path, default=ROOT / "models")
    ap.add_argument("--model", help="model to load (default: the first one the server lists)")
    ap.add_argument("--workers", type=int, default=6, help="client threads (default 6)")
    ap.add_argument("--ttl-s", type=float, default=5.0, help="session TTL of a started server")
    args = ap.parse_args(argv)

    def report(s: Sample) -> None:
        print(
            f"{s.t_s:7.1f}s {s.phase:8} rss {s.rss_mib:7.1f} MiB  sessions {s.sessions:6.0f}  "
            f"{s.requests:5d} req/s  p50 {s.p50_ms:6.1f} ms  p99 {s.p99_ms:6.1f} ms  errors {s.errors}",
            flush=True,
        )

    with contextlib.ExitStack() as stack:
        if args.target:
            if args.pid is None:
                ap.error("--target needs --pid (the server's process id, for its RSS)")
            target, pid, metrics_url = args.target, args.pid, args.metrics_url
        else:
            target, pid, metrics_url = stack.enter_context(
                _server(args.model_repository, args.ttl_s, args.out / "server.log")
            )
        model = args.model
        if model is None:
            with Client(target) as c:
                models = c.list_models()
            if not models:
                raise SystemExit("the server lists no models")
            model = models[0].name
        print(f"soak: {args.minutes} min of load on {target} (model {model}, pid {pid})")
        summary = run_soak(
            target,
            pid,
            model,
            args.minutes * 60,
            metrics_url=metrics_url,
            workers=args.workers,
            cooldown_s=max(30.0, 3 * args.ttl_s),
            on_sample=report,
        )
    write_csv(summary, args.out / "soak.csv")
    plot(summary, args.out / "soak.png")
    load = summary.load_samples
    warm = summary.rss_at(min(10.0, load[-1].t_s)) if load else float("nan")
    print(
        f"soak: {summary.requests} requests, errors {dict(summary.errors) or 0}; RSS after "
        f"warm-up {warm:.1f} MiB, peak {max(s.rss_mib for s in summary.samples):.1f} MiB, final "
        f"{summary.samples[-1].rss_mib:.1f} MiB; sessions back to 0 after "
        f"{summary.sessions_drained_s if summary.sessions_drained_s is not None else 'never'} s; "
        f"wrote {args.out / 'soak.csv'} and {args.out / 'soak.png'}"
    )
    return 0 if not summary.errors and summary.sessions_drained_s is not None else 1


if __name__ == "__main__":
    sys.exit(main())
