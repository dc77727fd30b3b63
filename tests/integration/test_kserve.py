"""The Open Inference Protocol, driven by Triton's own client (tritonclient[grpc], unchanged, in
the venv `make test` builds for it) against a real server on loopback; outputs are checked
against one pass of the NumPy oracle."""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import PROJECT_ROOT
from tests.helpers.server import ServerThread
from tests.oracle.one_pass import OnePass

TRITON_PYTHON = PROJECT_ROOT / ".venv-triton" / "bin" / "python"
CLIENT = PROJECT_ROOT / "tests" / "triton" / "client.py"
ATOL = 1e-5


def need_triton_client() -> None:
    if not TRITON_PYTHON.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{TRITON_PYTHON} is missing: `make test` builds it")
        pytest.skip("no tritonclient venv: run `make triton-client`")


@pytest.fixture(scope="module")
def triton_run(tiny_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    need_triton_client()
    rng = np.random.default_rng(7)
    inputs = {
        "batch": rng.normal(size=(3, 5, 3)).astype(np.float32),
        "seq_a": rng.normal(size=(12, 3)).astype(np.float32),
        "seq_b": rng.normal(size=(9, 3)).astype(np.float32),
        "tokens": rng.integers(0, 12, size=10).astype(np.int64),
    }
    d = tmp_path_factory.mktemp("triton")
    src, dst = d / "in.npz", d / "out.npz"
    np.savez(src, **inputs)
    with ServerThread(model_repository=tiny_repo, max_sessions=64) as srv:
        proc = subprocess.run(
            [str(TRITON_PYTHON), str(CLIENT), srv.target, str(src), str(dst)],
            capture_output=True, text=True, timeout=180,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-4000:]
        sessions = len(srv.engine.models[("tiny", "1")].store)
    out = dict(np.load(dst))
    facts = json.loads(str(out.pop("facts")))
    yield inputs, out, facts, sessions


def test_health_metadata_and_config(triton_run: Any) -> None:
    _, _, f, _ = triton_run
    assert f["live"] and f["ready"] and f["model_ready"]
    assert not f["unknown_ready"]
    assert f["server"]["name"] == "lstm-serve"
    assert "sequence" in f["server"]["extensions"]
    md = f["metadata"]
    assert md["name"] == "tiny" and md["versions"] == ["1"]
    assert md["inputs"] == [{"name": "x", "datatype": "FP32", "shape": ["-1", "-1", "3"]}]
    assert md["outputs"] == [{"name": "y", "datatype": "FP32", "shape": ["-1", "-1", "3"]}]
    assert f["tok_metadata"]["inputs"][0]["datatype"] == "INT64"
    cfg = f["config"]
    assert cfg["name"] == "tiny" and int(cfg["max_batch_size"]) > 1
    assert cfg["input"][0]["dims"] == ["-1", "3"]
    sb = cfg["sequence_batching"]
    # proto3 JSON leaves out the enum's first value, CONTROL_SEQUENCE_START
    controls = {
        c["name"]: c["control"][0].get("kind", "CONTROL_SEQUENCE_START")
        for c in sb["control_input"]
    }
    assert controls["START"] == "CONTROL_SEQUENCE_START"
    assert controls["END"] == "CONTROL_SEQUENCE_END"


def test_errors_map_to_tritons_statuses(triton_run: Any) -> None:
    _, _, f, _ = triton_run
    for key in ("unknown_model", "unknown_infer"):
        assert f[key]["status"] == "StatusCode.UNAVAILABLE"
        assert "Request for unknown model: 'nope' is not found" in f[key]["message"]
    for key, sid in (("after_end", "1234567890123"), ("never_started", "ghost")):
        assert f[key]["status"] == "StatusCode.INVALID_ARGUMENT"
        assert f[key]["message"] == (
            f"inference request for sequence {sid} to model 'tiny' must specify the START flag "
            f"on the first request of the sequence"
        )
    assert f["bad_shape"]["status"] == "StatusCode.INVALID_ARGUMENT"
    assert "5 features per step" in f["bad_shape"]["message"]
    assert f["batch_in_sequence"]["status"] == "StatusCode.INVALID_ARGUMENT"
    assert "batch-size 1" in f["batch_in_sequence"]["message"]


def test_stateless_batch_is_each_row_from_zero(triton_run: Any, oracle: OnePass) -> None:
    inputs, out, _, _ = triton_run
    want = np.stack([oracle.run(row)[0] for row in inputs["batch"]])
    assert out["batch_y"].shape == (3, 5, 3)
    np.testing.assert_allclose(out["batch_y"], want, atol=ATOL)
    np.testing.assert_allclose(out["typed_y"], want, atol=ATOL)  # typed contents both ways
    np.testing.assert_allclose(out["stream_after"], want, atol=ATOL)


def test_interleaved_sequences_equal_one_pass(triton_run: Any, oracle: OnePass) -> None:
    inputs, out, _, _ = triton_run
    for got, key in (
        ("unary_a", "seq_a"), ("unary_b", "seq_b"), ("stream_a", "seq_a"), ("stream_b", "seq_b")
    ):  # fmt: skip
        np.testing.assert_allclose(out[got], oracle.run(inputs[key])[0], atol=ATOL)


def test_stream_answers_in_order_and_goes_on_after_an_error(triton_run: Any) -> None:
    _, _, f, _ = triton_run
    want = [f"{sid}/{i}" for i in range(4) for sid in (77, "stream-b")] + ["after"]
    assert f["stream_ids"] == want
    assert len(f["stream_errors"]) == 1
    assert "sequence ghost" in f["stream_errors"][0] and "START" in f["stream_errors"][0]


def test_ended_and_stateless_sessions_are_gone(triton_run: Any) -> None:
    # Every sequence was ended except "once"; stateless rows never stay.
    assert triton_run[3] == 1


def test_seq_parameter_gives_exactly_once(triton_run: Any, oracle: OnePass) -> None:
    inputs, out, f, _ = triton_run
    want = oracle.run(inputs["seq_a"])[0][4:]
    np.testing.assert_allclose(out["once_first"][0], want, atol=ATOL)
    np.testing.assert_array_equal(out["once_retry"], out["once_first"])
    first, retry = f["once_params"]
    assert first["lstm_serve_replayed"] == {"bool_param": False}
    assert retry["lstm_serve_replayed"] == {"bool_param": True}
    assert first["lstm_serve_next_seq"]["int64_param"] == "12"
    assert retry["lstm_serve_next_seq"]["int64_param"] == "12"  # applied once
    assert f["once_gap"]["status"] == "StatusCode.FAILED_PRECONDITION"
    assert "expected seq 12" in f["once_gap"]["message"]


def test_token_model_and_classification(triton_run: Any, tok_oracle: OnePass) -> None:
    inputs, out, _, _ = triton_run
    y = tok_oracle.run(inputs["tokens"])[0]
    np.testing.assert_allclose(out["tok_y"], y, atol=ATOL)
    assert out["tok_top"].shape == (10, 3)
    np.testing.assert_array_equal(out["tok_top"][:, 0], y.argmax(axis=1))
    top3 = np.sort(np.take_along_axis(y, out["tok_top"], axis=1), axis=1)
    np.testing.assert_allclose(top3, np.sort(y, axis=1)[:, -3:], atol=ATOL)


def test_protocol_doc_example_runs_as_written(shipped_models_dir: Path, project_root: Path) -> None:
    """docs/protocol.md's tritonclient example, run by the tritonclient venv against the bundled
    models."""
    need_triton_client()
    text = (project_root / "docs" / "protocol.md").read_text()
    code = next(b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "tritonclient" in b)
    with ServerThread(model_repository=shipped_models_dir) as srv:
        proc = subprocess.run(
            [str(TRITON_PYTHON), "-c", code.replace("127.0.0.1:50051", srv.target)],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-4000:]
        # The example ended its sequence.
        assert srv.engine.model("forecaster").store.slot("7") is None
    assert proc.stdout.splitlines() == ["(2, 2) (1, 2)", "START"]
