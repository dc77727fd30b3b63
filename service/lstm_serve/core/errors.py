"""Service errors. Each carries the name of the gRPC status it maps to (core/ imports no gRPC);
one interceptor turns them into statuses."""

from __future__ import annotations


class ServiceError(Exception):
    """An error whose message is safe to show to clients."""

    code: str = "INTERNAL"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(ServiceError):
    code = "INVALID_ARGUMENT"


class NotFound(ServiceError):
    code = "NOT_FOUND"


class SessionNotFound(NotFound):
    """A request continued a session that does not exist (never started, ended or expired)."""

    def __init__(self, session_id: str) -> None:
        super().__init__(
            f"session {session_id!r} not found (never started, ended or expired); "
            f"start it again with seq 0"
        )
        self.session_id = session_id


class FailedPrecondition(ServiceError):
    code = "FAILED_PRECONDITION"


class Elsewhere(FailedPrecondition):
    """Sessions the shared store holds under another version of the model (a request that
    named no version reached a version they do not live on). moved: key -> that version."""

    # Counted by the engine, not the scheduler: most are sent again to their version, and
    # only the answer a client gets is counted.
    counted_by_engine = True

    def __init__(self, message: str, moved: dict[str, str]) -> None:
        super().__init__(message)
        self.moved = moved


class SeqGap(FailedPrecondition):
    """A request's seq is not the session's next seq (and is not a retry we can answer)."""

    def __init__(self, session_id: str, expected: int, got: int) -> None:
        if got < expected:
            # Behind: applied before, but not answerable again (not where a request began, or
            # its answer left the replay cache).
            why = (
                f"seq {got} was already applied and its answer can no longer be replayed "
                f"(no request began there, or the replay cache dropped it)"
            )
        else:
            why = f"seq {got} does not follow"
        super().__init__(f"session {session_id!r}: {why}; expected seq {expected}")
        self.expected = expected
        self.got = got


class ResourceExhausted(ServiceError):
    code = "RESOURCE_EXHAUSTED"


class Unavailable(ServiceError):
    code = "UNAVAILABLE"


class DeadlineExceeded(ServiceError):
    code = "DEADLINE_EXCEEDED"


class Unauthenticated(ServiceError):
    code = "UNAUTHENTICATED"


class PermissionDenied(ServiceError):
    code = "PERMISSION_DENIED"
