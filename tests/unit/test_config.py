"""Settings: every field documented and exposed as a `serve` flag; env vars and flags; validation."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
from pydantic import ValidationError

from lstm_serve.cli.main import build_parser
from lstm_serve.core.runtime import Device
from lstm_serve.core.store import CapPolicy
from lstm_serve.server.app import settings_from_args
from lstm_serve.server.settings import Settings

FIELDS = list(Settings.model_fields)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No LSTM_SERVE_* from the outer environment leaks into these tests."""
    import os

    for key in list(os.environ):
        if key.startswith("LSTM_SERVE_"):
            monkeypatch.delenv(key)


@pytest.fixture(scope="module")
def parser() -> argparse.ArgumentParser:
    return build_parser()


def serve_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            sub: argparse.ArgumentParser = action.choices["serve"]
            return sub
    raise AssertionError("lstm-serve has no serve subcommand")


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def settings(parser: argparse.ArgumentParser, *argv: str) -> Settings:
    return settings_from_args(parser.parse_args(["serve", *argv]))


def test_settings_has_fields() -> None:
    assert {"port", "max_batch_size", "session_ttl_s", "snapshot_dir", "cap_policy"} <= set(FIELDS)


@pytest.mark.parametrize("name", FIELDS)
def test_every_field_is_documented(name: str) -> None:
    description = Settings.model_fields[name].description
    assert description and len(description.strip()) >= 10, name


@pytest.mark.parametrize("name", FIELDS)
def test_every_field_is_a_serve_flag(parser: argparse.ArgumentParser, name: str) -> None:
    serve = serve_parser(parser)
    action = serve._option_string_actions.get(flag(name))
    assert action is not None, f"serve has no {flag(name)}"
    assert action.dest == name
    description = Settings.model_fields[name].description
    assert action.help and description and description in action.help
    assert f"LSTM_SERVE_{name.upper()}" in action.help


def test_flags_reach_settings(parser: argparse.ArgumentParser, tmp_path: Path) -> None:
    s = settings(
        parser, "--port", "0", "--max-batch-size", "7", "--session-ttl-s", "1.5",
        "--cap-policy", "evict_lru", "--device", "cpu", "--snapshot-dir", str(tmp_path),
        "--metrics-port", "-1",
    )  # fmt: skip
    assert s.port == 0
    assert s.max_batch_size == 7
    assert s.session_ttl_s == 1.5
    assert s.cap_policy is CapPolicy.evict_lru
    assert s.device is Device.cpu
    assert s.snapshot_dir == tmp_path
    assert s.metrics_port == -1


def test_defaults_without_flags_or_env(parser: argparse.ArgumentParser) -> None:
    s = settings(parser)
    for name, field in Settings.model_fields.items():
        assert getattr(s, name) == field.default, name


def test_env_is_honoured_and_a_flag_overrides_it(
    parser: argparse.ArgumentParser, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LSTM_SERVE_MAX_BATCH_SIZE", "17")
    monkeypatch.setenv("LSTM_SERVE_CAP_POLICY", "evict_lru")
    s = settings(parser)
    assert s.max_batch_size == 17
    assert s.cap_policy is CapPolicy.evict_lru
    s = settings(parser, "--max-batch-size", "5")
    assert s.max_batch_size == 5
    assert s.cap_policy is CapPolicy.evict_lru  # untouched by the other flag
    s = settings(parser, "--cap-policy", "refuse")
    assert s.cap_policy is CapPolicy.refuse
    assert Settings().max_batch_size == 17  # type: ignore[call-arg]


def test_invalid_env_is_rejected(
    parser: argparse.ArgumentParser, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LSTM_SERVE_MAX_BATCH_SIZE", "0")
    with pytest.raises(ValidationError, match="max_batch_size"):
        settings(parser)
    monkeypatch.setenv("LSTM_SERVE_MAX_BATCH_SIZE", "many")
    with pytest.raises(ValidationError, match="max_batch_size"):
        settings(parser)


@pytest.mark.parametrize(
    ("argv", "field"),
    [
        (["--port", "-5"], "port"),
        (["--port", "70000"], "port"),
        (["--metrics-port", "-2"], "metrics_port"),
        (["--max-batch-size", "0"], "max_batch_size"),
        (["--session-ttl-s", "0"], "session_ttl_s"),
        (["--reap-interval-s", "-1"], "reap_interval_s"),
        (["--inline-max-steps", "-1"], "inline_max_steps"),
        (["--cap-policy", "drop_random"], "cap_policy"),
        (["--device", "tpu"], "device"),
        (["--max-message-bytes", "10"], "max_message_bytes"),
    ],
)
def test_invalid_values_are_rejected(
    parser: argparse.ArgumentParser, argv: list[str], field: str
) -> None:
    with pytest.raises(ValidationError, match=field):
        settings(parser, *argv)


def test_tls_files_come_in_pairs(parser: argparse.ArgumentParser, tmp_path: Path) -> None:
    cert, key, ca = tmp_path / "c.pem", tmp_path / "k.pem", tmp_path / "ca.pem"
    with pytest.raises(ValidationError, match="tls_cert and tls_key"):
        settings(parser, "--tls-cert", str(cert))
    with pytest.raises(ValidationError, match="tls_cert and tls_key"):
        settings(parser, "--tls-key", str(key))
    with pytest.raises(ValidationError, match="tls_client_ca"):
        settings(parser, "--tls-client-ca", str(ca))
    s = settings(parser, "--tls-cert", str(cert), "--tls-key", str(key), "--tls-client-ca", str(ca))
    assert (s.tls_cert, s.tls_key, s.tls_client_ca) == (cert, key, ca)


def test_unknown_settings_are_refused() -> None:
    with pytest.raises(ValidationError):
        Settings(max_batchsize=3)  # type: ignore[call-arg]


def test_top_level_log_level_reaches_serve(parser: argparse.ArgumentParser) -> None:
    args = parser.parse_args(["--log-level", "DEBUG", "serve"])
    assert settings_from_args(args).log_level == "DEBUG"


def test_serve_log_level_flag(parser: argparse.ArgumentParser) -> None:
    assert settings(parser, "--log-level", "DEBUG").log_level == "DEBUG"
