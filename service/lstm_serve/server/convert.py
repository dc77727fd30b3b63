"""Protobuf <-> engine types: pure functions, no state."""

from __future__ import annotations

import json

import numpy as np

from lstm_serve.core.engine import ForecastResult, SessionStatus, StepInput, StepOutput
from lstm_serve.core.errors import InvalidArgument
from lstm_serve.core.repository import Kind, ModelVersion
from lstm_serve.server.pb import lstm_serve_pb2 as pb

F32 = np.dtype("<f4")


def floats_from_bytes(data: bytes, what: str) -> np.ndarray:
    if len(data) % 4:
        raise InvalidArgument(f"{what} has {len(data)} bytes, not a whole number of float32 values")
    return np.frombuffer(data, F32)


def step_inputs(req: pb.StepRequest) -> list[StepInput]:
    return [session_steps(s) for s in req.sessions]


def session_steps(s: pb.SessionSteps) -> StepInput:
    return StepInput(
        session_id=s.session_id,
        x=floats_from_bytes(s.x, f"session {s.session_id!r}: x") if s.x else None,
        tokens=np.asarray(s.tokens, np.int64) if len(s.tokens) else None,
        seq=s.seq if s.HasField("seq") else None,
        reset=s.reset,
    )


def model_ref(mv: ModelVersion) -> pb.ModelRef:
    return pb.ModelRef(name=mv.manifest.name, version=mv.manifest.version)


def top_k(probs: np.ndarray, k: int) -> list[pb.TopK]:
    """The k most likely tokens of each step, most likely first."""
    k = min(k, probs.shape[1])
    idx = np.argpartition(-probs, k - 1, axis=1)[:, :k]
    part = np.take_along_axis(probs, idx, axis=1)
    order = np.argsort(-part, axis=1, kind="stable")
    idx = np.take_along_axis(idx, order, axis=1)
    part = np.take_along_axis(part, order, axis=1)
    return [pb.TopK(tokens=i.tolist(), probs=p.tolist()) for i, p in zip(idx, part, strict=True)]


def session_output(o: StepOutput, k: int, token_model: bool) -> pb.SessionOutput:
    out = pb.SessionOutput(
        session_id=o.session_id, seq=o.seq, next_seq=o.next_seq, steps=o.y.shape[0],
        replayed=o.replayed,
    )  # fmt: skip
    if token_model and k > 0:
        out.top_k.extend(top_k(o.y, k))
    else:
        out.y = o.y.astype(F32, copy=False).tobytes()
    return out


def step_response(
    mv: ModelVersion, outputs: list[StepOutput], request_id: str, k: int
) -> pb.StepResponse:
    token = mv.manifest.kind is Kind.token
    return pb.StepResponse(
        request_id=request_id,
        model=model_ref(mv),
        sessions=[session_output(o, k, token) for o in outputs],
    )


def forecast_response(mv: ModelVersion, r: ForecastResult) -> pb.ForecastResponse:
    resp = pb.ForecastResponse(
        model=model_ref(mv), session_id=r.session_id, steps=r.y.shape[0], next_seq=r.next_seq
    )
    if mv.manifest.kind is Kind.token:
        resp.tokens.extend(r.tokens.tolist())
    else:
        resp.y = r.y.astype(F32, copy=False).tobytes()
    return resp


def session_info(mv: ModelVersion, s: SessionStatus) -> pb.SessionInfo:
    return pb.SessionInfo(
        model=model_ref(mv), session_id=s.session_id, next_seq=s.next_seq, exists=s.exists,
        idle_seconds=s.idle_seconds,
    )  # fmt: skip


def model_info(mv: ModelVersion) -> pb.ModelInfo:
    m = mv.manifest
    return pb.ModelInfo(
        name=m.name, version=m.version, kind=m.kind.value, input_dim=m.input_dim,
        output_dim=m.output_dim, vocab_size=m.vocab_size, layers=m.layers,
        hidden_size=m.hidden_size, manifest_json=json.dumps(m.model_dump(mode="json")),
    )  # fmt: skip
