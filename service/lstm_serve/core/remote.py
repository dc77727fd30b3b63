"""What a shared session store holds for one session, and the calls a replica makes on it.

A record is the whole of a session as the owning replica last wrote it: h, c, last output,
next_seq and its last replies (so retries of the last requests, a pipelined stream's too, are
answered again on any replica).
Every load of a stored session takes a new ownership epoch; every write names the epoch and the
version it follows and is refused (fenced) unless both still hold. A session the store does not
hold is claimed without a trace in the store (a request for an unknown session leaves nothing
there); its first write creates it, and is fenced if another replica created it meanwhile.
Epochs are random, never counted, so an ended session is deleted outright: a replica still
holding an old claim can never match a later session's epoch. Each store is one model
version's; beside its records the store keeps, per session id of the model, the version whose
record it is (written with the record, deleted with it), so a replica can tell a new session
from one that lives on another version. See core/sync.py for how a replica uses it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass(frozen=True, slots=True)
class Reply:
    """The answer to one request of the session."""

    seq: int
    next_seq: int
    digest: int  # of the request's inputs (frame.digest)
    reset: bool
    y: np.ndarray  # [steps, output_dim] float32


@dataclass(frozen=True, slots=True)
class State:
    h: np.ndarray  # [layers, hidden] float32
    c: np.ndarray
    last_y: np.ndarray  # [output_dim]
    next_seq: int
    # Loaded: the replies kept, oldest first. Written: the replies new since the last write,
    # oldest first; clear: the kept ones are of an earlier generation (a reset) and go.
    replies: tuple[Reply, ...] = ()
    clear: bool = False


@dataclass(frozen=True, slots=True)
class Claim:
    """A load: the new epoch this replica owns the session under, the version it is at, and
    its state (None: the store has no such session; its version is then 0). elsewhere: the
    store holds no such session under this model version but holds one under that other
    version of the model (which was not claimed: its owner goes on undisturbed)."""

    epoch: int
    version: int
    state: State | None
    elsewhere: str = ""


@dataclass(frozen=True, slots=True)
class Write:
    """Write (state set) or delete (state None) a session, if epoch and version still hold
    (version 0: if the store holds no such session)."""

    key: str
    epoch: int
    version: int  # the version this write follows; a write makes it version + 1
    state: State | None


class Remote(Protocol):
    """A shared session store (core/redis_store.py). Each call is one round trip."""

    async def claim(self, keys: list[str]) -> list[Claim]: ...

    async def write(self, writes: list[Write]) -> list[bool]:
        """Whether each write was applied (False: fenced by another epoch or version)."""
        ...

    async def peek(self, key: str) -> int | None:
        """A session's next_seq without claiming it (None: no such session)."""
        ...

    async def check(self) -> None:
        """One call that needs all a replica needs of the store (connection, credentials,
        scripts); raises StoreDown when it fails."""
        ...

    async def close(self) -> None: ...


class StoreDown(Exception):
    """The shared store could not be reached or answered with an error. The message is for the
    operator's log, never for clients.

    refused: the store refused this replica (credentials, TLS, permissions): this replica's
    configuration is wrong, which other replicas need not share; otherwise the store is down
    or unreachable, which every replica shares."""

    def __init__(self, message: str, refused: bool = False) -> None:
        super().__init__(message)
        self.refused = refused
