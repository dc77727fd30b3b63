"""(a) The ceiling: ONNX Runtime called in process, no transport, no state bookkeeping.

The session gets lstm-serve's options (intra-op threads as configured, no spinning), so the
number is what lstm-serve's inference thread could do at best with the same settings.
On CUDA (`device="cuda"`) each call goes through IOBinding as lstm-serve's runtime does: inputs
bound from host arrays, outputs copied back to host ("host" rows), and, for the ceiling of the
card itself, with inputs and outputs left on the GPU ("resident" rows).
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


def _session(model: BenchModel, intra_op_threads: int, device: str = "cpu") -> Any:
    import onnxruntime as ort

    from lstm_serve.core.runtime import CPU, CUDA, session_options

    sess = ort.InferenceSession(
        str(model.version_dir / "model.onnx"),
        session_options(intra_op_threads),
        providers=[CUDA, CPU] if device == "cuda" else [CPU],
    )
    if device == "cuda" and sess.get_providers()[0] != CUDA:
        raise RuntimeError(
            "device=cuda was asked for, but ONNX Runtime's CUDA provider did not load"
        )
    return sess


def _caller(sess: Any, feeds: dict[str, np.ndarray], out_names: list[str], mode: str) -> Any:
    """One inference call as a closure: plain run on the CPU, IOBinding on CUDA."""
    if mode == "cpu":
        return lambda: sess.run(out_names, feeds)
    if mode == "host":  # what lstm-serve's runtime does per batch
        from lstm_serve.core.runtime import run_bound

        return lambda: run_bound(sess, feeds, out_names)
    import onnxruntime as ort

    binding = sess.io_binding()
    for name, value in feeds.items():
        binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(value, "cuda", 0))
    for name in out_names:
        binding.bind_output(name, "cuda")
    binding.synchronize_inputs()

    def resident() -> None:
        sess.run_with_iobinding(binding)
        binding.synchronize_outputs()

    return resident


def measure(
    model: BenchModel,
    *,
    batches: tuple[int, ...] = BATCHES,
    steps: tuple[int, ...] = STEPS,
    seconds: float = 0.5,
    intra_op_threads: int = 1,
    min_calls: int = 3,
    device: str = "cpu",
) -> list[dict[str, Any]]:
    """steps/s and per-call latency for each (batch, steps per call[, CUDA binding mode])."""
    sess = _session(model, intra_op_threads, device)
    modes = ("host", "resident") if device == "cuda" else ("cpu",)
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
            for mode in modes:
                call = _caller(sess, feeds, out_names, mode)
                for _ in range(3):  # warm-up: first-call allocations (and CUDA kernel choice)
                    call()
                lat: list[float] = []
                end = time.perf_counter() + seconds
                cpu0 = time.process_time()  # the process's CPU: ORT's threads included
                while True:
                    t0 = time.perf_counter()
                    call()
                    t1 = time.perf_counter()
                    lat.append(t1 - t0)
                    if t1 >= end and len(lat) >= min_calls:
                        break
                cpu = time.process_time() - cpu0
                busy = float(np.sum(lat))
                summary = latency_summary(lat)
                row: dict[str, Any] = {
                    "batch": b,
                    "steps_per_call": t,
                    "device": device,
                    "binding": mode,
                    "calls": len(lat),
                    "steps_per_s": b * t * len(lat) / busy,
                    "cpu_s_per_1k_steps": 1000.0 * cpu / (b * t * len(lat)),
                    "latency_ms": summary,
                }
                results.append(row)
                tag = "" if mode == "cpu" else f" ({mode})"
                print(
                    f"  raw ORT  batch {b:5d} x {t:2d} steps{tag}: "
                    f"{row['steps_per_s']:12,.0f} steps/s, p50 {summary['p50']:8.3f} ms/call",
                    flush=True,
                )
    return results
