"""tests.oracle.reference: the NumPy oracle, and parity of ONNX Runtime, PyTorch and the oracle.

Invariant 3 (parity, atol 1e-5) and the chunking half of invariant 1 (atol 1e-6) at the graph
level, on fresh tiny models and on the shipped models.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from lstm_serve.core.repository import Manifest, load_version
from lstm_serve.training.model import RealLSTM
from tests.helpers.models import (
    build_module,
    export_onnx,
    make_model_repo,
    ort_session,
    random_inputs,
    run_ort,
    run_torch,
    torch_from_reference,
)
from tests.oracle.reference import (
    GraphError,
    LSTMLayerWeights,
    ReferenceModel,
    lstm_layer,
    lstm_step,
)

PARITY_ATOL = 1e-5
CHUNK_ATOL = 1e-6
SHIPPED = ("forecaster", "charlm")


def assert_close(got: tuple[np.ndarray, ...], want: tuple[np.ndarray, ...], atol: float) -> None:
    for label, g, w in zip(("y", "hn", "cn"), got, want, strict=True):
        assert g.shape == w.shape, f"{label}: shape {g.shape} != {w.shape}"
        err = float(np.abs(g.astype(np.float64) - w).max()) if g.size else 0.0
        assert err <= atol, f"{label}: max abs difference {err:.3g} > {atol}"


def sig(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


# --------------------------------------------------------------------------------------------
# The equations, pinned by hand
# --------------------------------------------------------------------------------------------

# A 1-unit LSTM with a 1-feature input; each W acts on [h_prev, x].
HAND = {
    "W_f": [[0.4, -0.6]],
    "b_f": [0.1],
    "W_i": [[-0.2, 0.9]],
    "b_i": [-0.3],
    "W_C": [[0.8, 0.5]],
    "b_C": [0.05],
    "W_o": [[0.3, -0.7]],
    "b_o": [0.2],
}
HAND_X, HAND_H, HAND_C = 0.7, -0.3, 0.5


def hand_step(x: float, h: float, c: float) -> tuple[float, float]:
    """The equations written out for one unit, with nothing shared with tests.oracle.reference."""
    f = sig(0.4 * h - 0.6 * x + 0.1)
    i = sig(-0.2 * h + 0.9 * x - 0.3)
    c_tilde = math.tanh(0.8 * h + 0.5 * x + 0.05)
    c_new = f * c + i * c_tilde
    o = sig(0.3 * h - 0.7 * x + 0.2)
    return o * math.tanh(c_new), c_new


def hand_weights() -> LSTMLayerWeights:
    return LSTMLayerWeights(**{k: np.array(v) for k, v in HAND.items()})


def one_unit_module(w: LSTMLayerWeights) -> RealLSTM:
    """RealLSTM(1 -> 1, hidden 1) with the head the identity, so y is h."""
    ref = ReferenceModel(kind="real", layers=(w,), head_W=np.ones((1, 1)), head_b=np.zeros(1))
    module = torch_from_reference(ref)
    assert isinstance(module, RealLSTM)
    return module


def test_hand_computed_single_step() -> None:
    h_want, c_want = hand_step(HAND_X, HAND_H, HAND_C)
    h, c = lstm_step(
        np.array([[HAND_X]]), np.array([[HAND_H]]), np.array([[HAND_C]]), hand_weights()
    )
    assert h[0, 0] == pytest.approx(h_want, abs=1e-12)
    assert c[0, 0] == pytest.approx(c_want, abs=1e-12)
    # Two steps through lstm_layer carry (h, C) from the first into the second.
    h1, c1 = hand_step(HAND_X, HAND_H, HAND_C)
    h2, c2 = hand_step(-1.3, h1, c1)
    y, hn, cn = lstm_layer(np.array([[[HAND_X]], [[-1.3]]]), [[HAND_H]], [[HAND_C]], hand_weights())
    np.testing.assert_allclose(y[:, 0, 0], [h1, h2], atol=1e-12)
    assert (hn[0, 0], cn[0, 0]) == pytest.approx((h2, c2), abs=1e-12)


def test_hand_computed_step_in_torch_and_onnx_runtime(tmp_path: Path) -> None:
    """PyTorch and the exported graph follow the same hand-written equations."""
    module = one_unit_module(hand_weights())
    x = np.array([[[HAND_X], [-1.3]]], np.float32)
    h0 = np.array([[[HAND_H]]], np.float32)
    c0 = np.array([[[HAND_C]]], np.float32)
    h1, c1 = hand_step(HAND_X, HAND_H, HAND_C)
    h2, c2 = hand_step(-1.3, h1, c1)
    want = (np.array([[[h1], [h2]]]), np.array([[[h2]]]), np.array([[[c2]]]))
    assert_close(run_torch(module, x, h0, c0), want, 1e-6)
    path = export_onnx(module, tmp_path / "model.onnx", kind="real", input_dim=1)
    assert_close(run_ort(ort_session(path), x, h0, c0), want, 1e-6)


@pytest.mark.parametrize(
    ("biases", "expect_c", "expect_h"),
    [
        # forget open, input closed, output open: the cell is kept and h = tanh(C_prev)
        ({"f": 30.0, "i": -30.0, "C": 0.0, "o": 30.0}, lambda c: c, lambda c: math.tanh(c)),
        # forget closed, input open: C is the candidate tanh(b_C); output gate half open
        (
            {"f": -30.0, "i": 30.0, "C": math.atanh(0.6), "o": 0.0},
            lambda c: 0.6,
            lambda c: 0.5 * math.tanh(0.6),
        ),
        # forget and input half open: C = (C_prev + tanh(b_C)) / 2; output closed
        (
            {"f": 0.0, "i": 0.0, "C": math.atanh(-0.2), "o": -30.0},
            lambda c: 0.5 * (c - 0.2),
            lambda c: 0.0,
        ),
    ],
)
def test_gate_roles(tmp_path: Path, biases: dict[str, float], expect_c, expect_h) -> None:
    """Each gate does its own job (weights zero, biases saturate the gates) in all three
    implementations: a swapped gate order anywhere breaks at least one of these cases."""
    zero = np.zeros((1, 2))
    w = LSTMLayerWeights(
        W_f=zero, W_i=zero, W_C=zero, W_o=zero, **{f"b_{g}": [b] for g, b in biases.items()}
    )
    c_prev = 0.75  # exact in float32
    x = np.array([[[0.3]]], np.float32)
    h0 = np.array([[[0.1]]], np.float32)
    c0 = np.array([[[c_prev]]], np.float32)
    want = (expect_h(c_prev), expect_c(c_prev))
    _, hn, cn = lstm_layer(x.transpose(1, 0, 2), h0[0], c0[0], w)
    assert (hn[0, 0], cn[0, 0]) == pytest.approx(want, abs=1e-9)
    module = one_unit_module(w)
    _, hn, cn = run_torch(module, x, h0, c0)
    assert (hn[0, 0, 0], cn[0, 0, 0]) == pytest.approx(want, abs=1e-6)
    path = export_onnx(module, tmp_path / "model.onnx", kind="real", input_dim=1)
    _, hn, cn = run_ort(ort_session(path), x, h0, c0)
    assert (hn[0, 0, 0], cn[0, 0, 0]) == pytest.approx(want, abs=1e-6)
    _, hn, cn = ReferenceModel.from_onnx(path).run(x, h0, c0)
    assert (hn[0, 0, 0], cn[0, 0, 0]) == pytest.approx(want, abs=1e-6)


# --------------------------------------------------------------------------------------------
# Gate order
# --------------------------------------------------------------------------------------------


def blocks_module(hidden: int = 2, input_dim: int = 3) -> RealLSTM:
    """A 1-layer RealLSTM whose PyTorch gate blocks (i, f, g, o) are filled with 1, 2, 3, 4
    (input weights), 10, 20, 30, 40 (recurrent), 0.1.. 0.4 (bias_ih) and 0.01.. 0.04 (bias_hh)."""
    module = RealLSTM(input_dim, 1, hidden, 1)
    H = hidden
    with torch.no_grad():
        for n in range(4):
            rows = slice(n * H, (n + 1) * H)
            module.lstm.weight_ih_l0[rows] = n + 1
            module.lstm.weight_hh_l0[rows] = 10 * (n + 1)
            module.lstm.bias_ih_l0[rows] = 0.1 * (n + 1)
            module.lstm.bias_hh_l0[rows] = 0.01 * (n + 1)
    return module.eval()


def check_blocks(layer: LSTMLayerWeights) -> None:
    for gate, n in (("i", 1), ("f", 2), ("C", 3), ("o", 4)):
        np.testing.assert_allclose(layer.input_weights(gate), n, err_msg=f"W_{gate} (x part)")
        np.testing.assert_allclose(
            layer.recurrent_weights(gate), 10 * n, err_msg=f"W_{gate} (h part)"
        )
        np.testing.assert_allclose(getattr(layer, f"b_{gate}"), 0.11 * n, rtol=1e-6)


def test_gate_order_from_torch() -> None:
    check_blocks(ReferenceModel.from_torch(blocks_module()).layers[0])


def test_gate_order_from_onnx(tmp_path: Path) -> None:
    path = export_onnx(blocks_module(), tmp_path / "model.onnx", kind="real")
    proto = onnx.load(str(path))
    lstm = next(n for n in proto.graph.node if n.op_type == "LSTM")
    W = next(
        onnx.numpy_helper.to_array(t) for t in proto.graph.initializer if t.name == lstm.input[1]
    )
    # The exporter re-stacks PyTorch's (i, f, g, o) as ONNX's (i, o, f, c).
    assert [float(W[0, n * 2, 0]) for n in range(4)] == [1.0, 4.0, 2.0, 3.0]
    check_blocks(ReferenceModel.from_onnx(proto).layers[0])


def test_swapped_gates_are_detected(tmp_path: Path) -> None:
    """On a model whose gates all differ, any swap of two gates moves the output far outside
    the parity tolerance, so the parity tests below would catch a gate-order bug."""
    module = build_module("real", hidden=8, layers=1, seed=5)
    with torch.no_grad():  # make the four gates clearly different from each other
        for n, scale in enumerate((1.5, -2.0, 2.5, 0.7)):
            module.lstm.weight_ih_l0[n * 8 : (n + 1) * 8] *= scale * 3
            module.lstm.bias_ih_l0[n * 8 : (n + 1) * 8] += scale
    path = export_onnx(module, tmp_path / "model.onnx", kind="real")
    ref = ReferenceModel.from_onnx(path)
    x, h0, c0 = random_inputs("real", batch=2, time=6, input_dim=3, layers=1, hidden=8, seed=1)
    want = run_ort(ort_session(path), x, h0, c0)
    assert_close(ref.run(x, h0, c0), want, PARITY_ATOL)
    assert_close(run_torch(module, x, h0, c0), want, PARITY_ATOL)
    layer = ref.layers[0]
    for a, b in (("f", "i"), ("f", "C"), ("f", "o"), ("i", "C"), ("i", "o"), ("C", "o")):
        swapped = replace(
            layer,
            **{
                f"W_{a}": getattr(layer, f"W_{b}"),
                f"W_{b}": getattr(layer, f"W_{a}"),
                f"b_{a}": getattr(layer, f"b_{b}"),
                f"b_{b}": getattr(layer, f"b_{a}"),
            },
        )
        y, _, cn = replace(ref, layers=(swapped,)).run(x, h0, c0)
        err = max(np.abs(y - want[0]).max(), np.abs(cn - want[2]).max())
        assert err > 1e-2, f"swapping {a} and {b} went unnoticed (max diff {err:.2g})"


# --------------------------------------------------------------------------------------------
# Parity on fresh tiny models: ONNX Runtime vs PyTorch vs reference (from ONNX and from torch)
# --------------------------------------------------------------------------------------------


@dataclass
class Tiny:
    kind: str
    module: torch.nn.Module
    path: Path
    sess: ort.InferenceSession
    ref: ReferenceModel
    input_dim: int
    vocab: int
    layers: int
    hidden: int

    def inputs(self, batch: int, time: int, seed: int) -> tuple[np.ndarray, ...]:
        return random_inputs(
            self.kind,
            batch=batch,
            time=time,
            input_dim=self.input_dim,
            layers=self.layers,
            hidden=self.hidden,
            seed=seed,
            vocab=self.vocab,
            mean=self.ref.in_mean,
            std=self.ref.in_std,
        )


TINY_CASES = [("real", 1), ("real", 2), ("token", 1), ("token", 2)]


@pytest.fixture(scope="module", params=TINY_CASES, ids=[f"{k}-{n}layer" for k, n in TINY_CASES])
def tiny(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Tiny:
    kind, layers = request.param
    args = {
        "kind": kind,
        "input_dim": 4,
        "output_dim": 11 if kind == "token" else 2,
        "hidden": 12,
        "layers": layers,
        "seed": 7 + layers,
    }
    version_dir = make_model_repo(tmp_path_factory.mktemp("tiny"), name="tiny", **args)
    path = version_dir / "model.onnx"
    return Tiny(
        kind=kind,
        module=build_module(**args),
        path=path,
        sess=ort_session(path),
        ref=ReferenceModel.from_onnx(path),
        input_dim=4,
        vocab=11 if kind == "token" else 0,
        layers=layers,
        hidden=12,
    )


def test_factory_makes_a_loadable_version(tiny: Tiny) -> None:
    mv, errs = load_version(tiny.path.parent)
    assert errs == []
    assert mv is not None
    assert mv.manifest.kind == tiny.kind
    assert (mv.manifest.layers, mv.manifest.hidden_size) == (tiny.layers, tiny.hidden)


def test_reference_reads_the_same_weights_from_onnx_and_torch(tiny: Tiny) -> None:
    a, b = tiny.ref, ReferenceModel.from_torch(tiny.module)
    assert (a.kind, a.num_layers, a.softmax) == (b.kind, b.num_layers, b.softmax)
    for la, lb in zip(a.layers, b.layers, strict=True):
        for name in ("W_f", "W_i", "W_C", "W_o", "b_f", "b_i", "b_C", "b_o"):
            np.testing.assert_allclose(getattr(la, name), getattr(lb, name), atol=1e-7)
    np.testing.assert_allclose(a.head_W, b.head_W, atol=1e-7)
    for name in ("embedding", "in_mean", "in_std", "out_mean", "out_std"):
        va, vb = getattr(a, name), getattr(b, name)
        assert (va is None) == (vb is None), name
        if va is not None:
            np.testing.assert_allclose(va, vb, atol=1e-7)


@pytest.mark.parametrize(("batch", "time"), [(1, 1), (3, 9), (5, 30)])
def test_parity_tiny(tiny: Tiny, batch: int, time: int) -> None:
    x, h0, c0 = tiny.inputs(batch, time, seed=batch * 100 + time)
    want = run_ort(tiny.sess, x, h0, c0)
    assert_close(tiny.ref.run(x, h0, c0), want, PARITY_ATOL)
    assert_close(ReferenceModel.from_torch(tiny.module).run(x, h0, c0), want, PARITY_ATOL)
    assert_close(run_torch(tiny.module, x, h0, c0), want, PARITY_ATOL)
    assert_close(run_torch(torch_from_reference(tiny.ref), x, h0, c0), want, PARITY_ATOL)
    # The outputs are not trivially equal: the states moved and the model is not constant.
    assert np.abs(want[2] - c0).max() > 1e-3
    if tiny.kind == "token":
        np.testing.assert_allclose(want[0].sum(-1), 1.0, atol=1e-5)


@pytest.mark.parametrize("kind", ["real", "token"])
def test_reads_the_project_exporters_graph(tmp_path: Path, kind: str) -> None:
    """The graph service/lstm_serve/training/export.py writes (not only this file's helper) reads back."""
    from lstm_serve.training.export import export_module
    from tests.helpers.models import normalisation_of, vocab_of

    args = {"input_dim": 2, "output_dim": 5, "hidden": 6, "layers": 2, "seed": 3}
    module = build_module(kind, **args)  # type: ignore[arg-type]
    norm = normalisation_of(2, 5, 3)
    fields: dict[str, object] = {
        "name": "exported",
        "kind": kind,
        "input_dim": 1 if kind == "token" else 2,
        "output_dim": 5,
        "layers": 2,
        "hidden_size": 6,
        "data": {"source": "synthetic", "licence": "CC0-1.0"},
    }
    if kind == "token":
        fields.update(vocab=vocab_of(5), output="probabilities")
    else:
        fields["normalisation"] = {
            "input_mean": norm["in_mean"],
            "input_std": norm["in_std"],
            "output_mean": norm["out_mean"],
            "output_std": norm["out_std"],
        }
    version_dir = export_module(module, fields, tmp_path)
    path = version_dir / "model.onnx"
    ref = ReferenceModel.from_onnx(path)
    assert (ref.kind, ref.num_layers, ref.hidden_size, ref.output_dim) == (kind, 2, 6, 5)
    x, h0, c0 = random_inputs(
        kind,
        batch=3,
        time=8,
        input_dim=2,
        layers=2,
        hidden=6,
        seed=9,
        vocab=5,
        mean=ref.in_mean,
        std=ref.in_std,
    )
    want = run_ort(ort_session(path), x, h0, c0)
    assert_close(ref.run(x, h0, c0), want, PARITY_ATOL)
    assert_close(run_torch(module, x, h0, c0), want, PARITY_ATOL)


# --------------------------------------------------------------------------------------------
# Chunking: one pass == any chunking with (h, c) carried between chunks
# --------------------------------------------------------------------------------------------


def chunkings(time: int, seed: int) -> Iterator[list[int]]:
    yield [time]
    yield [1] * time
    rng = np.random.default_rng(seed)
    for _ in range(4):
        cuts = sorted(rng.choice(np.arange(1, time), size=rng.integers(1, 8), replace=False))
        yield np.diff([0, *cuts, time]).tolist()


def run_chunked(run, x: np.ndarray, h0: np.ndarray, c0: np.ndarray, sizes: list[int]):
    ys, h, c, t = [], h0, c0, 0
    for n in sizes:
        y, h, c = run(x[:, t : t + n], h, c)
        ys.append(y)
        t += n
    assert t == x.shape[1]
    return np.concatenate(ys, axis=1), h, c


def check_chunkings(run, x: np.ndarray, h0: np.ndarray, c0: np.ndarray, seed: int) -> None:
    """The reference goes through run_f64: rounding its outputs to float32 alone costs one
    float32 ulp, 1.9e-6 once |y| >= 16 (temperatures, say), which is more than 1e-6."""
    whole = run(x, h0, c0)
    for sizes in chunkings(x.shape[1], seed):
        got = run_chunked(run, x, h0, c0, sizes)
        try:
            assert_close(got, whole, CHUNK_ATOL)
        except AssertionError as exc:
            raise AssertionError(f"chunking {sizes}: {exc}") from None


def test_chunking_tiny_ort(tiny: Tiny) -> None:
    x, h0, c0 = tiny.inputs(3, 40, seed=11)
    check_chunkings(lambda x, h, c: run_ort(tiny.sess, x, h, c), x, h0, c0, seed=1)


def test_chunking_tiny_reference(tiny: Tiny) -> None:
    x, h0, c0 = tiny.inputs(3, 40, seed=12)
    check_chunkings(tiny.ref.run_f64, x, h0, c0, seed=2)


# --------------------------------------------------------------------------------------------
# The shipped models
# --------------------------------------------------------------------------------------------


@dataclass
class Shipped:
    manifest: Manifest
    directory: Path
    sess: ort.InferenceSession
    ref: ReferenceModel

    def inputs(self, batch: int, time: int, seed: int) -> tuple[np.ndarray, ...]:
        m = self.manifest
        return random_inputs(
            m.kind.value,
            batch=batch,
            time=time,
            input_dim=m.input_dim,
            layers=m.layers,
            hidden=m.hidden_size,
            seed=seed,
            vocab=m.vocab_size,
            mean=self.ref.in_mean,
            std=self.ref.in_std,
        )

    def run_ort(self, x: np.ndarray, h0: np.ndarray, c0: np.ndarray):
        return run_ort(self.sess, x, h0, c0, self.manifest.tensors.model_dump())


@pytest.fixture(scope="module", params=SHIPPED)
def shipped(request: pytest.FixtureRequest, project_root: Path) -> Shipped:
    directory = project_root / "models" / request.param / "1"
    missing = [f for f in ("manifest.json", "model.onnx") if not (directory / f).is_file()]
    assert not missing, f"shipped model {directory} lacks {missing}: it is part of the repository"
    mv, errs = load_version(directory)
    assert errs == [], f"shipped model {directory} does not load: {[str(e) for e in errs]}"
    assert mv is not None
    names = mv.manifest.tensors.model_dump()
    return Shipped(
        mv.manifest,
        directory,
        ort_session(mv.onnx_path),
        ReferenceModel.from_onnx(mv.onnx_path, names=names),
    )


def test_shipped_manifest_matches_graph(shipped: Shipped) -> None:
    m, ref = shipped.manifest, shipped.ref
    assert ref.kind == m.kind.value
    assert (ref.num_layers, ref.hidden_size) == (m.layers, m.hidden_size)
    assert ref.output_dim == m.output_dim
    if m.kind.value == "token":
        assert ref.vocab_size == m.vocab_size
        assert ref.softmax == (m.output == "probabilities")
    else:
        assert ref.input_dim == m.input_dim
    norm = m.normalisation
    if norm is not None and norm.in_graph:
        for graph_value, manifest_value in (
            (ref.in_mean, norm.input_mean),
            (ref.in_std, norm.input_std),
            (ref.out_mean, norm.output_mean),
            (ref.out_std, norm.output_std),
        ):
            if manifest_value:
                assert graph_value is not None
                np.testing.assert_allclose(
                    np.broadcast_to(graph_value, (len(manifest_value),)),
                    manifest_value,
                    rtol=1e-6,
                    atol=1e-6,
                )


@pytest.mark.parametrize(("batch", "time"), [(1, 1), (4, 24)])
def test_parity_shipped(shipped: Shipped, batch: int, time: int) -> None:
    x, h0, c0 = shipped.inputs(batch, time, seed=batch + time)
    want = shipped.run_ort(x, h0, c0)
    assert_close(shipped.ref.run(x, h0, c0), want, PARITY_ATOL)
    assert_close(run_torch(torch_from_reference(shipped.ref), x, h0, c0), want, PARITY_ATOL)
    assert np.abs(want[2] - c0).max() > 1e-3


def test_chunking_shipped(shipped: Shipped) -> None:
    x, h0, c0 = shipped.inputs(2, 32, seed=21)
    check_chunkings(shipped.run_ort, x, h0, c0, seed=3)
    check_chunkings(shipped.ref.run_f64, x, h0, c0, seed=4)


# --------------------------------------------------------------------------------------------
# Unexpected graphs and bad inputs fail loudly
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def token_proto(tmp_path_factory: pytest.TempPathFactory) -> onnx.ModelProto:
    d = make_model_repo(tmp_path_factory.mktemp("tok"), kind="token", output_dim=6, layers=2)
    return onnx.load(str(d / "model.onnx"))


def edited(proto: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    return out


def test_unmodified_graph_reads(token_proto: onnx.ModelProto) -> None:
    ref = ReferenceModel.from_onnx(token_proto)
    assert (ref.kind, ref.num_layers, ref.softmax, ref.vocab_size) == ("token", 2, True, 6)


def test_unexpected_op_is_refused(token_proto: onnx.ModelProto) -> None:
    p = edited(token_proto)
    next(n for n in p.graph.node if n.op_type == "Softmax").op_type = "Relu"
    with pytest.raises(GraphError, match="Relu node"):
        ReferenceModel.from_onnx(p)


def test_layers_reading_the_wrong_initial_state_are_refused(token_proto: onnx.ModelProto) -> None:
    p = edited(token_proto)
    first, second = (n for n in p.graph.node if n.op_type == "LSTM")
    first.input[5], second.input[5] = second.input[5], first.input[5]
    with pytest.raises(GraphError, match=r"layer 0 reads h0\[\[1\]"):
        ReferenceModel.from_onnx(p)


def test_final_states_in_the_wrong_order_are_refused(token_proto: onnx.ModelProto) -> None:
    p = edited(token_proto)
    cat = next(n for n in p.graph.node if n.op_type == "Concat" and n.output[0] == "cn")
    cat.input[0], cat.input[1] = cat.input[1], cat.input[0]
    with pytest.raises(GraphError, match="cn joins"):
        ReferenceModel.from_onnx(p)


def test_reverse_lstm_is_refused(token_proto: onnx.ModelProto) -> None:
    p = edited(token_proto)
    lstm = next(n for n in p.graph.node if n.op_type == "LSTM")
    lstm.attribute.append(onnx.helper.make_attribute("direction", "reverse"))
    with pytest.raises(GraphError, match="direction"):
        ReferenceModel.from_onnx(p)


def test_missing_tensor_names_are_refused(token_proto: onnx.ModelProto) -> None:
    with pytest.raises(GraphError, match="no graph input 'ids'"):
        ReferenceModel.from_onnx(token_proto, names={"x": "ids"})


def test_graph_without_lstm_is_refused() -> None:
    h = onnx.helper
    graph = h.make_graph(
        [h.make_node("Identity", [a], [b]) for a, b in (("x", "y"), ("h0", "hn"), ("c0", "cn"))],
        "not-an-lstm",
        [h.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in ("x", "h0", "c0")],
        [h.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in ("y", "hn", "cn")],
    )
    with pytest.raises(GraphError, match="no LSTM"):
        ReferenceModel.from_onnx(h.make_model(graph))


def test_run_rejects_bad_shapes_and_ids(token_proto: onnx.ModelProto) -> None:
    ref = ReferenceModel.from_onnx(token_proto)
    h0, c0 = ref.zero_state(2)
    ids = np.zeros((2, 3), np.int64)
    with pytest.raises(ValueError, match="h0 has shape"):
        ref.run(ids, h0[:1], c0)
    with pytest.raises(ValueError, match="token ids"):
        ref.run(ids + 6, h0, c0)
    with pytest.raises(ValueError, match="integer"):
        ref.run(ids.astype(np.float32), h0, c0)
    y, hn, cn = ref.run(ids, h0, c0)
    assert (y.shape, hn.shape, cn.shape) == ((2, 3, 6), (2, 2, 16), (2, 2, 16))
    assert y.dtype == hn.dtype == cn.dtype == np.float32
