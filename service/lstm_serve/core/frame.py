"""A frame: one request's sessions as columns. The single-session form is a frame of one row.

x arrives in blocks of rows that share a step count: a columnar frame is one block
[sessions, steps, input_dim]; a request whose sessions send different step counts has one block
per count. Validation is over whole arrays; a frame is checked before anything is applied.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lstm_serve.core.errors import InvalidArgument

APPEND = -1  # seq column: no seq given, append at the session's next seq
# seq column: append, but only to a session that exists (Triton's sequences: a request without
# START on an unknown sequence is refused instead of starting one)
CONTINUE = -2
MAX_SESSION_ID = 256
# Joins a principal and a session id into a store key; control characters never appear in
# either (they are refused), so keys of different principals never collide.
KEY_SEP = "\x1f"
# The prefix of the ids of sessions that live for one request only (the Open Inference Protocol
# without a sequence id: reset and ended by that request, under a random tag no client knows).
ONE_REQUEST = "~oip/"
_MIX = np.uint64(0x9E3779B97F4A7C15)


@dataclass(eq=False, slots=True)
class Block:
    rows: np.ndarray  # int64 row indices into the frame
    x: np.ndarray  # [rows, steps, input_dim] float32, or [rows, steps] int64 token ids


@dataclass(eq=False, slots=True)
class Frame:
    ids: list[str]
    seq: np.ndarray  # int64 [n]; APPEND where absent
    reset: np.ndarray  # bool [n]
    blocks: list[Block]
    # bool [n] or None: end these sessions once the request is applied (Triton's sequence_end)
    end: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def uniform(self) -> bool:
        return len(self.blocks) == 1

    def steps(self) -> int:
        """Session-steps in the frame (sessions x their steps), summed over the blocks."""
        blocks = self.blocks
        if len(blocks) == 1:  # the common case, without a generator
            shape = blocks[0].x.shape
            return int(shape[0] * shape[1])
        return sum(int(b.x.shape[0] * b.x.shape[1]) for b in blocks)


def _constant(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False
    return a


# The columns of a streamed single session, shared by all such frames (nothing writes a
# frame's columns; read-only makes sure): three fewer arrays made per request.
_APPEND1 = _constant(np.array([APPEND], np.int64))
_NO_RESET1 = _constant(np.zeros(1, bool))
_RESET1 = _constant(np.ones(1, bool))
_ROW0 = _constant(np.zeros(1, np.int64))


def single(session_id: str, x: np.ndarray, seq: int | None = None, reset: bool = False) -> Frame:
    """A frame of one session: x is [steps, input_dim] (or [steps] token ids)."""
    return Frame(
        [session_id],
        _APPEND1 if seq is None or seq == APPEND else np.array([seq], np.int64),
        _RESET1 if reset else _NO_RESET1,
        [Block(_ROW0, x[None])],
    )


def from_rows(
    ids: list[str], xs: Sequence[np.ndarray], seq: np.ndarray, reset: np.ndarray
) -> Frame:
    """A frame from per-session arrays that may differ in step count (one block per count)."""
    lengths = np.fromiter((len(x) for x in xs), np.int64, len(xs))
    if len(xs) and (lengths == lengths[0]).all():
        blocks = [Block(np.arange(len(xs), dtype=np.int64), np.stack(xs))]
    else:
        blocks = []
        for t in np.unique(lengths):
            rows = np.flatnonzero(lengths == t)
            blocks.append(Block(rows, np.stack([xs[i] for i in rows.tolist()])))
    return Frame(ids, seq, reset, blocks)


def take(frame: Frame, rows: np.ndarray) -> Frame:
    """The frame of some of its rows (ascending), in their order."""
    pos = np.full(len(frame), -1, np.int64)
    pos[rows] = np.arange(len(rows))
    blocks = []
    for b in frame.blocks:
        sel = pos[b.rows] >= 0
        if sel.any():
            blocks.append(Block(pos[b.rows[sel]], b.x[sel]))
    end = None if frame.end is None else frame.end[rows]
    ids = [frame.ids[i] for i in rows.tolist()]
    return Frame(ids, frame.seq[rows], frame.reset[rows], blocks, end)


def valid_session_id(sid: str) -> bool:
    return 0 < len(sid) <= MAX_SESSION_ID and sid.isprintable()


def check_ids(ids: list[str], max_sessions: int) -> None:
    n = len(ids)
    if n == 1 and 0 < len(ids[0]) <= MAX_SESSION_ID and ids[0].isprintable():
        return  # the streamed single session: nothing else to look at
    if n == 0:
        raise InvalidArgument("request has no sessions")
    if n > max_sessions:
        raise InvalidArgument(f"request has {n} sessions; at most {max_sessions}")
    for sid in ids:
        if not sid or len(sid) > MAX_SESSION_ID or not sid.isprintable():
            if not sid:
                raise InvalidArgument("session_id is empty")
            if len(sid) > MAX_SESSION_ID:
                raise InvalidArgument(
                    f"session_id is {len(sid)} characters; at most {MAX_SESSION_ID}"
                )
            raise InvalidArgument("session_id has control characters")
    if n > 1 and len(set(ids)) != n:
        raise InvalidArgument("a session appears twice in one request")


def check(
    frame: Frame,
    token: bool,
    input_dim: int,
    vocab: int,
    max_steps: int,
    max_sessions: int,
) -> None:
    """Refuse a frame with anything wrong in it, naming the session and the field."""
    ids = frame.ids
    check_ids(ids, max_sessions)
    n = len(ids)
    if frame.seq.shape != (n,) or frame.reset.shape != (n,):
        raise InvalidArgument(f"seq and reset must have one value per session ({n})")
    seq = frame.seq.tolist() if n == 1 else frame.seq  # scalars are cheaper for one session
    reset = frame.reset.tolist() if n == 1 else frame.reset
    if n > 1 or reset[0]:
        bad_reset = frame.reset & (frame.seq > 0)
        if bad_reset.any():
            i = int(np.flatnonzero(bad_reset)[0])
            raise InvalidArgument(
                f"session {ids[i]!r}: a reset starts at seq 0, not {int(frame.seq[i])}"
            )
    if (n == 1 and seq[0] < CONTINUE) or (n > 1 and (frame.seq < CONTINUE).any()):
        i = int(np.flatnonzero(frame.seq < CONTINUE)[0])
        raise InvalidArgument(f"session {ids[i]!r}: seq is out of range")
    if frame.end is not None and frame.end.shape != (n,):
        raise InvalidArgument(f"end must have one value per session ({n})")
    for b in frame.blocks:
        x = b.x
        steps = x.shape[1] if x.ndim >= 2 else 0
        if steps == 0:
            raise InvalidArgument(f"session {ids[int(b.rows[0])]!r}: no steps")
        if steps > max_steps:
            raise InvalidArgument(
                f"session {ids[int(b.rows[0])]!r}: {steps} steps; at most {max_steps} per request"
            )
        if token:
            bad = (x < 0) | (x >= vocab)
            if bad.any():
                r, t = (int(v[0]) for v in np.nonzero(bad))
                raise InvalidArgument(
                    f"session {ids[int(b.rows[r])]!r}: token id {int(x[r, t])} at step {t} "
                    f"is outside the vocabulary [0, {vocab})"
                )
        else:
            if x.ndim != 3 or x.shape[2] != input_dim:
                raise InvalidArgument(
                    f"session {ids[int(b.rows[0])]!r}: x must be [steps, {input_dim}] values"
                )
            small = x.size <= 64
            if not (all(map(math.isfinite, x.ravel().tolist())) if small else np.isfinite(x).all()):
                r, t = (int(v[0]) for v in np.nonzero(~np.isfinite(x).all(axis=2)))
                raise InvalidArgument(
                    f"session {ids[int(b.rows[r])]!r}: x has NaN or Inf at step {t}"
                )


def digest(x: np.ndarray) -> np.ndarray:
    """A 64-bit hash of each row's inputs (x [rows, steps, ...]), to tell a retry from new data.
    A row's digest depends on that row alone, so a retry matches however it is batched."""
    n = x.shape[0]
    flat = np.ascontiguousarray(x).reshape(n, -1)
    bits = flat.view(np.uint32 if flat.dtype.itemsize == 4 else np.uint64)
    k = bits.shape[1]
    weights = _WEIGHTS.get(k)
    if weights is None:
        weights = (np.arange(1, k + 1, dtype=np.uint64) * _MIX) | np.uint64(1)
        if k <= 1 << 16:
            _WEIGHTS[k] = weights
    # A dot product wraps modulo 2**64 like the sum of products it stands for.
    out: np.ndarray = (bits.astype(np.uint64) @ weights) ^ np.uint64(k)
    return out


_WEIGHTS: dict[int, np.ndarray] = {}  # per row length: a row's few steps hash in a few calls
