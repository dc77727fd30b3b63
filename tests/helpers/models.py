"""Factories for tiny, freshly exported models and model repositories.

Every factory is deterministic in its ``seed``: ``build_module(...)`` with the arguments given to
``make_model_repo(...)`` rebuilds the exact module that was exported, so tests can compare the
ONNX graph with PyTorch and with ``tests.oracle.reference``.

Typical use (e.g. for a server test)::

    version_dir = make_model_repo(tmp_path, name="tiny", kind="real")
    repo = load_repository(tmp_path)
"""

from __future__ import annotations

import json
import shutil
import string
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from lstm_serve.core.repository import (
    MANIFEST,
    ONNX_FILE,
    DataProvenance,
    Manifest,
    Normalisation,
    sha256_file,
)
from lstm_serve.training.export import OPSET as EXPORT_OPSET

if TYPE_CHECKING:
    import onnxruntime as ort
    from torch import nn

    from tests.oracle.reference import ReferenceModel

Kind = Literal["real", "token"]
OPSET = EXPORT_OPSET


def vocab_of(size: int) -> list[str]:
    """`size` distinct tokens: single characters while they last."""
    chars = string.ascii_lowercase + string.digits + " .,;:!?'-"
    return list(chars[:size]) if size <= len(chars) else [f"<{i}>" for i in range(size)]


def in_memory_manifest(
    kind: str, input_dim: int, output_dim: int, vocab: int = 12, name: str = "tiny"
) -> Manifest:
    """A valid manifest with no model file behind it, for converters tested without a graph."""
    token = kind == "token"
    return Manifest(
        name=name, version="1", kind=kind, input_dim=1 if token else input_dim,  # type: ignore[arg-type]
        output_dim=vocab if token else output_dim, vocab=vocab_of(vocab) if token else None,
        layers=1, hidden_size=4, data=DataProvenance(source="test", licence="CC0-1.0"),
        opset=17, sha256="0" * 64,
    )  # fmt: skip


def normalisation_of(input_dim: int, output_dim: int, seed: int) -> dict[str, list[float]]:
    """Non-trivial normalisation constants, so the graph's Sub/Div/Mul/Add are exercised."""
    rng = np.random.default_rng(seed + 1000)
    return {
        "in_mean": rng.normal(0.0, 2.0, input_dim).round(3).tolist(),
        "in_std": rng.uniform(0.5, 3.0, input_dim).round(3).tolist(),
        "out_mean": rng.normal(0.0, 2.0, output_dim).round(3).tolist(),
        "out_std": rng.uniform(0.5, 3.0, output_dim).round(3).tolist(),
    }


def build_module(
    kind: Kind = "real",
    *,
    input_dim: int = 3,
    output_dim: int = 3,
    hidden: int = 16,
    layers: int = 2,
    seed: int = 0,
    embed_dim: int = 8,
) -> nn.Module:
    """The export-ready module (eval mode): RealLSTM, or WithSoftmax(TokenLSTM) for token models.

    Token models: `output_dim` is the vocabulary size, `embed_dim` the embedding width and
    `input_dim` is ignored (one id per step).
    """
    import torch

    from lstm_serve.training.model import RealLSTM, TokenLSTM, WithSoftmax

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module: nn.Module
        if kind == "real":
            module = RealLSTM(
                input_dim,
                output_dim,
                hidden,
                layers,
                **normalisation_of(input_dim, output_dim, seed),
            )
        elif kind == "token":
            module = WithSoftmax(TokenLSTM(output_dim, embed_dim, hidden, layers))
        else:
            raise ValueError(f"unknown kind {kind!r}")
    return module.eval()


def export_onnx(module: nn.Module, path: Path, *, kind: Kind, input_dim: int = 3) -> Path:
    """Export with the exporter's own tracing call (no parity gate: tests check parity)."""
    from lstm_serve.core.repository import Kind as ManifestKind
    from lstm_serve.training.export import trace_to_onnx

    lstm = module.inner.lstm if kind == "token" else module.lstm  # type: ignore[union-attr]
    path.parent.mkdir(parents=True, exist_ok=True)
    trace_to_onnx(module, ManifestKind(kind), input_dim, lstm.num_layers, lstm.hidden_size, path)
    return path


def write_manifest(
    version_dir: Path,
    *,
    name: str,
    version: str,
    kind: Kind,
    input_dim: int,
    output_dim: int,
    hidden: int,
    layers: int,
    seed: int = 0,
    normalisation: dict[str, list[float]] | None = None,
) -> dict[str, Any]:
    """Write a valid manifest.json for version_dir/model.onnx (sha256 computed); returns it."""
    norm = None
    if normalisation is not None:
        norm = Normalisation(
            in_graph=True,
            input_mean=normalisation["in_mean"],
            input_std=normalisation["in_std"],
            output_mean=normalisation["out_mean"],
            output_std=normalisation["out_std"],
        )
    manifest = Manifest(
        name=name,
        version=version,
        kind=kind,  # type: ignore[arg-type]
        description=f"tiny random {kind} LSTM for tests (seed {seed})",
        input_dim=1 if kind == "token" else input_dim,
        output_dim=output_dim,
        vocab=vocab_of(output_dim) if kind == "token" else None,
        output="probabilities" if kind == "token" else "values",
        layers=layers,
        hidden_size=hidden,
        normalisation=norm,
        data=DataProvenance(source="synthetic: random weights", licence="CC0-1.0"),
        training={"seed": seed, "epochs": 0},
        opset=OPSET,
        sha256=sha256_file(version_dir / ONNX_FILE),
    )
    raw = manifest.model_dump(mode="json")
    (version_dir / MANIFEST).write_text(json.dumps(raw, indent=2) + "\n")
    return raw


def make_model_repo(
    root: Path,
    *,
    name: str = "tiny",
    kind: Kind = "real",
    input_dim: int = 3,
    output_dim: int = 3,
    hidden: int = 16,
    layers: int = 2,
    seed: int = 0,
    version: str = "1",
    embed_dim: int = 8,
) -> Path:
    """Build, export and describe one model version at root/name/version; returns that directory.

    The directory is a loadable model version (model.onnx + manifest.json with its sha256).
    Call it several times on one root to build a repository of several models/versions.
    """
    module = build_module(
        kind,
        input_dim=input_dim,
        output_dim=output_dim,
        hidden=hidden,
        layers=layers,
        seed=seed,
        embed_dim=embed_dim,
    )
    version_dir = Path(root) / name / version
    export_onnx(module, version_dir / ONNX_FILE, kind=kind, input_dim=input_dim)
    write_manifest(
        version_dir,
        name=name,
        version=version,
        kind=kind,
        input_dim=input_dim,
        output_dim=output_dim,
        hidden=hidden,
        layers=layers,
        seed=seed,
        normalisation=normalisation_of(input_dim, output_dim, seed) if kind == "real" else None,
    )
    return version_dir


def clone_version(src: Path, root: Path, *, version: str, name: str | None = None) -> Path:
    """Copy a model version directory to root/name/version, fixing the manifest's name/version."""
    raw = json.loads((src / MANIFEST).read_text())
    raw["name"] = name or raw["name"]
    raw["version"] = version
    dst = Path(root) / raw["name"] / version
    shutil.copytree(src, dst)
    (dst / MANIFEST).write_text(json.dumps(raw, indent=2) + "\n")
    return dst


def ort_session(path: Path) -> ort.InferenceSession:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def run_ort(
    sess: ort.InferenceSession,
    x: np.ndarray,
    h0: np.ndarray,
    c0: np.ndarray,
    names: dict[str, str] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n = {"x": "x", "h0": "h0", "c0": "c0", "y": "y", "hn": "hn", "cn": "cn", **(names or {})}
    y, hn, cn = sess.run(
        [n["y"], n["hn"], n["cn"]],
        {n["x"]: x, n["h0"]: h0.astype(np.float32), n["c0"]: c0.astype(np.float32)},
    )
    return y, hn, cn


def run_torch(
    module: nn.Module, x: np.ndarray, h0: np.ndarray, c0: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    import torch

    with torch.no_grad():
        out = module(
            torch.from_numpy(np.ascontiguousarray(x)),
            torch.from_numpy(h0.astype(np.float32)),
            torch.from_numpy(c0.astype(np.float32)),
        )
    y, hn, cn = (t.numpy() for t in out)
    return y, hn, cn


def torch_from_reference(ref: ReferenceModel) -> nn.Module:
    """A lstm_serve.training.model module carrying the reference's weights (gates mapped back to
    PyTorch's i, f, g, o order; the summed bias goes to bias_ih, bias_hh is zero)."""
    import torch

    from lstm_serve.training.model import RealLSTM, TokenLSTM, WithSoftmax

    def t(a: np.ndarray) -> torch.Tensor:
        return torch.tensor(np.asarray(a), dtype=torch.float32)

    H, L = ref.hidden_size, ref.num_layers
    inner: Any
    if ref.kind == "token":
        assert ref.embedding is not None
        inner = TokenLSTM(ref.vocab_size, ref.embedding.shape[1], H, L)
        module: nn.Module = WithSoftmax(inner) if ref.softmax else inner
    else:

        def vec(v: np.ndarray | None, size: int, default: float) -> list[float]:
            return (np.full(size, default) if v is None else np.broadcast_to(v, (size,))).tolist()

        inner = module = RealLSTM(
            ref.input_dim,
            ref.output_dim,
            H,
            L,
            in_mean=vec(ref.in_mean, ref.input_dim, 0.0),
            in_std=vec(ref.in_std, ref.input_dim, 1.0),
            out_mean=vec(ref.out_mean, ref.output_dim, 0.0),
            out_std=vec(ref.out_std, ref.output_dim, 1.0),
            residual_scale=None
            if ref.residual_scale is None
            else vec(ref.residual_scale, ref.output_dim, 1.0),
        )
    with torch.no_grad():
        for k, layer in enumerate(ref.layers):
            order = ("i", "f", "C", "o")  # PyTorch's i, f, g, o
            w_ih = np.concatenate([layer.input_weights(g) for g in order])
            w_hh = np.concatenate([layer.recurrent_weights(g) for g in order])
            b = np.concatenate([getattr(layer, f"b_{g}") for g in order])
            getattr(inner.lstm, f"weight_ih_l{k}").copy_(t(w_ih))
            getattr(inner.lstm, f"weight_hh_l{k}").copy_(t(w_hh))
            getattr(inner.lstm, f"bias_ih_l{k}").copy_(t(b))
            getattr(inner.lstm, f"bias_hh_l{k}").zero_()
        inner.head.weight.copy_(t(ref.head_W))
        inner.head.bias.copy_(t(ref.head_b))
        if ref.kind == "token":
            inner.embed.weight.copy_(t(ref.embedding))
    return module.eval()


def random_inputs(
    kind: str,
    *,
    batch: int,
    time: int,
    input_dim: int,
    layers: int,
    hidden: int,
    seed: int,
    vocab: int = 0,
    mean: np.ndarray | None = None,
    std: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x (raw units around mean/std for real models, ids for token models) and non-zero h0, c0."""
    rng = np.random.default_rng(seed)
    if kind == "token":
        x = rng.integers(0, vocab, (batch, time), dtype=np.int64)
    else:
        z = rng.normal(size=(batch, time, input_dim))
        m = np.zeros(input_dim) if mean is None else np.asarray(mean)
        s = np.ones(input_dim) if std is None else np.asarray(std)
        x = (m + s * z).astype(np.float32)
    h0 = rng.uniform(-0.9, 0.9, (layers, batch, hidden)).astype(np.float32)
    c0 = rng.normal(0.0, 1.0, (layers, batch, hidden)).astype(np.float32)
    return x, h0, c0


def add_version(repo: Path, version: str, scale: float = 0.5, sha: str | None = None) -> Path:
    """tiny/<version>: tiny/1's graph with every initializer scaled (other weights)."""
    import onnx
    from onnx import numpy_helper

    src, dst = repo / "tiny" / "1", repo / "tiny" / version
    shutil.copytree(src, dst)
    model = onnx.load(dst / "model.onnx")
    for init in model.graph.initializer:
        a = numpy_helper.to_array(init)
        if a.dtype == np.float32 and a.size > 1:
            init.CopyFrom(numpy_helper.from_array((a * scale).astype(np.float32), init.name))
    onnx.save(model, dst / "model.onnx")
    manifest = json.loads((dst / "manifest.json").read_text())
    manifest["version"] = version
    manifest["sha256"] = sha or sha256_file(dst / "model.onnx")
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst
