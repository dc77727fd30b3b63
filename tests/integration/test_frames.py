"""Columnar frames on a real server: the same invariants as the per-session form, plus the cases
the frame opens (length mismatches, retried frames, new/replayed/reset sessions in one frame)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from lstm_serve.client import Client, Connection, frame_request, session_steps, step_request
from tests.helpers.server import ServerThread, code_of, serve, session_state, xs
from tests.oracle.one_pass import OnePass

ATOL = 1e-5


@pytest.fixture(scope="module")
def server(tiny_repo: Path) -> Iterator[ServerThread]:
    yield from serve(tiny_repo, metrics_port=-1)


def test_frames_continue_like_one_pass(client: Client, oracle: OnePass) -> None:
    """Chunks sent as frames, mixed with the per-session form, equal one pass per session."""
    ids = [f"fr-{i}" for i in range(6)]
    full = np.random.default_rng(1).normal(size=(6, 9, 3)).astype(np.float32)
    outs: list[list[np.ndarray]] = [[] for _ in ids]
    for a, b in ((0, 2), (2, 3), (3, 7)):
        r = client.step_frame("tiny", ids, full[:, a:b], seqs=[a] * 6)
        assert r.seq.tolist() == [a] * 6 and r.next_seq.tolist() == [b] * 6
        assert not r.replayed.any() and r.y.shape == (6, b - a, 3)
        for i in range(6):
            outs[i].append(r.y[i])
    for i, sid in enumerate(ids):  # the last two steps one session at a time
        outs[i].append(client.predict("tiny", sid, full[i, 7:], seq=7).y)
    for i in range(6):
        np.testing.assert_allclose(np.concatenate(outs[i]), oracle.run(full[i])[0], atol=ATOL)


def test_frame_length_mismatches_are_refused_and_change_nothing(
    server: ServerThread, client: Client
) -> None:
    client.step_frame("tiny", ["mm-0", "mm-1"], xs(1, 2).reshape(2, 1, 3))
    before = [session_state(server, s) for s in ("mm-0", "mm-1")]
    good = frame_request("tiny", ["mm-0", "mm-1"], xs(2, 2).reshape(2, 1, 3))
    cases = {
        "frame.seqs": lambda r: r.frame.seqs.extend([1]),
        "frame.resets": lambda r: r.frame.resets.extend([False, True, False]),
        "frame.x": lambda r: setattr(r.frame, "x", r.frame.x[:-4]),
        "frame.steps": lambda r: setattr(r.frame, "steps", 0),
        "twice": lambda r: r.frame.session_ids.append("mm-0") or r.frame.steps,
    }
    for field, spoil in cases.items():
        req = type(good)()
        req.CopyFrom(good)
        spoil(req)
        with pytest.raises(grpc.RpcError) as err:
            client.step(req)
        assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT, field
        if field.startswith("frame."):
            assert field in (err.value.details() or ""), (field, err.value.details())
    both = step_request("tiny", [session_steps("mm-0", xs(3, 1))])
    both.frame.CopyFrom(good.frame)
    assert code_of(lambda: client.step(both)) is grpc.StatusCode.INVALID_ARGUMENT
    assert [session_state(server, s) for s in ("mm-0", "mm-1")] == before


def test_retried_frame_is_answered_again_not_applied(server: ServerThread, client: Client) -> None:
    ids = ["rt-0", "rt-1", "rt-2"]
    x = np.random.default_rng(3).normal(size=(3, 2, 3)).astype(np.float32)
    first = client.step_frame("tiny", ids, x, seqs=[0, 0, 0])
    after = [session_state(server, s) for s in ids]
    again = client.step_frame("tiny", ids, x, seqs=[0, 0, 0])
    assert again.replayed.all() and not first.replayed.any()
    np.testing.assert_array_equal(again.y, first.y)
    assert again.next_seq.tolist() == [2, 2, 2]
    assert [session_state(server, s) for s in ids] == after
    # The same seq with other data is not a retry: refused, nothing applied.
    with pytest.raises(grpc.RpcError) as err:
        client.step_frame("tiny", ids, x + 1, seqs=[0, 0, 0])
    assert err.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert "different inputs" in (err.value.details() or "")
    assert [session_state(server, s) for s in ids] == after


def test_frame_mixing_new_replayed_and_reset_sessions(
    server: ServerThread, client: Client, oracle: OnePass
) -> None:
    a, b = xs(10, 2), xs(11, 2)
    client.predict("tiny", "mix-old", a, seq=0)
    client.predict("tiny", "mix-retry", b, seq=0)
    x = np.stack([xs(12, 2), b, xs(13, 2)])
    r = client.step_frame(
        "tiny", ["mix-old", "mix-retry", "mix-new"], x, seqs=[0, 0, -1], resets=[True, False, False]
    )
    assert r.replayed.tolist() == [False, True, False]
    assert r.next_seq.tolist() == [2, 2, 2]
    np.testing.assert_allclose(r.y[0], oracle.run(x[0])[0], atol=ATOL)  # reset: from zero
    np.testing.assert_allclose(r.y[1], oracle.run(b)[0], atol=ATOL)  # the first answer
    np.testing.assert_allclose(r.y[2], oracle.run(x[2])[0], atol=ATOL)  # new
    # A gap anywhere refuses the whole frame.
    with pytest.raises(grpc.RpcError) as err:
        client.step_frame("tiny", ["mix-old", "mix-new"], x[:2], seqs=[2, 5])
    assert err.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert "expected seq 2" in (err.value.details() or "")
    assert session_state(server, "mix-old") is not None and session_state(server, "mix-old")[0] == 2  # type: ignore[index]


def test_token_frame_and_top_k(client: Client, tok_oracle: OnePass) -> None:
    toks = np.random.default_rng(4).integers(0, 12, size=(4, 5))
    r = client.step_frame("tinytok", [f"tf-{i}" for i in range(4)], toks, top_k=3)
    assert r.y.size == 0 and r.top_k_tokens.shape == (4, 5, 3)
    for i in range(4):
        probs = tok_oracle.run(toks[i].astype(np.int64))[0]
        np.testing.assert_array_equal(r.top_k_tokens[i, :, 0], probs.argmax(axis=1))


def test_an_answer_too_large_is_refused_before_anything_is_applied(
    tiny_repo: Path,
) -> None:
    with (
        ServerThread(
            model_repository=tiny_repo, metrics_port=-1, max_message_bytes=64 * 1024
        ) as srv,
        Client(srv.target) as c,
    ):
        ids = [f"big-{i}" for i in range(4)]
        x = np.ones((4, 1000, 3), np.float32)  # 48 kB in, 48 kB out: fits
        assert c.step_frame("tiny", ids, x).next_seq.tolist() == [1000] * 4
        tok = np.ones((4, 1000), np.int64)  # 4000 steps x 12 probabilities: 192 kB out
        with pytest.raises(grpc.RpcError) as err:
            c.step_frame("tinytok", ids, tok)
        assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "bytes" in (err.value.details() or "")
        assert not c.get_session("tinytok", "big-0").exists
        # The gRPC metrics count what the client got, not OK.
        handled = srv.server.metrics.registry.get_sample_value(
            "grpc_server_handled_total",
            {"grpc_type": "unary", "grpc_service": "lstm_serve.v1.LstmServe",
             "grpc_method": "Predict", "grpc_code": "INVALID_ARGUMENT"},
        )  # fmt: skip
        assert handled == 1
        assert c.step_frame("tinytok", ids, tok, top_k=1).next_seq.tolist() == [1000] * 4
        # The client may say its own, smaller limit.
        md = (("lstm-serve-max-response-bytes", "1000"),)
        with pytest.raises(grpc.RpcError) as err:
            c.stub.Predict(frame_request("tiny", ids, x[:, :100]), metadata=md)
        assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert [c.get_session("tiny", s).next_seq for s in ids] == [1000] * 4


def test_the_client_library_sends_its_receive_limit(server: ServerThread) -> None:
    """A Client whose receive limit is smaller than the answer gets INVALID_ARGUMENT and the
    sessions stay where they were, instead of an answer it cannot receive after they moved."""
    ids = [f"lim-{i}" for i in range(12)]
    tok = np.ones((12, 1000), np.int64)  # 12 kB in; 12,000 steps x 12 probabilities out
    with Client(Connection(server.target, max_message_bytes=64 * 1024)) as small:
        with pytest.raises(grpc.RpcError) as err:
            small.step_frame("tinytok", ids, tok)
        assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "65536" in (err.value.details() or "")
        assert not small.get_session("tinytok", "lim-0").exists
        assert small.step_frame("tinytok", ids, tok[:, :50]).next_seq.tolist() == [50] * 12
