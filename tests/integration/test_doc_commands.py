"""Every shell command in README.md and docs/*.md works as written.

lstm-serve's client commands run for real against a server with the bundled models; the rest
are checked by what can run here (no Docker engine, no hours-long benchmark): make targets by a
dry run, compose commands by `config -q` with the same profile, docker build/run by the
Dockerfile's stages and the settings, bench command lines by the CLI's own parser. A command
this file does not know fails the test, so a new example cannot go untested.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from lstm_serve.cli.main import build_parser
from lstm_serve.core.policy import POLICY_FILE, read_policy
from lstm_serve.server.settings import Settings
from tests.helpers.server import ServerThread, serve

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CLIENT_COMMANDS = {"health", "models", "predict", "stream", "forecast"}


def doc_commands() -> list[tuple[str, str]]:
    """(file, command) for each command line of each ```sh block; continuations joined,
    comments dropped."""
    out = []
    for path in DOCS:
        for block in re.findall(r"```sh\n(.*?)```", path.read_text(), re.S):
            for line in block.replace("\\\n", " ").splitlines():
                cmd = re.sub(r"(^|\s+)#.*$", "", line).strip()
                if cmd:
                    out.append((path.name, cmd))
    return out


COMMANDS = doc_commands()


@pytest.fixture(scope="module")
def server(shipped_models_dir: Path) -> Iterator[ServerThread]:
    yield from serve(shipped_models_dir)


def _lstm_serve_args(cmd: str) -> list[str]:
    """The arguments after `lstm-serve` in the last stage of a pipeline."""
    stage = cmd.split("|")[-1]
    words = shlex.split(stage)
    i = next(i for i, w in enumerate(words) if w.endswith("lstm-serve"))
    return words[i + 1 :]


def _run_client_command(cmd: str, target: str) -> subprocess.CompletedProcess[str]:
    args = _lstm_serve_args(cmd)
    if "--target" in args:
        args[args.index("--target") + 1] = target
    else:
        args += ["--target", target]
    stage = cmd.split("|")[-1]
    head = cmd[: len(cmd) - len(stage)]
    tail = shlex.join([sys.executable, "-m", "lstm_serve.cli.main", *args])
    return subprocess.run(
        head + tail, shell=True, cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def _check(cmd: str, server: ServerThread) -> None:
    words = shlex.split(cmd.split("|")[0])
    if any(w.endswith("lstm-serve") for w in shlex.split(cmd.split("|")[-1])):
        args = _lstm_serve_args(cmd)
        if args[0] == "serve" or args[:2] in (["models", "load"], ["models", "unload"]):
            # Loading and unloading run for real in test_model_control.py (they change what
            # this module's server serves); serving is every server test. Here: the flags.
            build_parser(args).parse_args(args)
            return
        if args[0] in CLIENT_COMMANDS:
            r = _run_client_command(cmd, server.target)
            assert r.returncode == 0, f"{cmd}\n{r.stderr}"
            assert r.stdout.strip(), f"{cmd} printed nothing"
            return
        if args[0] == "bench":  # run by tests/unit/test_bench.py; here: the flags exist
            build_parser(args).parse_args(args)
            return
        raise AssertionError(f"no check for lstm-serve {args[0]}: {cmd}")
    if words[1:3] == ["-m", "lstm_serve.bench.oip"]:  # run by test_kserve_protocol.py
        from lstm_serve.bench.oip import build_parser as oip_parser

        oip_parser().parse_args(words[3:])
        return
    if words[0] == "printf" and cmd.rstrip().endswith("/serving.toml"):
        # A model's serving.toml written by the docs: what it writes must be a valid one.
        text = subprocess.run(
            cmd.split(">")[0], shell=True, capture_output=True, text=True, check=True
        ).stdout
        with tempfile.TemporaryDirectory() as d:
            (Path(d) / POLICY_FILE).write_text(text)
            read_policy(Path(d))
        return
    if words[0] == "make":
        r = subprocess.run(["make", "-n", *words[1:]], cwd=ROOT, capture_output=True, text=True)
        assert r.returncode == 0, f"{cmd}\n{r.stderr}"
        return
    if words[:2] == ["docker", "compose"] or words[0] == "docker-compose":
        _check_compose(words)
        return
    if words[:2] == ["docker", "build"]:
        for part in cmd.split("&&"):
            _check_build(shlex.split(part))
        return
    if words[:2] == ["docker", "run"]:
        _check_run(words)
        return
    if words[:2] == ["docker", "push"]:
        # No registry here: the pushed name is one the build above tagged, and the manifests'
        # kustomization has the images entry the docs say to point at it.
        built = [c for _, c in COMMANDS if c.startswith("docker build") and words[2] in c]
        assert built, f"{cmd}: no documented build tags {words[2]}"
        assert "images:" in (ROOT / "deploy" / "k8s" / "kustomization.yaml").read_text()
        return
    if words[0].endswith("python") and words[1].startswith("scripts/"):
        _check_script(words[1], words[2:])
        return
    if words[:3] == ["kubectl", "apply", "-k"]:
        # The manifests themselves: tests/deploy/test_cluster_deploy.py validates each one.
        assert (ROOT / words[3] / "kustomization.yaml").is_file(), cmd
        return
    if words[0] == "curl" and "localhost:9090/api/v1/targets" in cmd:
        # Prometheus's targets API: tests/deploy/test_e2e_prometheus.py scrapes a live server
        # with the compose file's scrape config and asks this same API.
        assert "prometheus" in (ROOT / "deploy" / "docker-compose.yml").read_text()
        return
    raise AssertionError(f"no check for this documented command: {cmd}")


def _check_compose(words: list[str]) -> None:
    from tests.deploy.test_compose import compose_command

    i = words.index("-f")
    compose_file = ROOT / words[i + 1]
    assert compose_file.is_file(), words
    profile = []
    if "--profile" in words:
        profile = words[words.index("--profile") : words.index("--profile") + 2]
    r = subprocess.run(
        [*compose_command(), "-f", str(compose_file), *profile, "config", "-q"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, f"{words}\n{r.stderr}"
    if "--scale" in words:
        service = words[words.index("--scale") + 1].split("=")[0]
        assert f"\n  {service}:\n" in compose_file.read_text(), words


def _check_script(path: str, args: list[str]) -> None:
    """A script's command line parses (scripts that run for minutes are not run here)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("doc_script", ROOT / path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.parser().parse_args(args)


def _stages() -> set[str]:
    return set(re.findall(r"^FROM \S+ AS (\S+)", (ROOT / "Dockerfile").read_text(), re.M))


def _check_build(words: list[str]) -> None:
    assert words[:2] == ["docker", "build"], words
    if "--target" in words:
        assert words[words.index("--target") + 1] in _stages(), words
    assert words[-1] == "." and (ROOT / "Dockerfile").is_file()


def _check_run(words: list[str]) -> None:
    built = set()
    for _, cmd in COMMANDS:
        built.update(re.findall(r"docker build -t (\S+)", cmd))
    rest = iter(words[2:])
    for w in rest:
        if w.startswith("-"):
            if w not in RUN_FLAGS:
                next(rest)  # the option's value
            continue
        assert w in built, f"{w} is not built by any documented docker build"
        break
    for w in words:
        if w.startswith("LSTM_SERVE_"):
            name = w.split("=")[0].removeprefix("LSTM_SERVE_").lower()
            assert name in Settings.model_fields, w


RUN_FLAGS = {"--rm", "-d", "-it", "-i", "-t"}  # docker run options that take no value


def test_the_docs_have_commands() -> None:
    files = {f for f, _ in COMMANDS}
    assert {"README.md", "operations.md", "benchmarks.md"} <= files


@pytest.mark.parametrize("where,cmd", COMMANDS, ids=[f"{f}:{c[:50]}" for f, c in COMMANDS])
def test_documented_command(where: str, cmd: str, server: ServerThread) -> None:
    if where == "training.md":
        # Its commands train models and then serve them, in order: tests/unit/test_train_doc.py
        # runs every one end to end on the CSV the page makes; here, their flags parse.
        args = _lstm_serve_args(cmd)
        build_parser(args).parse_args(args)
        return
    _check(cmd, server)
