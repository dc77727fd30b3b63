"""plan_rows over a hand-built store: every action a row can get, and what it is answered with.

The store's state is made the way a committed tick leaves it (create, record the answer, commit
next_seq), without a scheduler, so each case names the exact history it is planned against.
"""

from __future__ import annotations

import numpy as np
import pytest

from lstm_serve.core import frame as F
from lstm_serve.core.plan import (
    APPLY,
    GAP,
    MISMATCH,
    NEW,
    NOT_FOUND,
    REPLAY,
    RESET,
    RUNS,
    Plan,
    plan_one,
    plan_rows,
)
from lstm_serve.core.replay import ReplayCache
from lstm_serve.core.store import SessionStore

LAYERS, HIDDEN, DIM, OUT = 1, 2, 3, 2
NAMES = {APPLY: "APPLY", NEW: "NEW", RESET: "RESET", REPLAY: "REPLAY", GAP: "GAP",
         NOT_FOUND: "NOT_FOUND", MISMATCH: "MISMATCH"}  # fmt: skip


def x_of(tag: int, steps: int) -> np.ndarray:
    """Inputs [steps, DIM] that differ for every (tag, steps)."""
    return np.random.default_rng(tag * 1000 + steps).normal(size=(steps, DIM)).astype(np.float32)


def digest_of(x: np.ndarray) -> int:
    return int(F.digest(x[None])[0])


class History:
    """A store and replay cache, and the answers of the requests applied to it."""

    def __init__(self, budget: int = 1 << 20) -> None:
        self.store = SessionStore(16, LAYERS, HIDDEN, OUT)
        self.cache = ReplayCache(budget)
        self.answers: dict[tuple[str, int], np.ndarray] = {}

    def apply(self, key: str, seq: int, x: np.ndarray, reset: bool = False) -> None:
        """What a committed request leaves: the session exists (a reset of an existing session
        renews its generation), its answer is recorded, next_seq moves past its steps."""
        s = self.store
        slot = s.slot(key)
        if slot is None:
            slots = s.create([key], now=0.0)
        else:
            slots = np.array([slot])
            if reset:
                s.renew(slots)
        steps = len(x)
        y = np.full((1, steps, OUT), 10 * seq, np.float32) + np.arange(steps)[None, :, None]
        y += np.float32(ord(key[0]))
        s.record(
            self.cache, slots, y, np.array([seq]), np.array([reset]), np.array([seq + steps]),
            np.array([digest_of(x)], np.uint64),
        )  # fmt: skip
        h = np.zeros((LAYERS, 1, HIDDEN), np.float32)
        s.commit(slots, h, h, y[:, -1], np.array([seq + steps]))
        self.answers[key, seq] = y[0]

    def plan(self, rows: list[tuple[str, int, bool, np.ndarray]]) -> Plan:
        keys = [r[0] for r in rows]
        return plan_rows(
            self.store,
            self.store.lookup(keys),
            np.array([r[1] for r in rows], np.int64),
            np.array([r[2] for r in rows], bool),
            np.array([len(r[3]) for r in rows], np.int64),
            np.array([digest_of(r[3]) for r in rows], np.uint64),
        )


@pytest.fixture
def hist() -> History:
    """a: requests at seq 0 (2 steps) and 2 (3 steps), next 5.
    b: started by a reset at seq 0 (2 steps), next 2: the reset is its last request.
    c: a reset at seq 0 (2 steps), then seq 2 (1 step), next 3."""
    h = History()
    h.apply("a", 0, x_of(1, 2))
    h.apply("a", 2, x_of(2, 3))
    h.apply("b", 0, x_of(3, 2), reset=True)
    h.apply("c", 0, x_of(4, 2), reset=True)
    h.apply("c", 2, x_of(5, 1))
    return h


A = F.APPEND
C = F.CONTINUE
# (name, key, seq, reset, inputs) -> (action, base); base is checked where the row runs or replays
CASES = [
    ("next seq applies", "a", 5, False, x_of(9, 1), APPLY, 5),
    ("append applies at next seq", "a", A, False, x_of(9, 4), APPLY, 5),
    ("continue applies at next seq", "a", C, False, x_of(9, 1), APPLY, 5),
    ("retry of the last request", "a", 2, False, x_of(2, 3), REPLAY, 2),
    ("retry of an earlier request (walks the chain)", "a", 0, False, x_of(1, 2), REPLAY, 0),
    ("retry with different inputs", "a", 2, False, x_of(7, 3), MISMATCH, 0),
    ("retry with another request's inputs", "a", 0, False, x_of(2, 2), MISMATCH, 0),
    ("retry with fewer steps", "a", 2, False, x_of(2, 3)[:2], MISMATCH, 0),
    ("retry with more steps", "a", 2, False, x_of(2, 4), MISMATCH, 0),
    ("seq inside the first request", "a", 1, False, x_of(9, 1), GAP, 0),
    ("seq inside the second request", "a", 3, False, x_of(9, 2), GAP, 0),
    ("seq ahead", "a", 6, False, x_of(9, 1), GAP, 0),
    ("seq far ahead", "a", 2**62, False, x_of(9, 1), GAP, 0),
    ("reset on an existing session", "a", A, True, x_of(9, 2), RESET, 0),
    ("reset at seq 0 whose history has no reset there", "a", 0, True, x_of(1, 2), RESET, 0),
    ("seq 0 starts an unknown session", "zz", 0, False, x_of(9, 1), NEW, 0),
    ("append starts an unknown session", "zz", A, False, x_of(9, 1), NEW, 0),
    ("reset starts an unknown session", "zz", A, True, x_of(9, 1), NEW, 0),
    ("reset at seq 0 starts an unknown session", "zz", 0, True, x_of(9, 1), NEW, 0),
    ("seq > 0 on an unknown session", "zz", 3, False, x_of(9, 1), NOT_FOUND, 0),
    ("continue on an unknown session", "zz", C, False, x_of(9, 1), NOT_FOUND, 0),
    ("retry of a reset that is still the last request", "b", 0, True, x_of(3, 2), REPLAY, 0),
    ("a reset at seq 0 with other inputs is a new reset", "b", 0, True, x_of(8, 2), RESET, 0),
    ("a reset at seq 0 with other steps is a new reset", "b", 0, True, x_of(3, 3), RESET, 0),
    ("a reset without seq is always applied", "b", A, True, x_of(3, 2), RESET, 0),
    ("the reset's inputs without the reset", "b", 0, False, x_of(3, 2), GAP, 0),
    ("retry of a reset no longer the last request", "c", 0, True, x_of(4, 2), RESET, 0),
    ("retry of the request after that reset", "c", 2, False, x_of(5, 1), REPLAY, 2),
]


@pytest.mark.parametrize(
    ("key", "seq", "reset", "x", "action", "base"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_each_row_gets_its_action(
    hist: History, key: str, seq: int, reset: bool, x: np.ndarray, action: int, base: int
) -> None:
    p = hist.plan([(key, seq, reset, x)])
    assert NAMES[int(p.action[0])] == NAMES[action]
    if action in (*RUNS, REPLAY):  # a refused row's base means nothing
        assert int(p.base[0]) == base
    slot = hist.store.slot(key)
    assert int(p.slots[0]) == (-1 if slot is None else slot)
    assert int(p.expected[0]) == (0 if slot is None else int(hist.store.next_seq[slot]))
    assert bool(p.runs[0]) == (action in RUNS)
    if action == REPLAY:
        f = p.found[0]
        assert f.entry.y is not None
        assert np.array_equal(f.entry.y[f.row], hist.answers[key, seq])
        assert int(f.entry.next_seq[f.row]) == seq + len(x)  # what the first answer said
    else:
        assert p.found == {}


def test_rows_are_planned_independently_in_one_call(hist: History) -> None:
    """Planning every case in one call gives each row what it gets alone, and found is keyed by
    the row's position in the call."""
    rows = [(c[1], c[2], c[3], c[4]) for c in CASES]
    p = hist.plan(rows)
    assert [NAMES[int(a)] for a in p.action] == [NAMES[c[5]] for c in CASES]
    answered = [i for i, c in enumerate(CASES) if c[5] in (*RUNS, REPLAY)]
    assert p.base[answered].tolist() == [CASES[i][6] for i in answered]
    replayed = [i for i, c in enumerate(CASES) if c[5] == REPLAY]
    assert sorted(p.found) == replayed
    for i in replayed:
        f = p.found[i]
        assert f.entry.y is not None
        assert np.array_equal(f.entry.y[f.row], hist.answers[CASES[i][1], CASES[i][2]])


def test_planning_changes_nothing_in_the_store(hist: History) -> None:
    s = hist.store
    before = (s.next_seq.copy(), s.gen.copy(), s.replay.copy(), list(s.slots))
    hist.plan([(c[1], c[2], c[3], c[4]) for c in CASES])
    assert np.array_equal(s.next_seq, before[0]) and np.array_equal(s.gen, before[1])
    assert all(a is b for a, b in zip(s.replay, before[2], strict=True))
    assert list(s.slots) == before[3]


def test_a_reset_ends_the_chain_of_earlier_answers(hist: History) -> None:
    """After a reset (a new generation), the answers before it are never replayed again."""
    hist.apply("a", 0, x_of(6, 1), reset=True)
    p = hist.plan(
        [("a", 0, False, x_of(1, 2)), ("a", 2, False, x_of(2, 3)), ("a", 0, True, x_of(6, 1))]
    )
    assert [NAMES[int(a)] for a in p.action] == ["GAP", "GAP", "REPLAY"]
    assert p.expected.tolist() == [1, 1, 1]


def test_a_retry_whose_answer_left_the_cache_is_a_gap() -> None:
    """With room for one entry only, the older answer is dropped: its retry is refused as a
    gap, while the newest is still replayed."""
    h = History(budget=1400)
    h.apply("a", 0, x_of(1, 2))
    h.apply("a", 2, x_of(2, 3))
    assert len(h.cache) == 1
    p = h.plan([("a", 0, False, x_of(1, 2)), ("a", 2, False, x_of(2, 3))])
    assert [NAMES[int(a)] for a in p.action] == ["GAP", "REPLAY"]


def test_a_removed_and_recreated_session_does_not_replay_the_old_one(hist: History) -> None:
    hist.store.remove(["a"])
    hist.apply("a", 0, x_of(6, 1))
    p = hist.plan([("a", 0, False, x_of(1, 2)), ("a", 0, False, x_of(6, 1))])
    assert [NAMES[int(a)] for a in p.action] == ["MISMATCH", "REPLAY"]
    assert p.found[1].entry.y is not None
    assert np.array_equal(p.found[1].entry.y[p.found[1].row], hist.answers["a", 0])


@pytest.mark.parametrize(
    ("key", "seq", "expect"),
    [
        ("a", A, APPLY),
        ("a", C, APPLY),
        ("a", 5, APPLY),
        ("a", 2, -1),  # a retry
        ("a", 3, -1),  # a gap
        ("a", 6, -1),  # ahead
        ("zz", 0, NEW),
        ("zz", A, NEW),
        ("zz", C, -1),  # not found
        ("zz", 4, -1),  # not found
    ],
)
def test_plan_one_agrees_with_plan_rows_or_defers(
    hist: History, key: str, seq: int, expect: int
) -> None:
    """The scalar path decides only APPLY and NEW, exactly as plan_rows does, and leaves every
    other case (-1) to plan_rows."""
    x = x_of(2, 3) if seq == 2 else x_of(9, 1)
    got = plan_one(hist.store, hist.store.slot(key), seq)
    assert got == expect
    full = int(hist.plan([(key, seq, False, x)]).action[0])
    if got == -1:
        assert full not in (APPLY, NEW)
    else:
        assert full == got
