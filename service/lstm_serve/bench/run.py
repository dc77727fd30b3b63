"""`lstm-serve bench`: (a) raw ONNX Runtime, (b) an echo server, (c) a naive server and
(d) lstm-serve, measured in one run on this machine with one load generator; then the memory
of idle sessions. Prints the targets' ratios, writes a JSON result, Markdown tables and plots.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import logging
import math
import shutil
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

DEFAULT_OUT = Path("docs/bench/results.json")
PARTS = ("raw", "echo", "naive", "lstm-serve", "lstm-serve-echo", "memory")
# Run by default; lstm-serve-echo (lstm-serve's server answering as echo) only when named.
DEFAULT_PARTS = ("raw", "echo", "naive", "lstm-serve", "memory")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from lstm_serve.server.settings import DEFAULT_MODELS

    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT,
        help="result JSON, or a directory for results.json (plots and results.md go beside it; "
        f"default {DEFAULT_OUT})",
    )  # fmt: skip
    parser.add_argument(
        "--model-repository", type=Path, default=DEFAULT_MODELS,
        help=f"model repository holding the benchmark model (default {DEFAULT_MODELS})",
    )  # fmt: skip
    parser.add_argument("--model", default="forecaster", help="model to run (default forecaster)")
    parser.add_argument("--version", default="", help="model version (default: the newest)")
    parser.add_argument(
        "--quick", action="store_true",
        help="a smoke run: short loads, the target loads only, a few thousand idle sessions",
    )  # fmt: skip
    parser.add_argument(
        "--duration", type=float, default=None, help="seconds measured per load (default 3)"
    )
    parser.add_argument(
        "--warmup", type=float, default=None, help="seconds of warm-up per load (default 0.5)"
    )
    parser.add_argument("--workers", type=int, default=2, help="load generator processes")
    parser.add_argument(
        "--repeat", type=int, default=None,
        help="rounds per load and server, in rotating order; the best round is kept "
        "(default 2; --quick 1)",
    )  # fmt: skip
    parser.add_argument(
        "--only",
        default=",".join(DEFAULT_PARTS),
        help=f"comma-separated parts to run: {','.join(PARTS)} (default: all but lstm-serve-echo)",
    )
    parser.add_argument(
        "--loads", default="",
        help="comma-separated load names (default: all but gateway1024, which runs by default "
        "only with --device cuda)",
    )  # fmt: skip
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), default="cpu",
        help="where raw ORT and lstm-serve run their model (default cpu; cuda needs "
        "onnxruntime-gpu and a GPU, and binds inputs and outputs with IOBinding)",
    )  # fmt: skip
    parser.add_argument(
        "--memory-sessions", default="",
        help="comma-separated idle session counts (default 10000,100000,1000000)",
    )  # fmt: skip
    parser.add_argument(
        "--intra-op-threads", type=int, default=1,
        help="ONNX Runtime intra-op threads for raw ORT, naive and lstm-serve (default 1, "
        "lstm-serve's default)",
    )  # fmt: skip
    parser.add_argument(
        "--profile", type=Path, default=None,
        help="record py-spy profiles of each server per load into this directory (speedscope)",
    )  # fmt: skip
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")


def _out_paths(out: Path) -> tuple[Path, Path]:
    """(JSON file, directory for plots and tables)."""
    if out.suffix == ".json":
        return out, out.parent
    return out / "results.json", out


def _versions() -> dict[str, str]:
    found = {}
    for pkg in ("onnxruntime-gpu", "onnxruntime", "grpcio", "protobuf", "numpy"):
        try:
            found[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            continue
    return found


def _gpu_note(device: str = "cpu") -> str:
    if device == "cuda":
        return "CUDA execution provider with IOBinding: raw ORT and lstm-serve on the GPU"
    if shutil.which("nvidia-smi") is None:
        return "no GPU on this machine: CPU execution provider only; the CUDA path is not measured"
    return "a GPU may be present; this benchmark pins the CPU execution provider"


def _jsonable(o: Any) -> Any:
    if isinstance(o, dict):
        return {k: _jsonable(v) for k, v in o.items() if k != "latencies_s"}
    if isinstance(o, list | tuple):
        return [_jsonable(v) for v in o]
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return o


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from lstm_serve.bench import memory, plots, raw, report
    from lstm_serve.bench.common import machine, make_workdir, mib, prepare_model
    from lstm_serve.bench.loadgen import GPU_LOADS, LOADS, QUICK_LOADS, LoadGen
    from lstm_serve.bench.servers import ServerProcess

    t_start = time.perf_counter()
    json_path, out_dir = _out_paths(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    parts = {p.strip() for p in args.only.split(",") if p.strip()}
    unknown = parts - set(PARTS)
    if unknown:
        logger.error("unknown part(s) %s; choose from %s", sorted(unknown), ", ".join(PARTS))
        return 2
    quick = bool(args.quick)
    duration = args.duration if args.duration is not None else (0.4 if quick else 3.0)
    warmup = args.warmup if args.warmup is not None else (0.2 if quick else 0.5)
    if args.repeat is None:
        args.repeat = 1 if quick else 2
    wanted = [x.strip() for x in args.loads.split(",") if x.strip()]
    if not wanted and quick:
        wanted = list(QUICK_LOADS)
    if wanted:
        loads = [ld for ld in LOADS if ld.name in wanted]
    else:
        loads = [ld for ld in LOADS if args.device == "cuda" or ld.name not in GPU_LOADS]
    if wanted and len(loads) != len(wanted):
        logger.error("unknown load(s); choose from %s", ", ".join(ld.name for ld in LOADS))
        return 2
    if args.memory_sessions:
        counts = tuple(int(x) for x in args.memory_sessions.split(","))
    else:
        counts = memory.QUICK_COUNTS if quick else memory.COUNTS

    workdir = make_workdir()
    try:
        model = prepare_model(args.model_repository, args.model, args.version, workdir)
        info = machine()
        command = "lstm-serve " + " ".join(sys.argv[1:]) if sys.argv else "lstm-serve bench"
        results: dict[str, Any] = {
            "meta": {
                "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                "command": command,
                "machine": info,
                "gpu": _gpu_note(args.device),
                "device": args.device,
                "versions": _versions(),
                "model": model.as_dict(),
                "quick": quick,
                "duration_s": duration,
                "warmup_s": warmup,
                "loadgen_workers": args.workers,
                "repeat": args.repeat,
                "intra_op_threads": args.intra_op_threads,
                "note": "servers and load generator share this machine's cores",
            },
            "loads": [ld.as_dict() for ld in loads],
            "servers": {},
        }
        print(
            f"lstm-serve bench: {info['cpus']} CPUs ({info['cpu_model']}), "
            f"{mib(int(str(info['memory_bytes']))) / 1024:.0f} GiB; model {model.name}:"
            f"{model.version} ({model.layers} x {model.hidden}, input {model.input_dim}) "
            f"from {model.source}",
            flush=True,
        )
        print(f"  {_gpu_note(args.device)}", flush=True)
        busy = _machine_busy(1.0)
        results["meta"]["busy_cores_before"] = busy
        if busy > 0.25:
            print(
                f"  warning: other processes keep {busy:.2f} cores busy; the servers and the load "
                "generator will get less than the whole machine (see other_cpu_util per load)",
                flush=True,
            )

        if "raw" in parts:
            print("(a) raw ONNX Runtime in process", flush=True)
            results["raw_ort"] = raw.measure(
                model,
                batches=((1, 64, 256, 1024) if args.device == "cuda" else (1, 64, 256))
                if quick
                else raw.BATCHES,
                steps=(1,) if quick else raw.STEPS,
                seconds=0.05 if quick else 0.6,
                intra_op_threads=args.intra_op_threads,
                device=args.device,
            )
        latencies: dict[str, dict[str, np.ndarray]] = {}
        servers = [s for s in ("echo", "naive", "lstm-serve", "lstm-serve-echo") if s in parts]
        letters = {"echo": "(b)", "naive": "(c)", "lstm-serve": "(d)", "lstm-serve-echo": "(e)"}
        with LoadGen(args.workers) as lg, contextlib.ExitStack() as stack:
            # Every server runs for the whole benchmark (an idle one costs no CPU), and each load
            # runs against them back to back, so a change in the machine's other load hits
            # the three alike.
            procs: dict[str, ServerProcess] = {}
            for kind in servers:
                settings: dict[str, Any] = {}
                if kind in ("lstm-serve", "lstm-serve-echo"):
                    settings = {
                        "metrics_port": 0,
                        "intra_op_threads": args.intra_op_threads,
                        "device": args.device,
                    }
                procs[kind] = stack.enter_context(
                    ServerProcess(
                        kind, model, workdir / f"server-{kind}.log", settings,
                        args.intra_op_threads,
                    )
                )  # fmt: skip
                results["servers"][kind] = {"loads": {}}
            if servers:
                time.sleep(0.2)
                print(
                    f"(b, c, d) {', '.join(servers)}: each load against each server in turn, "
                    f"{warmup:g}s warm-up + {duration:g}s measured"
                    + (f", best of {args.repeat}" if args.repeat > 1 else ""),
                    flush=True,
                )
            for kind, srv in procs.items():
                results["servers"][kind]["idle_rss_bytes"] = srv.rss_bytes()
            for ld in loads if servers else ():  # --only raw,memory runs no server load
                for rnd in range(args.repeat):
                    order = servers[rnd % len(servers) :] + servers[: rnd % len(servers)]
                    for kind in order:
                        srv = procs[kind]
                        print(
                            f"  {letters[kind]} {kind:<10} {ld.label:<58} ...", end="", flush=True
                        )
                        prof = _start_profile(
                            args.profile, kind, ld.name, srv.pid, warmup + duration
                        )
                        r = lg.run(srv.target, model, ld, warmup=warmup, duration=duration,
                                   server=srv)  # fmt: skip
                        _stop_profile(prof)
                        print(_progress(r), flush=True)
                        runs = results["servers"][kind]["loads"]
                        best = runs.get(ld.name)
                        rounds = [*best["rounds_steps_per_s"], r["steps_per_s"]] if best else [
                            r["steps_per_s"]
                        ]  # fmt: skip
                        if best is None or r["steps_per_s"] > best["steps_per_s"]:
                            best = r
                            latencies.setdefault(kind, {})[ld.name] = np.frombuffer(
                                r["latencies_s"], np.float64
                            )
                        best["rounds_steps_per_s"] = rounds
                        runs[ld.name] = best
            stack.close()  # the servers stop before the memory test starts its own
            if "memory" in parts:
                print(f"memory: lstm-serve with {', '.join(f'{n:,}' for n in counts)} idle "
                      "sessions", flush=True)  # fmt: skip
                results["memory"] = memory.measure(
                    model, lg, workdir / "memory.log", counts,
                    {"metrics_port": 0, "intra_op_threads": args.intra_op_threads},
                )  # fmt: skip

        results["targets"] = report.targets(results)
        results["meta"]["elapsed_s"] = time.perf_counter() - t_start
        print("targets (each a ratio from this run):", flush=True)
        for line in report.targets_lines(results["targets"]):
            print(line, flush=True)

        json_path.write_text(json.dumps(_jsonable(results), indent=2) + "\n")
        (out_dir / "results.md").write_text(report.markdown(_jsonable(results)))
        written = [json_path, out_dir / "results.md"]
        if not args.no_plots:
            written += plots.draw(results, latencies, out_dir)
        print(
            f"wrote {', '.join(str(p) for p in written)} in {results['meta']['elapsed_s']:.0f}s",
            flush=True,
        )
        failed = [
            (s, n)
            for s, v in results["servers"].items()
            for n, r in v["loads"].items()
            if r["errors"]
        ]
        if failed:
            logger.error("loads with errors: %s", failed)
            return 1
        return 0
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _progress(r: dict[str, Any]) -> str:
    lat = r["latency_ms"]
    line = (
        f" {r['steps_per_s']:>10,.0f} steps/s {r['messages_per_s']:>8,.0f} msg/s"
        f"  p50 {lat['p50']:7.3f} p99 {lat['p99']:7.3f} ms  server CPU "
        f"{r['server_cpu_util']:.2f} (loop {r['server_main_thread_cpu_util']:.2f})"
        f" loadgen CPU {r['loadgen_cpu_util']:.2f} others {r['other_cpu_util']:.2f}"
    )
    b = r["batcher"]
    if b and b["inference_calls"]:  # lstm-serve-echo has the metrics but runs no inference
        line += (
            f"  batch {b['mean_batch']:.1f} infer {b['mean_inference_ms']:.2f} ms"
            f" queue {b['mean_queue_ms']:.2f} ms engine {b['mean_engine_ms']:.2f} ms"
        )
    if r["errors"]:
        line += f"  ERRORS: {r['errors'][0]}"
    return line


def _machine_busy(seconds: float) -> float:
    """Cores kept busy by the machine as a whole over a short sample."""
    from lstm_serve.bench.common import machine_busy_seconds

    b0 = machine_busy_seconds()
    time.sleep(seconds)
    return (machine_busy_seconds() - b0) / seconds


def _start_profile(
    directory: Path | None, kind: str, load: str, pid: int, seconds: float
) -> subprocess.Popen[bytes] | None:
    """py-spy record of the server for one load, as a speedscope file."""
    if directory is None:
        return None
    exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(exe).exists():
        logger.warning("--profile: py-spy not found (pip install py-spy)")
        return None
    directory.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        [exe, "record", "--pid", str(pid), "--duration", str(max(1, math.ceil(seconds))),
         "--rate", "250", "--threads", "--nonblocking", "--format", "speedscope",
         "--output", str(directory / f"{kind}-{load}.speedscope.json")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip


def _stop_profile(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is not None:
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
