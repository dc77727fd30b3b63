"""Frames: construction, Frame.steps/uniform, check()'s refusals and their messages, digest()."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from lstm_serve.core import frame as F
from lstm_serve.core.errors import InvalidArgument

DIM, VOCAB, MAX_STEPS, MAX_SESSIONS = 3, 12, 10, 4


def xs(steps: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(steps, DIM)).astype(np.float32)


def real(frame: F.Frame) -> None:
    F.check(frame, False, DIM, 0, MAX_STEPS, MAX_SESSIONS)


def token(frame: F.Frame) -> None:
    F.check(frame, True, 1, VOCAB, MAX_STEPS, MAX_SESSIONS)


def rows(ids: list[str], lengths: list[int], seq: list[int] | None = None,
         reset: list[bool] | None = None) -> F.Frame:  # fmt: skip
    n = len(ids)
    return F.from_rows(
        ids, [xs(t, i) for i, t in enumerate(lengths)],
        np.array(seq if seq is not None else [F.APPEND] * n, np.int64),
        np.array(reset if reset is not None else [False] * n, bool),
    )  # fmt: skip


# -- construction --------------------------------------------------------------------------------


def test_single_is_a_frame_of_one_row() -> None:
    x = xs(4)
    fr = F.single("s", x)
    assert fr.ids == ["s"] and len(fr) == 1 and fr.uniform
    assert fr.seq.tolist() == [F.APPEND] and fr.reset.tolist() == [False] and fr.end is None
    assert fr.blocks[0].rows.tolist() == [0] and np.array_equal(fr.blocks[0].x, x[None])
    assert fr.steps() == 4
    assert F.single("s", x, seq=7, reset=False).seq.tolist() == [7]
    assert F.single("s", x, seq=0, reset=True).reset.tolist() == [True]
    assert F.single("s", x, seq=F.APPEND).seq.tolist() == [F.APPEND]


def test_single_frames_share_read_only_columns() -> None:
    """The shared one-row columns cannot be written through one frame into all the others."""
    fr = F.single("s", xs(1))
    with pytest.raises(ValueError):
        fr.seq[0] = 3
    with pytest.raises(ValueError):
        F.single("s", xs(1), reset=True).reset[0] = False
    assert F.single("t", xs(1)).seq.tolist() == [F.APPEND]


def test_from_rows_makes_one_block_per_step_count() -> None:
    fr = rows(["a", "b", "c", "d"], [2, 5, 2, 1])
    assert not fr.uniform and len(fr.blocks) == 3
    by_steps = {b.x.shape[1]: b for b in fr.blocks}
    assert by_steps[2].rows.tolist() == [0, 2] and by_steps[5].rows.tolist() == [1]
    assert by_steps[1].rows.tolist() == [3]
    assert np.array_equal(by_steps[2].x[1], xs(2, 2))  # row c's own inputs
    assert fr.steps() == 2 + 5 + 2 + 1


def test_from_rows_of_equal_lengths_is_uniform() -> None:
    fr = rows(["a", "b", "c"], [3, 3, 3])
    assert fr.uniform and fr.blocks[0].rows.tolist() == [0, 1, 2]
    assert fr.blocks[0].x.shape == (3, 3, DIM) and fr.steps() == 9


def test_valid_session_id() -> None:
    assert F.valid_session_id("a") and F.valid_session_id("x" * F.MAX_SESSION_ID)
    assert F.valid_session_id("séance 日本")
    assert not F.valid_session_id("") and not F.valid_session_id("x" * (F.MAX_SESSION_ID + 1))
    assert not F.valid_session_id("a\nb") and not F.valid_session_id(f"p{F.KEY_SEP}s")


# -- check: what passes --------------------------------------------------------------------------


def test_well_formed_frames_pass() -> None:
    real(F.single("s", xs(MAX_STEPS)))
    real(F.single("s", xs(1), seq=F.CONTINUE))
    real(F.single("s", xs(1), seq=0, reset=True))
    real(rows(["a", "b", "c", "d"], [1, 2, 2, 3], seq=[0, F.APPEND, F.CONTINUE, 5],
              reset=[True, True, False, False]))  # fmt: skip
    token(F.single("s", np.array([0, VOCAB - 1, 3])))
    fr = rows(["a", "b"], [1, 1])
    fr.end = np.array([True, False])
    real(fr)


# -- check: refusals -----------------------------------------------------------------------------


def _frame(ids: list[str], **kw: object) -> F.Frame:
    n = len(ids)
    fr = F.Frame(ids, np.full(n, F.APPEND, np.int64), np.zeros(n, bool),
                 [F.Block(np.arange(n, dtype=np.int64), np.zeros((n, 1, DIM), np.float32))])  # fmt: skip
    for k, v in kw.items():
        setattr(fr, k, v)
    return fr


def _nan_at(n: int, steps: int, row: int, step: int, value: float) -> F.Frame:
    fr = rows([f"s{i}" for i in range(n)], [steps] * n)
    fr.blocks[0].x[row, step, 1] = value
    return fr


def _mixed_with_nan() -> F.Frame:
    """Rows 0 and 2 have 2 steps (one block), row 1 has 1; the bad value is row 2's step 1."""
    fr = rows(["a", "b", "c"], [2, 1, 2])
    block = next(b for b in fr.blocks if b.x.shape[1] == 2)
    block.x[1, 1, 0] = np.inf
    return fr


def _tokens(ids: np.ndarray, n: int = 1) -> F.Frame:
    """n token sessions t, u, v: the last has ids, the ones before it valid zeros."""
    x = np.zeros((n, len(ids)), np.int64)
    x[n - 1] = ids
    return F.Frame(["t", "u", "v"][:n], np.full(n, F.APPEND, np.int64), np.zeros(n, bool),
                   [F.Block(np.arange(n, dtype=np.int64), x)])  # fmt: skip


REFUSALS: list[tuple[str, F.Frame, bool, str]] = [
    ("no sessions", _frame([]), False, "request has no sessions"),
    (
        "too many sessions",
        _frame([f"s{i}" for i in range(5)]),
        False,
        "request has 5 sessions; at most 4",
    ),
    ("empty id alone", _frame([""]), False, "session_id is empty"),
    ("empty id among others", _frame(["a", ""]), False, "session_id is empty"),
    ("long id", _frame(["a", "x" * 257]), False, "session_id is 257 characters; at most 256"),
    ("long id alone", _frame(["x" * 300]), False, "session_id is 300 characters; at most 256"),
    ("control character", _frame(["a", "b\tc"]), False, "session_id has control characters"),
    ("key separator", _frame([f"a{F.KEY_SEP}b"]), False, "session_id has control characters"),
    ("duplicate ids", _frame(["a", "b", "a"]), False, "a session appears twice in one request"),
    (
        "seq of another length",
        _frame(["a", "b"], seq=np.zeros(3, np.int64)),
        False,
        r"seq and reset must have one value per session \(2\)",
    ),
    (
        "reset of another length",
        _frame(["a", "b"], reset=np.zeros(1, bool)),
        False,
        r"seq and reset must have one value per session \(2\)",
    ),
    (
        "end of another length",
        _frame(["a", "b"], end=np.zeros(3, bool)),
        False,
        r"end must have one value per session \(2\)",
    ),
    (
        "reset with seq",
        _frame(["a", "b"], seq=np.array([0, 3]), reset=np.array([True, True])),
        False,
        "session 'b': a reset starts at seq 0, not 3",
    ),
    (
        "reset with seq alone",
        _frame(["a"], seq=np.array([4]), reset=np.array([True])),
        False,
        "session 'a': a reset starts at seq 0, not 4",
    ),
    (
        "seq below continue",
        _frame(["a", "b"], seq=np.array([0, -3])),
        False,
        "session 'b': seq is out of range",
    ),
    (
        "seq below continue alone",
        _frame(["a"], seq=np.array([-7])),
        False,
        "session 'a': seq is out of range",
    ),
    ("no steps", F.single("a", np.zeros((0, DIM), np.float32)), False, "session 'a': no steps"),
    (
        "too many steps",
        F.single("a", xs(11)),
        False,
        "session 'a': 11 steps; at most 10 per request",
    ),
    (
        "too many steps in one block",
        rows(["a", "b"], [1, 11]),
        False,
        "session 'b': 11 steps; at most 10",
    ),
    (
        "wrong input_dim",
        F.single("a", np.zeros((2, DIM + 1), np.float32)),
        False,
        r"session 'a': x must be \[steps, 3\] values",
    ),
    (
        "x without features",
        F.Frame(
            ["a"],
            np.full(1, -1),
            np.zeros(1, bool),
            [F.Block(np.zeros(1, np.int64), np.zeros((1, 2), np.float32))],
        ),
        False,
        r"x must be \[steps, 3\]",
    ),
    ("NaN, small", _nan_at(2, 3, 1, 2, np.nan), False, "session 's1': x has NaN or Inf at step 2"),
    ("Inf, small", _nan_at(1, 1, 0, 0, np.inf), False, "session 's0': x has NaN or Inf at step 0"),
    (
        "-Inf, large",
        _nan_at(4, 8, 3, 5, -np.inf),
        False,
        "session 's3': x has NaN or Inf at step 5",
    ),
    ("NaN, large", _nan_at(4, 10, 0, 9, np.nan), False, "session 's0': x has NaN or Inf at step 9"),
    ("Inf in a later block", _mixed_with_nan(), False, "session 'c': x has NaN or Inf at step 1"),
    (
        "token id too large",
        _tokens(np.array([1, VOCAB, 2])),
        True,
        r"session 't': token id 12 at step 1 is outside the vocabulary \[0, 12\)",
    ),
    (
        "negative token id",
        _tokens(np.array([1, 2, -1]), n=2),
        True,
        r"session 'u': token id -1 at step 2 is outside the vocabulary \[0, 12\)",
    ),
    ("no token steps", _tokens(np.zeros(0, np.int64)), True, "session 't': no steps"),
]


@pytest.mark.parametrize(
    ("frame", "is_token", "message"), [r[1:] for r in REFUSALS], ids=[r[0] for r in REFUSALS]
)
def test_check_refuses_with_a_message_naming_the_problem(
    frame: F.Frame, is_token: bool, message: str
) -> None:
    with pytest.raises(InvalidArgument, match=message) as info:
        (token if is_token else real)(frame)
    assert info.value.code == "INVALID_ARGUMENT"


def test_check_changes_nothing_in_the_frame() -> None:
    fr = _nan_at(4, 8, 3, 5, np.nan)
    x = fr.blocks[0].x.copy()
    with pytest.raises(InvalidArgument):
        real(fr)
    assert np.array_equal(fr.blocks[0].x, x, equal_nan=True) and fr.seq.tolist() == [-1] * 4


# -- digest --------------------------------------------------------------------------------------


def test_digest_is_per_row_whatever_the_batch() -> None:
    x = np.stack([xs(4, i) for i in range(5)])
    d = F.digest(x)
    assert d.dtype == np.uint64 and d.shape == (5,)
    assert len(set(d.tolist())) == 5
    for i in range(5):
        assert F.digest(x[i : i + 1]).tolist() == [int(d[i])]
    assert F.digest(x[[3, 1]]).tolist() == [int(d[3]), int(d[1])]
    assert F.digest(np.asfortranarray(x)).tolist() == d.tolist()  # layout does not matter


def test_digest_tells_apart_the_same_values_in_another_order_or_length() -> None:
    x = xs(4)[None]
    assert F.digest(x[:, ::-1]).tolist() != F.digest(x).tolist()
    assert F.digest(x[:, :3]).tolist() != F.digest(x).tolist()
    assert (
        F.digest(np.zeros((1, 2, DIM), np.float32)).tolist()
        != F.digest(np.zeros((1, 3, DIM), np.float32)).tolist()
    )
    assert F.digest(np.array([[0.0]], np.float32)) != F.digest(np.array([[-0.0]], np.float32))


finite = st.floats(allow_nan=False, allow_infinity=False, width=32)


@settings(max_examples=200, deadline=None)
@given(
    hnp.arrays(np.float32, hnp.array_shapes(min_dims=3, max_dims=3, max_side=6), elements=finite),
    st.data(),
)
def test_digest_changes_with_any_value_of_its_row_only(x: np.ndarray, data: st.DataObject) -> None:
    """Changing any one input value changes that row's digest, and no other row's."""
    r = data.draw(st.integers(0, x.shape[0] - 1))
    t = data.draw(st.integers(0, x.shape[1] - 1))
    f = data.draw(st.integers(0, x.shape[2] - 1))
    new = np.float32(data.draw(finite))
    if new.view(np.uint32) == x[r, t, f].view(np.uint32):
        new = np.nextafter(new, np.float32(np.inf), dtype=np.float32)
    y = x.copy()
    y[r, t, f] = new
    before, after = F.digest(x), F.digest(y)
    assert before[r] != after[r]
    others = np.arange(x.shape[0]) != r
    assert np.array_equal(before[others], after[others])


ids = st.integers(0, 10_000)


@settings(max_examples=100, deadline=None)
@given(
    hnp.arrays(np.int64, st.tuples(st.integers(1, 4), st.integers(1, 8)), elements=ids),
    st.data(),
)
def test_token_digest_changes_with_any_id(x: np.ndarray, data: st.DataObject) -> None:
    r = data.draw(st.integers(0, x.shape[0] - 1))
    t = data.draw(st.integers(0, x.shape[1] - 1))
    y = x.copy()
    y[r, t] = data.draw(ids.filter(lambda v: v != x[r, t]))
    assert F.digest(x)[r] != F.digest(y)[r]
    assert F.digest(x[r : r + 1]).tolist() == [int(F.digest(x)[r])]
