"""Memory: RSS of lstm-serve holding many idle sessions, against the raw bytes of their state.

One lstm-serve process (metrics on, as in production) with room for the largest count; the
sessions are started by gateway frames of up to 1024 sessions, one step each, and left idle.
At each count the RSS is read from /proc. Raw state bytes = sessions x 2 (h, c) x layers x
hidden x 4. At the end the replay cache (responses kept for retries; replay_cache_bytes,
64 MiB by default) is dropped and the RSS read again, which shows its real footprint.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from lstm_serve.bench.common import BenchModel, mib
from lstm_serve.bench.loadgen import LoadGen
from lstm_serve.bench.servers import ServerProcess

logger = logging.getLogger(__name__)

COUNTS = (10_000, 100_000, 1_000_000)
QUICK_COUNTS = (1_000, 5_000)
SLACK_BYTES = 200 * 1000 * 1000  # the target's "+ 200 MB"
FACTOR = 1.5


def measure(
    model: BenchModel,
    loadgen: LoadGen,
    log_path: Path,
    counts: tuple[int, ...] = COUNTS,
    settings: dict[str, Any] | None = None,
) -> dict[str, Any]:
    given = {"max_sessions": int(max(counts) * 1.1) + 1024, "session_ttl_s": 86400.0}
    given |= settings or {}
    rows: list[dict[str, Any]] = []
    with ServerProcess("lstm-serve", model, log_path, given) as srv:
        time.sleep(0.5)
        base = srv.rss_bytes()
        print(f"  lstm-serve idle, no sessions: RSS {mib(base):,.0f} MiB", flush=True)
        done = 0
        for n in counts:
            t0 = time.perf_counter()
            created, errors = loadgen.create_sessions(srv.target, model, done, n)
            elapsed = time.perf_counter() - t0
            if errors:
                raise RuntimeError(f"creating sessions {done}..{n}: {errors[0]}")
            done = n
            time.sleep(0.5)  # idle
            st = srv.stats()
            rss = srv.rss_bytes()
            raw = n * model.state_bytes_per_session
            limit = FACTOR * raw + SLACK_BYTES
            row = {
                "sessions": n,
                "sessions_reported": st.get("sessions"),
                "rss_bytes": rss,
                "rss_over_baseline_bytes": rss - base,
                "raw_state_bytes": raw,
                "rss_over_raw": rss / raw,
                "bytes_per_session": (rss - base) / n,
                "target_bytes": limit,
                "target_ok": rss <= limit,
                "replay_entries": st.get("replay_entries"),
                "replay_accounted_bytes": st.get("replay_accounted_bytes"),
                "create_seconds": elapsed,
                "create_sessions_per_s": created / elapsed if elapsed else 0.0,
            }
            rows.append(row)
            print(
                f"  {n:>9,} idle sessions: RSS {mib(rss):8,.0f} MiB, raw state {mib(raw):8,.1f} MiB,"
                f" RSS/raw {row['rss_over_raw']:6.2f}, {row['bytes_per_session']:7,.0f} B/session "
                f"over baseline (target <= {mib(limit):,.0f} MiB: "
                f"{'ok' if row['target_ok'] else 'MISSED'}); created at "
                f"{row['create_sessions_per_s']:,.0f} sessions/s",
                flush=True,
            )
        dropped = srv.drop_replay()
        print(
            f"  replay cache dropped ({dropped.get('replay_entries_dropped', 0):,} entries): "
            f"RSS {mib(dropped['rss_bytes']):,.0f} MiB",
            flush=True,
        )
    return {
        "baseline_rss_bytes": base,
        "settings": given,
        "state_bytes_per_session": model.state_bytes_per_session,
        "rows": rows,
        "after_dropping_replay_cache": dropped,
        "target": f"RSS <= {FACTOR} x raw state bytes + {SLACK_BYTES / 1e6:.0f} MB",
    }
