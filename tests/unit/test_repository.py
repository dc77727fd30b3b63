"""lstm_serve.core.repository: discovery, manifest validation, graph checks and version lookup.

Every broken version is reported as a LoadError naming the file and the field at fault, and never
stops the other versions from loading.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from lstm_serve.core.errors import NotFound
from lstm_serve.core.repository import LoadError, load_repository, load_version, sha256_file
from tests.helpers.models import clone_version

Edit = Callable[[dict[str, Any]], None]


def read_manifest(d: Path) -> dict[str, Any]:
    raw: dict[str, Any] = json.loads((d / "manifest.json").read_text())
    return raw


def write_manifest(d: Path, raw: dict[str, Any]) -> None:
    (d / "manifest.json").write_text(json.dumps(raw))


def edit_manifest(d: Path, edit: Edit) -> None:
    raw = read_manifest(d)
    edit(raw)
    write_manifest(d, raw)


def load_errors(d: Path) -> list[LoadError]:
    mv, errs = load_version(d)
    assert mv is None, "a broken version must not load"
    assert errs, "a version that does not load must say why"
    return errs


def where(errs: list[LoadError]) -> list[tuple[Path, str]]:
    return [(e.path, e.field) for e in errs]


@pytest.fixture
def real_dir(tiny_repo_copy: Path) -> Path:
    return tiny_repo_copy / "tiny" / "1"


@pytest.fixture
def token_dir(tiny_repo_copy: Path) -> Path:
    return tiny_repo_copy / "tinytok" / "1"


# --------------------------------------------------------------------------------------------
# Good versions
# --------------------------------------------------------------------------------------------


def test_good_versions_load(tiny_repo: Path) -> None:
    repo = load_repository(tiny_repo)
    assert repo.errors == []
    assert sorted(repo.models) == ["tiny", "tinytok"]
    tok = repo.get("tinytok").manifest
    assert (tok.kind.value, tok.vocab_size, tok.output_dim, tok.input_dim) == ("token", 12, 12, 1)
    real = repo.get("tiny")
    assert real.onnx_path == tiny_repo / "tiny" / "1" / "model.onnx"
    assert real.key == ("tiny", "1")
    assert real.manifest.sha256 == sha256_file(real.onnx_path)


# --------------------------------------------------------------------------------------------
# manifest.json itself
# --------------------------------------------------------------------------------------------


def test_missing_manifest(real_dir: Path) -> None:
    (real_dir / "manifest.json").unlink()
    errs = load_errors(real_dir)
    assert where(errs) == [(real_dir / "manifest.json", "manifest.json")]
    assert "missing" in errs[0].message


@pytest.mark.parametrize(
    "content",
    [b"{not json", b"", b'{"name": "tiny",', b"\xff\xfe{}"],
    ids=["garbage", "empty", "truncated", "not-utf8"],
)
def test_manifest_not_json(real_dir: Path, content: bytes) -> None:
    (real_dir / "manifest.json").write_bytes(content)
    errs = load_errors(real_dir)
    assert where(errs) == [(real_dir / "manifest.json", "manifest.json")]
    assert "not valid JSON" in errs[0].message


def _del(*keys: str) -> Edit:
    def edit(raw: dict[str, Any]) -> None:
        target = raw
        for k in keys[:-1]:
            target = target[k]
        del target[keys[-1]]

    return edit


def _set(**changes: Any) -> Edit:
    return lambda raw: raw.update(changes)


SCHEMA_CASES: list[tuple[str, str, Edit, str, str]] = [
    # (id, model, edit, field, words in the message)
    ("missing-sha256", "tiny", _del("sha256"), "sha256", "required"),
    ("missing-hidden", "tiny", _del("hidden_size"), "hidden_size", "required"),
    ("missing-data", "tiny", _del("data"), "data", "required"),
    ("missing-licence", "tiny", _del("data", "licence"), "data.licence", "required"),
    ("bad-kind", "tiny", _set(kind="image"), "kind", "'real' or 'token'"),
    ("bad-layers", "tiny", _set(layers=0), "layers", "greater than or equal to 1"),
    ("bad-sha256-format", "tiny", _set(sha256="ABC"), "sha256", "pattern"),
    ("unknown-field", "tiny", _set(colour="red"), "colour", "Extra inputs"),
    ("bad-output", "tiny", _set(output="odds"), "output", "'values'"),
    ("bad-name-format", "tiny", _set(name="Tiny Model"), "name", "must match"),
    ("bad-version-format", "tiny", _set(version="v1"), "version", "whole number"),
    ("vocab-on-real", "tiny", _set(vocab=["a", "b", "c"]), "vocab", "only for token"),
    ("token-without-vocab", "tinytok", _del("vocab"), "vocab", "need vocab"),
    ("token-empty-vocab", "tinytok", _set(vocab=[]), "vocab", "need vocab"),
    (
        "vocab-output-mismatch",
        "tinytok",
        _set(output_dim=13),
        "vocab",
        "output_dim 13 != len(vocab) 12",
    ),
    ("token-input-dim", "tinytok", _set(input_dim=3), "input_dim", "input_dim 1"),
    ("bad-tensor-key", "tiny", _set(tensors={"ids": "x"}), "tensors.ids", "Extra inputs"),
]


@pytest.mark.parametrize(
    ("model", "edit", "field", "words"),
    [c[1:] for c in SCHEMA_CASES],
    ids=[c[0] for c in SCHEMA_CASES],
)
def test_schema_errors(
    tiny_repo_copy: Path, model: str, edit: Edit, field: str, words: str
) -> None:
    d = tiny_repo_copy / model / "1"
    edit_manifest(d, edit)
    errs = load_errors(d)
    assert where(errs) == [(d / "manifest.json", field)], [str(e) for e in errs]
    assert words in errs[0].message


def test_name_must_match_directory(real_dir: Path) -> None:
    edit_manifest(real_dir, _set(name="other"))
    errs = load_errors(real_dir)
    assert where(errs) == [(real_dir / "manifest.json", "name")]
    assert "'other'" in errs[0].message and "'tiny'" in errs[0].message


def test_version_must_match_directory(real_dir: Path) -> None:
    edit_manifest(real_dir, _set(version="2"))
    errs = load_errors(real_dir)
    assert where(errs) == [(real_dir / "manifest.json", "version")]
    assert "'2'" in errs[0].message and "'1'" in errs[0].message


# --------------------------------------------------------------------------------------------
# model.onnx
# --------------------------------------------------------------------------------------------


def test_missing_model_file(real_dir: Path) -> None:
    (real_dir / "model.onnx").unlink()
    errs = load_errors(real_dir)
    assert where(errs) == [(real_dir / "model.onnx", "model.onnx")]
    assert "missing" in errs[0].message


def test_sha256_mismatch(real_dir: Path) -> None:
    want = read_manifest(real_dir)["sha256"]
    with (real_dir / "model.onnx").open("ab") as f:
        f.write(b"\0")
    errs = load_errors(real_dir)
    assert where(errs) == [(real_dir / "manifest.json", "sha256")]
    assert want in errs[0].message
    assert sha256_file(real_dir / "model.onnx") in errs[0].message


def test_onnx_not_loadable(real_dir: Path) -> None:
    onnx_path = real_dir / "model.onnx"
    onnx_path.write_bytes(b"this is not a protobuf \x00\x01\x02" * 10)
    edit_manifest(real_dir, _set(sha256=sha256_file(onnx_path)))  # the digest is right
    errs = load_errors(real_dir)
    assert where(errs) == [(onnx_path, "model.onnx")]
    assert "ONNX Runtime cannot load it" in errs[0].message


def test_check_graph_false_skips_the_graph(real_dir: Path) -> None:
    onnx_path = real_dir / "model.onnx"
    onnx_path.write_bytes(b"garbage")
    edit_manifest(real_dir, _set(sha256=sha256_file(onnx_path)))
    mv, errs = load_version(real_dir, check_graph=False)
    assert errs == [] and mv is not None
    assert load_version(real_dir)[0] is None


@pytest.mark.parametrize(
    ("tensor", "axis", "what"), [("x", 0, "batch"), ("x", 1, "time"), ("h0", 1, "batch")]
)
def test_a_fixed_batch_or_time_axis_is_refused(
    real_dir: Path, tensor: str, axis: int, what: str
) -> None:
    """A graph exported with a fixed batch or time axis loads in ONNX Runtime but cannot run a
    batch of sessions or a request of another length (it failed the warm-up run, and stopped
    the server): refused at load, naming the axis."""
    import onnx

    onnx_path = real_dir / "model.onnx"
    model = onnx.load(onnx_path)
    node = next(i for i in model.graph.input if i.name == tensor)
    dim = node.type.tensor_type.shape.dim[axis]
    dim.ClearField("dim_param")
    dim.dim_value = 7
    onnx.save(model, onnx_path)
    edit_manifest(real_dir, _set(sha256=sha256_file(onnx_path)))
    errs = load_errors(real_dir)
    assert (onnx_path, f"tensors (input {tensor!r})") in where(errs), [str(e) for e in errs]
    assert any(f"{what} (axis {axis}) is fixed at 7" in e.message for e in errs)


@pytest.mark.parametrize("role", ["x", "h0", "c0", "y", "hn", "cn"])
def test_wrong_tensor_names(real_dir: Path, role: str) -> None:
    edit_manifest(real_dir, _set(tensors={role: "renamed"}))
    errs = load_errors(real_dir)
    onnx_path = real_dir / "model.onnx"
    kind = "input" if role in ("x", "h0", "c0") else "output"
    assert where(errs) == [
        (onnx_path, f"tensors ({kind} 'renamed')"),
        (onnx_path, "tensors"),
    ], [str(e) for e in errs]
    assert f"graph has no {kind} 'renamed'" in errs[0].message
    assert f"unexpected {kind}s ['{role}']" in errs[1].message


def test_graph_of_the_wrong_kind(token_dir: Path) -> None:
    """A token graph described as a real model: x has the wrong element type and rank."""

    def as_real(raw: dict[str, Any]) -> None:
        raw.update(kind="real", vocab=None, output="values", input_dim=1)

    edit_manifest(token_dir, as_real)
    errs = load_errors(token_dir)
    x_field = (token_dir / "model.onnx", "tensors (input 'x')")
    assert where(errs) == [x_field, x_field]
    assert "type tensor(int64), expected tensor(float)" in errs[0].message
    assert "rank 2, expected 3" in errs[1].message


@pytest.mark.parametrize(
    ("model", "changes", "field", "labels"),
    [
        ("tiny", {"hidden_size": 8}, "layers/hidden_size", ["h0 axis 2", "c0 axis 2"]),
        ("tiny", {"layers": 3}, "layers/hidden_size", ["h0 axis 0", "c0 axis 0"]),
        ("tiny", {"input_dim": 4}, "input_dim", ["x axis 2"]),
        ("tiny", {"output_dim": 5}, "output_dim", ["y axis 2"]),
        ("tinytok", {"hidden_size": 32}, "layers/hidden_size", ["h0 axis 2", "c0 axis 2"]),
        (
            "tinytok",
            {"output_dim": 5, "vocab": list("abcde")},
            "output_dim",
            ["y axis 2"],
        ),
    ],
    ids=["hidden", "layers", "input_dim", "output_dim", "token-hidden", "token-vocab"],
)
def test_wrong_dims(
    tiny_repo_copy: Path, model: str, changes: dict[str, Any], field: str, labels: list[str]
) -> None:
    d = tiny_repo_copy / model / "1"
    edit_manifest(d, _set(**changes))
    errs = load_errors(d)
    assert where(errs) == [(d / "model.onnx", field)] * len(labels), [str(e) for e in errs]
    for e, label in zip(errs, labels, strict=True):
        assert e.message.startswith(label), e.message
        assert "manifest says" in e.message


# --------------------------------------------------------------------------------------------
# A repository: broken versions are reported, the rest load
# --------------------------------------------------------------------------------------------


def test_broken_versions_do_not_stop_the_others(tiny_repo_copy: Path) -> None:
    root = tiny_repo_copy
    good = root / "tiny" / "1"
    # tiny/2: bad JSON; tiny/3: fine; tinytok/1: garbage ONNX; noonnx/1: no model.onnx;
    # wrongdims/1: graph does not match the manifest; a stray file and a non-numeric directory.
    (clone_version(good, root, version="2") / "manifest.json").write_text("{")
    clone_version(good, root, version="3")
    tok_onnx = root / "tinytok" / "1" / "model.onnx"
    tok_onnx.write_bytes(b"\x08garbage")
    edit_manifest(tok_onnx.parent, _set(sha256=sha256_file(tok_onnx)))
    (clone_version(good, root, name="noonnx", version="1") / "model.onnx").unlink()
    edit_manifest(clone_version(good, root, name="wrongdims", version="1"), _set(hidden_size=4))
    (root / "README.txt").write_text("not a model")
    (root / "tiny" / "latest").mkdir()

    repo = load_repository(root)

    assert {n: repo.versions(n) for n in repo.models} == {"tiny": ["1", "3"]}
    assert repo.get("tiny").manifest.version == "3"
    broken = {(e.path.parent.parent.name, e.path.parent.name, e.field) for e in repo.errors}
    assert broken == {
        ("tiny", "2", "manifest.json"),
        ("tinytok", "1", "model.onnx"),
        ("noonnx", "1", "model.onnx"),
        ("wrongdims", "1", "layers/hidden_size"),
    }
    with pytest.raises(NotFound):
        repo.get("tinytok")


def test_missing_root(tmp_path: Path) -> None:
    repo = load_repository(tmp_path / "nowhere")
    assert repo.models == {}
    assert where(repo.errors) == [(tmp_path / "nowhere", "model_repository")]


def test_empty_root(tmp_path: Path) -> None:
    repo = load_repository(tmp_path)
    assert repo.models == {} and repo.errors == [] and repo.all() == []


# --------------------------------------------------------------------------------------------
# Versions
# --------------------------------------------------------------------------------------------


@pytest.fixture
def many_versions(tiny_repo_copy: Path) -> Path:
    root = tiny_repo_copy
    for v in ("10", "9", "2"):
        clone_version(root / "tiny" / "1", root, version=v)
    return root


def test_newest_version_by_number(many_versions: Path) -> None:
    repo = load_repository(many_versions)
    assert repo.errors == []
    assert repo.versions("tiny") == ["1", "2", "9", "10"]
    newest = repo.get("tiny")
    assert newest.manifest.version == "10"  # numeric: '10' > '9'
    assert newest.directory == many_versions / "tiny" / "10"
    assert repo.get("tiny", "") is newest
    assert repo.get("tinytok").manifest.version == "1"


def test_get_a_given_version(many_versions: Path) -> None:
    repo = load_repository(many_versions)
    for v in ("1", "2", "9", "10"):
        mv = repo.get("tiny", v)
        assert mv.key == ("tiny", v)
        assert mv.directory == many_versions / "tiny" / v


def test_all_lists_every_version_in_order(many_versions: Path) -> None:
    repo = load_repository(many_versions)
    assert [mv.key for mv in repo.all()] == [
        ("tiny", "1"),
        ("tiny", "2"),
        ("tiny", "9"),
        ("tiny", "10"),
        ("tinytok", "1"),
    ]


def test_unknown_model_or_version_is_not_found(many_versions: Path) -> None:
    repo = load_repository(many_versions)
    with pytest.raises(NotFound, match="model 'nope' not found") as exc:
        repo.get("nope")
    assert exc.value.code == "NOT_FOUND"
    with pytest.raises(NotFound, match="model 'nope' not found"):
        repo.get("nope", "1")
    with pytest.raises(NotFound, match="has no version '3'"):
        repo.get("tiny", "3")
    with pytest.raises(NotFound, match="has no version '010'"):
        repo.get("tiny", "010")
    assert repo.versions("nope") == []
