"""The plan of a tick: what happens to each row (one session of one request), over arrays."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lstm_serve.core.frame import APPEND, CONTINUE
from lstm_serve.core.replay import Found, find
from lstm_serve.core.store import SessionStore

APPLY, NEW, RESET, REPLAY, GAP, NOT_FOUND, MISMATCH = range(7)
RUNS = (APPLY, NEW, RESET)


@dataclass(eq=False, slots=True)
class Plan:
    action: np.ndarray  # int8 [rows]
    slots: np.ndarray  # int64 [rows], -1 where the session does not exist (yet)
    base: np.ndarray  # int64 [rows]: seq of the row's first step as answered
    expected: np.ndarray  # int64 [rows]: the session's next seq now (for errors)
    found: dict[int, Found]  # row -> the replay entry answering it

    @property
    def runs(self) -> np.ndarray:
        a = self.action
        runs: np.ndarray = (a == APPLY) | (a == NEW) | (a == RESET)
        return runs


def plan_rows(
    store: SessionStore,
    slots: np.ndarray,
    seq: np.ndarray,
    reset: np.ndarray,
    steps: np.ndarray,
    digests: np.ndarray,
) -> Plan:
    n = len(slots)
    exists = slots >= 0
    s = np.where(exists, slots, 0)
    nxt = np.where(exists, store.next_seq[s], 0)
    append = seq < 0  # APPEND or CONTINUE
    action = np.full(n, APPLY, np.int8)
    action[~exists] = NEW
    action[~exists & ~reset & (seq != 0) & ((seq == CONTINUE) | ~append)] = NOT_FOUND
    live = exists & ~reset & ~append
    action[live & (seq > nxt)] = GAP
    action[exists & reset] = RESET
    base = np.where(action == APPLY, nxt, 0)
    found: dict[int, Found] = {}
    # Retries: few rows, looked up one by one along their session's chain of answers.
    for i in np.flatnonzero((live & (seq < nxt)) | (exists & reset & (seq == 0))).tolist():
        slot = int(s[i])
        f = find(store.replay[slot], int(store.replay_row[slot]), int(store.gen[slot]), int(seq[i]))
        same_reset = f is not None and bool(f.entry.reset[f.row]) == bool(reset[i])
        ok = same_reset and f is not None and f.entry.row_steps(f.row) == int(steps[i])
        if reset[i]:
            # A reset is answered again only while it is still the session's last request.
            if (
                ok
                and f is not None
                and int(f.entry.next_seq[f.row]) == int(nxt[i])
                and int(f.entry.digest[f.row]) == int(digests[i])
            ):
                action[i], base[i] = REPLAY, 0
                found[i] = f
            continue
        if f is not None and same_reset and not ok:
            action[i] = MISMATCH  # a request began at seq, with another number of steps
        elif not ok or f is None:
            action[i] = GAP
        elif int(f.entry.digest[f.row]) != int(digests[i]):
            action[i] = MISMATCH
        else:
            action[i], base[i] = REPLAY, seq[i]
            found[i] = f
    return Plan(action, slots.copy(), base, nxt, found)


def plan_one(store: SessionStore, slot: int | None, seq: int) -> int:
    """plan_rows for one row that appends (or starts its session) without a reset, in
    scalars: APPLY or NEW as plan_rows would decide, or -1 when only plan_rows can say (a
    retry, a gap, a session not found). The scheduler's streaming path; a test drives both on
    the same requests."""
    if slot is None:
        return NEW if seq in (0, APPEND) else -1
    return APPLY if seq < 0 or seq == int(store.next_seq[slot]) else -1
