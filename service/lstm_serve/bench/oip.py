"""One-stream ping-pong through the Open Inference Protocol vs lstm_serve.v1, on one server.

    python -m lstm_serve.bench.oip [--rounds 3000] [--model forecaster]

One lstm-serve process (bench/servers.py), one client process holding one `ModelStreamInfer`
stream (a Triton sequence) and one `lstm_serve.v1.Stream` (a session), both sending one step
per message and waiting for its answer. The two alternate in blocks of 100 messages, so both
see the same machine; prints p50/p95 of each and their ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from lstm_serve.bench.common import latency_summary, make_workdir, prepare_model
from lstm_serve.bench.servers import ServerProcess
from lstm_serve.server.pb import grpc_service_pb2 as ipb
from lstm_serve.server.pb import grpc_service_pb2_grpc as ipb_grpc
from lstm_serve.server.pb import lstm_serve_pb2 as pb
from lstm_serve.server.pb import lstm_serve_pb2_grpc as pb_grpc

BLOCK = 100


async def _measure(target: str, model: str, dim: int, rounds: int, warmup: int) -> dict[str, Any]:
    x = np.random.default_rng(0).normal(size=(1, dim)).astype("<f4").tobytes()
    async with grpc.aio.insecure_channel(target) as ch:
        v1 = pb_grpc.LstmServeStub(ch).Stream()
        oip = ipb_grpc.GRPCInferenceServiceStub(ch).ModelStreamInfer()

        def v1_req(i: int) -> pb.StepRequest:
            return pb.StepRequest(
                model=pb.ModelRef(name=model),
                sessions=[pb.SessionSteps(session_id="bench-v1", x=x, reset=i == 0)],
            )

        def oip_req(i: int) -> ipb.ModelInferRequest:
            req = ipb.ModelInferRequest(model_name=model, id=str(i))
            req.inputs.add(name="x", datatype="FP32", shape=[1, 1, dim])
            req.raw_input_contents.append(x)
            req.parameters["sequence_id"].string_param = "bench-oip"
            req.parameters["sequence_start"].bool_param = i == 0
            return req

        async def ping(call: Any, req: Any) -> float:
            t0 = time.perf_counter()
            await call.write(req)
            resp = await call.read()
            took = time.perf_counter() - t0
            if isinstance(resp, ipb.ModelStreamInferResponse) and resp.error_message:
                raise RuntimeError(resp.error_message)
            return took

        samples: dict[str, list[float]] = {"oip": [], "v1": []}
        for start in range(0, warmup + rounds, BLOCK):
            for name, call, make in (("oip", oip, oip_req), ("v1", v1, v1_req)):
                for i in range(start, min(start + BLOCK, warmup + rounds)):
                    took = await ping(call, make(i))
                    if i >= warmup:
                        samples[name].append(took)
        await v1.done_writing()
        await oip.done_writing()
    out: dict[str, Any] = {k: latency_summary(v) for k, v in samples.items()}
    out["ratio_p50"] = out["oip"]["p50"] / out["v1"]["p50"]
    out["rounds"] = rounds
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m lstm_serve.bench.oip",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--repository", default="models")
    p.add_argument("--model", default="forecaster")
    p.add_argument("--rounds", type=int, default=3000, help="measured messages per protocol")
    p.add_argument("--warmup", type=int, default=300)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    work = make_workdir()
    model = prepare_model(Path(args.repository), args.model, "", work)
    with ServerProcess("lstm-serve", model, work / "server.log") as srv:
        res = asyncio.run(
            _measure(srv.target, model.name, model.input_dim, args.rounds, args.warmup)
        )
    for k in ("oip", "v1"):
        s = res[k]
        name = "inference.ModelStreamInfer" if k == "oip" else "lstm_serve.v1.Stream   "
        print(f"{name}  p50 {s['p50']:.3f} ms  p95 {s['p95']:.3f} ms  p99 {s['p99']:.3f} ms")
    print(f"p50 ratio ModelStreamInfer / v1.Stream: {res['ratio_p50']:.2f}")
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
