"""Fuzzing a live server (invariant 8, docs/architecture.md): bad input gets a clear status, never crashes
the server and never touches a session's state.

Hypothesis drives at least 10,000 random and malformed requests through Predict, Stream,
Forecast and the session calls: wrong shapes, NaN and Inf, huge step counts, bad token ids,
empty, 10 kB and unprintable session ids, unknown models and versions, seq gaps, oversized
messages and mutated wire bytes. Each case knows which statuses fit it. A few victim sessions
receive only requests that must be refused; their (h, c, next_seq) are compared before and after.
"""

from __future__ import annotations

import collections
import functools
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from lstm_serve.client import Client
from lstm_serve.server.pb import lstm_serve_pb2 as pb
from tests.helpers.proxy import health_status
from tests.helpers.server import ServerThread, serve

C = grpc.StatusCode
OK, INVALID, NOT_FOUND, GAP, EXHAUSTED = (
    C.OK,
    C.INVALID_ARGUMENT,
    C.NOT_FOUND,
    C.FAILED_PRECONDITION,
    C.RESOURCE_EXHAUSTED,
)
CLEAN = frozenset({OK, INVALID, NOT_FOUND, GAP, EXHAUSTED})  # never INTERNAL, UNKNOWN, ...
MAX_STEPS, MAX_SESSIONS_PER_REQUEST, MAX_BYTES, MAX_HORIZON = 64, 8, 64 * 1024, 32
VICTIMS = {"tiny": ["victim-0", "victim-1", "victim-2"], "tinytok": ["victim-t0", "victim-t1"]}
VICTIM_STEPS = 5
POOL = [f"fz-{i}" for i in range(16)] + ["ünï-cødé ✓", "a b", "x" * 256]
UNPRINTABLE = ["\x00", "\n", "\x1f", "\x7f", "\u200b", "\u2028", "\xa0", "\ufeff"]
DIM = {"tiny": 3, "tinytok": 12}
BATCH = 25  # requests per Hypothesis example
# x BATCH requests, with a margin for draws that are skipped
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "440"))


@dataclass(frozen=True)
class Case:
    label: str
    via: str  # predict | stream | raw | forecast | get | reset | end
    payload: Any
    allowed: frozenset[grpc.StatusCode]


def _victims(c: Client) -> None:
    for sid in VICTIMS["tiny"]:
        c.predict("tiny", sid, np.ones((VICTIM_STEPS, 3)), seq=0)
    for sid in VICTIMS["tinytok"]:
        c.predict("tinytok", sid, tokens=[1, 2, 3, 4, 5], seq=0)


@pytest.fixture(scope="module")
def server(tiny_repo: Path) -> Iterator[ServerThread]:
    yield from serve(
        tiny_repo,
        setup=_victims,
        metrics_port=-1,
        max_steps_per_request=MAX_STEPS,
        max_sessions_per_request=MAX_SESSIONS_PER_REQUEST,
        max_message_bytes=MAX_BYTES,
        max_sessions=120,
        max_forecast_horizon=MAX_HORIZON,
    )


def _victim_state(server: ServerThread) -> dict[str, tuple[int, int, bytes]]:
    out = {}
    for model, sids in VICTIMS.items():
        lm = server.engine.model(model)
        for sid in sids:
            slot = lm.store.slot(sid)
            assert slot is not None, sid
            a = lm.store
            out[f"{model}/{sid}"] = (
                int(a.next_seq[slot]),
                int(a.gen[slot]),
                a.h[:, slot].tobytes() + a.c[:, slot].tobytes() + a.last_y[slot].tobytes(),
            )
    return out


# -- strategies --------------------------------------------------------------------------------

# Hypothesis draws the structure (model, kind of defect, path, text); a seeded NumPy generator
# fills in the bulk (values, ids, seqs), which keeps generation cheap enough for 10,000 requests.
seeds = st.integers(0, 2**32 - 1)
models = st.sampled_from(["tiny", "tinytok"])
step_via = st.sampled_from(["predict"] * 7 + ["stream"])
malformations = st.sampled_from(
    ["defect"] * 6 + ["too_many_sessions", "no_sessions", "duplicate", "bad_top_k"]
)
short_text = st.text(max_size=40)


def pick(rng: np.random.Generator, options: list[Any]) -> Any:
    return options[int(rng.integers(len(options)))]


def _valid_steps(model: str, rng: np.random.Generator, n: int) -> dict[str, Any]:
    if model == "tinytok":
        return {"tokens": rng.integers(0, 12, n).tolist()}
    return {"x": rng.normal(0, 3, (n, 3)).astype("<f4").tobytes()}


DECODE_DEFECTS = [
    "x_not_float32",
    "x_not_whole_steps",
    "nan",
    "inf",
    "too_many_steps",
    "empty",
    "wrong_kind",
    "bad_token",
    "empty_id",
    "long_id",
    "unprintable_id",
]
decode_defects = st.sampled_from(DECODE_DEFECTS)


def _defective(model: str, sid: str, defect: str, rng: np.random.Generator) -> pb.SessionSteps:
    """One session's steps with a defect the server finds before it looks at any session."""
    s = pb.SessionSteps(session_id=sid, **_valid_steps(model, rng, int(rng.integers(1, 6))))
    if rng.random() < 0.5:
        s.seq = int(rng.integers(0, 10))
    real = model == "tiny"
    if defect == "x_not_float32" and real:
        s.x = rng.bytes(int(rng.integers(1, 100)) * 4 + int(rng.integers(1, 4)))
    elif defect == "x_not_whole_steps" and real:
        s.x = (
            rng.normal(size=int(rng.integers(1, 50)) * 3 + int(rng.integers(1, 3)))
            .astype("<f4")
            .tobytes()
        )
    elif defect in ("nan", "inf") and real:
        x = rng.normal(size=(int(rng.integers(1, 20)), 3)).astype("<f4")
        x.flat[int(rng.integers(x.size))] = (
            np.nan if defect == "nan" else rng.choice([np.inf, -np.inf])
        )
        s.x = x.tobytes()
    elif defect == "too_many_steps":
        n = int(rng.choice([MAX_STEPS + 1, int(rng.integers(MAX_STEPS + 1, 4000))]))
        s.ClearField("x")
        s.ClearField("tokens")
        s.MergeFrom(pb.SessionSteps(**_valid_steps(model, rng, n)))
    elif defect == "empty":
        s.ClearField("x")
        s.ClearField("tokens")
    elif defect == "wrong_kind":
        s.ClearField("x")
        s.ClearField("tokens")
        if real:
            s.tokens.extend(rng.integers(0, 12, int(rng.integers(1, 5))).tolist())
        else:
            s.x = np.ones(int(rng.integers(1, 5)), "<f4").tobytes()
    elif defect == "bad_token" and not real:
        t = rng.integers(0, 12, int(rng.integers(1, 10)))
        t[int(rng.integers(t.size))] = [-1, 12, 13, 1000, 2**31 - 1, -(2**31)][int(rng.integers(6))]
        s.ClearField("tokens")
        s.tokens.extend(t.tolist())
    elif defect == "empty_id":
        s.session_id = ""
    elif defect == "long_id":
        s.session_id = "s" * int(rng.choice([257, 1000, 10_000]))
    elif defect == "unprintable_id":
        bad = UNPRINTABLE[int(rng.integers(len(UNPRINTABLE)))]
        k = int(rng.integers(len(sid) + 1))
        s.session_id = sid[:k] + bad + sid[k:]
    else:  # the defect does not apply to this kind of model: an empty id always does
        s.session_id = ""
    return s


@st.composite
def valid_pool_request(draw: Callable[..., Any]) -> Case:
    """Well-formed steps for fuzz-owned sessions: applied, or refused for seq/capacity."""
    model, rng = draw(models), np.random.default_rng(draw(seeds))
    n = int(rng.integers(1, MAX_SESSIONS_PER_REQUEST + 1))
    parts = []
    for sid in rng.choice(POOL, n, replace=False).tolist():
        s = pb.SessionSteps(session_id=sid, **_valid_steps(model, rng, int(rng.integers(1, 9))))
        r = rng.random()
        if r < 0.15:
            s.reset = True
            if rng.random() < 0.5:
                s.seq = 0
        elif r < 0.5:
            s.seq = [0, int(rng.integers(0, 60)), 2**64 - 1][int(rng.integers(3))]
        parts.append(s)
    version = pick(rng, ["", "", "1"])
    # top_k is for token models only, and at most their vocabulary (12 tokens)
    top_k = pick(rng, [0, 0, 1, 3, 12]) if model == "tinytok" else 0
    req = pb.StepRequest(
        model=pb.ModelRef(name=model, version=version),
        sessions=parts,
        top_k=top_k,
        request_id=draw(short_text),
    )
    via = draw(step_via)
    return Case("valid_pool", via, req, frozenset({OK, GAP, NOT_FOUND, EXHAUSTED}))


@st.composite
def malformed_request(draw: Callable[..., Any]) -> Case:
    """At least one defect found while decoding: refused as a whole, INVALID_ARGUMENT."""
    model, rng = draw(models), np.random.default_rng(draw(seeds))
    kind = draw(malformations)
    ids = VICTIMS[model] + POOL
    n = int(rng.integers(1, MAX_SESSIONS_PER_REQUEST + 1))
    parts = [
        pb.SessionSteps(session_id=sid, **_valid_steps(model, rng, int(rng.integers(1, 5))))
        for sid in rng.choice(ids, n, replace=False).tolist()
    ]
    label = kind
    if kind == "defect":
        defect = draw(decode_defects)
        k = int(rng.integers(n))
        parts[k] = _defective(model, parts[k].session_id, defect, rng)
        label = defect
    elif kind == "too_many_sessions":
        extra = rng.choice(ids, MAX_SESSIONS_PER_REQUEST + 1, replace=False).tolist()
        parts = [pb.SessionSteps(session_id=sid, **_valid_steps(model, rng, 1)) for sid in extra]
    elif kind == "no_sessions":
        parts = []
    elif kind == "duplicate":
        parts.append(pb.SessionSteps(session_id=parts[0].session_id, **_valid_steps(model, rng, 1)))
    top_k = 0
    if kind == "bad_top_k":  # any top_k on a real-valued model, or above the vocabulary
        top_k = pick(rng, [1, 3]) if model == "tiny" else pick(rng, [13, 1000, 2**31 - 1])
    req = pb.StepRequest(model=pb.ModelRef(name=model), sessions=parts, top_k=top_k)
    via = draw(step_via)
    return Case(f"malformed/{label}", via, req, frozenset({INVALID}))


@st.composite
def gap_request(draw: Callable[..., Any]) -> Case:
    """A victim's steps with a seq that does not follow (ahead, or stale with no replay)."""
    model, rng = draw(models), np.random.default_rng(draw(seeds))
    victim = pick(rng, VICTIMS[model])
    n = int(rng.integers(1, 9))
    if rng.random() < 0.5:
        seq = pick(rng, [VICTIM_STEPS + 1, VICTIM_STEPS + 2, 99, 2**40, 2**63, 2**64 - 1])
    else:  # stale: no replay is stored for these (seq, steps)
        seq = int(rng.integers(1, VICTIM_STEPS))
    parts = [pb.SessionSteps(session_id=victim, seq=seq, **_valid_steps(model, rng, n))]
    for sid in rng.choice(POOL, int(rng.integers(0, 4)), replace=False).tolist():
        parts.insert(
            int(rng.integers(len(parts) + 1)),
            pb.SessionSteps(session_id=sid, **_valid_steps(model, rng, 1)),
        )
    if rng.random() < 0.5:  # reset with a seq other than 0: refused too
        parts[parts.index(next(p for p in parts if p.session_id == victim))].reset = True
    req = pb.StepRequest(model=pb.ModelRef(name=model), sessions=parts)
    via = draw(step_via)
    return Case("gap", via, req, frozenset({GAP, INVALID}))


@st.composite
def unknown_model_request(draw: Callable[..., Any]) -> Case:
    rng = np.random.default_rng(draw(seeds))
    text = draw(short_text)
    if rng.random() < 0.5:
        name = text if text not in DIM else text + "-nope"  # (10 kB: test_long_model_name_...)
        version = pick(rng, ["", "1", "2"])
    else:
        name = pick(rng, list(DIM))
        version = text if text not in ("", "1") else text + "2"
    model = name if name in DIM else "tiny"
    sid = pick(rng, VICTIMS[model] + POOL)
    parts = [pb.SessionSteps(session_id=sid, **_valid_steps(model, rng, 2))]
    req = pb.StepRequest(model=pb.ModelRef(name=name, version=version), sessions=parts)
    via = draw(step_via)
    return Case("unknown_model", via, req, frozenset({NOT_FOUND}))


@st.composite
def oversized_request(draw: Callable[..., Any]) -> Case:
    model, rng = draw(models), np.random.default_rng(draw(seeds))
    sid = pick(rng, VICTIMS[model])
    n = MAX_BYTES // 12 + int(rng.integers(10, 3000))
    s = pb.SessionSteps(session_id=sid)
    if model == "tiny":
        s.x = np.zeros((n, 3), "<f4").tobytes()
    else:
        s.tokens.extend([1000] * n * 6)  # varints: beyond the limit in bytes too
    req = pb.StepRequest(model=pb.ModelRef(name=model), sessions=[s])
    return Case("oversized", pick(rng, ["predict", "stream"]), req, frozenset({EXHAUSTED}))


@st.composite
def mutated_bytes(draw: Callable[..., Any]) -> Case | None:
    """A valid request's wire bytes with bytes flipped, cut or inserted; only ones that still
    parse (see test_undecodable_bytes_get_invalid_argument for the rest)."""
    model, rng = draw(models), np.random.default_rng(draw(seeds))
    sid = pick(rng, POOL)
    req = pb.StepRequest(
        model=pb.ModelRef(name=model),
        sessions=[pb.SessionSteps(session_id=sid, **_valid_steps(model, rng, 3))],
    )
    data = bytearray(req.SerializeToString())
    for _ in range(int(rng.integers(1, 5))):
        op, k = pick(rng, ["flip", "cut", "insert"]), int(rng.integers(len(data)))
        if op == "flip":
            data[k] ^= 1 << int(rng.integers(8))
        elif op == "cut":
            del data[k:]
            if not data:
                break
        else:
            data[k:k] = rng.bytes(int(rng.integers(1, 8)))
    parsed = pb.StepRequest()
    try:
        parsed.ParseFromString(bytes(data))
    except Exception:
        return None
    victims = {v for vs in VICTIMS.values() for v in vs}
    if any(s.session_id in victims for s in parsed.sessions):
        return None
    known = parsed.model.name in DIM and parsed.model.version in ("", "1")
    return Case("mutated_bytes", "raw", bytes(data), CLEAN if known else frozenset({NOT_FOUND}))


@st.composite
def forecast_request(draw: Callable[..., Any]) -> Case:
    rng = np.random.default_rng(draw(seeds))
    model = pick(rng, ["tiny", "tinytok", "tinytok", "nope"])
    m = model if model in DIM else "tiny"
    victim = rng.random() < 0.5
    sid = pick(rng, VICTIMS[m] if victim else POOL)
    bad_id = pick(rng, [None, None, None, "", "z" * 300, "a\x00b"])
    horizon = pick(rng, [0, 1, 2, 5, MAX_HORIZON, MAX_HORIZON + 1, 2**32 - 1])
    temperature = pick(rng, [0.0, 0.5, 2.0, -1.0, float("nan"), float("inf")])
    req = pb.ForecastRequest(
        model=pb.ModelRef(name=model),
        session_id=sid if bad_id is None else bad_id,
        horizon=horizon,
        temperature=temperature,
        top_k=pick(rng, [0, 2, 100]),
        seed=int(rng.integers(0, 2**63)),
        commit=not victim and rng.random() < 0.5,
    )
    if rng.random() < 0.5:
        req.prefix.CopyFrom(pb.SessionSteps(**_valid_steps(m, rng, int(rng.integers(1, 4)))))
        if rng.random() < 0.5:
            req.prefix.seq = int(rng.integers(0, 8))
    if model not in DIM:
        allowed = {NOT_FOUND}
    elif (
        bad_id is not None
        or not 1 <= horizon <= MAX_HORIZON
        or temperature < 0
        or not np.isfinite(temperature)
    ):
        allowed = {INVALID}
    else:
        allowed = {OK, NOT_FOUND, GAP, INVALID, EXHAUSTED}
    return Case("forecast", "forecast", req, frozenset(allowed))


@st.composite
def session_call(draw: Callable[..., Any]) -> Case:
    rng = np.random.default_rng(draw(seeds))
    via = pick(rng, ["get", "reset", "end"])
    model = pick(rng, ["tiny", "tinytok", "nope", ""])
    m = model if model in DIM else "tiny"
    ids = POOL + (VICTIMS[m] if via == "get" else [])
    sid = pick(rng, ids) if rng.random() < 0.8 else pick(rng, ["", "q" * 10_000, "\x00"])
    ref = pb.SessionRef(model=pb.ModelRef(name=model), session_id=sid)
    if model not in DIM:
        allowed = {NOT_FOUND}
    elif not sid or len(sid) > 256 or not sid.isprintable():
        allowed = {INVALID}
    else:
        allowed = {OK} if via == "get" else {OK, NOT_FOUND}
    return Case(f"session/{via}", via, ref, frozenset(allowed))


WEIGHTS: list[tuple[int, st.SearchStrategy[Case | None]]] = [
    (30, valid_pool_request()),
    (36, malformed_request()),
    (10, gap_request()),
    (6, unknown_model_request()),
    (1, oversized_request()),  # ~0.1 s each: grpc's own limit
    (5, mutated_bytes()),
    (8, forecast_request()),
    (4, session_call()),
]
any_case: st.SearchStrategy[Case | None] = st.sampled_from(
    [s for w, s in WEIGHTS for _ in range(w)]
).flatmap(lambda s: s)


# -- sending -----------------------------------------------------------------------------------


def _code(fn: Callable[[], Any]) -> tuple[grpc.StatusCode, str, Any]:
    try:
        return OK, "", fn()
    except grpc.RpcError as err:
        return err.code(), err.details() or "", None


def _drain(call: Any, data: bytes) -> list[Any]:
    return list(call(iter([data]), timeout=5))


def _stream_one(stub: Any, req: pb.StepRequest) -> pb.StepResponse:
    (resp,) = list(stub.Stream(iter([req])))
    assert isinstance(resp, pb.StepResponse)
    return resp


def _check_ok(case: Case, resp: Any) -> None:
    """An OK answer to a step request is well-formed: finite outputs, one row per step."""
    if case.via not in ("predict", "stream", "raw"):
        return
    req = (
        case.payload
        if isinstance(case.payload, pb.StepRequest)
        else pb.StepRequest.FromString(case.payload)
    )
    dim = DIM[req.model.name]
    for s, out in zip(req.sessions, resp.sessions, strict=True):
        steps = len(s.x) // 12 if req.model.name == "tiny" else len(s.tokens)
        assert out.session_id == s.session_id and out.steps == steps
        assert out.next_seq == out.seq + steps
        if out.y:
            y = np.frombuffer(out.y, "<f4")
            assert y.size == steps * dim and np.isfinite(y).all()
        else:
            assert req.model.name == "tinytok" and len(out.top_k) == steps


def test_fuzz_10k_requests(server: ServerThread) -> None:
    before = _victim_state(server)
    counts: collections.Counter[str] = collections.Counter()
    codes: collections.Counter[str] = collections.Counter()
    client = Client(server.target, timeout=20)
    stub = client.stub
    raw_predict = client.channel.unary_unary(
        "/lstm_serve.v1.LstmServe/Predict", request_serializer=None, response_deserializer=None
    )

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
        phases=[Phase.explicit, Phase.generate],
        print_blob=False,
    )
    @given(st.lists(any_case, min_size=BATCH, max_size=BATCH))
    def fuzz(batch: list[Case | None]) -> None:
        cases = [c for c in batch if c is not None]
        counts["skipped (unparseable bytes)"] += len(batch) - len(cases)
        futures = {}
        for i, c in enumerate(cases):  # unary calls all in flight at once
            if c.via == "predict":
                futures[i] = stub.Predict.future(c.payload)
            elif c.via == "raw":
                futures[i] = raw_predict.future(c.payload)
            elif c.via == "forecast":
                futures[i] = stub.Forecast.future(c.payload)
            elif c.via in ("get", "reset", "end"):
                method = {
                    "get": stub.GetSession,
                    "reset": stub.ResetSession,
                    "end": stub.EndSession,
                }
                futures[i] = method[c.via].future(c.payload)
        for i, c in enumerate(cases):
            if c.via == "stream":
                code, details, resp = _code(functools.partial(_stream_one, stub, c.payload))
            else:
                code, details, resp = _code(futures[i].result)
            if c.via == "raw" and resp is not None:
                resp = pb.StepResponse.FromString(resp)
            assert code in c.allowed, (
                c.label,
                c.via,
                code,
                details,
                c.payload if c.via != "raw" else "",
            )
            assert "Traceback" not in details and "<class" not in details
            if code is OK:
                _check_ok(c, resp)
            counts[c.via] += 1
            codes[code.name] += 1

    fuzz()
    total = sum(v for k, v in counts.items() if not k.startswith("skipped"))
    after = _victim_state(server)
    assert after == before, "an invalid request changed a victim session's state"
    # The server keeps serving: health, and a valid step on a victim continues it exactly.
    assert health_status(server.target) == "SERVING"
    res = client.predict("tiny", "victim-0", np.ones((1, 3)), seq=VICTIM_STEPS)
    assert res.next_seq == VICTIM_STEPS + 1 and not res.replayed
    client.close()
    print(f"\nfuzz: {total} requests fuzzed; by call {dict(counts)}; by status {dict(codes)}")
    assert total >= 10_000
    assert {OK.name, INVALID.name, NOT_FOUND.name, GAP.name, EXHAUSTED.name} <= set(codes)


@pytest.mark.parametrize("method", ["Predict", "Stream"])
def test_undecodable_bytes_get_invalid_argument(server: ServerThread, method: str) -> None:
    rng = np.random.default_rng(5)
    blobs = [
        b"\xff\xff\xff",
        b"\x0a\x05abc",
        b"\x1a\x02\x0a\xff",
        *(rng.bytes(40) for _ in range(20)),
    ]
    undecodable = []
    for b in blobs:
        try:
            pb.StepRequest.FromString(b)
        except Exception:
            undecodable.append(b)
    assert len(undecodable) >= 5
    with Client(server.target) as c:
        for b in undecodable:
            path = f"/lstm_serve.v1.LstmServe/{method}"
            if method == "Predict":
                call = c.channel.unary_unary(path, None, None)
                code, details, _ = _code(functools.partial(call, b, timeout=5))
            else:
                scall = c.channel.stream_stream(path, None, None)
                code, details, _ = _code(functools.partial(_drain, scall, b))
            assert code is INVALID, (code, details)
            assert "Error" not in details and "<class" not in details


@pytest.mark.parametrize("via", ["predict", "stream", "get_model", "version"])
def test_long_model_name_gets_not_found(server: ServerThread, via: str) -> None:
    long = "m" * 20_000
    ref = pb.ModelRef(name="tiny", version=long) if via == "version" else pb.ModelRef(name=long)
    req = pb.StepRequest(
        model=ref, sessions=[pb.SessionSteps(session_id="s", x=np.ones(3, "<f4").tobytes())]
    )
    with Client(server.target) as c:
        calls: dict[str, Callable[[], Any]] = {
            "predict": lambda: c.stub.Predict(req, timeout=5),
            "version": lambda: c.stub.Predict(req, timeout=5),
            "stream": lambda: list(c.stub.Stream(iter([req]), timeout=5)),
            "get_model": lambda: c.stub.GetModel(ref, timeout=5),
        }
        code, details, _ = _code(calls[via])
    assert code is NOT_FOUND, (code, details[:200])


def test_reset_with_nonzero_seq_is_refused_for_new_sessions_too(server: ServerThread) -> None:
    with Client(server.target) as c:
        code, _, _ = _code(
            lambda: c.predict("tiny", "reset-new", np.ones((1, 3)), seq=5, reset=True)
        )
        exists = c.get_session("tiny", "reset-new").exists
    assert code is INVALID and not exists
