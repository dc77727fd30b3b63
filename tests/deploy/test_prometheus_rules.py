"""Prometheus config and rules: promtool's checks and unit tests, and that every alert has a
unit test in which it fires and then clears."""

from __future__ import annotations

import subprocess
from typing import Any

import pytest
import yaml

from tests.deploy.promql import (
    PROMETHEUS_CONFIG,
    RULE_TESTS_DIR,
    alerting_rules,
    recording_rules,
    require_tool,
    rule_files,
)


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    binary = require_tool("promtool", "apt-get install prometheus")
    return subprocess.run([binary, *args], capture_output=True, text=True, timeout=60)


def test_promtool_check_config() -> None:
    r = promtool("check", "config", str(PROMETHEUS_CONFIG))
    assert r.returncode == 0, r.stdout + r.stderr
    # The config's rule_files glob finds the rule files (a wrong glob finds none, silently).
    assert f"{len(rule_files())} rule files found" in r.stdout, r.stdout


def test_promtool_check_rules() -> None:
    files = rule_files()
    assert len(files) >= 2
    r = promtool("check", "rules", *map(str, files))
    assert r.returncode == 0, r.stdout + r.stderr


def test_promtool_test_rules() -> None:
    tests = sorted(RULE_TESTS_DIR.glob("*.yml"))
    assert tests, f"no rule tests in {RULE_TESTS_DIR}"
    r = promtool("test", "rules", *map(str, tests))
    assert r.returncode == 0, r.stdout + r.stderr


def _alert_evals() -> dict[str, list[tuple[str, bool]]]:
    """alertname -> [(eval_time, fires?)] over every rule unit test, in test order."""
    out: dict[str, list[tuple[str, bool]]] = {}
    for path in sorted(RULE_TESTS_DIR.glob("*.yml")):
        doc: dict[str, Any] = yaml.safe_load(path.read_text())
        loaded = {(path.parent / f).resolve() for f in doc["rule_files"]}
        assert loaded == {p.resolve() for p in rule_files()}, f"{path}: load every rule file"
        for case in doc["tests"]:
            for t in case.get("alert_rule_test", []):
                out.setdefault(t["alertname"], []).append(
                    (str(t["eval_time"]), bool(t.get("exp_alerts")))
                )
    return out


def _minutes(duration: str) -> float:
    units = {"s": 1 / 60, "m": 1, "h": 60}
    return float(duration[:-1]) * units[duration[-1]]


@pytest.mark.parametrize("alert", [r["alert"] for r in alerting_rules()])
def test_every_alert_is_tested_firing_and_clearing(alert: str) -> None:
    evals = _alert_evals().get(alert, [])
    fires = [_minutes(t) for t, firing in evals if firing]
    quiet = [_minutes(t) for t, firing in evals if not firing]
    assert fires, f"{alert}: no unit test where it fires"
    assert any(q < min(fires) for q in quiet), f"{alert}: no unit test where it is quiet first"
    assert any(q > max(fires) for q in quiet), f"{alert}: no unit test where it clears"


def test_rules_are_well_formed() -> None:
    alerts = alerting_rules()
    names = [r["alert"] for r in alerts]
    assert len(names) == len(set(names))
    assert {
        "LstmServeTargetDown",
        "LstmServeHighStepLatency",
        "LstmServeServerErrors",
        "LstmServeRequestErrors",
        "LstmServeSessionsNearCap",
        "LstmServeSessionsEvicted",
    } <= set(names)
    for r in alerts:
        assert r["labels"]["severity"] in {"critical", "warning"}, r["alert"]
        assert r["annotations"]["summary"] and r["annotations"]["description"], r["alert"]
    records = [r["record"] for r in recording_rules()]
    assert len(records) == len(set(records))
    # level:metric:operations
    assert all(len(name.split(":")) == 3 for name in records), records
    # the latency quantiles the dashboard and the latency alert build on
    for q in ("p50", "p95", "p99"):
        assert f"job_model:lstm_serve_step_latency_seconds:{q}_rate5m" in records
