"""Open Inference Protocol (KServe v2, Triton's flavour) <-> core types: pure functions, no state.

A request is one input tensor, x: real models FP32 `[batch, steps, input_dim]` or
`[steps, input_dim]`, token models INT64/INT32 `[batch, steps]` or `[steps]`. Triton's sequence
parameters name a session; see docs/protocol.md for the mapping.
"""

from __future__ import annotations

import math
import struct
import uuid
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from lstm_serve.core import frame as F
from lstm_serve.core.errors import (
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    ServiceError,
    SessionNotFound,
    Unavailable,
)
from lstm_serve.core.jobs import StepResult
from lstm_serve.core.repository import Kind, Manifest, ModelVersion
from lstm_serve.server.convert import F32, SEQ_LIMIT
from lstm_serve.server.pb import grpc_service_pb2 as ipb
from lstm_serve.server.pb import model_config_pb2 as mc
from lstm_serve.server.statistics import ModelStats

# The request parameter that carries lstm-serve's seq (exactly-once retries); the response
# parameters that answer it.
SEQ_PARAM = "lstm_serve_seq"
NEXT_SEQ_PARAM = "lstm_serve_next_seq"
REPLAYED_PARAM = "lstm_serve_replayed"
# Triton's classification extension: a requested output's parameter asking for the top k.
CLASSIFICATION = "classification"
# Control inputs declared in the sequence batching section (Triton's names in its examples).
CONTROLS = (
    ("START", mc.ModelSequenceBatching.Control.CONTROL_SEQUENCE_START),
    ("END", mc.ModelSequenceBatching.Control.CONTROL_SEQUENCE_END),
    ("READY", mc.ModelSequenceBatching.Control.CONTROL_SEQUENCE_READY),
)
_INT_TYPES: dict[str, np.dtype[Any]] = {"INT64": np.dtype("<i8"), "INT32": np.dtype("<i4")}


@dataclass(frozen=True, slots=True)
class Requested:
    name: str
    class_count: int  # 0: the tensor itself; k > 0: Triton's classification, the top k


@dataclass(frozen=True, slots=True)
class Decoded:
    """What the encoder needs to know about the request besides the core's answer."""

    batched: bool  # the input had a batch dimension (the output gets one too)
    raw: bool  # the input came as raw_input_contents (the output goes out raw too)
    outputs: tuple[Requested, ...]
    sequence: bool  # the request named a sequence


def _param(params: Any, key: str) -> Any:
    """A request parameter's value (bool, int, str or float), or None when absent."""
    if key not in params:
        return None
    p = params[key]
    which = p.WhichOneof("parameter_choice")
    return None if which is None else getattr(p, which)


def _sequence_id(params: Any) -> str | None:
    sid = _param(params, "sequence_id")
    if sid is None or sid == 0 or sid == "":
        return None  # Triton: 0 and "" mean no sequence
    if isinstance(sid, bool) or not isinstance(sid, int | str):
        raise InvalidArgument("sequence_id must be an unsigned integer or a string")
    if isinstance(sid, int) and sid < 0:
        raise InvalidArgument("sequence_id must be an unsigned integer or a string")
    return str(sid)


def _flag(params: Any, key: str) -> bool:
    v = _param(params, key)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise InvalidArgument(f"{key} must be a bool parameter")
    return v


def _seq(params: Any) -> int | None:
    v = _param(params, SEQ_PARAM)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise InvalidArgument(f"{SEQ_PARAM} must be an integer >= 0")
    return min(v, SEQ_LIMIT)


def _typed(contents: Any, datatype: str) -> np.ndarray:
    if datatype == "FP32":
        return np.asarray(contents.fp32_contents, F32)
    if datatype == "INT64":
        return np.asarray(contents.int64_contents, np.int64)
    return np.asarray(contents.int_contents, np.int64)


def _input(req: ipb.ModelInferRequest, m: Manifest) -> tuple[np.ndarray, bool, bool]:
    """The input x as [batch, steps(, input_dim)], whether it had a batch dimension, and
    whether it came raw."""
    name = m.tensors.x
    if len(req.inputs) != 1 or req.inputs[0].name != name:
        names = ", ".join(repr(t.name) for t in req.inputs) or "none"
        raise InvalidArgument(f"model '{m.name}' expects one input, '{name}'; got {names}")
    t = req.inputs[0]
    token = m.kind is Kind.token
    want = ("INT64", "INT32") if token else ("FP32",)
    if t.datatype not in want:
        raise InvalidArgument(
            f"input '{name}' has datatype {t.datatype or 'none'}; model '{m.name}' takes "
            + " or ".join(want)
        )
    shape = [int(d) for d in t.shape]
    inner = 0 if token else 1  # dimensions after steps
    if len(shape) not in (1 + inner, 2 + inner) or min(shape, default=0) < 0:
        form = (
            "[batch, steps] or [steps]"
            if token
            else "[batch, steps, input_dim] or [steps, input_dim]"
        )
        raise InvalidArgument(f"input '{name}' has shape {shape}; expected {form}")
    if not token and shape[-1] != m.input_dim:
        raise InvalidArgument(
            f"input '{name}' has {shape[-1]} features per step; model '{m.name}' takes "
            f"{m.input_dim}"
        )
    batched = len(shape) == 2 + inner
    count = math.prod(shape)
    raw = len(req.raw_input_contents) > 0
    if raw:
        if len(req.raw_input_contents) != 1:
            raise InvalidArgument(f"{len(req.raw_input_contents)} raw_input_contents for 1 input")
        dtype: np.dtype[Any] = F32 if not token else _INT_TYPES[t.datatype]
        data = req.raw_input_contents[0]
        if len(data) != count * dtype.itemsize:
            raise InvalidArgument(
                f"input '{name}': raw_input_contents has {len(data)} bytes; shape {shape} of "
                f"{t.datatype} needs {count * dtype.itemsize}"
            )
        x = np.frombuffer(data, dtype)
    else:
        x = _typed(t.contents, t.datatype)
        if x.size != count:
            raise InvalidArgument(
                f"input '{name}' has {x.size} {t.datatype} values in contents; shape {shape} "
                f"needs {count}"
            )
    x = x.astype(np.int64, copy=False) if token else x
    x = x.reshape(shape if batched else [1, *shape])
    return x, batched, raw


def _outputs(req: ipb.ModelInferRequest, m: Manifest) -> tuple[Requested, ...]:
    if not req.outputs:
        return (Requested(m.tensors.y, 0),)  # Triton: no outputs asked for means all of them
    out = []
    for o in req.outputs:
        if o.name != m.tensors.y:
            raise InvalidArgument(f"unexpected inference output '{o.name}' for model '{m.name}'")
        k = _param(o.parameters, CLASSIFICATION)
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise InvalidArgument(f"output '{o.name}': {CLASSIFICATION} must be an integer >= 1")
        out.append(Requested(o.name, min(int(k or 0), m.output_dim)))
    return tuple(out)


def decode(req: ipb.ModelInferRequest, m: Manifest) -> tuple[F.Frame, Decoded]:
    """The request as a frame: a sequence is one session; without one, each batch row is a
    session of its own that starts from a zero state and ends with the request."""
    params = req.parameters
    sid = _sequence_id(params)
    start, end, seq = _flag(params, "sequence_start"), _flag(params, "sequence_end"), _seq(params)
    x, batched, raw = _input(req, m)
    batch, steps = x.shape[0], x.shape[1]
    if batch == 0 or steps == 0:
        raise InvalidArgument(f"input '{m.tensors.x}' has no steps")
    outputs = _outputs(req, m)
    if sid is None:
        if start or end or seq is not None:
            raise InvalidArgument(
                f"sequence_start, sequence_end and {SEQ_PARAM} need a sequence_id"
            )
        # Ids no client chooses; the sessions live for this request only.
        tag = uuid.uuid4().hex
        ids = [f"{F.ONE_REQUEST}{tag}/{i}" for i in range(batch)]
        frame = F.Frame(
            ids, np.full(batch, F.APPEND, np.int64), np.ones(batch, bool),
            [F.Block(np.arange(batch, dtype=np.int64), x)], np.ones(batch, bool),
        )  # fmt: skip
        return frame, Decoded(batched, raw, outputs, False)
    if batch != 1:
        raise InvalidArgument(
            f"inference request to model '{m.name}' must specify batch-size 1 due to "
            f"requirements of sequence batcher"
        )
    if start and seq not in (None, 0):
        raise InvalidArgument(f"sequence_start begins at {SEQ_PARAM} 0, not {seq}")
    # An explicit seq keeps lstm-serve's rules; without one, only START may create a session.
    col = seq if seq is not None else (F.APPEND if start else F.CONTINUE)
    frame = F.Frame(
        [sid], np.array([col], np.int64), np.array([start]),
        [F.Block(np.zeros(1, np.int64), x)], np.array([end]),
    )  # fmt: skip
    return frame, Decoded(batched, raw, outputs, True)


def answer_bytes(frame: F.Frame, m: Manifest, d: Decoded) -> int:
    """An upper bound of the encoded answer's size, known before anything runs."""
    steps = frame.steps()
    label = max((len(v.encode()) for v in m.vocab), default=0) if m.vocab else 0
    per_step = sum(
        o.class_count * (4 + 32 + label) if o.class_count else 4 * m.output_dim for o in d.outputs
    )
    return steps * per_step + 256 * (len(d.outputs) + 1)


def _classes(y: np.ndarray, k: int, vocab: list[str] | None) -> np.ndarray:
    """Triton's classification strings, "value:index[:label]", most likely first."""
    idx = np.argsort(-y, axis=-1, kind="stable")[..., :k]
    val = np.take_along_axis(y, idx, axis=-1)
    out = np.empty(idx.shape, object)
    for pos in np.ndindex(idx.shape):
        i = int(idx[pos])
        label = f":{vocab[i]}" if vocab else ""
        out[pos] = f"{float(val[pos]):f}:{i}{label}".encode()
    return out


def _bytes_raw(items: np.ndarray) -> bytes:
    """BYTES tensors travel as 4-byte little-endian lengths, each followed by its bytes."""
    return b"".join(struct.pack("<I", len(b)) + b for b in items.ravel().tolist())


def encode(
    mv: ModelVersion, req: ipb.ModelInferRequest, d: Decoded, r: StepResult
) -> ipb.ModelInferResponse:
    m = mv.manifest
    # The version that ran: a sequence naming no version goes on on its own.
    version = r.version or (r.versions or [m.version])[0]
    resp = ipb.ModelInferResponse(model_name=m.name, model_version=version, id=req.id)
    y = r.y if isinstance(r.y, np.ndarray) else np.stack(r.y)
    y = y if d.batched else y[0]
    for o in d.outputs:
        t = resp.outputs.add(name=o.name)
        if o.class_count:
            classes = _classes(y, o.class_count, m.vocab)
            t.datatype = "BYTES"
            t.shape.extend(classes.shape)
            if d.raw:
                resp.raw_output_contents.append(_bytes_raw(classes))
            else:
                t.contents.bytes_contents.extend(classes.ravel().tolist())
            continue
        t.datatype = "FP32"
        t.shape.extend(y.shape)
        if d.raw:
            resp.raw_output_contents.append(y.astype(F32, copy=False).tobytes())
        else:
            t.contents.fp32_contents.extend(y.ravel().tolist())
    if d.sequence:
        resp.parameters[SEQ_PARAM].int64_param = int(r.seq[0])
        resp.parameters[NEXT_SEQ_PARAM].int64_param = int(r.next_seq[0])
        resp.parameters[REPLAYED_PARAM].bool_param = bool(r.replayed[0])
    return resp


def triton_error(exc: ServiceError, name: str, version: str) -> ServiceError:
    """The status and text Triton gives for the same failure."""
    if isinstance(exc, SessionNotFound):
        return InvalidArgument(
            f"inference request for sequence {exc.session_id} to model '{name}' must specify "
            f"the START flag on the first request of the sequence"
        )
    if isinstance(exc, NotFound):  # the model or its version
        v = f" version {version}" if version else ""
        return Unavailable(f"Request for unknown model: '{name}'{v} is not found")
    if isinstance(exc, ResourceExhausted):  # Triton refuses a full queue as UNAVAILABLE
        return Unavailable(exc.message)
    return exc


def http_error(exc: ServiceError, name: str, version: str) -> ServiceError:
    """As triton_error, except where HTTP has a truer status than Triton's gRPC one: an unknown
    model or version stays NOT_FOUND (404), a full queue or the session cap RESOURCE_EXHAUSTED
    (429)."""
    if isinstance(exc, NotFound) and not isinstance(exc, SessionNotFound):
        return NotFound(triton_error(exc, name, version).message)
    if isinstance(exc, ResourceExhausted):
        return exc
    return triton_error(exc, name, version)


# -- metadata and config ----------------------------------------------------------------------


def _dims(m: Manifest, batch: bool) -> list[int]:
    inner = [] if m.kind is Kind.token else [m.input_dim]
    return ([-1] if batch else []) + [-1, *inner]


def model_metadata(mv: ModelVersion, versions: list[str]) -> ipb.ModelMetadataResponse:
    m = mv.manifest
    x_type = "INT64" if m.kind is Kind.token else "FP32"
    T = ipb.ModelMetadataResponse.TensorMetadata
    return ipb.ModelMetadataResponse(
        name=m.name, versions=versions, platform="onnxruntime_onnx",
        inputs=[T(name=m.tensors.x, datatype=x_type, shape=_dims(m, True))],
        outputs=[T(name=m.tensors.y, datatype="FP32", shape=[-1, -1, m.output_dim])],
    )  # fmt: skip


def model_config(mv: ModelVersion, max_batch: int, idle_s: float) -> mc.ModelConfig:
    """Enough of Triton's model configuration for its clients and perf_analyzer: inputs and
    outputs without the batch dimension, max_batch_size, and the sequence batching section."""
    m = mv.manifest
    x_type = mc.TYPE_INT64 if m.kind is Kind.token else mc.TYPE_FP32
    SB = mc.ModelSequenceBatching
    controls = [
        SB.ControlInput(name=name, control=[SB.Control(kind=kind, int32_false_true=[0, 1])])
        for name, kind in CONTROLS
    ]
    return mc.ModelConfig(
        name=m.name, platform="onnxruntime_onnx", backend="onnxruntime",
        max_batch_size=max_batch,
        input=[mc.ModelInput(name=m.tensors.x, data_type=x_type, dims=_dims(m, False))],
        output=[mc.ModelOutput(name=m.tensors.y, data_type=mc.TYPE_FP32, dims=[-1, m.output_dim])],
        sequence_batching=SB(
            max_sequence_idle_microseconds=int(idle_s * 1e6), control_input=controls
        ),
    )  # fmt: skip


def model_statistics(stats: list[ModelStats]) -> ipb.ModelStatisticsResponse:
    """The statistics extension's answer. ModelStats' fields are named as the message's
    (statistics.py), so the figures map one to one; batch_stats, memory_usage and
    response_stats stay empty (docs/protocol.md, "Statistics")."""
    return ipb.ModelStatisticsResponse(
        model_stats=[ipb.ModelStatistics(**asdict(s)) for s in stats]
    )
