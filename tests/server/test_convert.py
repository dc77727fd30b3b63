"""convert.py on its own: StepRequest -> Frame in both forms, refusals, and the answer-size
bounds against really encoded answers. No server, no engine: manifests are built in memory."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lstm_serve.core import frame as F
from lstm_serve.core.errors import InvalidArgument
from lstm_serve.core.jobs import StepResult
from lstm_serve.core.repository import Manifest, ModelVersion
from lstm_serve.core.rollout import ForecastResult
from lstm_serve.server import convert
from lstm_serve.server.pb import lstm_serve_pb2 as pb
from tests.helpers.models import in_memory_manifest

DIM, OUT = 3, 4


def manifest(kind: str, vocab: int = 12, name: str = "tiny") -> Manifest:
    return in_memory_manifest(kind, DIM, OUT, vocab, name)


REAL = manifest("real")
TOKEN = manifest("token")


def xs(steps: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(steps, DIM)).astype(np.float32)


def toks(steps: int, seed: int = 0, vocab: int = 12) -> list[int]:
    return np.random.default_rng(seed).integers(0, vocab, steps).tolist()


def assert_same_frame(a: F.Frame, b: F.Frame) -> None:
    assert a.ids == b.ids
    assert a.seq.dtype == b.seq.dtype == np.int64 and a.seq.tolist() == b.seq.tolist()
    assert a.reset.tolist() == b.reset.tolist()
    assert (a.end is None) == (b.end is None)
    assert len(a.blocks) == len(b.blocks)
    for ba, bb in zip(a.blocks, b.blocks, strict=True):
        assert ba.rows.tolist() == bb.rows.tolist()
        assert ba.x.dtype == bb.x.dtype and ba.x.shape == bb.x.shape
        assert np.array_equal(ba.x, bb.x)


def per_session(m: Manifest, sessions: list[tuple[str, int | None, bool, int]]) -> pb.StepRequest:
    """sessions: (id, seq or None, reset, steps); inputs seeded by position."""
    req = pb.StepRequest()
    for i, (sid, seq, reset, steps) in enumerate(sessions):
        s = req.sessions.add(session_id=sid, reset=reset)
        if seq is not None:
            s.seq = seq
        if m.kind == "token":
            s.tokens.extend(toks(steps, i))
        else:
            s.x = xs(steps, i).tobytes()
    return req


def columnar(m: Manifest, sessions: list[tuple[str, int | None, bool, int]]) -> pb.StepRequest:
    steps = {s[3] for s in sessions}
    assert len(steps) == 1
    t = steps.pop()
    req = pb.StepRequest()
    fr = req.frame
    fr.session_ids.extend(s[0] for s in sessions)
    fr.steps = t
    if any(s[1] is not None for s in sessions):
        fr.seqs.extend(F.APPEND if s[1] is None else s[1] for s in sessions)
    if any(s[2] for s in sessions):
        fr.resets.extend(s[2] for s in sessions)
    if m.kind == "token":
        fr.tokens.extend(v for i in range(len(sessions)) for v in toks(t, i))
    else:
        fr.x = np.concatenate([xs(t, i) for i in range(len(sessions))]).tobytes()
    return req


SHAPES = {
    "one session, append": [("a", None, False, 3)],
    "one session, seq": [("a", 7, False, 2)],
    "one session, reset": [("a", 0, True, 1)],
    "three sessions": [("a", None, False, 4), ("b", 5, False, 4), ("c", 0, True, 4)],
    "three sessions, no seqs or resets": [("a", None, False, 2), ("b", None, False, 2),
                                          ("c", None, False, 2)],
}  # fmt: skip


@pytest.mark.parametrize("kind", ["real", "token"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_both_forms_give_the_same_frame(kind: str, shape: str) -> None:
    m = REAL if kind == "real" else TOKEN
    sessions = SHAPES[shape]
    a = convert.frame_of(per_session(m, sessions), m)
    b = convert.frame_of(columnar(m, sessions), m)
    assert_same_frame(a, b)
    assert a.blocks[0].x.dtype == (np.int64 if kind == "token" else np.float32)
    first = a.blocks[0].x[0]
    expect = np.array(toks(sessions[0][3], 0)) if kind == "token" else xs(sessions[0][3], 0)
    assert np.array_equal(first, expect)
    assert a.seq.tolist() == [F.APPEND if s[1] is None else s[1] for s in sessions]


def test_sessions_of_different_lengths_make_blocks() -> None:
    fr = convert.frame_of(per_session(REAL, [("a", None, False, 2), ("b", 3, False, 5),
                                             ("c", None, False, 2)]), REAL)  # fmt: skip
    assert not fr.uniform and fr.steps() == 9
    blocks = {b.x.shape[1]: b for b in fr.blocks}
    assert blocks[2].rows.tolist() == [0, 2] and blocks[5].rows.tolist() == [1]
    assert np.array_equal(blocks[5].x[0], xs(5, 1))


def test_a_seq_beyond_int64_is_clamped() -> None:
    """uint64 seqs beyond what the int64 columns hold become the largest one (a gap later)."""
    fr = convert.frame_of(per_session(REAL, [("a", 2**64 - 1, False, 1)]), REAL)
    assert fr.seq.tolist() == [convert.SEQ_LIMIT]
    fr = convert.frame_of(
        per_session(REAL, [("a", 2**64 - 1, False, 1), ("b", 2**63, False, 1)]), REAL
    )
    assert fr.seq.tolist() == [convert.SEQ_LIMIT] * 2


def _req(**frame: object) -> pb.StepRequest:
    return pb.StepRequest(frame=pb.Frame(**frame))  # type: ignore[arg-type]


X6 = xs(2).tobytes()
REFUSALS = [
    ("both forms", REAL, pb.StepRequest(sessions=[pb.SessionSteps(session_id="a", x=X6)],
     frame=pb.Frame(session_ids=["b"], steps=2, x=X6)), "set either sessions or frame, not both"),
    ("x for a token model", TOKEN, pb.StepRequest(sessions=[pb.SessionSteps(session_id="a", x=X6)]),
     "session 'a': model 'tiny' takes tokens, not x"),
    ("no tokens", TOKEN, pb.StepRequest(sessions=[pb.SessionSteps(session_id="a")]),
     r"session 'a': no steps \(tokens is empty\)"),
    ("tokens for a real model", REAL,
     pb.StepRequest(sessions=[pb.SessionSteps(session_id="a", tokens=[1])]),
     "session 'a': model 'tiny' takes x, not tokens"),
    ("no x", REAL, pb.StepRequest(sessions=[pb.SessionSteps(session_id="a")]),
     r"session 'a': no steps \(x is empty\)"),
    ("a partial float", REAL, pb.StepRequest(sessions=[pb.SessionSteps(session_id="a", x=X6[:13])]),
     "session 'a': x has 13 bytes, not a whole number of float32 values"),
    ("not whole steps", REAL, pb.StepRequest(sessions=[pb.SessionSteps(session_id="a", x=X6[:16])]),
     "session 'a': x has 4 values, not a multiple of input_dim 3"),
    ("a bad id among sessions", REAL, pb.StepRequest(sessions=[
        pb.SessionSteps(session_id="a", x=X6), pb.SessionSteps(session_id="", x=b"")]),
     "session_id is empty"),
    ("a session twice", REAL, pb.StepRequest(sessions=[
        pb.SessionSteps(session_id="a", x=X6), pb.SessionSteps(session_id="a", x=X6)]),
     "a session appears twice"),
    ("frame without ids", REAL, _req(steps=2, x=X6), "frame.session_ids is empty"),
    ("frame without steps", REAL, _req(session_ids=["a"], x=X6), "frame.steps is 0"),
    ("frame seqs", REAL, _req(session_ids=["a", "b"], steps=1, x=X6, seqs=[0]),
     "frame.seqs has 1 values for 2 session_ids"),
    ("frame resets", REAL, _req(session_ids=["a", "b"], steps=1, x=X6, resets=[True] * 3),
     "frame.resets has 3 values for 2 session_ids"),
    ("frame seq below -1", REAL, _req(session_ids=["a", "b"], steps=1, x=X6, seqs=[0, -2]),
     r"frame.seqs: each value is a seq >= 0, or -1 to append"),
    ("frame x for tokens", TOKEN, _req(session_ids=["a"], steps=1, x=X6),
     "model 'tiny' takes frame.tokens, not frame.x"),
    ("frame token count", TOKEN, _req(session_ids=["a", "b"], steps=2, tokens=[1, 2, 3]),
     "frame.tokens has 3 ids; 2 sessions x 2 steps need 4"),
    ("frame tokens for real", REAL, _req(session_ids=["a"], steps=1, tokens=[1]),
     "model 'tiny' takes frame.x, not frame.tokens"),
    ("frame x count", REAL, _req(session_ids=["a", "b"], steps=2, x=X6),
     "frame.x has 6 values; 2 sessions x 2 steps x input_dim 3 need 12"),
    ("frame partial float", REAL, _req(session_ids=["a"], steps=1, x=X6[:5]),
     "frame.x has 5 bytes, not a whole number of float32 values"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("m", "req", "message"), [r[1:] for r in REFUSALS], ids=[r[0] for r in REFUSALS]
)
def test_frame_of_refuses_with_a_message(m: Manifest, req: pb.StepRequest, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        convert.frame_of(req, m)


# -- answer sizes --------------------------------------------------------------------------------

SEQ_MAX = convert.SEQ_LIMIT  # the largest seq an answer can carry: the longest varint
LONG_NAME = "m" * 64  # the longest model name a manifest allows


def version_of(m: Manifest) -> ModelVersion:
    return ModelVersion(m, Path("/nonexistent"))


def result_of(frame: F.Frame, m: Manifest, seed: int = 0) -> StepResult:
    """A worst-case answer for the frame: every seq at its largest, every row replayed."""
    n = len(frame)
    rng = np.random.default_rng(seed)
    per_row: list[np.ndarray] = [np.empty(0)] * n
    for b in frame.blocks:
        for r in b.rows.tolist():
            v = rng.random((b.x.shape[1], m.output_dim)).astype(np.float32)
            per_row[r] = v / v.sum(axis=1, keepdims=True) if m.kind == "token" else v * 1e6
    y: np.ndarray | list[np.ndarray] = np.stack(per_row) if frame.uniform else per_row
    full = np.full(n, SEQ_MAX, np.int64)
    return StepResult(frame.ids, full, full.copy(), np.ones(n, bool), y)


def encoded_size(
    m: Manifest, req: pb.StepRequest, top_k: int, request_id: str = ""
) -> tuple[int, int]:
    """(the bound, the real encoded size) of the answer to req."""
    frame = convert.frame_of(req, m)
    r = result_of(frame, m)
    resp = convert.step_response(version_of(m), r, request_id, top_k, req.HasField("frame"))
    return convert.answer_bytes(frame, m, top_k), resp.ByteSize()


# Long ids, and many sessions: what each session adds to the answer must be counted.
LONG_IDS = [(chr(ord("a") + i) * (256 - i), None, False) for i in range(24)]
BIG_VOCAB = manifest("token", vocab=300, name=LONG_NAME)  # token ids of two varint bytes
REAL_LONG = manifest("real", name=LONG_NAME)


@pytest.mark.parametrize("form", ["sessions", "frame"])
@pytest.mark.parametrize("n", [1, 3, 24])
@pytest.mark.parametrize("steps", [1, 7])
@pytest.mark.parametrize(
    ("m", "top_k"),
    [(REAL_LONG, 0), (BIG_VOCAB, 0), (BIG_VOCAB, 1), (BIG_VOCAB, 5), (BIG_VOCAB, 300),
     (manifest("token", vocab=12, name=LONG_NAME), 3)],
    ids=["real", "token", "token-top1", "token-top5", "token-top-all", "small-vocab-top3"],
)  # fmt: skip
def test_answer_bytes_bounds_the_encoded_answer(
    form: str, n: int, steps: int, m: Manifest, top_k: int
) -> None:
    """The size known before anything runs is never below the real answer's, for worst-case
    seqs and ids; and it is not wildly above it (it is used to refuse requests): at most three
    times the answer, plus the ids (counted even where a frame's answer does not carry them)."""
    sessions = [(sid, seq, reset, steps) for sid, seq, reset in LONG_IDS[:n]]
    make = per_session if form == "sessions" else columnar
    bound, real = encoded_size(m, make(m, sessions), top_k)
    assert real <= bound
    assert bound <= 3 * real + 1024 + sum(len(s[0]) for s in sessions)


def test_answer_bytes_bounds_answers_of_mixed_lengths() -> None:
    for m, k in ((REAL_LONG, 0), (BIG_VOCAB, 0), (BIG_VOCAB, 4)):
        req = per_session(m, [("a" * 256, 0, False, 1), ("b" * 256, None, False, 9),
                              ("c", 3, False, 2)])  # fmt: skip
        bound, real = encoded_size(m, req, k)
        assert real <= bound <= 3 * real + 1024


@pytest.mark.xfail(
    strict=True,
    reason="answer_bytes(frame, m, top_k) does not count the request_id that step_response "
    "echoes: a long request_id makes the answer larger than the bound checked before queuing",
)
def test_answer_bytes_counts_the_echoed_request_id() -> None:
    req = per_session(REAL, [("a", None, False, 1)])
    bound, real = encoded_size(REAL, req, 0, request_id="r" * 4096)
    assert real <= bound


@pytest.mark.xfail(
    strict=True,
    reason="answer_bytes counts session ids in characters (len(id)), while the answer carries "
    "their UTF-8 bytes: ids of non-ASCII characters exceed the bound (forecast_bytes encodes)",
)
def test_answer_bytes_counts_session_ids_in_bytes() -> None:
    req = per_session(REAL, [("日" * 256, None, False, 1), ("本" * 256, None, False, 1)])
    bound, real = encoded_size(REAL, req, 0)
    assert real <= bound


@pytest.mark.parametrize("horizon", [1, 64, 1000])
@pytest.mark.parametrize("m", [REAL_LONG, BIG_VOCAB], ids=["real", "token"])
@pytest.mark.parametrize("sid", ["s", "x" * 256, "日" * 256], ids=["short", "long", "utf8"])
def test_forecast_bytes_bounds_the_encoded_answer(horizon: int, m: Manifest, sid: str) -> None:
    rng = np.random.default_rng(horizon)
    token = m.kind == "token"
    y = rng.random((horizon, m.output_dim)).astype(np.float32) * (1 if token else 1e6)
    tokens = (
        rng.integers(m.output_dim - 10, m.output_dim, horizon) if token else np.empty(0, np.int64)
    )
    r = ForecastResult(sid, y, tokens, SEQ_MAX)
    resp = convert.forecast_response(version_of(m), r)
    bound = convert.forecast_bytes(m, sid, horizon)
    assert resp.ByteSize() <= bound <= 3 * resp.ByteSize() + 1024
    if token:
        assert list(resp.tokens) == tokens.tolist() and not resp.y
    else:
        assert np.array_equal(np.frombuffer(resp.y, np.float32).reshape(horizon, -1), y)


# -- encoding --------------------------------------------------------------------------------------


def test_step_response_carries_each_sessions_answer() -> None:
    m = REAL
    req = per_session(m, [("a", 3, False, 2), ("b", None, False, 5)])
    fr = convert.frame_of(req, m)
    y = [np.full((2, OUT), 1.5, np.float32), np.full((5, OUT), -2.0, np.float32)]
    r = StepResult(fr.ids, np.array([3, 0]), np.array([5, 5]), np.array([True, False]), y)
    resp = convert.step_response(version_of(m), r, "req-1", 0, False)
    assert resp.request_id == "req-1" and resp.model.name == "tiny" and resp.model.version == "1"
    got = [(o.session_id, o.seq, o.next_seq, o.steps, o.replayed) for o in resp.sessions]
    assert got == [("a", 3, 5, 2, True), ("b", 0, 5, 5, False)]
    for o, yi in zip(resp.sessions, y, strict=True):
        assert np.array_equal(np.frombuffer(o.y, np.float32).reshape(-1, OUT), yi)


def test_top_k_lists_the_most_likely_tokens_first_in_both_forms() -> None:
    m = TOKEN
    probs = np.random.default_rng(3).random((2, 3, 12)).astype(np.float32)
    r = StepResult(["a", "b"], np.zeros(2, np.int64), np.full(2, 3), np.zeros(2, bool), probs)
    per = convert.step_response(version_of(m), r, "", 4, False)
    col = convert.step_response(version_of(m), r, "", 4, True)
    expect_ids = np.argsort(-probs, axis=-1, kind="stable")[..., :4]
    for i, o in enumerate(per.sessions):
        assert not o.y and len(o.top_k) == 3
        for t, tk in enumerate(o.top_k):
            assert list(tk.tokens) == expect_ids[i, t].tolist()
            assert np.allclose(tk.probs, probs[i, t, expect_ids[i, t]])
    assert list(col.frame.top_k_tokens) == expect_ids.ravel().tolist()
    assert not col.frame.y and col.frame.steps == 3 and list(col.frame.next_seqs) == [3, 3]
