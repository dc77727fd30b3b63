"""Session snapshots on disk: one .npz per model version, written atomically, checked on read."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np

from lstm_serve.core.frame import KEY_SEP, valid_session_id
from lstm_serve.core.store import Captured

# Far beyond any real stream, and far enough below 2**63 that next_seq + steps never overflows.
MAX_SEQ = 2**62
MAX_IDLE_S = 10 * 365 * 86400.0


def write_snapshot(path: Path, snap: Captured, meta: dict[str, object]) -> None:
    """Write atomically: a crash leaves the previous snapshot or this one, never a mix."""
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(
                f, h=snap.h, c=snap.c, last_y=snap.last_y, next_seq=snap.next_seq,
                idle=snap.idle, keys=np.array(json.dumps(snap.keys)),
                meta=np.array(json.dumps(meta)),
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
    return Captured(
        keys, h.astype(np.float32), c.astype(np.float32), y.astype(np.float32),
        seq.astype(np.int64), idle.astype(np.float64),
    )  # fmt: skip
