"""Drives lstm-serve with Triton's own Python client, unchanged (run by the tritonclient venv).

    python client.py TARGET INPUTS.npz OUTPUTS.npz

INPUTS holds the steps to send; OUTPUTS gets what came back, and `facts` (JSON) the statuses,
metadata and config seen. The test that runs this compares them with one pass of the oracle.
"""

from __future__ import annotations

import json
import queue
import sys
from typing import Any

import numpy as np
import tritonclient.grpc as tc
from errors import error_of  # tests/triton/errors.py, beside this script
from tritonclient.grpc import service_pb2

REAL, TOKEN = "tiny", "tinytok"


def x_input(x: np.ndarray, name: str = "x") -> tc.InferInput:
    dtype = "INT64" if x.dtype == np.int64 else "FP32"
    i = tc.InferInput(name, list(x.shape), dtype)
    i.set_data_from_numpy(x)
    return i


def metadata(c: tc.InferenceServerClient, facts: dict[str, Any]) -> None:
    facts["live"] = c.is_server_live()
    facts["ready"] = c.is_server_ready()
    facts["model_ready"] = c.is_model_ready(REAL)
    facts["unknown_ready"] = c.is_model_ready("nope")
    facts["server"] = c.get_server_metadata(as_json=True)
    facts["metadata"] = c.get_model_metadata(REAL, as_json=True)
    facts["tok_metadata"] = c.get_model_metadata(TOKEN, as_json=True)
    facts["config"] = c.get_model_config(REAL, as_json=True)["config"]
    facts["unknown_model"] = error_of(lambda: c.get_model_metadata("nope"))
    facts["unknown_infer"] = error_of(
        lambda: c.infer("nope", [x_input(np.zeros((1, 1, 3), np.float32))])
    )


def unary(c: tc.InferenceServerClient, d: dict[str, np.ndarray], out: dict[str, Any]) -> None:
    # Stateless: a batch of 3, run as one batch from zero states.
    r = c.infer(REAL, [x_input(d["batch"])], outputs=[tc.InferRequestedOutput("y")])
    out["batch_y"] = r.as_numpy("y")
    # Two sequences (uint64 and string ids), interleaved, in three chunks each.
    a, b = np.array_split(d["seq_a"], 3), np.array_split(d["seq_b"], 3)
    ys: dict[str, list[np.ndarray]] = {"a": [], "b": []}
    for i in range(3):
        for key, sid, chunks in (("a", 1234567890123, a), ("b", "user-b", b)):
            r = c.infer(
                REAL, [x_input(chunks[i][None])], sequence_id=sid,
                sequence_start=i == 0, sequence_end=i == 2,
            )  # fmt: skip
            ys[key].append(r.as_numpy("y")[0])
    out["unary_a"] = np.concatenate(ys["a"])
    out["unary_b"] = np.concatenate(ys["b"])


def errors(c: tc.InferenceServerClient, d: dict[str, np.ndarray], facts: dict[str, Any]) -> None:
    step = d["seq_a"][:2][None]
    # The sequence ended above: continuing it without START is refused, as Triton refuses it.
    facts["after_end"] = error_of(lambda: c.infer(REAL, [x_input(step)], sequence_id=1234567890123))
    facts["never_started"] = error_of(lambda: c.infer(REAL, [x_input(step)], sequence_id="ghost"))
    facts["bad_shape"] = error_of(lambda: c.infer(REAL, [x_input(np.zeros((1, 2, 5), np.float32))]))
    facts["batch_in_sequence"] = error_of(
        lambda: c.infer(REAL, [x_input(d["batch"])], sequence_id=9, sequence_start=True)
    )


def exactly_once(c: tc.InferenceServerClient, d: dict[str, np.ndarray], out: dict[str, Any],
                 facts: dict[str, Any]) -> None:  # fmt: skip
    x = d["seq_a"]
    first, second = x[:4][None], x[4:][None]
    c.infer(REAL, [x_input(first)], sequence_id="once", sequence_start=True,
            parameters={"lstm_serve_seq": 0})  # fmt: skip
    r1 = c.infer(REAL, [x_input(second)], sequence_id="once", parameters={"lstm_serve_seq": 4})
    r2 = c.infer(REAL, [x_input(second)], sequence_id="once", parameters={"lstm_serve_seq": 4})
    out["once_first"], out["once_retry"] = r1.as_numpy("y"), r2.as_numpy("y")
    p1 = r1.get_response(as_json=True).get("parameters", {})
    p2 = r2.get_response(as_json=True).get("parameters", {})
    facts["once_params"] = [p1, p2]
    facts["once_gap"] = error_of(
        lambda: c.infer(
            REAL, [x_input(second)], sequence_id="once", parameters={"lstm_serve_seq": 99}
        )
    )


def streaming(c: tc.InferenceServerClient, d: dict[str, np.ndarray], out: dict[str, Any],
              facts: dict[str, Any]) -> None:  # fmt: skip
    got: queue.Queue[tuple[Any, Any]] = queue.Queue()
    c.start_stream(callback=lambda result, error: got.put((result, error)))
    a, b = np.array_split(d["seq_a"], 4), np.array_split(d["seq_b"], 4)
    sent = 0
    for i in range(4):
        for sid, chunks in ((77, a), ("stream-b", b)):
            c.async_stream_infer(
                REAL, [x_input(chunks[i][None])], request_id=f"{sid}/{i}", sequence_id=sid,
                sequence_start=i == 0, sequence_end=i == 3,
            )  # fmt: skip
            sent += 1
    # A failing message in the middle of a stream is answered with an error; the stream goes on.
    c.async_stream_infer(REAL, [x_input(a[0][None])], request_id="ghost", sequence_id="ghost")
    c.async_stream_infer(REAL, [x_input(d["batch"])], request_id="after")
    sent += 2
    ys: dict[str, list[np.ndarray]] = {"77": [], "stream-b": []}
    ids, errs = [], []
    for _ in range(sent):
        result, error = got.get(timeout=30)
        if error is not None:
            errs.append(str(error))
            continue
        rid = result.get_response().id
        ids.append(rid)
        if rid == "after":
            out["stream_after"] = result.as_numpy("y")
        else:
            ys[rid.split("/")[0]].append(result.as_numpy("y")[0])
    c.stop_stream()
    out["stream_a"] = np.concatenate(ys["77"])
    out["stream_b"] = np.concatenate(ys["stream-b"])
    facts["stream_ids"], facts["stream_errors"] = ids, errs


def tokens(c: tc.InferenceServerClient, d: dict[str, np.ndarray], out: dict[str, Any]) -> None:
    t = d["tokens"]
    half = len(t) // 2
    ys = []
    for i, part in enumerate((t[:half], t[half:])):
        r = c.infer(
            TOKEN, [x_input(part[None])], sequence_id=5, sequence_start=i == 0,
            sequence_end=i == 1,
        )  # fmt: skip
        ys.append(r.as_numpy("y")[0])
    # Classification alone (Triton's extension): the top 3 tokens of every step.
    r = c.infer(TOKEN, [x_input(t[None])], outputs=[tc.InferRequestedOutput("y", class_count=3)])
    classes = r.as_numpy("y")
    out["tok_y"] = np.concatenate(ys)
    out["tok_top"] = np.array(
        [[int(s.decode().split(":")[1]) for s in row] for row in classes[0]], np.int64
    )


def typed(c: tc.InferenceServerClient, d: dict[str, np.ndarray], out: dict[str, Any]) -> None:
    """Typed contents (no raw bytes), as KServe's other clients send them, through the stub
    that tritonclient generated from the same proto."""
    x = d["batch"]
    req = service_pb2.ModelInferRequest(model_name=REAL)
    t = req.inputs.add(name="x", datatype="FP32", shape=list(x.shape))
    t.contents.fp32_contents.extend(x.ravel().tolist())
    resp = c._client_stub.ModelInfer(req)
    o = resp.outputs[0]
    out["typed_y"] = np.array(o.contents.fp32_contents, np.float32).reshape(list(o.shape))


def main() -> int:
    target, src, dst = sys.argv[1:4]
    d = dict(np.load(src))
    out: dict[str, Any] = {}
    facts: dict[str, Any] = {}
    with tc.InferenceServerClient(target) as c:
        metadata(c, facts)
        unary(c, d, out)
        errors(c, d, facts)
        exactly_once(c, d, out, facts)
        streaming(c, d, out, facts)
        tokens(c, d, out)
        typed(c, d, out)
    np.savez(dst, facts=np.array(json.dumps(facts)), **out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
