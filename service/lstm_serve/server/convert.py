"""Protobuf <-> core types: pure functions, no state."""

from __future__ import annotations

import functools
import json

import numpy as np

from lstm_serve.core import frame as F
from lstm_serve.core.errors import InvalidArgument
from lstm_serve.core.jobs import SessionStatus, StepResult
from lstm_serve.core.repository import Kind, Manifest, ModelVersion
from lstm_serve.core.rollout import ForecastResult
from lstm_serve.server.pb import lstm_serve_pb2 as pb

F32 = np.dtype("<f4")
SEQ_LIMIT = 2**63 - 1  # the largest seq the int64 columns hold


def floats_from_bytes(data: bytes, what: str) -> np.ndarray:
    if len(data) % 4:
        raise InvalidArgument(f"{what} has {len(data)} bytes, not a whole number of float32 values")
    return np.frombuffer(data, F32)


def _session_x(s: pb.SessionSteps, m: Manifest) -> np.ndarray:
    sid = s.session_id
    if m.kind is Kind.token:
        if s.x:
            raise InvalidArgument(f"session {sid!r}: model {m.name!r} takes tokens, not x")
        if not len(s.tokens):
            raise InvalidArgument(f"session {sid!r}: no steps (tokens is empty)")
        return np.asarray(s.tokens, np.int64)
    if len(s.tokens):
        raise InvalidArgument(f"session {sid!r}: model {m.name!r} takes x, not tokens")
    data = s.x  # each read of a bytes field copies it: once
    if not data:
        raise InvalidArgument(f"session {sid!r}: no steps (x is empty)")
    dim = m.input_dim
    if len(data) % (4 * dim):
        floats_from_bytes(data, f"session {sid!r}: x")  # names a partial float first
        raise InvalidArgument(
            f"session {sid!r}: x has {len(data) // 4} values, not a multiple of input_dim {dim}"
        )
    return np.frombuffer(data, F32).reshape(-1, dim)


def _seq(s: pb.SessionSteps) -> int:
    if not s.HasField("seq"):
        return F.APPEND
    # No session gets this far: a larger seq is a gap (or not found) like any other.
    return min(int(s.seq), SEQ_LIMIT)


def frame_of(req: pb.StepRequest, m: Manifest) -> F.Frame:
    """The request as a frame, whichever form it came in."""
    if req.HasField("frame"):
        if len(req.sessions):
            raise InvalidArgument("set either sessions or frame, not both")
        return _columnar(req.frame, m)
    sessions = req.sessions
    if len(sessions) == 1:
        s = sessions[0]
        return F.single(s.session_id, _session_x(s, m), _seq(s), s.reset)
    F.check_ids([s.session_id for s in sessions], 2**31)  # names the bad id before decoding
    xs = [_session_x(s, m) for s in sessions]
    seq = np.fromiter((_seq(s) for s in sessions), np.int64, len(sessions))
    reset = np.fromiter((s.reset for s in sessions), bool, len(sessions))
    return F.from_rows(list(s.session_id for s in sessions), xs, seq, reset)


def _columnar(fr: pb.Frame, m: Manifest) -> F.Frame:
    ids = list(fr.session_ids)
    n, t = len(ids), fr.steps
    if n == 0:
        raise InvalidArgument("frame.session_ids is empty")
    if t == 0:
        raise InvalidArgument("frame.steps is 0")
    if len(fr.seqs) not in (0, n):
        raise InvalidArgument(f"frame.seqs has {len(fr.seqs)} values for {n} session_ids")
    if len(fr.resets) not in (0, n):
        raise InvalidArgument(f"frame.resets has {len(fr.resets)} values for {n} session_ids")
    seq = np.asarray(fr.seqs, np.int64) if len(fr.seqs) else np.full(n, F.APPEND, np.int64)
    if len(fr.seqs) and (seq < F.APPEND).any():
        raise InvalidArgument("frame.seqs: each value is a seq >= 0, or -1 to append")
    reset = np.asarray(fr.resets, bool) if len(fr.resets) else np.zeros(n, bool)
    if m.kind is Kind.token:
        if fr.x:
            raise InvalidArgument(f"model {m.name!r} takes frame.tokens, not frame.x")
        if len(fr.tokens) != n * t:
            raise InvalidArgument(
                f"frame.tokens has {len(fr.tokens)} ids; {n} sessions x {t} steps need {n * t}"
            )
        x: np.ndarray = np.asarray(fr.tokens, np.int64).reshape(n, t)
    else:
        if len(fr.tokens):
            raise InvalidArgument(f"model {m.name!r} takes frame.x, not frame.tokens")
        want = n * t * m.input_dim
        x = floats_from_bytes(fr.x, "frame.x")
        if x.size != want:
            raise InvalidArgument(
                f"frame.x has {x.size} values; {n} sessions x {t} steps x input_dim "
                f"{m.input_dim} need {want}"
            )
        x = x.reshape(n, t, m.input_dim)
    return F.Frame(ids, seq, reset, [F.Block(np.arange(n, dtype=np.int64), x)])


def answer_bytes(frame: F.Frame, m: Manifest, top_k: int) -> int:
    """An upper bound of the encoded answer's size, known before anything runs."""
    ids = frame.ids
    steps = frame.steps()
    per_step = (
        10 * min(top_k, m.output_dim) + 4 if m.kind is Kind.token and top_k else 4 * m.output_dim
    )
    id_bytes = len(ids[0]) if len(ids) == 1 else sum(map(len, ids))
    return steps * per_step + id_bytes + 48 * len(ids) + 256


def forecast_bytes(m: Manifest, session_id: str, horizon: int) -> int:
    """An upper bound of a Forecast answer's size: float32 rows, or token ids (5-byte varints)."""
    per_step = 5 if m.kind is Kind.token else 4 * m.output_dim
    return horizon * per_step + len(session_id.encode()) + 256


def model_ref(mv: ModelVersion) -> pb.ModelRef:
    return _model_ref(mv.manifest.name, mv.manifest.version)


@functools.lru_cache(maxsize=256)
def _model_ref(name: str, version: str) -> pb.ModelRef:
    # One per model version: a message field set from it gets a copy, so sharing it is safe.
    return pb.ModelRef(name=name, version=version)


def _top_k(probs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k most likely tokens along the last axis, most likely first: (ids, probs)."""
    k = min(k, probs.shape[-1])
    idx = np.argpartition(-probs, k - 1, axis=-1)[..., :k]
    part = np.take_along_axis(probs, idx, axis=-1)
    order = np.argsort(-part, axis=-1, kind="stable")
    return np.take_along_axis(idx, order, axis=-1), np.take_along_axis(part, order, axis=-1)


def top_k(probs: np.ndarray, k: int) -> list[pb.TopK]:
    idx, part = _top_k(probs, k)
    return [pb.TopK(tokens=i.tolist(), probs=p.tolist()) for i, p in zip(idx, part, strict=True)]


def step_response(
    mv: ModelVersion, r: StepResult, request_id: str, k: int, columnar: bool
) -> pb.StepResponse:
    m = mv.manifest
    token = m.kind is Kind.token
    resp = pb.StepResponse(request_id=request_id, model=_model_ref(m.name, r.version or m.version))
    if columnar:
        # one array, or (sessions on several versions, of one output size) one per session
        y = r.y if isinstance(r.y, np.ndarray) else np.stack(r.y)
        out = resp.frame
        out.steps = y.shape[1]
        out.seqs.extend(r.seq.tolist())
        out.next_seqs.extend(r.next_seq.tolist())
        out.replayed.extend(r.replayed.tolist())
        if r.versions is not None:
            out.versions.extend(r.versions)
        if token and k > 0:
            idx, part = _top_k(y, k)
            out.top_k_tokens.extend(idx.ravel().tolist())
            out.top_k_probs.extend(part.ravel().tolist())
        else:
            out.y = y.astype(F32, copy=False).tobytes()
        return resp
    seq, nxt, rep = r.seq.tolist(), r.next_seq.tolist(), r.replayed.tolist()
    if len(seq) == 1 and not (token and k > 0):  # a streamed session: one add, no loop
        yi = r.y[0]
        resp.sessions.add(
            session_id=r.ids[0], seq=seq[0], next_seq=nxt[0], steps=yi.shape[0],
            replayed=rep[0], y=yi.astype(F32, copy=False).tobytes(),
        )  # fmt: skip
        return resp
    versions = r.versions or [""] * len(seq)  # named per session only when they differ
    for i, sid in enumerate(r.ids):
        yi = r.y[i]
        o = resp.sessions.add(
            session_id=sid, seq=seq[i], next_seq=nxt[i], steps=yi.shape[0], replayed=rep[i],
            version=versions[i],
        )  # fmt: skip
        if token and k > 0:
            o.top_k.extend(top_k(yi, k))
        else:
            o.y = yi.astype(F32, copy=False).tobytes()
    return resp


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
