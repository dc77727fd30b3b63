"""The README's Python and command-line examples work as written, against the bundled models."""

from __future__ import annotations

import contextlib
import io
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.server import ServerThread, serve

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def _block(lang: str, contains: str) -> str:
    for m in re.finditer(rf"```{lang}\n(.*?)```", README, re.S):
        if contains in m.group(1):
            return m.group(1)
    raise AssertionError(f"README has no {lang} block containing {contains!r}")


@pytest.fixture(scope="module")
def server(shipped_models_dir: Path) -> Iterator[ServerThread]:
    yield from serve(shipped_models_dir)


def test_python_example(server: ServerThread) -> None:
    code = _block("python", "Client(").replace("127.0.0.1:50051", server.target)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), {})
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    values = [float(v) for v in re.findall(r"-?\d+\.\d+(?:e-?\d+)?", lines[0])]
    assert len(values) == 6  # 2 + 1 steps x (temperature, dew point), each for the next hour
    assert all(-10 < v < 35 for v in values)  # plausible temperatures in °C
    assert lines[0].endswith(" 3")  # next_seq
    assert lines[1] == "(24, 2)"
    # The example ends its session.
    assert not server.engine.model("forecaster").store.slot("sensor-7")


def test_command_line_examples(server: ServerThread) -> None:
    for line in _block("sh", "lstm-serve stream").strip().splitlines():
        cmd = re.sub(r"(lstm-serve \w+)", rf"\1 --target {server.target}", line)
        cmd = cmd.replace(".venv/bin/lstm-serve", f"{sys.executable} -m lstm_serve.cli.main")
        result = subprocess.run(
            cmd, shell=True, cwd=ROOT, capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, result.stderr
        out = result.stdout.strip().splitlines()
        if "stream" in cmd:
            assert [r.split(",")[0] for r in out] == ["0", "1", "2"]
        else:
            assert len(out) == len("def main(\n")  # one line per character sent
            assert all(len(re.findall(r":[01]\.\d{3}", r)) == 3 for r in out)  # top 3 each
