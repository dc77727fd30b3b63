"""Typed errors of the lstm-serve client: one class per gRPC status the protocol names.

Every failed call of `Client`, `AsyncClient` and their session streams raises a subclass of
`LstmServeError`, not grpc's untyped `_InactiveRpcError` or `AioRpcError`:

    from lstm_serve.client import Client, FailedPrecondition, NotFound
    try:
        client.predict("forecaster", "sensor-7", x, seq=12)
    except FailedPrecondition as err:
        print(err.expected_seq)       # the seq the server expects next (a gap), or None
    except NotFound:
        ...                           # unknown model or version, or an expired session

`LstmServeError` subclasses `grpc.aio.AioRpcError` (a `grpc.RpcError`) and has grpc's `code()`
and `details()`, so code written against raw gRPC errors (`except grpc.RpcError as e:
e.code()`, `except grpc.aio.AioRpcError`) keeps working.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import ClassVar

import grpc

__all__ = [
    "Cancelled",
    "DeadlineExceeded",
    "FailedPrecondition",
    "Internal",
    "InvalidArgument",
    "LstmServeError",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "error_class",
    "from_rpc_error",
]


class LstmServeError(grpc.aio.AioRpcError):
    """A call the server (or the channel) refused: its gRPC status and the server's message.

    `code()` is the `grpc.StatusCode`, `details()` the message meant for people. Subclasses
    name the status; a status without a subclass of its own raises this class. It is a
    `grpc.aio.AioRpcError` (and so a `grpc.RpcError`), raised by the sync client too, so code
    that catches either keeps working; `initial_metadata()`, `trailing_metadata()` and
    `debug_error_string()` are the failed call's.
    """

    status: ClassVar[grpc.StatusCode | None] = None  # the status a subclass stands for
    # set by AioRpcError.__init__ (its stub does not declare them)
    _code: grpc.StatusCode
    _debug_error_string: str | None

    def __init__(
        self,
        code: grpc.StatusCode,
        details: str = "",
        *,
        debug_error_string: str | None = None,
        initial_metadata: grpc.aio.Metadata | None = None,
        trailing_metadata: grpc.aio.Metadata | None = None,
    ) -> None:
        super().__init__(
            code,
            initial_metadata if initial_metadata is not None else grpc.aio.Metadata(),
            trailing_metadata if trailing_metadata is not None else grpc.aio.Metadata(),
            details,
            debug_error_string,
        )
        self._details: str = details

    def code(self) -> grpc.StatusCode:
        """The gRPC status code (as grpc.RpcError's code())."""
        return self._code

    def details(self) -> str:
        """The status message: what was refused and why (as grpc.RpcError's details())."""
        return self._details

    def __str__(self) -> str:
        return f"{self._code.name}: {self._details}" if self._details else self._code.name

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._code!s}, {self._details!r})"

    def __reduce__(self) -> tuple[object, ...]:  # picklable, e.g. across processes
        return (_rebuild, (type(self), self._code, self._details, self._debug_error_string))


def _rebuild(
    cls: type[LstmServeError], code: grpc.StatusCode, details: str, debug: str | None
) -> LstmServeError:
    return cls(code, details, debug_error_string=debug)


class InvalidArgument(LstmServeError):
    """INVALID_ARGUMENT: the request is malformed (shapes, NaN/Inf, empty or oversized input,
    token ids, frame columns, an answer over the message limit). Nothing was applied."""

    status = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(LstmServeError):
    """NOT_FOUND: unknown model or version, or an unknown session where one must exist (a step
    with seq > 0, a Forecast without prefix, ResetSession, EndSession)."""

    status = grpc.StatusCode.NOT_FOUND


_EXPECTED_SEQ = re.compile(r"expected seq (\d+)")


class FailedPrecondition(LstmServeError):
    """FAILED_PRECONDITION: a seq gap, a seq already applied with other inputs, or an applied
    seq whose answer can no longer be replayed; also a step on a drained model version.

    `expected_seq` is the seq the server expects next, parsed from its message ("expected seq
    N"), or None when the message names none.
    """

    status = grpc.StatusCode.FAILED_PRECONDITION

    @property
    def expected_seq(self) -> int | None:
        """The seq the server expects next (a seq gap), or None when its message names none."""
        m = _EXPECTED_SEQ.search(self._details)
        return int(m.group(1)) if m else None


class ResourceExhausted(LstmServeError):
    """RESOURCE_EXHAUSTED: the session cap (cap_policy=refuse), a full inference queue, or a
    message over the server's max_message_bytes. Retry later, or send less."""

    status = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(LstmServeError):
    """UNAVAILABLE: no connection, a server draining for shutdown, a shared store that is down,
    or a fenced replica. Safe to retry (with the same seq)."""

    status = grpc.StatusCode.UNAVAILABLE


class Unauthenticated(LstmServeError):
    """UNAUTHENTICATED: a missing or wrong bearer token (Connection.token)."""

    status = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(LstmServeError):
    """PERMISSION_DENIED: the caller is known but may not make this call."""

    status = grpc.StatusCode.PERMISSION_DENIED


class DeadlineExceeded(LstmServeError):
    """DEADLINE_EXCEEDED: no answer within the call's timeout. The request may still have been
    applied: retry it with the same seq, and the server answers it again without applying it
    twice."""

    status = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(LstmServeError):
    """CANCELLED: the call was cancelled (e.g. its channel was closed under it)."""

    status = grpc.StatusCode.CANCELLED


class Unimplemented(LstmServeError):
    """UNIMPLEMENTED: the server does not serve this method."""

    status = grpc.StatusCode.UNIMPLEMENTED


class Internal(LstmServeError):
    """INTERNAL: a bug on the server (its message is generic; the traceback is in its log)."""

    status = grpc.StatusCode.INTERNAL


_BY_CODE: dict[grpc.StatusCode, type[LstmServeError]] = {
    cls.status: cls
    for cls in (
        InvalidArgument,
        NotFound,
        FailedPrecondition,
        ResourceExhausted,
        Unavailable,
        Unauthenticated,
        PermissionDenied,
        DeadlineExceeded,
        Cancelled,
        Unimplemented,
        Internal,
    )
    if cls.status is not None
}


def error_class(code: grpc.StatusCode) -> type[LstmServeError]:
    """The exception class raised for a status code (LstmServeError for one without its own)."""
    return _BY_CODE.get(code, LstmServeError)


def _aio_metadata(value: object) -> grpc.aio.Metadata | None:
    """A call's metadata as grpc.aio.Metadata (the sync API gives (key, value) tuples)."""
    if value is None or isinstance(value, grpc.aio.Metadata):
        return value
    if not isinstance(value, Iterable):
        return None
    try:
        return grpc.aio.Metadata(*((str(k), v) for k, v in value))
    except (TypeError, ValueError):
        return None


def _ask(exc: object, name: str) -> object:
    """exc.name() when exc has that method and it answers, else None."""
    fn = getattr(exc, name, None)
    if not callable(fn):
        return None
    try:
        return fn()
    except Exception:  # e.g. a call object without that value
        return None


def from_rpc_error(exc: grpc.RpcError) -> LstmServeError:
    """The typed error for a raw gRPC error (an LstmServeError is returned as it is)."""
    if isinstance(exc, LstmServeError):
        return exc
    code = _ask(exc, "code")
    if not isinstance(code, grpc.StatusCode):
        code = grpc.StatusCode.UNKNOWN
    details = _ask(exc, "details")
    debug = _ask(exc, "debug_error_string")
    return error_class(code)(
        code,
        str(details) if details is not None else "",
        debug_error_string=str(debug) if debug is not None else None,
        initial_metadata=_aio_metadata(_ask(exc, "initial_metadata")),
        trailing_metadata=_aio_metadata(_ask(exc, "trailing_metadata")),
    )
