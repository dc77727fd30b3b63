"""Drives lstm-serve's HTTP/REST port with Triton's own HTTP client (run by the tritonclient venv).

    python http_client.py HOST:PORT INPUTS.npz OUTPUTS.npz

INPUTS holds `seq` (one sequence, [steps, 3]) and `batch` ([batch, steps, 3]); OUTPUTS gets what
came back, and `facts` (JSON) the statuses and metadata seen.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import numpy as np
import tritonclient.http as th
from errors import error_of  # tests/triton/errors.py, beside this script

REAL = "tiny"


def x_input(x: np.ndarray, binary: bool) -> th.InferInput:
    i = th.InferInput("x", list(x.shape), "FP32")
    i.set_data_from_numpy(x, binary_data=binary)
    return i


def main() -> int:
    target, src, dst = sys.argv[1:4]
    d = dict(np.load(src))
    out: dict[str, Any] = {}
    facts: dict[str, Any] = {}
    c = th.InferenceServerClient(target)
    try:
        facts["live"] = c.is_server_live()
        facts["ready"] = c.is_server_ready()
        facts["model_ready"] = c.is_model_ready(REAL)
        facts["server"] = c.get_server_metadata()
        facts["metadata"] = c.get_model_metadata(REAL)
        facts["unknown"] = error_of(lambda: c.get_model_metadata("nope"))
        step = d["seq"][:2][None]
        facts["never_started"] = error_of(
            lambda: c.infer(REAL, [x_input(step, True)], sequence_id="ghost")
        )
        # Stateless batches, JSON both ways and binary both ways.
        for binary in (False, True):
            r = c.infer(
                REAL, [x_input(d["batch"], binary)],
                outputs=[th.InferRequestedOutput("y", binary_data=binary)],
            )  # fmt: skip
            out["batch_binary" if binary else "batch_json"] = r.as_numpy("y")
        # One sequence in three requests (START, continue, END), mixing JSON and binary.
        ys = []
        for i, part in enumerate(np.array_split(d["seq"], 3)):
            r = c.infer(
                REAL, [x_input(part[None], i % 2 == 0)], sequence_id=31337,
                sequence_start=i == 0, sequence_end=i == 2,
            )  # fmt: skip
            ys.append(r.as_numpy("y")[0])
        out["seq"] = np.concatenate(ys)
    finally:
        c.close()
    np.savez(dst, facts=np.array(json.dumps(facts)), **out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
