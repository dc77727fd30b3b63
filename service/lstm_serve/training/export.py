"""Export a trained LSTM to ONNX + manifest.json, refusing anything that fails the parity check.

`lstm-serve export --checkpoint runs/<name>/checkpoint.pt --out models` re-exports a checkpoint
that `lstm-serve train` saved; train.py calls export_checkpoint() directly.

torch and onnx are imported inside functions: the serving install has neither, and cli.py imports
this module to build its parser.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lstm_serve.core.repository import (
    MANIFEST,
    ONNX_FILE,
    Kind,
    Manifest,
    load_version,
    sha256_file,
)

if TYPE_CHECKING:
    from torch import nn

logger = logging.getLogger(__name__)

OPSET = 17
CHECKPOINT_FORMAT = "lstm-serve-checkpoint/1"
# Max |ORT - torch| over y, hn, cn (invariant 3, docs/architecture.md). Read at call time, so a test can
# tighten it to prove the refusal path.
PARITY_TOLERANCE = 1e-5
# The trace runs at one (batch, time); parity also runs at others, so a shape baked into the
# graph by the tracer is caught here rather than in production.
EXPORT_EXAMPLE = (2, 5)
PARITY_CASES: tuple[tuple[int, int], ...] = ((3, 7), (1, 1), (4, 29))
INPUT_NAMES = ["x", "h0", "c0"]
OUTPUT_NAMES = ["y", "hn", "cn"]
DYNAMIC_AXES = {
    "x": {0: "batch", 1: "time"},
    "h0": {1: "batch"},
    "c0": {1: "batch"},
    "y": {0: "batch", 1: "time"},
    "hn": {1: "batch"},
    "cn": {1: "batch"},
}
# Graph ops that would mean the recurrence was unrolled or looped instead of one LSTM op.
_FORBIDDEN_OPS = {"Loop", "Scan", "If"}


class ExportError(RuntimeError):
    """The export was refused; nothing was written to the repository."""


def build_module(checkpoint: Mapping[str, Any]) -> nn.Module:
    """Rebuild the export module from a checkpoint: RealLSTM, or TokenLSTM wrapped in softmax."""
    from lstm_serve.training.model import RealLSTM, TokenLSTM, WithSoftmax

    if checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise ExportError(f"not an lstm-serve checkpoint (format {checkpoint.get('format')!r})")
    spec = checkpoint["model"]
    module: nn.Module
    if spec["class"] == "RealLSTM":
        module = RealLSTM(**spec["args"])
        module.load_state_dict(checkpoint["state_dict"])
    elif spec["class"] == "TokenLSTM":
        inner = TokenLSTM(**spec["args"])
        inner.load_state_dict(checkpoint["state_dict"])
        module = WithSoftmax(inner)
    else:
        raise ExportError(f"unknown model class {spec['class']!r}")
    return module.eval()


def load_checkpoint(path: Path) -> dict[str, Any]:
    import torch

    # weights_only: a checkpoint is tensors and plain data, so no pickle code runs on load.
    ckpt: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    return ckpt


def export_checkpoint(
    checkpoint: Mapping[str, Any], out_root: Path, version: str = "1", overwrite: bool = False
) -> Path:
    """Export a checkpoint to out_root/<name>/<version>/ and return that directory."""
    return export_module(
        build_module(checkpoint), checkpoint["manifest"], out_root, version, overwrite
    )


def export_module(
    module: nn.Module,
    fields: Mapping[str, Any],
    out_root: Path,
    version: str = "1",
    overwrite: bool = False,
) -> Path:
    """Trace, check and parity-test `module`, then move model.onnx + manifest.json into place.

    `fields` are the manifest fields that describe the model (name, kind, dims, vocab,
    normalisation, data, training, metrics); version, opset, tensors and sha256 are filled here.
    Everything is built in a staging directory under out_root and renamed into place only when
    every check passed, so a refused export leaves the repository untouched.
    """
    name = str(fields["name"])
    target = out_root / name / version
    if target.exists() and not overwrite:
        raise ExportError(f"{target} exists (pass --force to replace it)")
    module.eval()
    out_root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=out_root))
    try:
        vdir = staging / name / version
        vdir.mkdir(parents=True)
        onnx_path = vdir / ONNX_FILE
        kind = Kind(fields["kind"])
        layers, hidden = int(fields["layers"]), int(fields["hidden_size"])
        trace_to_onnx(module, kind, int(fields["input_dim"]), layers, hidden, onnx_path)
        check_graph(onnx_path)
        worst = parity_max_abs_diff(module, onnx_path, kind, fields, PARITY_CASES)
        # `not <=` also refuses NaN.
        if not worst <= PARITY_TOLERANCE:
            raise ExportError(
                f"parity check failed: max |ORT - torch| = {worst:.3g} > {PARITY_TOLERANCE:g}"
            )
        logger.info(
            "parity ok: max |ORT - torch| = %.2g at (batch, time) in %s", worst, PARITY_CASES
        )
        manifest = Manifest.model_validate(
            {
                **fields,
                "version": version,
                "opset": OPSET,
                "sha256": sha256_file(onnx_path),
                "tensors": dict(
                    zip(["x", "h0", "c0", "y", "hn", "cn"], INPUT_NAMES + OUTPUT_NAMES, strict=True)
                ),
            }
        )
        (vdir / MANIFEST).write_text(json.dumps(manifest.model_dump(mode="json"), indent=2) + "\n")
        # The same check the server runs at start-up, so a bad artifact never reaches it.
        _, errs = load_version(vdir)
        if errs:
            raise ExportError("; ".join(str(e) for e in errs))
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            os.replace(target, staging / "replaced")
        os.replace(vdir, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    size = (target / ONNX_FILE).stat().st_size
    logger.info("exported %s (%.2f MB, sha256 %s)", target, size / 1e6, manifest.sha256[:12])
    return target


def trace_to_onnx(
    module: nn.Module, kind: Kind, input_dim: int, layers: int, hidden: int, path: Path
) -> None:
    """Write module's graph to path with the graph contract's names and dynamic axes."""
    import torch

    batch, time = EXPORT_EXAMPLE
    x = (
        torch.zeros(batch, time, dtype=torch.int64)
        if kind is Kind.token
        else torch.zeros(batch, time, input_dim)
    )
    h0 = torch.zeros(layers, batch, hidden)
    # The legacy (TorchScript) exporter emits the ONNX LSTM op; its deprecation notice and the
    # LSTM batch-size advice (moot: h0/c0 are graph inputs) are noise on the terminal.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (x, h0, h0.clone()),
            str(path),
            dynamo=False,
            opset_version=OPSET,
            input_names=INPUT_NAMES,
            output_names=OUTPUT_NAMES,
            dynamic_axes=DYNAMIC_AXES,
        )


def check_graph(path: Path) -> None:
    """ONNX checker, one or more real LSTM ops (no loops), and dynamic batch/time axes."""
    import onnx

    model = onnx.load(str(path))
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"onnx checker: {exc}") from exc
    ops = {n.op_type for n in model.graph.node}
    if "LSTM" not in ops:
        raise ExportError(f"graph has no ONNX LSTM op (ops: {sorted(ops)})")
    if ops & _FORBIDDEN_OPS:
        raise ExportError(f"graph has control flow {sorted(ops & _FORBIDDEN_OPS)}")
    for value in [*model.graph.input, *model.graph.output]:
        dims = value.type.tensor_type.shape.dim
        axes = DYNAMIC_AXES.get(value.name, {})
        for axis in axes:
            if dims[axis].HasField("dim_value"):
                raise ExportError(f"{value.name} axis {axis} is fixed at {dims[axis].dim_value}")


def parity_max_abs_diff(
    module: nn.Module,
    onnx_path: Path,
    kind: Kind,
    fields: Mapping[str, Any],
    cases: Sequence[tuple[int, int]],
    seed: int = 0,
) -> float:
    """Largest |ORT - torch| over y, hn, cn on random inputs and random nonzero h0/c0."""
    import onnxruntime as ort
    import torch

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    layers, hidden = int(fields["layers"]), int(fields["hidden_size"])
    worst = 0.0
    for batch, time in cases:
        x: np.ndarray[Any, Any]
        if kind is Kind.token:
            x = rng.integers(0, int(fields["output_dim"]), size=(batch, time), dtype=np.int64)
        else:
            # Raw units around the data's own scale, as clients will send them.
            norm = fields.get("normalisation") or {}
            mean = np.asarray(norm.get("input_mean") or 0.0, dtype=np.float32)
            std = np.asarray(norm.get("input_std") or 1.0, dtype=np.float32)
            z = rng.standard_normal((batch, time, int(fields["input_dim"])), dtype=np.float32)
            x = (mean + std * z).astype(np.float32)
        h0 = rng.normal(0.0, 0.5, size=(layers, batch, hidden)).astype(np.float32)
        c0 = rng.normal(0.0, 0.5, size=(layers, batch, hidden)).astype(np.float32)
        got = sess.run(OUTPUT_NAMES, {"x": x, "h0": h0, "c0": c0})
        with torch.no_grad():
            want = module(torch.from_numpy(x), torch.from_numpy(h0), torch.from_numpy(c0))
        for g, w in zip(got, want, strict=True):
            w_np = w.numpy()
            if g.shape != w_np.shape:
                raise ExportError(f"ORT shape {g.shape} != torch shape {w_np.shape}")
            worst = max(worst, float(np.max(np.abs(g - w_np))))
    return worst


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint", required=True, type=Path, help="checkpoint.pt saved by `lstm-serve train`"
    )
    parser.add_argument("--out", type=Path, default=Path("models"), help="repository root")
    parser.add_argument("--version", default="1", help="version directory to write (default 1)")
    parser.add_argument("--force", action="store_true", help="replace an existing version")


def run(args: argparse.Namespace) -> int:
    from lstm_serve.training.extra import MissingExtra, require_training_extra

    try:
        require_training_extra("export", ("torch", "onnx"))
        target = export_checkpoint(
            load_checkpoint(args.checkpoint), args.out, str(args.version), args.force
        )
    except (ExportError, MissingExtra, OSError) as exc:
        logger.error("export refused: %s", exc)
        return 1
    print(target)
    return 0
