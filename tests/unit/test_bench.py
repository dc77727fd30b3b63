"""Smoke test of `lstm-serve bench`: a tiny run writes a valid result. No timing assertions."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from lstm_serve.bench import report
from lstm_serve.bench.loadgen import GPU_LOADS, LOADS, QUICK_LOADS, split
from lstm_serve.cli.main import build_parser
from tests.helpers.models import make_model_repo


def test_split_spreads_streams_over_workers() -> None:
    assert split(5, 2) == [3, 2]
    assert split(1, 2) == [1, 0]
    assert sum(split(256, 3)) == 256


def test_targets_without_data_are_not_judged() -> None:
    ts = report.targets({})
    assert len(ts) == 6
    assert all(t["ok"] is None for t in ts)


@pytest.mark.timeout(120)
def test_quick_bench_writes_json(tmp_path: Path) -> None:
    make_model_repo(tmp_path / "repo", name="tiny", kind="real", input_dim=1, output_dim=1,
                    hidden=8, layers=2)  # fmt: skip
    out = tmp_path / "out"
    args = build_parser().parse_args(
        [
            "bench", "--quick", "--no-plots", "--out", str(out),
            "--model-repository", str(tmp_path / "repo"), "--model", "tiny",
            "--duration", "0.3", "--warmup", "0.1", "--memory-sessions", "500,1500",
        ]
    )  # fmt: skip
    from lstm_serve.bench.run import run

    assert run(args) == 0
    result = json.loads((out / "results.json").read_text())
    assert set(result) >= {"meta", "loads", "raw_ort", "servers", "memory", "targets"}
    assert result["meta"]["model"]["name"] == "tiny"
    assert result["meta"]["machine"]["cpus"] >= 1
    assert [ld["name"] for ld in result["loads"]] == [
        ld.name for ld in LOADS if ld.name in QUICK_LOADS
    ]
    assert {(r["batch"], r["steps_per_call"]) for r in result["raw_ort"]} >= {(1, 1), (256, 1)}
    for server in ("echo", "naive", "lstm-serve"):
        loads = result["servers"][server]["loads"]
        assert set(loads) == set(QUICK_LOADS)
        for r in loads.values():
            assert r["errors"] == []
            assert r["steps"] > 0 and r["messages"] > 0
            for key in ("steps_per_s", "messages_per_s", "server_cpu_s_per_1k_steps",
                        "server_peak_rss_bytes", "loadgen_cpu_s"):  # fmt: skip
                assert isinstance(r[key], int | float) and math.isfinite(r[key])
            assert set(r["latency_ms"]) >= {"p50", "p95", "p99"}
    assert result["servers"]["lstm-serve"]["loads"]["streams64"]["batcher"]["inference_calls"] > 0
    rows = result["memory"]["rows"]
    assert [r["sessions"] for r in rows] == [500, 1500]
    assert rows[-1]["sessions_reported"] == 1500
    assert all(r["raw_state_bytes"] == r["sessions"] * 2 * 2 * 8 * 4 for r in rows)
    assert len(result["targets"]) == 6
    assert all(t["ok"] is not None for t in result["targets"])
    assert all(r["cpu_s_per_1k_steps"] > 0 for r in result["raw_ort"])
    assert "| target |" in (out / "results.md").read_text()


def test_memory_alone_runs_no_server_load(tmp_path: Path) -> None:
    """`--only memory` (or raw,memory) once failed dividing by the number of servers: zero."""
    make_model_repo(tmp_path / "repo", name="tiny", kind="real", input_dim=1, output_dim=1,
                    hidden=8, layers=2)  # fmt: skip
    out = tmp_path / "out"
    args = build_parser().parse_args(
        [
            "bench", "--only", "memory", "--no-plots", "--out", str(out),
            "--model-repository", str(tmp_path / "repo"), "--model", "tiny",
            "--memory-sessions", "500",
        ]
    )  # fmt: skip
    from lstm_serve.bench.run import run

    assert run(args) == 0
    result = json.loads((out / "results.json").read_text())
    assert result["servers"] == {}
    assert [r["sessions"] for r in result["memory"]["rows"]] == [500]


def _row(batch: int, binding: str, steps_per_s: float) -> dict[str, object]:
    return {"batch": batch, "steps_per_call": 1, "binding": binding, "steps_per_s": steps_per_s}


def test_gpu_targets_compare_gateway_frames_with_raw_ort_at_batch_1024() -> None:
    """On CUDA the frame load is judged against raw ORT with host-bound IOBinding (what the
    server's runtime does) and, separately, against GPU-resident inputs."""
    load = {"steps": 1000, "steps_per_s": 300_000.0, "server_cpu_s_per_1k_steps": 0.01}
    results = {
        "meta": {"device": "cuda"},
        "raw_ort": [_row(1024, "host", 1_000_000.0), _row(1024, "resident", 3_000_000.0)],
        "servers": {"lstm-serve": {"loads": {"gateway1024": load}}},
    }
    by_name = {t["name"]: t for t in report.targets(results)}
    host = by_name["gateway frames of 1024 sessions: lstm-serve / raw ORT at batch 1024 (cuda)"]
    assert host["value"] == pytest.approx(0.3) and host["ok"] is False
    resident = by_name[
        "gateway frames of 1024 sessions: lstm-serve / raw ORT at batch 1024, GPU-resident"
    ]
    assert resident["value"] == pytest.approx(0.1)
    # on the CPU the same load is judged against the plain run, and nothing is "resident"
    results["meta"] = {"device": "cpu"}
    results["raw_ort"] = [_row(1024, "cpu", 600_000.0)]
    names = [t["name"] for t in report.targets(results)]
    assert "gateway frames of 1024 sessions: lstm-serve / raw ORT at batch 1024 (cpu)" in names
    assert not any("GPU-resident" in n for n in names)


def test_cpu_per_session_step_is_judged_against_raw_orts_cpu_per_row() -> None:
    """Server CPU per session-step over raw ORT's CPU per row, on the CPU only (a GPU's host
    CPU per row measures something else)."""
    raw = {**_row(1024, "cpu", 100_000.0), "cpu_s_per_1k_steps": 0.004}
    load = {"steps": 1000, "steps_per_s": 80_000.0, "server_cpu_s_per_1k_steps": 0.008}
    results = {
        "meta": {"device": "cpu"},
        "raw_ort": [raw],
        "servers": {"lstm-serve": {"loads": {"gateway1024": load}}},
    }
    by_name = {t["name"]: t for t in report.targets(results)}
    t = by_name["gateway frames of 1024: server CPU per session-step / ORT CPU per row"]
    assert t["value"] == pytest.approx(2.0) and t["ok"] is False and "8.00 / 4.00 us" in t["detail"]
    assert (
        by_name["gateway frames of 256: server CPU per session-step / ORT CPU per row"]["ok"]
        is None
    )  # not measured
    results["meta"], results["raw_ort"] = {"device": "cuda"}, [{**raw, "binding": "host"}]
    names = [t["name"] for t in report.targets(results)]
    assert not any("1024: server CPU" in n for n in names)


def test_gateway1024_runs_by_default_only_on_cuda() -> None:
    assert "gateway1024" in GPU_LOADS and "gateway1024" not in QUICK_LOADS


@pytest.mark.timeout(120)
def test_cuda_without_a_usable_gpu_is_one_clear_error(tmp_path: Path) -> None:
    from lstm_serve.core.runtime import Device, choose_device

    try:
        usable = choose_device(Device.auto).device == "cuda"
    except RuntimeError:
        usable = False
    if usable:
        pytest.skip("this machine has a usable GPU: the CUDA path runs instead")
    make_model_repo(tmp_path / "repo", name="tiny", kind="real", input_dim=1, output_dim=1,
                    hidden=8, layers=2)  # fmt: skip
    r = subprocess.run(
        [sys.executable, "-m", "lstm_serve.cli.main", "bench", "--device", "cuda", "--quick",
         "--only", "raw", "--no-plots", "--out", str(tmp_path / "out"),
         "--model-repository", str(tmp_path / "repo"), "--model", "tiny"],
        capture_output=True, text=True, timeout=100,
    )  # fmt: skip
    assert r.returncode != 0
    assert "device=cuda was asked for" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.timeout(120)
def test_lstm_serve_echo_answers_without_the_engine(tmp_path: Path) -> None:
    """lstm-serve-echo is lstm-serve's own server answering as echo does: every message is
    answered and counted by the server's interceptors, and the engine runs nothing."""
    make_model_repo(tmp_path / "repo", name="tiny", kind="real", input_dim=1, output_dim=1,
                    hidden=8, layers=2)  # fmt: skip
    out = tmp_path / "out"
    args = build_parser().parse_args(
        [
            "bench", "--only", "lstm-serve-echo", "--loads", "streams64", "--no-plots",
            "--out", str(out), "--model-repository", str(tmp_path / "repo"), "--model", "tiny",
            "--duration", "0.3", "--warmup", "0.1",
        ]
    )  # fmt: skip
    from lstm_serve.bench.run import run

    assert run(args) == 0
    result = json.loads((out / "results.json").read_text())
    assert set(result["servers"]) == {"lstm-serve-echo"}
    r = result["servers"]["lstm-serve-echo"]["loads"]["streams64"]
    assert r["errors"] == [] and r["messages"] > 0
    assert r["batcher"]["inference_calls"] == 0
    assert "| lstm-serve-echo |" in (out / "results.md").read_text()
