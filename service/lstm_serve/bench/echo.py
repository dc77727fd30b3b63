"""(b) The transport ceiling: the LstmServe proto answered without inference.

Stream and Predict decode the request and answer with a response of the right shape (one
SessionOutput per session, steps x output_dim zero floats), so the bytes on the wire and the
protobuf work match lstm-serve's; there is no state, no batching and no model.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc

from lstm_serve.server.pb import lstm_serve_pb2 as pb
from lstm_serve.server.pb import lstm_serve_pb2_grpc as pb_grpc

Context = grpc.aio.ServicerContext[Any, Any]


class EchoServicer(pb_grpc.LstmServeServicer):  # type: ignore[misc]
    def __init__(self, input_dim: int, output_dim: int) -> None:
        self.step_bytes = 4 * input_dim
        self.out_bytes = 4 * output_dim
        self._zeros: dict[int, bytes] = {}

    def _y(self, steps: int) -> bytes:
        y = self._zeros.get(steps)
        if y is None:
            y = self._zeros[steps] = bytes(steps * self.out_bytes)
        return y

    def answer(self, req: pb.StepRequest) -> pb.StepResponse:
        if req.HasField("frame"):  # a columnar frame gets a columnar answer
            fr = req.frame
            n, steps = len(fr.session_ids), fr.steps
            out = pb.FrameOutput(
                steps=steps, seqs=[0] * n, next_seqs=[steps] * n, replayed=[False] * n,
                y=self._y(n * steps),
            )  # fmt: skip
            return pb.StepResponse(request_id=req.request_id, model=req.model, frame=out)
        outs = []
        for s in req.sessions:
            steps = len(s.x) // self.step_bytes if s.x else len(s.tokens)
            outs.append(
                pb.SessionOutput(
                    session_id=s.session_id,
                    seq=s.seq,
                    next_seq=s.seq + steps,
                    steps=steps,
                    y=self._y(steps),
                )
            )
        return pb.StepResponse(request_id=req.request_id, model=req.model, sessions=outs)

    async def Predict(self, request: pb.StepRequest, context: Context) -> pb.StepResponse:
        return self.answer(request)

    async def Stream(
        self, request_iterator: AsyncIterator[pb.StepRequest], context: Context
    ) -> AsyncIterator[pb.StepResponse]:
        async for req in request_iterator:
            yield self.answer(req)
