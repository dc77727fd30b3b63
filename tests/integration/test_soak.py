"""A 30-second soak in the suite (scripts/soak.py runs the same load for 10 minutes).

Mixed load against a real `lstm-serve serve` subprocess: resumable streams (ended, or left to
expire), gateway frames of many new sessions, resets and ends. Then the clients leave. Bounds:
no request fails; every session is gone once ended or expired (the sessions gauge is back to 0
within TTL + reap interval + slack); the server's RSS grows by less than RSS_GROWTH_MIB from the
end of the warm-up to the end, and p99 latency stays under a second.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest

from tests.helpers.proxy import ServeProcess

SECONDS = 30.0
WARM_UP_S = 8.0
TTL_S, REAP_S = 2.0, 0.5
RSS_GROWTH_MIB = 48.0  # documented in docs/operations.md (Guarantees)
REPLAY_CACHE_BYTES = 4 * 1024 * 1024


def _soak_module() -> ModuleType:
    path = Path(__file__).resolve().parents[2] / "scripts" / "soak.py"
    spec = importlib.util.spec_from_file_location("lstm_serve_soak", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_soak_30s(tiny_repo: Path, tmp_path: Path) -> None:
    soak = _soak_module()
    proc = ServeProcess(
        tiny_repo,
        tmp_path / "serve.log",
        metrics_port=0,
        session_ttl_s=TTL_S,
        reap_interval_s=REAP_S,
        # The replay cache fills up to its budget, by design: a small one is full by the end of
        # the warm-up, so that growth after it is what nothing bounds.
        replay_cache_bytes=REPLAY_CACHE_BYTES,
    )
    with proc:
        summary = soak.run_soak(
            proc.target,
            proc.pid,
            "tiny",
            SECONDS,
            metrics_url=f"http://127.0.0.1:{proc.metrics_port}/metrics",
            workers=6,
            cooldown_s=TTL_S + 10 * REAP_S + 5,
        )
        log = proc.log()
    soak.write_csv(summary, tmp_path / "soak.csv")
    soak.plot(summary, tmp_path / "soak.png")
    assert (tmp_path / "soak.png").stat().st_size > 10_000
    load = summary.load_samples
    warm = summary.rss_at(WARM_UP_S)
    end = load[-1].rss_mib
    peak = max(s.rss_mib for s in summary.samples)
    p99 = max(s.p99_ms for s in load[1:] if not math.isnan(s.p99_ms))
    peak_sessions = max(s.sessions for s in load)
    print(
        f"\nsoak: {summary.requests} requests in {SECONDS:.0f} s, errors {dict(summary.errors)}; "
        f"RSS after warm-up {warm:.1f} MiB, end of load {end:.1f} MiB, peak {peak:.1f} MiB; "
        f"worst per-second p99 {p99:.0f} ms; sessions peak {peak_sessions:.0f}, back to 0 "
        f"{summary.sessions_drained_s} s after the load"
    )
    assert not summary.errors
    assert summary.requests > 1000 and peak_sessions > 50
    assert summary.sessions_drained_s is not None  # every session ended or expired
    assert summary.samples[-1].sessions == 0
    assert end - warm < RSS_GROWTH_MIB
    assert p99 < 1000
    assert "Traceback" not in log


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-s"]))
