from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ModelRef(_message.Message):
    __slots__ = ("name", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...

class SessionSteps(_message.Message):
    __slots__ = ("session_id", "seq", "reset", "x", "tokens")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    RESET_FIELD_NUMBER: _ClassVar[int]
    X_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    seq: int
    reset: bool
    x: bytes
    tokens: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, session_id: _Optional[str] = ..., seq: _Optional[int] = ..., reset: _Optional[bool] = ..., x: _Optional[bytes] = ..., tokens: _Optional[_Iterable[int]] = ...) -> None: ...

class Frame(_message.Message):
    __slots__ = ("session_ids", "seqs", "resets", "steps", "x", "tokens")
    SESSION_IDS_FIELD_NUMBER: _ClassVar[int]
    SEQS_FIELD_NUMBER: _ClassVar[int]
    RESETS_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    X_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    session_ids: _containers.RepeatedScalarFieldContainer[str]
    seqs: _containers.RepeatedScalarFieldContainer[int]
    resets: _containers.RepeatedScalarFieldContainer[bool]
    steps: int
    x: bytes
    tokens: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, session_ids: _Optional[_Iterable[str]] = ..., seqs: _Optional[_Iterable[int]] = ..., resets: _Optional[_Iterable[bool]] = ..., steps: _Optional[int] = ..., x: _Optional[bytes] = ..., tokens: _Optional[_Iterable[int]] = ...) -> None: ...

class StepRequest(_message.Message):
    __slots__ = ("model", "request_id", "sessions", "top_k", "frame")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    FRAME_FIELD_NUMBER: _ClassVar[int]
    model: ModelRef
    request_id: str
    sessions: _containers.RepeatedCompositeFieldContainer[SessionSteps]
    top_k: int
    frame: Frame
    def __init__(self, model: _Optional[_Union[ModelRef, _Mapping]] = ..., request_id: _Optional[str] = ..., sessions: _Optional[_Iterable[_Union[SessionSteps, _Mapping]]] = ..., top_k: _Optional[int] = ..., frame: _Optional[_Union[Frame, _Mapping]] = ...) -> None: ...

class TopK(_message.Message):
    __slots__ = ("tokens", "probs")
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    PROBS_FIELD_NUMBER: _ClassVar[int]
    tokens: _containers.RepeatedScalarFieldContainer[int]
    probs: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, tokens: _Optional[_Iterable[int]] = ..., probs: _Optional[_Iterable[float]] = ...) -> None: ...

class SessionOutput(_message.Message):
    __slots__ = ("session_id", "seq", "next_seq", "steps", "y", "top_k", "replayed", "version")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    NEXT_SEQ_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    Y_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    seq: int
    next_seq: int
    steps: int
    y: bytes
    top_k: _containers.RepeatedCompositeFieldContainer[TopK]
    replayed: bool
    version: str
    def __init__(self, session_id: _Optional[str] = ..., seq: _Optional[int] = ..., next_seq: _Optional[int] = ..., steps: _Optional[int] = ..., y: _Optional[bytes] = ..., top_k: _Optional[_Iterable[_Union[TopK, _Mapping]]] = ..., replayed: _Optional[bool] = ..., version: _Optional[str] = ...) -> None: ...

class FrameOutput(_message.Message):
    __slots__ = ("steps", "seqs", "next_seqs", "replayed", "y", "top_k_tokens", "top_k_probs", "versions")
    STEPS_FIELD_NUMBER: _ClassVar[int]
    SEQS_FIELD_NUMBER: _ClassVar[int]
    NEXT_SEQS_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    Y_FIELD_NUMBER: _ClassVar[int]
    TOP_K_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOP_K_PROBS_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    steps: int
    seqs: _containers.RepeatedScalarFieldContainer[int]
    next_seqs: _containers.RepeatedScalarFieldContainer[int]
    replayed: _containers.RepeatedScalarFieldContainer[bool]
    y: bytes
    top_k_tokens: _containers.RepeatedScalarFieldContainer[int]
    top_k_probs: _containers.RepeatedScalarFieldContainer[float]
    versions: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, steps: _Optional[int] = ..., seqs: _Optional[_Iterable[int]] = ..., next_seqs: _Optional[_Iterable[int]] = ..., replayed: _Optional[_Iterable[bool]] = ..., y: _Optional[bytes] = ..., top_k_tokens: _Optional[_Iterable[int]] = ..., top_k_probs: _Optional[_Iterable[float]] = ..., versions: _Optional[_Iterable[str]] = ...) -> None: ...

class StepResponse(_message.Message):
    __slots__ = ("request_id", "model", "sessions", "frame")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    FRAME_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: ModelRef
    sessions: _containers.RepeatedCompositeFieldContainer[SessionOutput]
    frame: FrameOutput
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[_Union[ModelRef, _Mapping]] = ..., sessions: _Optional[_Iterable[_Union[SessionOutput, _Mapping]]] = ..., frame: _Optional[_Union[FrameOutput, _Mapping]] = ...) -> None: ...

class ForecastRequest(_message.Message):
    __slots__ = ("model", "session_id", "horizon", "prefix", "temperature", "top_k", "seed", "commit")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    HORIZON_FIELD_NUMBER: _ClassVar[int]
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    COMMIT_FIELD_NUMBER: _ClassVar[int]
    model: ModelRef
    session_id: str
    horizon: int
    prefix: SessionSteps
    temperature: float
    top_k: int
    seed: int
    commit: bool
    def __init__(self, model: _Optional[_Union[ModelRef, _Mapping]] = ..., session_id: _Optional[str] = ..., horizon: _Optional[int] = ..., prefix: _Optional[_Union[SessionSteps, _Mapping]] = ..., temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., seed: _Optional[int] = ..., commit: _Optional[bool] = ...) -> None: ...

class ForecastResponse(_message.Message):
    __slots__ = ("model", "session_id", "steps", "y", "tokens", "next_seq")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    Y_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    NEXT_SEQ_FIELD_NUMBER: _ClassVar[int]
    model: ModelRef
    session_id: str
    steps: int
    y: bytes
    tokens: _containers.RepeatedScalarFieldContainer[int]
    next_seq: int
    def __init__(self, model: _Optional[_Union[ModelRef, _Mapping]] = ..., session_id: _Optional[str] = ..., steps: _Optional[int] = ..., y: _Optional[bytes] = ..., tokens: _Optional[_Iterable[int]] = ..., next_seq: _Optional[int] = ...) -> None: ...

class SessionRef(_message.Message):
    __slots__ = ("model", "session_id")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    model: ModelRef
    session_id: str
    def __init__(self, model: _Optional[_Union[ModelRef, _Mapping]] = ..., session_id: _Optional[str] = ...) -> None: ...

class SessionInfo(_message.Message):
    __slots__ = ("model", "session_id", "next_seq", "exists", "idle_seconds")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    NEXT_SEQ_FIELD_NUMBER: _ClassVar[int]
    EXISTS_FIELD_NUMBER: _ClassVar[int]
    IDLE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    model: ModelRef
    session_id: str
    next_seq: int
    exists: bool
    idle_seconds: float
    def __init__(self, model: _Optional[_Union[ModelRef, _Mapping]] = ..., session_id: _Optional[str] = ..., next_seq: _Optional[int] = ..., exists: _Optional[bool] = ..., idle_seconds: _Optional[float] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "version", "kind", "input_dim", "output_dim", "vocab_size", "layers", "hidden_size", "manifest_json")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    INPUT_DIM_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_DIM_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_JSON_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    kind: str
    input_dim: int
    output_dim: int
    vocab_size: int
    layers: int
    hidden_size: int
    manifest_json: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., kind: _Optional[str] = ..., input_dim: _Optional[int] = ..., output_dim: _Optional[int] = ..., vocab_size: _Optional[int] = ..., layers: _Optional[int] = ..., hidden_size: _Optional[int] = ..., manifest_json: _Optional[str] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ...) -> None: ...
