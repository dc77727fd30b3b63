"""The generated code in service/lstm_serve/server/pb matches protos/ (and the staleness check is real)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lstm_serve.server import gen_pb
from lstm_serve.server.pb import lstm_serve_pb2 as pb

PROTO = "lstm_serve/v1/lstm_serve.proto"


def test_generated_code_is_not_stale() -> None:
    assert gen_pb.is_stale() == []


def test_check_command_passes(project_root: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "lstm_serve.server.gen_pb", "--check"],
        cwd=project_root, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "up to date" in proc.stdout


@pytest.fixture
def proto_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private copy of protos/ that gen_pb reads instead of the real one."""
    dst = tmp_path / "protos"
    shutil.copytree(gen_pb.PROTO_DIR, dst)
    monkeypatch.setattr(gen_pb, "PROTO_DIR", dst)
    return dst


def test_an_unchanged_copy_is_not_stale(proto_copy: Path) -> None:
    """The control for the next test: where the .proto lives does not change the output."""
    assert gen_pb.is_stale() == []


def test_a_changed_proto_makes_the_code_stale(proto_copy: Path) -> None:
    path = proto_copy / PROTO
    text = path.read_text()
    anchor = "message ModelRef {\n"
    assert anchor in text
    path.write_text(text.replace(anchor, anchor + "  string added_for_test = 99;\n", 1))
    stale = gen_pb.is_stale()
    assert "lstm_serve_pb2.py" in stale
    assert "lstm_serve_pb2.pyi" in stale
    assert "lstm_serve_pb2_grpc.py" not in stale  # the service did not change


def test_a_changed_service_makes_the_stubs_stale(proto_copy: Path) -> None:
    path = proto_copy / PROTO
    text = path.read_text()
    anchor = "  rpc GetModel(ModelRef) returns (ModelInfo);\n"
    assert anchor in text
    path.write_text(text.replace(anchor, anchor + "  rpc Ping(ModelRef) returns (ModelRef);\n"))
    assert "lstm_serve_pb2_grpc.py" in gen_pb.is_stale()


def test_generated_imports_are_package_relative() -> None:
    grpc_py = (gen_pb.OUT_DIR / "lstm_serve_pb2_grpc.py").read_text()
    assert "from . import lstm_serve_pb2" in grpc_py
    assert "from lstm_serve.v1" not in grpc_py


def test_generated_descriptor_matches_the_contract() -> None:
    assert pb.DESCRIPTOR.package == "lstm_serve.v1"
    assert pb.DESCRIPTOR.name == PROTO
    service = pb.DESCRIPTOR.services_by_name["LstmServe"]
    methods = {m.name: m for m in service.methods}
    assert set(methods) == {
        "Stream", "Predict", "Forecast", "GetSession", "ResetSession", "EndSession",
        "ListModels", "GetModel",
    }  # fmt: skip
    assert methods["Stream"].client_streaming and methods["Stream"].server_streaming
    assert not methods["Predict"].client_streaming and not methods["Predict"].server_streaming
    seq = pb.SessionSteps.DESCRIPTOR.fields_by_name["seq"]
    assert seq.has_presence  # `optional`: absent means append at the session's next seq


def test_a_changed_triton_proto_makes_its_code_stale(proto_copy: Path) -> None:
    path = proto_copy / gen_pb.TRITON_SUBDIR / "grpc_service.proto"
    text = path.read_text()
    anchor = "message ServerLiveRequest {}"
    assert anchor in text
    path.write_text(text.replace(anchor, "message ServerLiveRequest { bool added_for_test = 9; }"))
    stale = gen_pb.is_stale()
    assert "grpc_service_pb2.py" in stale
    assert "lstm_serve_pb2.py" not in stale


def test_triton_descriptors_keep_their_package() -> None:
    """Triton's and KServe's clients call /inference.GRPCInferenceService/...: the package and
    the service name must stay as published."""
    from lstm_serve.server.pb import grpc_service_pb2 as ipb
    from lstm_serve.server.pb import model_config_pb2 as mc

    assert ipb.DESCRIPTOR.package == mc.DESCRIPTOR.package == "inference"
    service = ipb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert service.full_name == "inference.GRPCInferenceService"
    grpc_py = (gen_pb.OUT_DIR / "grpc_service_pb2.py").read_text()
    assert "from . import model_config_pb2" in grpc_py
