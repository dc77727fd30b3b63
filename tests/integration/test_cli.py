"""The `lstm-serve` client commands, run as real subprocesses against a real server."""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lstm_serve.bench.procs.process import stop_process
from lstm_serve.cli.main import build_parser
from lstm_serve.client import Client
from tests.helpers.certs import Pki
from tests.helpers.server import ServerThread, xs
from tests.oracle.one_pass import OnePass

ROOT = Path(__file__).resolve().parents[2]
# Outputs are printed with %.6g: six significant digits.
RTOL, ATOL = 2e-5, 2e-5


def cli(*args: str, stdin: str = "", timeout: float = 60) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).with_name("lstm-serve")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "lstm_serve.cli.main"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("LSTM_SERVE_")}
    return subprocess.run(
        [*cmd, *args], input=stdin, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
        env=env,
    )  # fmt: skip


def csv_of(x: np.ndarray, header: bool = True) -> str:
    lines = ["a,b,c"] if header else []
    lines += [",".join(repr(float(v)) for v in row) for row in x]
    return "\n".join(lines) + "\n"


def parse_rows(stdout: str) -> tuple[list[int], np.ndarray]:
    """'seq,v1,v2,...' lines -> seqs and values."""
    seqs, rows = [], []
    for line in stdout.strip().splitlines():
        head, *vals = line.split(",")
        seqs.append(int(head))
        rows.append([float(v) for v in vals])
    return seqs, np.array(rows, np.float32)


# -- models ----------------------------------------------------------------------------------


def test_models_lists_the_repository(tiny_repo: Path) -> None:
    proc = cli("models", "--model-repository", str(tiny_repo))
    assert proc.returncode == 0, proc.stderr
    rows = [line.split() for line in proc.stdout.strip().splitlines()[1:]]
    by_name = {r[0]: r for r in rows}
    assert set(by_name) == {"tiny", "tinytok"}
    assert by_name["tiny"][1:4] == ["1", "real", "3"]
    assert by_name["tinytok"][1:3] == ["1", "token"]
    assert proc.stderr.strip() == ""

    proc = cli("models", "--model-repository", str(tiny_repo), "--json")
    assert proc.returncode == 0, proc.stderr
    manifests = json.loads(proc.stdout)
    assert sorted(m["name"] for m in manifests) == ["tiny", "tinytok"]
    assert {m["name"]: m["hidden_size"] for m in manifests} == {"tiny": 16, "tinytok": 16}


def test_models_shows_the_held_out_scores(shipped_models_dir: Path) -> None:
    proc = cli("models", "--model-repository", str(shipped_models_dir))
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((shipped_models_dir / "forecaster" / "1" / "manifest.json").read_text())
    metrics = manifest["metrics"]
    for h in metrics["horizons"]:
        line = next(x for x in proc.stdout.splitlines() if f"{h} step" in x and "test MAE" in x)
        assert f"LSTM {metrics['model'][f'h{h}']['mae']:.3f}" in line
        for name, b in metrics["baselines"].items():
            assert f"{name} {b[f'h{h}']['mae']:.3f}" in line
    charlm = json.loads((shipped_models_dir / "charlm" / "1" / "manifest.json").read_text())
    metrics = charlm["metrics"]
    source = metrics["held_out_code"]["source"]
    for key, label in (
        ("test_bits_per_char", "test bits/char"),
        ("held_out_code_bits_per_char", f"held-out code ({source}) bits/char"),
    ):
        line = next(x for x in proc.stdout.splitlines() if f"{label}: LSTM" in x)
        assert f"LSTM {metrics['model'][key]:.3f}" in line
        for name in ("unigram", "bigram", "kn5", "xz_9"):
            assert f"{name} {metrics['baselines'][name][key]:.3f}" in line


def test_models_reports_a_broken_version(tiny_repo_copy: Path) -> None:
    manifest = tiny_repo_copy / "tiny" / "1" / "manifest.json"
    raw = json.loads(manifest.read_text())
    raw["layers"] = 0
    manifest.write_text(json.dumps(raw))
    proc = cli("models", "--model-repository", str(tiny_repo_copy))
    assert proc.returncode == 1
    assert str(manifest) in proc.stderr
    assert "layers" in proc.stderr
    assert "Traceback" not in proc.stderr
    # The healthy model is still listed.
    names = [line.split()[0] for line in proc.stdout.strip().splitlines()[1:]]
    assert names == ["tinytok"]


def test_models_on_a_missing_directory(tmp_path: Path) -> None:
    proc = cli("models", "--model-repository", str(tmp_path / "nope"))
    assert proc.returncode == 1
    assert "nope" in proc.stderr and "Traceback" not in proc.stderr


# -- health ----------------------------------------------------------------------------------


def test_health_against_a_live_server(server: ServerThread) -> None:
    proc = cli("health", "--target", server.target)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "SERVING"
    assert cli("health", "--target", server.target, "--service", "tinytok").returncode == 0
    proc = cli("health", "--target", server.target, "--service", "no-such-model")
    assert proc.returncode == 1
    assert "NOT_FOUND" in proc.stderr


def test_health_against_a_closed_port() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again when the block ends; nobody listens there
    proc = cli("health", "--target", f"127.0.0.1:{port}", "--timeout", "2")
    assert proc.returncode == 1
    assert "UNAVAILABLE" in proc.stderr or "DEADLINE_EXCEEDED" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "args",
    [
        ("predict", "--model", "tiny", "--session", "s"),
        ("stream", "--model", "tiny", "--session", "s"),
        ("forecast", "--model", "tiny", "--session", "s", "--horizon", "2"),
    ],
    ids=lambda a: a[0],
)
def test_client_commands_without_a_server_fail_in_one_line(args: tuple[str, ...]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = cli(*args, "--target", f"127.0.0.1:{port}", stdin="1,2,3\n")
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith("error: UNAVAILABLE") and f"127.0.0.1:{port}" in line


def test_a_missing_input_file_fails_in_one_line(server: ServerThread, tmp_path: Path) -> None:
    proc = cli(
        "predict", "--target", server.target, "--model", "tiny", "--session", "s",
        "--input", str(tmp_path / "missing.csv"),
    )  # fmt: skip
    assert proc.returncode == 1
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith("error:") and "missing.csv" in line


# -- predict / stream ------------------------------------------------------------------------


def test_predict_csv_from_stdin(server: ServerThread, oracle: OnePass) -> None:
    x = xs(1, 5)
    proc = cli(
        "predict", "--target", server.target, "--model", "tiny", "--session", "cli-predict",
        stdin=csv_of(x),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    seqs, y = parse_rows(proc.stdout)
    assert seqs == [0, 1, 2, 3, 4]
    np.testing.assert_allclose(y, oracle.run(x)[0], rtol=RTOL, atol=ATOL)
    # A second call continues the session (and says so with --seq).
    x2 = xs(2, 2)
    proc = cli(
        "predict", "--target", server.target, "--model", "tiny", "--session", "cli-predict",
        "--seq", "5", stdin=csv_of(x2, header=False),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    seqs, y = parse_rows(proc.stdout)
    assert seqs == [5, 6]
    full = np.concatenate([x, x2])
    np.testing.assert_allclose(y, oracle.run(full)[0][5:], rtol=RTOL, atol=ATOL)


def test_predict_refuses_a_gap(server: ServerThread) -> None:
    proc = cli(
        "predict", "--target", server.target, "--model", "tiny", "--session", "cli-gap",
        "--seq", "3", stdin=csv_of(xs(3, 1)),
    )  # fmt: skip
    assert proc.returncode == 1
    assert "NOT_FOUND" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""


def test_predict_from_a_file(server: ServerThread, oracle: OnePass, tmp_path: Path) -> None:
    x = xs(4, 3)
    path = tmp_path / "steps.csv"
    path.write_text(csv_of(x))
    proc = cli(
        "predict", "--target", server.target, "--model", "tiny", "--session", "cli-file",
        "--input", str(path),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    _, y = parse_rows(proc.stdout)
    np.testing.assert_allclose(y, oracle.run(x)[0], rtol=RTOL, atol=ATOL)


def test_stream_csv_one_line_per_step(server: ServerThread, oracle: OnePass) -> None:
    x = xs(5, 7)
    proc = cli(
        "stream", "--target", server.target, "--model", "tiny", "--session", "cli-stream",
        "--chunk", "3", stdin=csv_of(x),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    seqs, y = parse_rows(proc.stdout)
    assert seqs == list(range(7))
    np.testing.assert_allclose(y, oracle.run(x)[0], rtol=RTOL, atol=ATOL)
    # Streaming again continues where the session is.
    x2 = xs(6, 2)
    proc = cli(
        "stream", "--target", server.target, "--model", "tiny", "--session", "cli-stream",
        stdin=csv_of(x2, header=False),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    seqs, y = parse_rows(proc.stdout)
    assert seqs == [7, 8]
    full = np.concatenate([x, x2])
    np.testing.assert_allclose(y, oracle.run(full)[0][7:], rtol=RTOL, atol=ATOL)
    with Client(server.target) as c:
        assert c.get_session("tiny", "cli-stream").next_seq == 9


def test_stream_text_to_a_token_model(server: ServerThread, tok_oracle: OnePass) -> None:
    with Client(server.target) as c:
        vocab = json.loads(c.get_model("tinytok").manifest_json)["vocab"]
    text = "".join(vocab[i] for i in (1, 4, 2, 7))
    proc = cli(
        "stream", "--target", server.target, "--model", "tinytok", "--session", "cli-tok",
        "--top-k", "2", stdin=text,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 4
    probs = tok_oracle.run(np.array([1, 4, 2, 7], np.int64))[0]
    for i, line in enumerate(lines):
        seq, shown = line.split(",", 1)
        assert int(seq) == i
        best = shown.split()[0]  # "'c':0.123"
        name, p = best.rsplit(":", 1)
        assert name == repr(vocab[int(np.argmax(probs[i]))])
        assert abs(float(p) - float(probs[i].max())) < 1e-3
        assert len(shown.split()) == 2


def _with_a_bad_line(x: np.ndarray, bad: str) -> str:
    """A header, two rows of x, a blank line, `bad` (line 5), then the rest of x."""
    rows = csv_of(x).splitlines()
    return "\n".join([*rows[:3], "", bad, *rows[3:]]) + "\n"


@pytest.mark.parametrize("bad,chunk", [("foo,3,4", 1), ("1,,3", 3)])
def test_stream_stops_at_a_line_that_is_not_numbers(
    server: ServerThread, oracle: OnePass, bad: str, chunk: int
) -> None:
    x = xs(8, 4)
    session = f"cli-bad-{chunk}"
    proc = cli(
        "stream", "--target", server.target, "--model", "tiny", "--session", session,
        "--chunk", str(chunk), stdin=_with_a_bad_line(x, bad),
    )  # fmt: skip
    assert proc.returncode == 1
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith(f"error: stdin line 5 ({bad!r})"), line
    assert "the 2 step(s) before it were sent" in line
    # The lines before it were sent as they came (with --chunk 3, the part chunk too) ...
    seqs, y = parse_rows(proc.stdout)
    assert seqs == [0, 1]
    np.testing.assert_allclose(y, oracle.run(x[:2])[0], rtol=RTOL, atol=ATOL)
    # ... and nothing from the bad line on.
    with Client(server.target) as c:
        assert c.get_session("tiny", session).next_seq == 2


@pytest.mark.parametrize(
    "bad,why",
    [
        ("foo,3,4", "is not a row of numbers"),
        ("1,,3", "is not a row of numbers"),
        ("1,2", "has 2 values, the rows before it 3"),
        ("nan,1,2", "holds a NaN or Inf"),
    ],
)
def test_predict_sends_nothing_when_a_line_is_bad(
    server: ServerThread, tmp_path: Path, bad: str, why: str
) -> None:
    path = tmp_path / "steps.csv"
    path.write_text(_with_a_bad_line(xs(9, 4), bad))
    proc = cli(
        "predict", "--target", server.target, "--model", "tiny", "--session", "cli-bad-predict",
        "--input", str(path),
    )  # fmt: skip
    assert proc.returncode == 1
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith(f"error: {path} line 5 ({bad!r}) {why}"), line
    assert proc.stdout == ""
    with Client(server.target) as c:
        assert not c.get_session("tiny", "cli-bad-predict").exists


# -- forecast --------------------------------------------------------------------------------


def test_forecast_prints_horizon_lines(server: ServerThread, oracle: OnePass) -> None:
    x = xs(7, 4)
    with Client(server.target) as c:
        c.predict("tiny", "cli-fc", x, seq=0)
    proc = cli(
        "forecast", "--target", server.target, "--model", "tiny", "--session", "cli-fc",
        "--horizon", "5",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    rows = np.array(
        [[float(v) for v in line.split(",")] for line in proc.stdout.strip().splitlines()]
    )
    assert rows.shape == (5, 3)
    seq, expected = x, []
    for _ in range(5):
        y = oracle.run(seq)[0][-1]
        expected.append(y)
        seq = np.concatenate([seq, y[None]])
    np.testing.assert_allclose(rows, np.stack(expected), rtol=RTOL, atol=ATOL)
    with Client(server.target) as c:
        assert c.get_session("tiny", "cli-fc").next_seq == 4  # not committed


def test_forecast_commit_and_errors(server: ServerThread) -> None:
    with Client(server.target) as c:
        c.predict("tinytok", "cli-fct", tokens=[1, 2, 3], seq=0)
    proc = cli(
        "forecast", "--target", server.target, "--model", "tinytok", "--session", "cli-fct",
        "--horizon", "6", "--commit",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.rstrip("\n")) == 6  # one character per generated token
    with Client(server.target) as c:
        assert c.get_session("tinytok", "cli-fct").next_seq == 9
    proc = cli(
        "forecast", "--target", server.target, "--model", "tiny", "--session", "cli-none",
        "--horizon", "3",
    )  # fmt: skip
    assert proc.returncode == 1
    assert "NOT_FOUND" in proc.stderr and "Traceback" not in proc.stderr


# -- serve -----------------------------------------------------------------------------------


def test_serve_with_a_broken_repository_exits_1(tmp_path: Path) -> None:
    proc = cli("serve", "--port", "0", "--metrics-port", "-1", "--model-repository", str(tmp_path))
    assert proc.returncode == 1
    assert "no loadable model" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_serve_with_an_invalid_flag_says_which(tiny_repo: Path) -> None:
    proc = cli("serve", "--port", "-5", "--model-repository", str(tiny_repo))
    assert proc.returncode != 0
    assert "port" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_serve_with_an_out_of_range_metrics_port_says_how_to_set_it(tiny_repo: Path) -> None:
    for port in ("-2", "65536"):
        proc = cli(
            "serve", "--port", "0", "--metrics-port", port, "--model-repository", str(tiny_repo)
        )
        assert proc.returncode == 2, proc.stderr
        [line] = proc.stderr.strip().splitlines()
        assert "metrics_port (--metrics-port or LSTM_SERVE_METRICS_PORT)" in line
        assert "-1 disables" in line  # what the setting means, not only what is wrong


@pytest.mark.parametrize(
    "flag,env",
    [
        ("--port", "LSTM_SERVE_PORT"),
        ("--metrics-port", "LSTM_SERVE_METRICS_PORT"),
        ("--health-port", "LSTM_SERVE_HEALTH_PORT"),
    ],
)
def test_serve_on_a_taken_port_names_it_in_one_line(tiny_repo: Path, flag: str, env: str) -> None:
    ports = {"--port": "0", "--metrics-port": "-1", "--health-port": "-1"}
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        ports[flag] = str(port)
        proc = cli(
            "serve", *(w for p in ports.items() for w in p), "--model-repository", str(tiny_repo)
        )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr and "Event loop is closed" not in proc.stderr
    [line] = [x for x in proc.stderr.splitlines() if " ERROR " in x]
    assert f"127.0.0.1:{port}" in line and "Address already in use" in line
    assert f"{flag} or {env}" in line
    # Ports are bound before the models load: a taken one fails at once.
    assert "loaded" not in proc.stderr


def _serve_until_listening(*args: str) -> list[str]:
    """Start `lstm-serve serve`, return its log up to the "listening" line, then stop it."""
    exe = Path(sys.executable).with_name("lstm-serve")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "lstm_serve.cli.main"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("LSTM_SERVE_")}
    proc = subprocess.Popen(
        [*cmd, "serve", *args], stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env
    )
    lines = []
    try:
        assert proc.stderr is not None
        for line in proc.stderr:  # ends at EOF if the server exits
            lines.append(line)
            if "listening on" in line:
                break
    finally:
        stop_process(proc)
    assert any("listening on" in x for x in lines), "".join(lines)
    return lines


def test_serve_logs_the_metrics_port_and_warns_of_tokens_in_clear(
    tiny_repo: Path, tmp_path: Path
) -> None:
    lines = _serve_until_listening(
        "--port", "0", "--metrics-port", "-1", "--auth-tokens", "ops:s3cret",
        "--model-repository", str(tiny_repo),
    )  # fmt: skip
    [listening] = [x for x in lines if "listening on" in x]
    assert "metrics off" in listening and "127.0.0.1:0" not in listening
    [warning] = [x for x in lines if " WARNING " in x]
    assert "clear text" in warning and "--tls-cert" in warning
    # With TLS the tokens are not in clear: no warning; metrics on the port really bound.
    pki = Pki.create(tmp_path)
    lines = _serve_until_listening(
        "--port", "0", "--metrics-port", "0", "--auth-tokens", "ops:s3cret",
        "--tls-cert", str(pki.server.cert_path), "--tls-key", str(pki.server.key_path),
        "--model-repository", str(tiny_repo),
    )  # fmt: skip
    [listening] = [x for x in lines if "listening on" in x]
    metrics_port = int(listening.split("metrics 127.0.0.1:")[1].split(",")[0])
    assert metrics_port > 0
    assert not [x for x in lines if " WARNING " in x]


def test_version() -> None:
    from importlib.metadata import version

    proc = cli("--version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"lstm-serve {version('lstm-serve')}"


# -- train -----------------------------------------------------------------------------------


def _torch_pin() -> str:
    import tomllib

    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    [pin] = [r for r in extra["train"] if r.startswith("torch")]
    return pin


@pytest.mark.parametrize("command", ["train", "export"])
def test_train_without_torch_says_how_to_install_it(command: str, tmp_path: Path) -> None:
    # The `make serve` venv has no torch: make it unimportable in a real CLI process.
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from lstm_serve.cli.main import main\n"
        "sys.exit(main(sys.argv[1:]))"
    )
    args = {
        "train": ["train", "models/forecaster/train.toml", "--out", str(tmp_path / "m")],
        "export": ["export", "--checkpoint", str(tmp_path / "c.pt"), "--out", str(tmp_path / "m")],
    }[command]
    env = {k: v for k, v in os.environ.items() if not k.startswith("LSTM_SERVE_")}
    proc = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT, env=env,
        timeout=120,
    )  # fmt: skip
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    [line] = proc.stderr.strip().splitlines()
    assert f"lstm-serve {command} needs the training extra, and torch cannot be imported" in line
    python = Path(sys.executable)
    shown = python.relative_to(ROOT) if python.is_relative_to(ROOT) else python
    assert f"`{shown} -m pip install -e '.[train]'`" in line
    pin = _torch_pin()  # the exact version pyproject.toml pins, never a newer one
    assert pin.startswith("torch==") and pin in line
    assert not (tmp_path / "m").exists()


def test_the_readme_retrain_command_can_run_as_written() -> None:
    readme = (ROOT / "README.md").read_text()
    [command] = re.findall(r"`(\.venv/bin/lstm-serve train [^`]+)`", readme)
    args = shlex.split(command)[1:]
    parsed = build_parser(args).parse_args(args)
    target = ROOT / parsed.out / "forecaster" / parsed.version
    # It may be run again (a retrain), and it never replaces the shipped model.
    assert parsed.force or not target.exists(), command
    assert not target.resolve().is_relative_to(ROOT / "models"), command
    assert parsed.recipe == Path("models/forecaster/train.toml")
