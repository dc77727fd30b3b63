"""The LSTM equations in plain NumPy: the numerical oracle the tests hold ONNX Runtime and PyTorch to.

Nothing here calls PyTorch's or ONNX Runtime's LSTM code. For every step t, with h_prev and C_prev
the previous hidden and cell state and [h_prev, x] their concatenation with the input x_t:

    forget gate          f  = sigma(W_f [h_prev, x] + b_f)
    input gate           i  = sigma(W_i [h_prev, x] + b_i)
    candidate            C~ = tanh(W_C [h_prev, x] + b_C)
    new cell state       C  = f * C_prev + i * C~
    output gate          o  = sigma(W_o [h_prev, x] + b_o)
    new hidden state     h  = o * tanh(C)

Weights come either from an exported ONNX graph (`ReferenceModel.from_onnx`, which reads the
initializers with the `onnx` package) or from a PyTorch module's parameters
(`ReferenceModel.from_torch`, which reads tensors only). Mind the gate orders when reading them:
ONNX's LSTM operator stacks its gates as (i, o, f, c); PyTorch stacks them as (i, f, g, o).

Arithmetic is float64 throughout; `ReferenceModel.run` returns float32, like the graph.
The serving code never imports this module.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    import onnx

F64 = npt.NDArray[np.float64]
F32 = npt.NDArray[np.float32]

#: Gate order of ONNX's LSTM operator (W, R and both halves of B are stacked in this order).
ONNX_GATES = ("i", "o", "f", "c")
#: Gate order of torch.nn.LSTM (weight_ih, weight_hh, bias_ih, bias_hh); g is the candidate.
TORCH_GATES = ("i", "f", "g", "o")

DEFAULT_NAMES: Mapping[str, str] = {
    "x": "x",
    "h0": "h0",
    "c0": "c0",
    "y": "y",
    "hn": "hn",
    "cn": "cn",
}


class GraphError(ValueError):
    """The ONNX graph does not have the shape this project's exporter produces."""


def sigmoid(z: F64) -> F64:
    """sigma(z) = 1 / (1 + exp(-z)), written as 0.5 * (1 + tanh(z / 2)) so it never overflows."""
    out: F64 = 0.5 * (1.0 + np.tanh(0.5 * z))
    return out


def _f64(a: Any) -> F64:
    out: F64 = np.asarray(a, dtype=np.float64)
    return out


@dataclass(frozen=True, eq=False)
class LSTMLayerWeights:
    """One LSTM layer. Each W_* is [hidden, hidden + input] and acts on [h_prev, x]; b_* is [hidden]."""

    W_f: F64
    W_i: F64
    W_C: F64
    W_o: F64
    b_f: F64
    b_i: F64
    b_C: F64
    b_o: F64

    def __post_init__(self) -> None:
        for name in ("W_f", "W_i", "W_C", "W_o", "b_f", "b_i", "b_C", "b_o"):
            object.__setattr__(self, name, _f64(getattr(self, name)))
        hidden = self.b_f.shape[0] if self.b_f.ndim == 1 else -1
        for gate in ("f", "i", "C", "o"):
            w: F64 = getattr(self, f"W_{gate}")
            b: F64 = getattr(self, f"b_{gate}")
            if w.ndim != 2 or w.shape[0] != hidden or w.shape[1] <= hidden:
                raise ValueError(
                    f"W_{gate} has shape {w.shape}; expected [hidden, hidden + input] "
                    f"with hidden {hidden}"
                )
            if w.shape != self.W_f.shape:
                raise ValueError(f"W_{gate} has shape {w.shape}, W_f has {self.W_f.shape}")
            if b.shape != (hidden,):
                raise ValueError(f"b_{gate} has shape {b.shape}; expected ({hidden},)")

    @property
    def hidden_size(self) -> int:
        return int(self.W_f.shape[0])

    @property
    def input_size(self) -> int:
        return int(self.W_f.shape[1] - self.W_f.shape[0])

    @classmethod
    def from_split(
        cls,
        w_x: Mapping[str, F64],
        w_h: Mapping[str, F64],
        b: Mapping[str, F64],
    ) -> LSTMLayerWeights:
        """From per-gate input weights [H, I], recurrent weights [H, H] and summed biases [H].

        Keys are the gate letters f, i, C, o.
        """
        return cls(
            W_f=np.concatenate([w_h["f"], w_x["f"]], axis=1),
            W_i=np.concatenate([w_h["i"], w_x["i"]], axis=1),
            W_C=np.concatenate([w_h["C"], w_x["C"]], axis=1),
            W_o=np.concatenate([w_h["o"], w_x["o"]], axis=1),
            b_f=b["f"],
            b_i=b["i"],
            b_C=b["C"],
            b_o=b["o"],
        )

    def input_weights(self, gate: str) -> F64:
        """The columns of W_gate that act on x ([H, I])."""
        w: F64 = getattr(self, f"W_{gate}")[:, self.hidden_size :]
        return w

    def recurrent_weights(self, gate: str) -> F64:
        """The columns of W_gate that act on h_prev ([H, H])."""
        w: F64 = getattr(self, f"W_{gate}")[:, : self.hidden_size]
        return w


def lstm_step(x: F64, h_prev: F64, C_prev: F64, w: LSTMLayerWeights) -> tuple[F64, F64]:
    """One time step for a batch: x [B, I], h_prev and C_prev [B, H] -> (h, C), each [B, H]."""
    hx = np.concatenate([h_prev, x], axis=1)  # [h_prev, x], [B, H + I]
    f = sigmoid(hx @ w.W_f.T + w.b_f)  # forget gate
    i = sigmoid(hx @ w.W_i.T + w.b_i)  # input gate
    C_tilde = np.tanh(hx @ w.W_C.T + w.b_C)  # candidate cell state
    C = f * C_prev + i * C_tilde  # new cell state
    o = sigmoid(hx @ w.W_o.T + w.b_o)  # output gate
    h = o * np.tanh(C)  # new hidden state
    return h, C


def lstm_layer(
    x: npt.ArrayLike, h0: npt.ArrayLike, c0: npt.ArrayLike, weights: LSTMLayerWeights
) -> tuple[F64, F64, F64]:
    """Run one layer over a sequence: x [T, B, I], h0 and c0 [B, H] -> (y [T, B, H], hn, cn)."""
    xs, h, c = _f64(x), _f64(h0), _f64(c0)
    H, n_in = weights.hidden_size, weights.input_size
    if xs.ndim != 3 or xs.shape[2] != n_in:
        raise ValueError(f"x has shape {xs.shape}; expected [time, batch, {n_in}]")
    B = xs.shape[1]
    for name, s in (("h0", h), ("c0", c)):
        if s.shape != (B, H):
            raise ValueError(f"{name} has shape {s.shape}; expected ({B}, {H})")
    y = np.empty((xs.shape[0], B, H), dtype=np.float64)
    for t in range(xs.shape[0]):
        h, c = lstm_step(xs[t], h, c, weights)
        y[t] = h
    return y, h, c


def softmax(z: F64) -> F64:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    out: F64 = e / e.sum(axis=-1, keepdims=True)
    return out


@dataclass(frozen=True, eq=False)
class ReferenceModel:
    """A whole exported model: [embedding | normalisation] -> LSTM layers -> head -> output.

    real:  x [B, T, F] -> (x - in_mean) / in_std -> LSTM... -> y = h head_W^T + head_b
           -> y * out_std + out_mean
    token: ids [B, T] -> embedding[ids] -> LSTM... -> logits = h head_W^T + head_b
           -> softmax (when `softmax`)
    """

    kind: Literal["real", "token"]
    layers: tuple[LSTMLayerWeights, ...]
    head_W: F64  # [output, hidden]
    head_b: F64  # [output]
    embedding: F64 | None = None  # token models: [vocab, embed]
    in_mean: F64 | None = None
    in_std: F64 | None = None
    out_mean: F64 | None = None
    out_std: F64 | None = None
    # Residual models: the head predicts the change, y_normalised = z + head * residual_scale.
    residual_scale: F64 | None = None
    softmax: bool = False
    names: Mapping[str, str] = field(default_factory=lambda: dict(DEFAULT_NAMES))

    def __post_init__(self) -> None:
        if not self.layers:
            raise ValueError("a model needs at least one LSTM layer")
        for k in range(1, len(self.layers)):
            prev, cur = self.layers[k - 1], self.layers[k]
            if cur.input_size != prev.hidden_size or cur.hidden_size != prev.hidden_size:
                raise ValueError(
                    f"layer {k} is [{cur.hidden_size}, {cur.hidden_size}+{cur.input_size}] "
                    f"but layer {k - 1} has hidden size {prev.hidden_size}"
                )
        for name in (
            "head_W",
            "head_b",
            "embedding",
            "in_mean",
            "in_std",
            "out_mean",
            "out_std",
            "residual_scale",
        ):
            v = getattr(self, name)
            if v is not None:
                object.__setattr__(self, name, _f64(v))
        if self.head_W.shape != (self.output_dim, self.hidden_size):
            raise ValueError(
                f"head_W has shape {self.head_W.shape}; expected "
                f"({self.output_dim}, {self.hidden_size})"
            )
        if self.head_b.shape != (self.output_dim,):
            raise ValueError(f"head_b has shape {self.head_b.shape}; expected ({self.output_dim},)")
        if self.kind == "token":
            if self.embedding is None or self.embedding.ndim != 2:
                raise ValueError("token models need a 2-D embedding [vocab, embed]")
            if self.embedding.shape[1] != self.layers[0].input_size:
                raise ValueError(
                    f"embedding width {self.embedding.shape[1]} != LSTM input size "
                    f"{self.layers[0].input_size}"
                )
            if any(getattr(self, n) is not None for n in ("in_mean", "in_std")):
                raise ValueError("token models have no input normalisation")
        elif self.embedding is not None:
            raise ValueError("only token models have an embedding")
        for name, size in (
            ("in_mean", self.layers[0].input_size),
            ("in_std", self.layers[0].input_size),
            ("out_mean", self.output_dim),
            ("out_std", self.output_dim),
        ):
            v = getattr(self, name)
            if v is not None and v.shape not in ((size,), (1,), ()):
                raise ValueError(f"{name} has shape {v.shape}; expected ({size},)")

    # -- shape ---------------------------------------------------------------------------------

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def hidden_size(self) -> int:
        return self.layers[0].hidden_size

    @property
    def input_dim(self) -> int:
        """Features per step (1 for token models, whose input is one id per step)."""
        return 1 if self.kind == "token" else self.layers[0].input_size

    @property
    def output_dim(self) -> int:
        return int(self.head_W.shape[0])

    @property
    def vocab_size(self) -> int:
        return 0 if self.embedding is None else int(self.embedding.shape[0])

    def zero_state(self, batch: int) -> tuple[F32, F32]:
        shape = (self.num_layers, batch, self.hidden_size)
        return np.zeros(shape, np.float32), np.zeros(shape, np.float32)

    # -- forward -------------------------------------------------------------------------------

    def run(self, x: npt.ArrayLike, h0: npt.ArrayLike, c0: npt.ArrayLike) -> tuple[F32, F32, F32]:
        """Same contract as the graph: x [B, T, F] (token ids [B, T]), h0/c0 [L, B, H]
        -> (y [B, T, out], hn [L, B, H], cn [L, B, H]), float32."""
        y, hn, cn = self.run_f64(x, h0, c0)
        return y.astype(np.float32), hn.astype(np.float32), cn.astype(np.float32)

    def run_f64(
        self, x: npt.ArrayLike, h0: npt.ArrayLike, c0: npt.ArrayLike
    ) -> tuple[F64, F64, F64]:
        """`run` without the final rounding to float32: carrying this (hn, cn) into the next
        call continues a sequence exactly, however large the outputs are."""
        xa = np.asarray(x)
        h0a, c0a = _f64(h0), _f64(c0)
        if self.kind == "token":
            if xa.ndim != 2 or not np.issubdtype(xa.dtype, np.integer):
                raise ValueError(
                    f"token ids must be integer [batch, time]; got {xa.dtype} {xa.shape}"
                )
            assert self.embedding is not None
            if xa.size and (xa.min() < 0 or xa.max() >= self.vocab_size):
                raise ValueError(f"token ids must be in [0, {self.vocab_size})")
            z = self.embedding[xa]
        else:
            if xa.ndim != 3 or xa.shape[2] != self.input_dim:
                raise ValueError(
                    f"x has shape {xa.shape}; expected [batch, time, {self.input_dim}]"
                )
            z = _f64(xa)
            if self.in_mean is not None:
                z = z - self.in_mean
            if self.in_std is not None:
                z = z / self.in_std
        B = xa.shape[0]
        want = (self.num_layers, B, self.hidden_size)
        for name, s in (("h0", h0a), ("c0", c0a)):
            if s.shape != want:
                raise ValueError(f"{name} has shape {s.shape}; expected {want}")
        seq = z.transpose(1, 0, 2)  # time-major [T, B, I]
        hn = np.empty(want, np.float64)
        cn = np.empty(want, np.float64)
        for k, layer in enumerate(self.layers):
            seq, hn[k], cn[k] = lstm_layer(seq, h0a[k], c0a[k], layer)
        y = seq.transpose(1, 0, 2) @ self.head_W.T + self.head_b
        if self.residual_scale is not None:
            y = z + y * self.residual_scale
        if self.out_std is not None:
            y = y * self.out_std
        if self.out_mean is not None:
            y = y + self.out_mean
        if self.softmax:
            y = softmax(y)
        return y, hn, cn

    # -- from PyTorch --------------------------------------------------------------------------

    @classmethod
    def from_torch(cls, module: Any) -> ReferenceModel:
        """Read the parameters of a lstm_serve.training.model module (RealLSTM, TokenLSTM or
        WithSoftmax). Only tensors are read; none of torch's LSTM code runs."""
        softmax_out = False
        m = module
        if hasattr(m, "inner"):  # WithSoftmax
            m, softmax_out = m.inner, True
        lstm = m.lstm
        if not lstm.batch_first or lstm.bidirectional or getattr(lstm, "proj_size", 0):
            raise ValueError("only unidirectional, batch_first LSTMs without projection")

        def arr(t: Any) -> F64:
            return _f64(t.detach().cpu().numpy())

        H = int(lstm.hidden_size)
        layers = []
        for k in range(int(lstm.num_layers)):
            w_ih = arr(getattr(lstm, f"weight_ih_l{k}"))  # [4H, I], gates i, f, g, o
            w_hh = arr(getattr(lstm, f"weight_hh_l{k}"))  # [4H, H]
            if lstm.bias:
                b = arr(getattr(lstm, f"bias_ih_l{k}")) + arr(getattr(lstm, f"bias_hh_l{k}"))
            else:
                b = np.zeros(4 * H)
            layers.append(_layer_from_stacked(w_ih, w_hh, b, H, TORCH_GATES))
        embedding = arr(m.embed.weight) if hasattr(m, "embed") else None
        kind: Literal["real", "token"] = "token" if embedding is not None else "real"

        def buf(name: str) -> F64 | None:
            t = getattr(m, name, None)
            return None if t is None else arr(t)

        return cls(
            kind=kind,
            layers=tuple(layers),
            head_W=arr(m.head.weight),
            head_b=arr(m.head.bias) if m.head.bias is not None else np.zeros(m.head.out_features),
            embedding=embedding,
            in_mean=buf("in_mean"),
            in_std=buf("in_std"),
            out_mean=buf("out_mean"),
            out_std=buf("out_std"),
            residual_scale=buf("residual_scale") if getattr(m, "residual", False) else None,
            softmax=softmax_out,
        )

    # -- from ONNX -----------------------------------------------------------------------------

    @classmethod
    def from_onnx(
        cls, model: str | Path | onnx.ModelProto, *, names: Mapping[str, str] | None = None
    ) -> ReferenceModel:
        """Read the weights of a graph made by this project's exporter.

        `names` maps x, h0, c0, y, hn, cn to the graph's tensor names (the manifest's `tensors`).
        Raises GraphError when the graph is not the chain the exporter produces:
        [Gather | Sub, Div] -> Transpose -> (LSTM -> Squeeze)+ -> Transpose -> MatMul -> Add
        -> [Mul, Add | Softmax], with h0/c0 sliced per layer and hn/cn concatenated.
        """
        import onnx as onnx_mod

        proto = model if isinstance(model, onnx_mod.ModelProto) else onnx_mod.load(str(model))
        return _GraphReader(proto, {**DEFAULT_NAMES, **(names or {})}).read()


def _layer_from_stacked(
    w_x: F64, w_h: F64, b: F64, hidden: int, order: Sequence[str]
) -> LSTMLayerWeights:
    """Split [4H, I], [4H, H] and [4H] stacks whose gate blocks come in `order`.

    Letters: i input, f forget, o output, and c (ONNX) or g (PyTorch) for the candidate.
    """
    H = hidden
    if w_x.ndim != 2 or w_x.shape[0] != 4 * H:
        raise ValueError(f"input weights have shape {w_x.shape}; expected [{4 * H}, input]")
    if w_h.shape != (4 * H, H):
        raise ValueError(f"recurrent weights have shape {w_h.shape}; expected ({4 * H}, {H})")
    if b.shape != (4 * H,):
        raise ValueError(f"bias has shape {b.shape}; expected ({4 * H},)")
    ours = {"i": "i", "f": "f", "o": "o", "c": "C", "g": "C"}
    blocks = {ours[g]: slice(n * H, (n + 1) * H) for n, g in enumerate(order)}
    if sorted(blocks) != ["C", "f", "i", "o"]:
        raise ValueError(f"gate order {order} does not name each gate once")
    return LSTMLayerWeights.from_split(
        {g: w_x[s] for g, s in blocks.items()},
        {g: w_h[s] for g, s in blocks.items()},
        {g: b[s] for g, s in blocks.items()},
    )


class _GraphReader:
    """Walks the chain from input x to output y, one consumer at a time, and checks the rest."""

    def __init__(self, proto: onnx.ModelProto, names: Mapping[str, str]) -> None:
        from onnx import TensorProto, helper, numpy_helper

        self.names = dict(names)
        g = proto.graph
        self.consts: dict[str, npt.NDArray[Any]] = {
            t.name: numpy_helper.to_array(t) for t in g.initializer
        }
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in g.node:
            for out in node.output:
                if out:
                    self.producer[out] = node
            for inp in node.input:
                if inp:
                    self.consumers.setdefault(inp, []).append(node)
            if node.op_type == "Constant":
                if len(node.attribute) != 1:
                    raise GraphError(
                        f"Constant node {node.name!r} has {len(node.attribute)} values"
                    )
                value = helper.get_attribute_value(node.attribute[0])
                if isinstance(value, TensorProto):
                    self.consts[node.output[0]] = numpy_helper.to_array(value)
                else:
                    self.consts[node.output[0]] = np.asarray(value)
            elif node.op_type == "Identity" and node.input[0] in self.consts:
                # the exporter shares equal initializers through Identity nodes
                self.consts[node.output[0]] = self.consts[node.input[0]]
        self.inputs = {i.name: i for i in g.input if i.name not in self.consts}
        self.outputs = {o.name for o in g.output}
        self.used: set[int] = set()  # id() of every node accounted for

    # -- small helpers -------------------------------------------------------------------------

    def fail(self, node: onnx.NodeProto | None, msg: str) -> GraphError:
        where = f"{node.op_type} node {node.name!r}: " if node is not None else ""
        return GraphError(f"unexpected graph: {where}{msg}")

    def const(self, node: onnx.NodeProto, name: str, what: str) -> npt.NDArray[Any]:
        if name not in self.consts:
            raise self.fail(node, f"{what} {name!r} is not a constant")
        producer = self.producer.get(name)
        if producer is not None:
            self.used.add(id(producer))
        return self.consts[name]

    def attrs(self, node: onnx.NodeProto) -> dict[str, Any]:
        from onnx import helper

        return {a.name: helper.get_attribute_value(a) for a in node.attribute}

    def other_operand(self, node: onnx.NodeProto, cur: str, what: str) -> F64:
        if len(node.input) != 2 or cur not in node.input:
            raise self.fail(node, f"expected a binary op on {cur!r}")
        other = node.input[1] if node.input[0] == cur else node.input[0]
        return _f64(self.const(node, other, what))

    def skip_identity(self, name: str) -> str:
        """Follow Identity nodes backwards from `name`."""
        node = self.producer.get(name)
        while node is not None and node.op_type == "Identity":
            self.used.add(id(node))
            name = node.input[0]
            node = self.producer.get(name)
        return name

    # -- the walk ------------------------------------------------------------------------------

    def read(self) -> ReferenceModel:
        n = self.names
        for role in ("x", "h0", "c0"):
            if n[role] not in self.inputs:
                raise self.fail(
                    None, f"no graph input {n[role]!r} ({role}); has {sorted(self.inputs)}"
                )
        for role in ("y", "hn", "cn"):
            if n[role] not in self.outputs:
                raise self.fail(
                    None, f"no graph output {n[role]!r} ({role}); has {sorted(self.outputs)}"
                )
        extra = set(self.inputs) - {n["x"], n["h0"], n["c0"]}
        if extra:
            raise self.fail(None, f"unexpected graph inputs {sorted(extra)}")

        cur = n["x"]
        time_major = False
        stage = "input"  # input -> lstm -> head -> bias -> scaled -> done
        embedding: F64 | None = None
        in_mean: F64 | None = None
        in_std: F64 | None = None
        out_mean: F64 | None = None
        out_std: F64 | None = None
        residual_scale: F64 | None = None
        z_name: str | None = None  # the normalised input, which a residual model adds back
        residual_add: onnx.NodeProto | None = None
        head_W: F64 | None = None
        head_b: F64 | None = None
        use_softmax = False
        lstms: list[onnx.NodeProto] = []
        layers: list[LSTMLayerWeights] = []
        squeeze_pending = False

        while cur != n["y"]:
            users = self.consumers.get(cur, [])
            if cur == z_name and len(users) == 2 and residual_add is None:
                # z feeds the LSTM path and, later, the residual Add.
                adds = [u for u in users if u.op_type == "Add"]
                if len(adds) != 1:
                    raise self.fail(None, f"normalised input {cur!r} feeds {len(users)} nodes")
                residual_add = adds[0]
                users = [u for u in users if u is not residual_add]
            if len(users) != 1:
                raise self.fail(
                    None, f"tensor {cur!r} should feed exactly one node, feeds {len(users)}"
                )
            node = users[0]
            if id(node) in self.used:
                raise self.fail(node, "the graph loops")
            self.used.add(id(node))
            op = node.op_type
            a = self.attrs(node)
            if squeeze_pending and op != "Squeeze":
                raise self.fail(node, "expected Squeeze(axis 1) after LSTM")
            if op in ("Identity", "Dropout"):  # Dropout is the identity at inference
                pass
            elif op == "Gather":
                if stage != "input" or embedding is not None or in_mean is not None:
                    raise self.fail(node, "an embedding lookup must come first")
                if node.input[1] != cur or a.get("axis", 0) != 0:
                    raise self.fail(node, "expected Gather(table, ids) on axis 0")
                embedding = _f64(self.const(node, node.input[0], "embedding table"))
                if embedding.ndim != 2:
                    raise self.fail(node, f"embedding table has shape {embedding.shape}")
            elif op == "Sub" and stage == "input" and embedding is None:
                if in_mean is not None or in_std is not None or node.input[0] != cur:
                    raise self.fail(node, "expected one (x - mean) before the division")
                in_mean = self.other_operand(node, cur, "input mean")
            elif op == "Div" and stage == "input" and embedding is None:
                if in_std is not None or node.input[0] != cur:
                    raise self.fail(node, "expected one (x - mean) / std")
                in_std = self.other_operand(node, cur, "input std")
                z_name = node.output[0]
            elif op == "Transpose":
                if list(a.get("perm", [])) != [1, 0, 2]:
                    raise self.fail(node, f"perm {a.get('perm')}, expected [1, 0, 2]")
                time_major = not time_major
            elif op == "LSTM":
                if stage not in ("input", "lstm") or not time_major or node.input[0] != cur:
                    raise self.fail(node, "LSTM input must be the time-major sequence")
                layers.append(self.lstm_weights(node, a))
                lstms.append(node)
                stage = "lstm"
                squeeze_pending = True
                cur = node.output[0]
                continue
            elif op == "Squeeze":
                if not squeeze_pending:
                    raise self.fail(node, "Squeeze only follows an LSTM")
                axes = a.get("axes")
                if axes is None:
                    if len(node.input) < 2:
                        raise self.fail(node, "Squeeze without axes")
                    axes = self.const(node, node.input[1], "squeeze axes")
                if [int(v) for v in np.ravel(axes)] != [1]:
                    raise self.fail(node, f"Squeeze axes {axes}, expected [1]")
                squeeze_pending = False
            elif op == "MatMul":
                if stage != "lstm" or time_major or node.input[0] != cur:
                    raise self.fail(node, "the head must follow the batch-major LSTM output")
                w = _f64(self.const(node, node.input[1], "head weight"))
                if w.ndim != 2:
                    raise self.fail(node, f"head weight has shape {w.shape}")
                head_W = w.T
                stage = "head"
            elif op == "Add" and stage == "head":
                head_b = self.other_operand(node, cur, "head bias")
                stage = "bias"
            elif (
                op == "Mul"
                and stage == "bias"
                and residual_add is not None
                and self.consumers.get(node.output[0], []) == [residual_add]
            ):
                residual_scale = self.other_operand(node, cur, "residual scale")
                stage = "residual_mul"
            elif op == "Add" and stage == "residual_mul":
                if node is not residual_add or z_name not in node.input:
                    raise self.fail(node, "expected the normalised input added back")
                stage = "residual"
            elif op == "Mul" and stage in ("bias", "residual"):
                out_std = self.other_operand(node, cur, "output std")
                stage = "scaled"
            elif op == "Add" and stage in ("bias", "scaled", "residual"):
                out_mean = self.other_operand(node, cur, "output mean")
                stage = "done"
            elif op == "Softmax" and stage == "bias":
                if a.get("axis", -1) not in (-1, 2):
                    raise self.fail(node, f"Softmax axis {a.get('axis')}, expected -1")
                use_softmax = True
                stage = "done"
            else:
                raise self.fail(node, f"not expected here (after stage {stage!r})")
            if len(node.output) < 1:
                raise self.fail(node, "no output")
            cur = node.output[0]

        if not layers:
            raise self.fail(None, "no LSTM node between x and y")
        if head_W is None or head_b is None:
            raise self.fail(None, "no head (MatMul + Add) before y")
        if squeeze_pending:
            raise self.fail(None, "y is the raw LSTM output")
        if residual_add is not None and residual_scale is None:
            raise self.fail(residual_add, "the normalised input feeds an Add off the path")
        is_token = embedding is not None
        if use_softmax and not is_token:
            raise self.fail(None, "Softmax output on a real-valued model")
        if is_token and (out_mean is not None or out_std is not None):
            raise self.fail(None, "output de-normalisation on a token model")

        self.check_states(lstms)
        self.check_nothing_else()
        return ReferenceModel(
            kind="token" if is_token else "real",
            layers=tuple(layers),
            head_W=head_W,
            head_b=head_b,
            embedding=embedding,
            in_mean=in_mean,
            in_std=in_std,
            out_mean=out_mean,
            out_std=out_std,
            residual_scale=residual_scale,
            softmax=use_softmax,
            names=dict(self.names),
        )

    def lstm_weights(self, node: onnx.NodeProto, a: Mapping[str, Any]) -> LSTMLayerWeights:
        def text(v: Any) -> str:
            return v.decode() if isinstance(v, bytes) else str(v)

        if text(a.get("direction", "forward")) != "forward":
            raise self.fail(node, f"direction {a.get('direction')!r}, expected forward")
        acts = [text(v) for v in a.get("activations", ["Sigmoid", "Tanh", "Tanh"])]
        if acts != ["Sigmoid", "Tanh", "Tanh"]:
            raise self.fail(node, f"activations {acts}, expected Sigmoid, Tanh, Tanh")
        for attr, ok in (("clip", None), ("input_forget", 0), ("layout", 0)):
            if attr in a and a[attr] != ok:
                raise self.fail(node, f"attribute {attr}={a[attr]} is not supported")
        for attr in ("activation_alpha", "activation_beta"):
            if attr in a:
                raise self.fail(node, f"attribute {attr} is not supported")
        ins = list(node.input) + [""] * (8 - len(node.input))
        if ins[4]:
            raise self.fail(node, "sequence_lens is not supported")
        if ins[7]:
            raise self.fail(node, "peepholes are not supported")
        if not ins[5] or not ins[6]:
            raise self.fail(node, "initial_h and initial_c must come from h0 and c0")
        W = _f64(self.const(node, ins[1], "W"))
        R = _f64(self.const(node, ins[2], "R"))
        H = int(a.get("hidden_size", R.shape[-1]))
        if W.ndim != 3 or W.shape[:2] != (1, 4 * H):
            raise self.fail(node, f"W has shape {W.shape}; expected [1, {4 * H}, input]")
        if R.shape != (1, 4 * H, H):
            raise self.fail(node, f"R has shape {R.shape}; expected [1, {4 * H}, {H}]")
        if ins[3]:
            B = _f64(self.const(node, ins[3], "B"))
            if B.shape != (1, 8 * H):
                raise self.fail(node, f"B has shape {B.shape}; expected [1, {8 * H}]")
            b = B[0, : 4 * H] + B[0, 4 * H :]  # Wb + Rb
        else:
            b = np.zeros(4 * H)
        return _layer_from_stacked(W[0], R[0], b, H, ONNX_GATES)

    def check_states(self, lstms: Sequence[onnx.NodeProto]) -> None:
        """initial_h/c of layer k must be h0/c0[k]; hn/cn must be the layers' final states in order."""
        L = len(lstms)
        for k, node in enumerate(lstms):
            for idx, role in ((5, "h0"), (6, "c0")):
                src = self.skip_identity(node.input[idx])
                if src == self.names[role]:
                    if L != 1:
                        raise self.fail(node, f"layer {k} of {L} takes all of {role}")
                    continue
                sl = self.producer.get(src)
                if sl is None or sl.op_type != "Slice":
                    raise self.fail(node, f"initial state {src!r} is not a slice of {role}")
                self.used.add(id(sl))
                if self.skip_identity(sl.input[0]) != self.names[role]:
                    raise self.fail(sl, f"slices {sl.input[0]!r}, expected {role}")
                vals = [
                    [int(v) for v in np.ravel(self.const(sl, sl.input[j], "slice bound"))]
                    if len(sl.input) > j and sl.input[j]
                    else None
                    for j in (1, 2, 3, 4)
                ]
                starts, ends, axes, steps = vals
                if (
                    starts != [k]
                    or ends != [k + 1]
                    or axes not in (None, [0])
                    or steps not in (None, [1])
                ):
                    raise self.fail(
                        sl,
                        f"layer {k} reads {role}[{starts}:{ends}] on axes {axes}, "
                        f"expected {role}[{k}:{k + 1}] on axis 0",
                    )
        for idx, role in ((1, "hn"), (2, "cn")):
            want = [node.output[idx] for node in lstms]
            src = self.skip_identity(self.names[role])
            if L == 1 and src == want[0]:
                continue
            cat = self.producer.get(src)
            if cat is None or cat.op_type != "Concat" or self.attrs(cat).get("axis") != 0:
                raise self.fail(cat, f"{role} is not the layers' final states joined on axis 0")
            got = [self.skip_identity(i) for i in cat.input]
            if got != want:
                raise self.fail(cat, f"{role} joins {got}, expected {want}")
            self.used.add(id(cat))

    def check_nothing_else(self) -> None:
        """Every node the outputs depend on must be one the walk accounted for, or a constant
        (a Constant node, or an Identity of one)."""
        stack = [self.names[r] for r in ("y", "hn", "cn")]
        seen: set[str] = set()
        while stack:
            name = stack.pop()
            if name in seen:
                continue
            seen.add(name)
            node = self.producer.get(name)
            if node is None:
                continue
            if id(node) not in self.used and name not in self.consts:
                raise self.fail(node, "the outputs depend on a node this reader does not model")
            stack.extend(i for i in node.input if i)
