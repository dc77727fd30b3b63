"""Drives lstm-serve's repository calls with Triton's own Python client (run by the tritonclient
venv), as an operator's script would:

    python repository.py TARGET STEP

STEP index: print the repository index as JSON. STEP load:MODEL / unload:MODEL: load or
unload every version of MODEL, then print the index. STEP stats, stats:MODEL or
stats:MODEL:VERSION: print {"stats": ...}, the statistics extension's answer
(`get_inference_statistics`) as tritonclient gives it in JSON. An error prints {"error": status}.
"""

from __future__ import annotations

import json
import sys

import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException


def main() -> None:
    target, step = sys.argv[1], sys.argv[2]
    c = tc.InferenceServerClient(target)
    try:
        if step == "stats" or step.startswith("stats:"):
            _, name, version = [*step.split(":", 2), "", ""][:3]
            stats = c.get_inference_statistics(name, version, as_json=True)
            print(json.dumps({"stats": stats}))
            return
        if step.startswith("load:"):
            c.load_model(step.split(":", 1)[1])
        elif step.startswith("unload:"):
            c.unload_model(step.split(":", 1)[1])
    except InferenceServerException as exc:
        print(json.dumps({"error": exc.status(), "message": exc.message()}))
        return
    index = c.get_model_repository_index(as_json=True)
    ready = {m["name"]: c.is_model_ready(m["name"]) for m in index.get("models", [])}
    print(json.dumps({"index": index.get("models", []), "ready": ready}))


if __name__ == "__main__":
    main()
