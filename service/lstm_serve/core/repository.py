"""Model repository: discovery of models/<name>/<version>/, manifest validation, versions."""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from lstm_serve.core.errors import NotFound

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
ONNX_FILE = "model.onnx"
_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
_VERSION = re.compile(r"^[0-9]+$")


class Kind(StrEnum):
    real = "real"
    token = "token"


class TensorNames(BaseModel):
    model_config = ConfigDict(extra="forbid")
    x: str = "x"
    h0: str = "h0"
    c0: str = "c0"
    y: str = "y"
    hn: str = "hn"
    cn: str = "cn"


class Normalisation(BaseModel):
    """Per-feature affine normalisation, applied inside the graph (clients send raw units)."""

    model_config = ConfigDict(extra="forbid")
    in_graph: bool = True
    input_mean: list[float] = Field(default_factory=list)
    input_std: list[float] = Field(default_factory=list)
    output_mean: list[float] = Field(default_factory=list)
    output_std: list[float] = Field(default_factory=list)


class DataProvenance(BaseModel):
    model_config = ConfigDict(extra="forbid")
    source: str
    licence: str
    description: str = ""
    files: list[str] = Field(default_factory=list)


class Manifest(BaseModel):
    """manifest.json beside model.onnx; checked against the ONNX graph when loaded."""

    model_config = ConfigDict(extra="forbid")

    name: str
    version: str
    kind: Kind
    description: str = ""
    input_dim: int = Field(ge=1, description="Features per step (token models: 1).")
    output_dim: int = Field(
        ge=1, description="Values per step (token models: the vocabulary size)."
    )
    vocab: list[str] | None = Field(
        None, validate_default=True, description="Token models: the characters/tokens, index = id."
    )
    output: Literal["values", "probabilities", "logits"] = "values"
    layers: int = Field(ge=1)
    hidden_size: int = Field(ge=1)
    tensors: TensorNames = Field(default_factory=TensorNames)
    normalisation: Normalisation | None = None
    data: DataProvenance
    training: dict[str, object] = Field(default_factory=dict)
    metrics: dict[str, object] = Field(
        default_factory=dict, description="Held-out metrics and baselines."
    )
    opset: int = Field(ge=7)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")

    # Field validators (not one model validator) so a LoadError names the offending field.
    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError(f"name {v!r} must match {_NAME.pattern}")
        return v

    @field_validator("version")
    @classmethod
    def _version(cls, v: str) -> str:
        if not _VERSION.match(v):
            raise ValueError(f"version {v!r} must be a whole number")
        return v

    @field_validator("input_dim")
    @classmethod
    def _input_dim(cls, v: int, info: ValidationInfo) -> int:
        if info.data.get("kind") is Kind.token and v != 1:
            raise ValueError("token models have input_dim 1")
        return v

    @field_validator("vocab")
    @classmethod
    def _vocab(cls, v: list[str] | None, info: ValidationInfo) -> list[str] | None:
        kind = info.data.get("kind")
        if kind is Kind.token:
            if not v:
                raise ValueError("token models need vocab")
            out = info.data.get("output_dim")
            if out is not None and out != len(v):
                raise ValueError(f"output_dim {out} != len(vocab) {len(v)}")
        elif kind is not None and v is not None:
            raise ValueError("vocab is only for token models")
        return v

    @property
    def vocab_size(self) -> int:
        return len(self.vocab) if self.vocab else 0


@dataclass(frozen=True)
class ModelVersion:
    manifest: Manifest
    directory: Path

    @property
    def onnx_path(self) -> Path:
        return self.directory / ONNX_FILE

    @property
    def key(self) -> tuple[str, str]:
        return (self.manifest.name, self.manifest.version)


@dataclass(frozen=True)
class LoadError:
    path: Path
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.field}: {self.message}"


@dataclass
class Repository:
    root: Path
    models: dict[str, dict[str, ModelVersion]] = field(default_factory=dict)
    errors: list[LoadError] = field(default_factory=list)

    def versions(self, name: str) -> list[str]:
        return sorted(self.models.get(name, {}), key=int)

    def get(self, name: str, version: str = "") -> ModelVersion:
        versions = self.models.get(name)
        if not versions:
            raise NotFound(f"model {_short(name)!r} not found")
        if not version:
            return versions[self.versions(name)[-1]]
        try:
            return versions[version]
        except KeyError:
            raise NotFound(f"model {name!r} has no version {_short(version)!r}") from None

    def all(self) -> list[ModelVersion]:
        return [self.models[n][v] for n in sorted(self.models) for v in self.versions(n)]


def _short(text: str, limit: int = 64) -> str:
    """Client-chosen text in an error message, cut short: status messages travel in metadata."""
    return text if len(text) <= limit else text[:limit] + "..."


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _graph_errors(mv: ModelVersion) -> list[LoadError]:
    """Check the ONNX graph's input/output names, element types and ranks against the manifest."""
    import onnxruntime as ort  # imported here: discovery-only callers need not pay for it

    m = mv.manifest
    path = mv.onnx_path
    try:
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own exception types for bad files
        return [LoadError(path, "model.onnx", f"ONNX Runtime cannot load it: {exc}")]
    inputs = {i.name: i for i in sess.get_inputs()}
    outputs = {o.name: o for o in sess.get_outputs()}
    errs: list[LoadError] = []
    x_type = "tensor(int64)" if m.kind is Kind.token else "tensor(float)"
    x_rank = 2 if m.kind is Kind.token else 3
    expect_in = {
        m.tensors.x: (x_type, x_rank),
        m.tensors.h0: ("tensor(float)", 3),
        m.tensors.c0: ("tensor(float)", 3),
    }
    expect_out = {
        m.tensors.y: ("tensor(float)", 3),
        m.tensors.hn: ("tensor(float)", 3),
        m.tensors.cn: ("tensor(float)", 3),
    }
    for kind, expect, actual in (("input", expect_in, inputs), ("output", expect_out, outputs)):
        for name, (etype, rank) in expect.items():
            node = actual.get(name)
            if node is None:
                errs.append(
                    LoadError(
                        path,
                        f"tensors ({kind} {name!r})",
                        f"graph has no {kind} {name!r}; it has {sorted(actual)}",
                    )
                )
                continue
            if node.type != etype:
                errs.append(
                    LoadError(
                        path, f"tensors ({kind} {name!r})", f"type {node.type}, expected {etype}"
                    )
                )
            if len(node.shape) != rank:
                errs.append(
                    LoadError(
                        path,
                        f"tensors ({kind} {name!r})",
                        f"rank {len(node.shape)}, expected {rank}",
                    )
                )
                continue
            # Batch and time must be dynamic: sessions are batched, requests have any length.
            seq = name in (m.tensors.x, m.tensors.y)
            dynamic = {0: "batch", 1: "time"} if seq else {1: "batch"}
            fixed = [i for i in dynamic if isinstance(node.shape[i], int)]
            if fixed:
                axes = ", ".join(
                    f"{dynamic[i]} (axis {i}) is fixed at {node.shape[i]}" for i in fixed
                )
                errs.append(
                    LoadError(path, f"tensors ({kind} {name!r})", f"{axes}; export it as dynamic")
                )
        extra = set(actual) - set(expect)
        if extra:
            errs.append(LoadError(path, "tensors", f"graph has unexpected {kind}s {sorted(extra)}"))
    if errs:
        return errs
    # Fixed dimensions must agree with the manifest (batch and time are dynamic).
    checks = [
        (inputs[m.tensors.h0].shape, [m.layers, None, m.hidden_size], "h0"),
        (inputs[m.tensors.c0].shape, [m.layers, None, m.hidden_size], "c0"),
        (outputs[m.tensors.y].shape, [None, None, m.output_dim], "y"),
    ]
    if m.kind is Kind.real:
        checks.append((inputs[m.tensors.x].shape, [None, None, m.input_dim], "x"))
    for shape, want, label in checks:
        for got, exp, axis in zip(shape, want, range(len(want)), strict=True):
            if exp is not None and isinstance(got, int) and got != exp:
                field_name = {
                    "h0": "layers/hidden_size",
                    "c0": "layers/hidden_size",
                    "y": "output_dim",
                    "x": "input_dim",
                }[label]
                errs.append(
                    LoadError(
                        path,
                        field_name,
                        f"{label} axis {axis} is {got} in the graph, manifest says {exp}",
                    )
                )
    return errs


def load_version(
    directory: Path, check_graph: bool = True
) -> tuple[ModelVersion | None, list[LoadError]]:
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        return None, [LoadError(manifest_path, MANIFEST, "missing")]
    try:
        raw = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as exc:  # ValueError: bad JSON or not UTF-8
        return None, [LoadError(manifest_path, MANIFEST, f"not valid JSON: {exc}")]
    try:
        manifest = Manifest.model_validate(raw)
    except ValidationError as exc:
        return None, [
            LoadError(manifest_path, ".".join(str(p) for p in e["loc"]) or "manifest", e["msg"])
            for e in exc.errors()
        ]
    errs: list[LoadError] = []
    if manifest.name != directory.parent.name:
        errs.append(
            LoadError(
                manifest_path,
                "name",
                f"{manifest.name!r} but the directory is {directory.parent.name!r}",
            )
        )
    if manifest.version != directory.name:
        errs.append(
            LoadError(
                manifest_path,
                "version",
                f"{manifest.version!r} but the directory is {directory.name!r}",
            )
        )
    mv = ModelVersion(manifest, directory)
    if not mv.onnx_path.is_file():
        errs.append(LoadError(mv.onnx_path, ONNX_FILE, "missing"))
        return None, errs
    digest = sha256_file(mv.onnx_path)
    if digest != manifest.sha256:
        errs.append(
            LoadError(
                manifest_path, "sha256", f"manifest says {manifest.sha256}, {ONNX_FILE} is {digest}"
            )
        )
    if errs:
        return None, errs
    if check_graph:
        errs = _graph_errors(mv)
        if errs:
            return None, errs
    return mv, []


def is_model_name(name: str) -> bool:
    """Whether name may be a model's (and so a directory under the repository root)."""
    return bool(_NAME.match(name))


def is_version(version: str) -> bool:
    return bool(_VERSION.match(version))


def model_dirs(root: Path) -> list[Path]:
    """The repository's model directories, by name (none when root is not a directory)."""
    return sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


def version_dirs(model_dir: Path) -> list[Path]:
    """A model directory's version directories (whole numbers), by name."""
    return sorted(p for p in model_dir.iterdir() if p.is_dir() and is_version(p.name))


def load_repository(root: Path, check_graph: bool = True) -> Repository:
    """Load every valid model version under root; broken ones are reported, not fatal."""
    repo = Repository(root=root)
    if not root.is_dir():
        repo.errors.append(LoadError(root, "model_repository", "not a directory"))
        return repo
    for model_dir in model_dirs(root):
        for version_dir in version_dirs(model_dir):
            mv, errs = load_version(version_dir, check_graph=check_graph)
            repo.errors.extend(errs)
            for e in errs:
                logger.error("model %s/%s not loaded: %s", model_dir.name, version_dir.name, e)
            if mv is not None:
                repo.models.setdefault(mv.manifest.name, {})[mv.manifest.version] = mv
    return repo
