"""Forecast against a real server: predictions fed back as inputs, checked by feeding them back
by hand through one pass of the NumPy oracle (OnePass); commit, sampling, errors."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from lstm_serve.client import Client, session_steps
from tests.helpers.server import ServerThread, code_of, serve, xs
from tests.oracle.one_pass import OnePass

ATOL = 1e-5
MAX_HORIZON = 16


@pytest.fixture(scope="module")
def server(tiny_repo: Path) -> Iterator[ServerThread]:
    yield from serve(tiny_repo, max_forecast_horizon=MAX_HORIZON)


def by_hand(oracle: OnePass, x: np.ndarray, horizon: int) -> np.ndarray:
    """Roll forward by feeding each prediction back as the next input, one pass each time."""
    seq = x.copy()
    preds = []
    for _ in range(horizon):
        y = oracle.run(seq)[0][-1]
        preds.append(y)
        seq = np.concatenate([seq, y[None].astype(np.float32)])
    return np.stack(preds)


def greedy_by_hand(oracle: OnePass, tokens: list[int], horizon: int) -> list[int]:
    seq = list(tokens)
    out = []
    for _ in range(horizon):
        probs = oracle.run(np.array(seq, np.int64))[0][-1]
        t = int(np.argmax(probs))
        out.append(t)
        seq.append(t)
    return out


def test_forecast_equals_feeding_predictions_back(client: Client, oracle: OnePass) -> None:
    x = xs(1, 6)
    last = client.predict("tiny", "fc-hand", x, seq=0)
    out = client.forecast("tiny", "fc-hand", 7)
    assert out.y.shape == (7, 3)
    assert out.tokens == []
    expected = by_hand(oracle, x, 7)
    # As documented: row 0 is the prediction the last step already returned; 6 rows are new.
    np.testing.assert_array_equal(out.y[0], last.y[-1])
    np.testing.assert_allclose(out.y, expected, atol=ATOL)
    # The predictions really move (a constant answer would be a poor forecast test).
    assert np.abs(np.diff(out.y, axis=0)).max() > 1e-4


def test_forecast_leaves_the_session_untouched(client: Client, oracle: OnePass) -> None:
    x = xs(2, 5)
    client.predict("tiny", "fc-pure", x, seq=0)
    first = client.forecast("tiny", "fc-pure", 4)
    assert first.next_seq == 5
    st = client.get_session("tiny", "fc-pure")
    assert st.exists and st.next_seq == 5
    again = client.forecast("tiny", "fc-pure", 4)
    np.testing.assert_array_equal(again.y, first.y)
    nxt = xs(3, 2)
    out = client.predict("tiny", "fc-pure", nxt, seq=5)
    assert out.next_seq == 7
    np.testing.assert_allclose(out.y, oracle.run(np.concatenate([x, nxt]))[0][5:], atol=ATOL)


def test_forecast_commit_advances_the_session(client: Client, oracle: OnePass) -> None:
    x = xs(4, 3)
    client.predict("tiny", "fc-commit", x, seq=0)
    h = 4
    out = client.forecast("tiny", "fc-commit", h, commit=True)
    assert out.next_seq == 3 + h
    np.testing.assert_allclose(out.y, by_hand(oracle, x, h), atol=ATOL)
    assert client.get_session("tiny", "fc-commit").next_seq == 3 + h
    # The session now holds the state after its inputs and the h fed-back predictions.
    fed = np.concatenate([x, out.y])
    more = client.forecast("tiny", "fc-commit", 2)
    np.testing.assert_allclose(more.y, by_hand(oracle, fed, 2), atol=ATOL)
    assert code_of(lambda: client.predict("tiny", "fc-commit", xs(5, 1), seq=3)) == (
        grpc.StatusCode.FAILED_PRECONDITION
    )
    nxt = xs(5, 2)
    step = client.predict("tiny", "fc-commit", nxt, seq=3 + h)
    assert step.next_seq == 5 + h
    np.testing.assert_allclose(step.y, oracle.run(np.concatenate([fed, nxt]))[0][-2:], atol=ATOL)


def test_forecast_with_prefix_on_a_fresh_session(client: Client, oracle: OnePass) -> None:
    x = xs(6, 4)
    # A prefix naming another session is refused, not silently ignored.
    other = session_steps("another", x)
    assert code_of(lambda: client.forecast("tiny", "fc-fresh", 3, prefix=other)) == (
        grpc.StatusCode.INVALID_ARGUMENT
    )
    out = client.forecast("tiny", "fc-fresh", 3, prefix=session_steps("fc-fresh", x))
    np.testing.assert_allclose(out.y, by_hand(oracle, x, 3), atol=ATOL)
    assert out.next_seq == 0
    assert not client.get_session("tiny", "fc-fresh").exists  # not committed: not created
    out = client.forecast("tiny", "fc-fresh-c", 3, prefix=session_steps("", x), commit=True)
    np.testing.assert_allclose(out.y, by_hand(oracle, x, 3), atol=ATOL)
    assert out.next_seq == 4 + 3
    assert client.get_session("tiny", "fc-fresh-c").next_seq == 7


def test_forecast_prefix_on_an_existing_session(client: Client, oracle: OnePass) -> None:
    x, p = xs(7, 3), xs(8, 2)
    client.predict("tiny", "fc-pre", x, seq=0)
    out = client.forecast("tiny", "fc-pre", 3, prefix=session_steps("", p, seq=3))
    np.testing.assert_allclose(out.y, by_hand(oracle, np.concatenate([x, p]), 3), atol=ATOL)
    assert client.get_session("tiny", "fc-pre").next_seq == 3
    # A prefix with the wrong seq is a gap.
    bad = session_steps("", p, seq=9)
    assert code_of(lambda: client.forecast("tiny", "fc-pre", 3, prefix=bad)) == (
        grpc.StatusCode.FAILED_PRECONDITION
    )
    out = client.forecast("tiny", "fc-pre", 2, prefix=session_steps("", p, seq=3), commit=True)
    assert out.next_seq == 3 + 2 + 2
    assert client.get_session("tiny", "fc-pre").next_seq == 7


def test_forecast_prefix_with_reset_starts_from_zero(client: Client, oracle: OnePass) -> None:
    client.predict("tiny", "fc-reset", xs(11, 4), seq=0)
    p = xs(12, 3)
    out = client.forecast("tiny", "fc-reset", 3, prefix=session_steps("", p, reset=True))
    np.testing.assert_allclose(out.y, by_hand(oracle, p, 3), atol=ATOL)
    assert client.get_session("tiny", "fc-reset").next_seq == 4  # not committed
    reset = session_steps("", p, seq=0, reset=True)
    out = client.forecast("tiny", "fc-reset", 3, prefix=reset, commit=True)
    assert out.next_seq == 3 + 3
    nxt = xs(13, 1)
    step = client.predict("tiny", "fc-reset", nxt, seq=6)
    fed = np.concatenate([p, out.y, nxt])
    np.testing.assert_allclose(step.y, oracle.run(fed)[0][-1:], atol=ATOL)


def test_token_greedy_forecast_equals_argmax_by_hand(client: Client, tok_oracle: OnePass) -> None:
    toks = [1, 4, 4, 9, 0]
    client.predict("tinytok", "fc-tok", tokens=toks, seq=0)
    out = client.forecast("tinytok", "fc-tok", 10)
    assert out.tokens == greedy_by_hand(tok_oracle, toks, 10)
    assert client.get_session("tinytok", "fc-tok").next_seq == 5
    out = client.forecast("tinytok", "fc-tok", 6, commit=True)
    assert out.next_seq == 11
    fed = toks + out.tokens
    nxt = client.predict("tinytok", "fc-tok", tokens=[2], seq=11)
    np.testing.assert_allclose(
        nxt.y, tok_oracle.run(np.array([*fed, 2], np.int64))[0][-1:], atol=ATOL
    )


def test_token_sampling_is_reproducible_per_seed(client: Client, tok_oracle: OnePass) -> None:
    toks = [3, 1, 2]
    prefix = session_steps("", tokens=toks)

    def sample(seed: int, top_k: int = 0) -> list[int]:
        out = client.forecast(
            "tinytok", "fc-sample", MAX_HORIZON, prefix=prefix, temperature=1.0, seed=seed,
            top_k=top_k,
        )  # fmt: skip
        return out.tokens

    a = sample(42)
    assert len(a) == MAX_HORIZON
    assert all(0 <= t < 12 for t in a)
    assert sample(42) == a
    others = [sample(s) for s in (1, 2, 3, 4)]
    assert any(o != a for o in others)
    # Sampling among the single most likely token is greedy decoding.
    assert sample(7, top_k=1) == greedy_by_hand(tok_oracle, toks, MAX_HORIZON)


def test_forecast_errors(client: Client) -> None:
    client.predict("tiny", "fc-err", xs(9, 2), seq=0)
    assert code_of(lambda: client.forecast("tiny", "fc-err", 0)) == (
        grpc.StatusCode.INVALID_ARGUMENT
    )
    assert code_of(lambda: client.forecast("tiny", "fc-err", MAX_HORIZON + 1)) == (
        grpc.StatusCode.INVALID_ARGUMENT
    )
    assert client.forecast("tiny", "fc-err", MAX_HORIZON).y.shape == (MAX_HORIZON, 3)
    assert code_of(lambda: client.forecast("tiny", "fc-none", 3)) == grpc.StatusCode.NOT_FOUND
    assert code_of(lambda: client.forecast("no-such-model", "fc-err", 3)) == (
        grpc.StatusCode.NOT_FOUND
    )
    assert code_of(
        lambda: client.forecast("tinytok", "fc-err", 3, prefix=session_steps("", tokens=[99]))
    ) == (grpc.StatusCode.INVALID_ARGUMENT)
    nan = np.full((1, 3), np.nan, np.float32)
    assert code_of(lambda: client.forecast("tiny", "fc-err", 3, prefix=session_steps("", nan))) == (
        grpc.StatusCode.INVALID_ARGUMENT
    )
    client.predict("tinytok", "fc-err", tokens=[1, 2], seq=0)
    assert code_of(lambda: client.forecast("tinytok", "fc-err", 3, temperature=-1.0)) == (
        grpc.StatusCode.INVALID_ARGUMENT
    )
    assert client.get_session("tinytok", "fc-err").next_seq == 2
    # A session that has no steps (just reset) has nothing to forecast from.
    client.predict("tiny", "fc-empty", xs(10, 2), seq=0)
    client.reset_session("tiny", "fc-empty")
    assert code_of(lambda: client.forecast("tiny", "fc-empty", 3)) in (
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert client.get_session("tiny", "fc-empty").next_seq == 0
    # None of this touched the session.
    assert client.get_session("tiny", "fc-err").next_seq == 2
