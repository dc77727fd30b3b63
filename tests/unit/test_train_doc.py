"""docs/training.md stays true: its tables list every field of the recipe and of the manifest
with its default, and its worked example runs as written, from the CSV it makes to a served
model's predictions, and its bring-your-own examples export and check a model."""

from __future__ import annotations

import contextlib
import json
import logging
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from lstm_serve.core.repository import (
    DataProvenance,
    Manifest,
    Normalisation,
    TensorNames,
    load_repository,
)
from lstm_serve.training.train import DataSpec, ModelSpec, Provenance, Recipe, TrainSpec

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "training.md"
TEXT = DOC.read_text()
DEMO = "/tmp/lstm-demo"  # the page's working directory, moved into tmp_path by the test
CLI = f"{shlex.quote(sys.executable)} -m lstm_serve.cli.main"

# The line that introduces each table -> the model whose fields it lists.
TABLES: dict[str, type[BaseModel]] = {
    "### Top level": Recipe,
    "### `[data]`": DataSpec,
    "### `[data.provenance]`": Provenance,
    "### `[model]`": ModelSpec,
    "### `[train]`": TrainSpec,
    "### The manifest, every field": Manifest,
    "`tensors`:": TensorNames,
    "`normalisation` (`lstm-serve train` records it for real models):": Normalisation,
    "`data`:": DataProvenance,
}

EPOCH_LINE = re.compile(
    r"^epoch (\d+)/(\d+)  train \d+\.\d{5}  val_mae \d+\.\d{5}( \*)?  lr \S+  "
    r"\d+\.\ds/epoch  ETA (\d+s|\d+m\d\ds|\d+h\d\dm)( \(time limit\))?$"
)


def _table(marker: str) -> dict[str, tuple[str, str]]:
    """field -> (default cell, meaning cell) of the first table after the marker line."""
    lines = TEXT.splitlines()
    assert lines.count(marker) == 1, f"docs/training.md needs one line {marker!r}"
    i = lines.index(marker) + 1
    while not lines[i].startswith("|"):
        i += 1
    rows: dict[str, tuple[str, str]] = {}
    for line in lines[i + 2 :]:  # past the header and its rule
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        name = re.fullmatch(r"`(\w+)`", cells[0])
        assert name, f"{marker}: {line}"
        rows[name[1]] = (cells[1], cells[2])
    return rows


def _literal(value: Any) -> str | None:
    """A default as the page writes it (None: a nested model, described in words)."""
    if isinstance(value, BaseModel):
        return None
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, str):
        return f'`"{value}"`'
    if isinstance(value, int | float):
        return f"`{value!r}`"
    if value in ([], {}):
        return f"`{value!r}`"
    raise AssertionError(f"no way to write the default {value!r}")


@pytest.mark.parametrize("marker", TABLES, ids=[m.__name__ for m in TABLES.values()])
def test_every_field_is_documented_with_its_default(marker: str) -> None:
    model = TABLES[marker]
    rows = _table(marker)
    assert list(rows) == list(model.model_fields), f"{marker}: the fields, in the model's order"
    for name, info in model.model_fields.items():
        default, meaning = rows[name]
        assert meaning, f"{model.__name__}.{name} has no meaning in docs/training.md"
        if info.is_required():
            assert default == "required", f"{model.__name__}.{name} is required"
            continue
        literal = _literal(info.get_default(call_default_factory=True))
        assert not default.startswith("required"), f"{model.__name__}.{name} has a default"
        if literal is not None:
            assert default.startswith(literal), f"{model.__name__}.{name}: {default} != {literal}"


# --------------------------------------------------------------------------- the worked example


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", TEXT, re.S)


def _commands() -> list[str]:
    """Each command line of the page's sh blocks, continuations joined, comments dropped."""
    out = []
    for block in _blocks("sh"):
        for line in block.replace("\\\n", " ").splitlines():
            cmd = re.sub(r"\s+#.*$", "", line).strip()
            if cmd:
                out.append(cmd)
    return out


def _words(cmd: str) -> list[str]:
    """The arguments after `lstm-serve` in the command's last stage."""
    words = shlex.split(cmd.split("|")[-1])
    i = next(i for i, w in enumerate(words) if w.endswith("lstm-serve"))
    return words[i + 1 :]


def _run(cmd: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        cmd.replace(".venv/bin/lstm-serve", CLI), shell=True, cwd=cwd, capture_output=True,
        text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, f"{cmd}\n{proc.stderr[-3000:]}"
    return proc


def _cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """`lstm-serve ARGS` in this process (the console script's own entry point): its stdout.

    In-process, so the two trainings share one import of torch, onnx and statsmodels."""
    from lstm_serve.cli.main import main

    capsys.readouterr()
    assert main(args) == 0, args
    return capsys.readouterr().out


def _check_training(out: str, logged: list[str], models: Path) -> None:
    """stdout: the version written; the log: one progress line per epoch, with its ETA, and
    the held-out scores."""
    version_dir = Path(out.strip().splitlines()[-1])
    assert version_dir.parent.parent == models
    manifest = json.loads((version_dir / "manifest.json").read_text())
    epochs = [m for line in logged if (m := EPOCH_LINE.match(line)) is not None]
    planned = manifest["training"]["recipe"]["train"]["epochs"]
    assert [int(m[1]) for m in epochs] == list(range(1, manifest["training"]["epochs_run"] + 1))
    assert all(int(m[2]) == planned for m in epochs)
    assert epochs[-1][4] == "0s"  # the last epoch leaves nothing to wait for
    held_out = "\n".join(logged[logged.index(HELD_OUT) :])
    assert re.search(r"test MAE.*, 1 step ahead: LSTM \d+\.\d{3}, persistence ", held_out)


HELD_OUT = "held-out scores, lower is better (how measured: metrics.held_out in manifest.json)"


@pytest.fixture
def _torch_threads() -> Iterator[None]:
    """Training sets torch's thread count from its recipe: put it back afterwards."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnx")
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
@pytest.mark.usefixtures("_torch_threads")
def test_the_worked_example_runs_as_written(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    from lstm_serve.cli.main import build_parser
    from tests.helpers.server import ServerThread

    # The checkpoints go to ./runs, as they do from the repository root.
    monkeypatch.chdir(tmp_path)
    caplog.set_level(logging.INFO, logger="lstm_serve.training")
    demo = tmp_path / "lstm-demo"

    def here(text: str) -> str:
        return text.replace(DEMO, str(demo))

    make_csv, export_mine, check_mine = _blocks("python")
    exec(compile(here(make_csv), "docs/training.md", "exec"), {})
    assert (demo / "room.csv").read_text().startswith("time,outdoor_c,indoor_c\n")
    for recipe in _blocks("toml"):
        saved = re.match(rf"# ({re.escape(DEMO)}/\S+\.toml):", recipe)
        assert saved, f"a toml block names where to save it: {recipe.splitlines()[0]}"
        Path(here(saved[1])).write_text(recipe)

    models = demo / "models"
    seen: list[str] = []
    with contextlib.ExitStack() as stack:
        server: ServerThread | None = None
        for cmd in map(here, _commands()):
            args = _words(cmd)
            seen.append(args[0])
            if args[0] == "train":
                assert cmd.startswith(".venv/bin/lstm-serve "), cmd
                caplog.clear()
                out = _cli(args, capsys)
                _check_training(out, [r.getMessage() for r in caplog.records], models)
            elif args[0] == "models":
                out = _cli(args, capsys)
                assert re.search(r"^indoor +1 +real +1 +1 ", out, re.M), out
                assert re.search(r"^room +1 +real +2 +2 ", out, re.M), out
            elif args[0] == "serve":
                parsed = build_parser(args).parse_args(args)
                server = stack.enter_context(ServerThread(model_repository=parsed.model_repository))
            elif args[0] in ("stream", "forecast"):
                assert server is not None, f"{cmd} comes before `lstm-serve serve`"
                assert "--target" in args
                cmd = re.sub(r"--target \S+", f"--target {server.target}", cmd)
                lines = _run(cmd, tmp_path).stdout.strip().splitlines()
                if args[0] == "stream":  # 24 rows after the header: index, 2 values each
                    assert [r.split(",")[0] for r in lines] == [str(i) for i in range(24)]
                    assert all(len(r.split(",")) == 3 for r in lines)
                else:
                    horizon = int(args[args.index("--horizon") + 1])
                    assert len(lines) == horizon and all(len(r.split(",")) == 2 for r in lines)
            else:
                raise AssertionError(f"no check for this command of docs/training.md: {cmd}")
    assert seen == ["train", "train", "models", "serve", "stream", "forecast"]
    repo = load_repository(models)
    assert repo.errors == [] and sorted(repo.models) == ["indoor", "room"]
    room = repo.get("room").manifest
    assert room.metrics["horizons"] == [1, 12]
    assert set(room.metrics["baselines"]) == {  # type: ignore[arg-type]
        "persistence", "seasonal_naive_24", "holt_winters", "linear_ar", "direct_linear",
    }  # fmt: skip

    # Bring your own: export a module of one's own, then check the recurrence of its graph.
    exec(compile(here(export_mine), "docs/training.md", "exec"), {})
    assert load_repository(models).get("mine", "1").manifest.hidden_size == 16
    exec(compile(here(check_mine), "docs/training.md", "exec"), {})
