"""(a) The ceiling: ONNX Runtime called in process, no transport, no state bookkeeping.

The session gets lstm-serve's options (intra-op threads as configured, no spinning), so the
number is what lstm-serve's inference thread could do at best with the same settings.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from lstm_serve.bench.common import BenchModel, latency_summary

logger = logging.getLogger(__name__)

BATCHES = (1, 16, 64, 256, 1024)
STEPS = (1, 32)


def _session(model: BenchModel, intra_op_threads: int) -> Any:
    import onnxruntime as ort

    from lstm_serve.core.runtime import session_options

    return ort.InferenceSession(
        str(model.version_dir / "model.onnx"),
        session_options(intra_op_threads),
        providers=["CPUExecutionProvider"],
    )


def measure(
    model: BenchModel,
    *,
    batches: tuple[int, ...] = BATCHES,
    steps: tuple[int, ...] = STEPS,
    seconds: float = 0.5,
    intra_op_threads: int = 1,
    min_calls: int = 3,
) -> list[dict[str, Any]]:
    """steps/s and per-call latency for each (batch, steps per call)."""
    sess = _session(model, intra_op_threads)
    names = [i.name for i in sess.get_inputs()]
    out_names = [o.name for o in sess.get_outputs()]
    rng = np.random.default_rng(0)
    results = []
    for t in steps:
        for b in batches:
            if model.kind == "token":
                x: np.ndarray = rng.integers(0, model.output_dim, (b, t), dtype=np.int64)
            else:
                x = rng.normal(size=(b, t, model.input_dim)).astype(np.float32)
            h = np.zeros((model.layers, b, model.hidden), np.float32)
            feeds = {names[0]: x, names[1]: h, names[2]: h.copy()}
            sess.run(out_names, feeds)  # warm-up: first-call allocations
            lat: list[float] = []
            end = time.perf_counter() + seconds
            while True:
                t0 = time.perf_counter()
                sess.run(out_names, feeds)
                t1 = time.perf_counter()
                lat.append(t1 - t0)
                if t1 >= end and len(lat) >= min_calls:
                    break
            busy = float(np.sum(lat))
            summary = latency_summary(lat)
            row: dict[str, Any] = {
                "batch": b,
                "steps_per_call": t,
                "calls": len(lat),
                "steps_per_s": b * t * len(lat) / busy,
                "latency_ms": summary,
            }
            results.append(row)
            print(
                f"  raw ORT  batch {b:5d} x {t:2d} steps: {row['steps_per_s']:12,.0f} steps/s, "
                f"p50 {summary['p50']:8.3f} ms/call",
                flush=True,
            )
    return results
