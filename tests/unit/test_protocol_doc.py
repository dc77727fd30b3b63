"""docs/protocol.md's byte-level example is what the generated code really encodes."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from lstm_serve.server.pb import lstm_serve_pb2 as pb

DOC = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"


def _hex_only(title: str) -> bytes:
    text = DOC.read_text()
    block = text[text.index(title) :].split("```")[0].splitlines()[1:]
    out = []
    for line in block:
        # The hex is what comes before the first run of 3+ spaces followed by a word.
        m = re.match(r"^\s*((?:[0-9a-f]{2} )*[0-9a-f]{2})", line)
        if m:
            out.append(m.group(1))
    return bytes.fromhex(" ".join(out))


def test_request_bytes_match_the_doc() -> None:
    req = pb.StepRequest(
        model=pb.ModelRef(name="forecaster"),
        request_id="r1",
        sessions=[
            pb.SessionSteps(session_id="s1", seq=0, x=np.array([12.1, 8.9], "<f4").tobytes())
        ],
    )
    assert _hex_only("StepRequest (36 bytes)") == req.SerializeToString()
    assert len(req.SerializeToString()) == 36


def test_response_bytes_match_the_doc() -> None:
    resp = pb.StepResponse.FromString(_hex_only("StepResponse (41 bytes)"))
    assert resp.request_id == "r1"
    assert (resp.model.name, resp.model.version) == ("forecaster", "1")
    s = resp.sessions[0]
    assert (s.session_id, s.seq, s.next_seq, s.steps) == ("s1", 0, 1, 1)
    np.testing.assert_array_equal(np.frombuffer(s.y, "<f4"), [12.0, 8.75])
    assert len(resp.SerializeToString()) == 41
