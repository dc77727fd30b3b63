"""Session snapshots on disk: one .npz per model version, written atomically, checked on read."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np

from lstm_serve.core.frame import KEY_SEP, valid_session_id
from lstm_serve.core.store import Captured, CapturedReplay

# Far beyond any real stream, and far enough below 2**63 that next_seq + steps never overflows.
MAX_SEQ = 2**62
MAX_IDLE_S = 10 * 365 * 86400.0


def write_snapshot(path: Path, snap: Captured, meta: dict[str, object]) -> None:
    """Write atomically: a crash leaves the previous snapshot or this one, never a mix."""
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        r = snap.replay or CapturedReplay.empty(snap.last_y.shape[1])
        with os.fdopen(fd, "wb") as f:
            np.savez(
                f, h=snap.h, c=snap.c, last_y=snap.last_y, next_seq=snap.next_seq,
                idle=snap.idle, keys=np.array(json.dumps(snap.keys)),
                meta=np.array(json.dumps(meta)),
                replay_index=r.index, replay_seq=r.seq, replay_next_seq=r.next_seq,
                replay_reset=r.reset, replay_digest=r.digest, replay_steps=r.steps,
                replay_y=r.y,
            )  # fmt: skip
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def read_snapshot(
    path: Path, meta: dict[str, object], layers: int, hidden: int, output_dim: int
) -> Captured:
    """Read and check a snapshot; raises ValueError for another model's or an inconsistent file."""
    with np.load(path, allow_pickle=False) as z:
        saved_meta = json.loads(str(z["meta"]))
        if saved_meta != meta:
            raise ValueError(f"{path}: snapshot is for {saved_meta}, not {meta}")
        keys = json.loads(str(z["keys"]))
        h, c, y, seq, idle = z["h"], z["c"], z["last_y"], z["next_seq"], z["idle"]
        # Files written before last answers were kept have none: they restore without them.
        replay = (
            CapturedReplay(
                z["replay_index"], z["replay_seq"], z["replay_next_seq"], z["replay_reset"],
                z["replay_digest"], z["replay_steps"], z["replay_y"],
            )
            if "replay_index" in z.files
            else None
        )  # fmt: skip
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise ValueError(f"{path}: keys are not a list of strings")
    n = len(keys)
    want = {
        "h": (h, (n, layers, hidden)), "c": (c, (n, layers, hidden)),
        "last_y": (y, (n, output_dim)), "next_seq": (seq, (n,)), "idle": (idle, (n,)),
    }  # fmt: skip
    for name, (array, shape) in want.items():
        if array.shape != shape:
            raise ValueError(f"{path}: {name} has shape {array.shape}, expected {shape}")
    if len(set(keys)) != n:
        raise ValueError(f"{path}: keys are not {n} distinct strings")
    if not (np.isfinite(h).all() and np.isfinite(c).all() and np.isfinite(y).all()):
        raise ValueError(f"{path}: state has NaN or Inf")
    if not np.issubdtype(seq.dtype, np.integer) or (seq < 0).any() or (seq > MAX_SEQ).any():
        raise ValueError(f"{path}: next_seq outside 0..{MAX_SEQ}")
    if not np.isfinite(idle).all() or (idle < 0).any() or (idle > MAX_IDLE_S).any():
        raise ValueError(f"{path}: idle times outside 0..{MAX_IDLE_S:g}s")
    for key in keys:
        *principal, sid = key.split(KEY_SEP)
        if (
            not valid_session_id(sid)
            or len(principal) > 1
            or (principal and not (principal[0] and principal[0].isprintable()))
        ):
            raise ValueError(f"{path}: invalid session key {key[:300]!r}")
    if replay is not None:
        _check_replay(path, replay, seq, output_dim)
    return Captured(
        keys, h.astype(np.float32), c.astype(np.float32), y.astype(np.float32),
        seq.astype(np.int64), idle.astype(np.float64), replay,
    )  # fmt: skip


def _check_replay(path: Path, r: CapturedReplay, next_seq: np.ndarray, output_dim: int) -> None:
    m = len(r.index)
    for name in ("seq", "next_seq", "reset", "digest", "steps"):
        if getattr(r, name).shape != (m,):
            raise ValueError(f"{path}: replay_{name} has shape {getattr(r, name).shape}")
    if r.y.ndim != 2 or r.y.shape[1] != output_dim or r.y.dtype != np.float32:
        raise ValueError(f"{path}: replay_y has shape {r.y.shape} ({r.y.dtype})")
    ints = (r.index, r.seq, r.next_seq, r.steps)
    if not all(np.issubdtype(a.dtype, np.integer) for a in ints) or r.digest.dtype != np.uint64:
        raise ValueError(f"{path}: replay columns of the wrong types")
    if m and (
        (r.index < 0).any() or (r.index >= len(next_seq)).any()
        or len(np.unique(r.index)) != m
        or (r.steps < 1).any() or int(r.steps.sum()) != r.y.shape[0]
        or (r.seq < 0).any() or (r.next_seq != r.seq + r.steps).any()
        or (r.next_seq > next_seq[r.index]).any()
    ):  # fmt: skip
        raise ValueError(f"{path}: replay entries inconsistent with the sessions")
    if not np.isfinite(r.y).all():
        raise ValueError(f"{path}: replay_y has NaN or Inf")
