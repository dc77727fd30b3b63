"""(c) The naive server: what a user writes in an afternoon.

The same proto; every request is one ONNX Runtime call, made right in the handler on the event
loop; each session's (h, c) lives in a dict; no cross-request batching, no seq checks, no
metrics. A gateway frame becomes one call over its sessions (all must carry the same number of
steps). ONNX Runtime gets lstm-serve's session options (1 intra-op thread, no spinning), so
the comparison is of the architecture, not of ONNX Runtime tuning.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import numpy as np

from lstm_serve.core.repository import Kind, ModelVersion
from lstm_serve.server.pb import lstm_serve_pb2 as pb
from lstm_serve.server.pb import lstm_serve_pb2_grpc as pb_grpc

Context = grpc.aio.ServicerContext[Any, Any]


class NaiveServicer(pb_grpc.LstmServeServicer):  # type: ignore[misc]
    def __init__(self, mv: ModelVersion, intra_op_threads: int = 1) -> None:
        import onnxruntime as ort

        m = mv.manifest
        from lstm_serve.core.runtime import session_options

        self.sess = ort.InferenceSession(
            str(mv.onnx_path), session_options(intra_op_threads), providers=["CPUExecutionProvider"]
        )
        self.names = m.tensors
        self.token = m.kind is Kind.token
        self.input_dim = m.input_dim
        self.zeros = np.zeros((m.layers, m.hidden_size), np.float32)
        self.state: dict[str, tuple[np.ndarray, np.ndarray, int]] = {}

    def step(self, req: pb.StepRequest, context: Context) -> pb.StepResponse:
        if req.HasField("frame"):
            return self.frame(req)
        sessions = list(req.sessions)
        xs: list[np.ndarray]
        if self.token:
            xs = [np.asarray(s.tokens, np.int64) for s in sessions]
        else:
            xs = [np.frombuffer(s.x, np.float32).reshape(-1, self.input_dim) for s in sessions]
        if not xs or any(len(x) != len(xs[0]) for x in xs):
            raise ValueError("every session of a frame must carry the same number of steps")
        states = [self.state.get(s.session_id) for s in sessions]
        h = np.stack([st[0] if st else self.zeros for st in states], axis=1)
        c = np.stack([st[1] if st else self.zeros for st in states], axis=1)
        n = self.names
        y, hn, cn = self.sess.run(
            [n.y, n.hn, n.cn], {n.x: np.stack(xs), n.h0: h, n.c0: c}
        )  # one call per request, on the event loop
        steps = len(xs[0])
        outs = []
        for i, (s, st) in enumerate(zip(sessions, states, strict=True)):
            seq = st[2] if st else 0
            self.state[s.session_id] = (hn[:, i].copy(), cn[:, i].copy(), seq + steps)
            outs.append(
                pb.SessionOutput(
                    session_id=s.session_id,
                    seq=seq,
                    next_seq=seq + steps,
                    steps=steps,
                    y=y[i].tobytes(),
                )
            )
        return pb.StepResponse(request_id=req.request_id, model=req.model, sessions=outs)

    def frame(self, req: pb.StepRequest) -> pb.StepResponse:
        """A columnar frame: the same, with the sessions as arrays."""
        fr = req.frame
        ids, steps = list(fr.session_ids), fr.steps
        x: np.ndarray
        if self.token:
            x = np.asarray(fr.tokens, np.int64).reshape(len(ids), steps)
        else:
            x = np.frombuffer(fr.x, np.float32).reshape(len(ids), steps, self.input_dim)
        states = [self.state.get(sid) for sid in ids]
        h = np.stack([st[0] if st else self.zeros for st in states], axis=1)
        c = np.stack([st[1] if st else self.zeros for st in states], axis=1)
        n = self.names
        y, hn, cn = self.sess.run([n.y, n.hn, n.cn], {n.x: x, n.h0: h, n.c0: c})
        seqs = [st[2] if st else 0 for st in states]
        for i, sid in enumerate(ids):
            self.state[sid] = (hn[:, i].copy(), cn[:, i].copy(), seqs[i] + steps)
        out = pb.FrameOutput(
            steps=steps, seqs=seqs, next_seqs=[s + steps for s in seqs],
            replayed=[False] * len(ids), y=y.astype(np.float32).tobytes(),
        )  # fmt: skip
        return pb.StepResponse(request_id=req.request_id, model=req.model, frame=out)

    async def Predict(self, request: pb.StepRequest, context: Context) -> pb.StepResponse:
        return self.step(request, context)

    async def Stream(
        self, request_iterator: AsyncIterator[pb.StepRequest], context: Context
    ) -> AsyncIterator[pb.StepResponse]:
        async for req in request_iterator:
            yield self.step(req, context)
