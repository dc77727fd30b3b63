"""Prometheus config and rules: promtool's checks and unit tests, and that every alert has a
unit test in which it fires and then clears."""

from __future__ import annotations

import re
import subprocess
from typing import Any

import pytest
import yaml

from tests.deploy.promql import (
    OPERATIONS_DOC,
    PROMETHEUS_CONFIG,
    RULE_TESTS_DIR,
    alerting_rules,
    metric_names,
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
        "LstmServeAbsent",
        "LstmServeStoreErrors",
        "LstmServeFencedWrites",
        "LstmServeModelLoadFailed",
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


# A label matcher on `job`: job="...", job=~"...", job!="...".
_JOB_MATCHER = re.compile(r"\bjob\s*(=~|!~|!=|=)")


def test_no_rule_names_a_job() -> None:
    """The job is the operator's choice (compose's `lstm-serve`, a ServiceMonitor's, a shared
    `kubernetes-pods`): rules group by it but never select on it."""
    for rule in alerting_rules() + recording_rules():
        name = rule.get("alert") or rule["record"]
        assert not _JOB_MATCHER.search(rule["expr"]), f"{name} selects a job: {rule['expr']}"


def test_losing_every_target_and_the_store_are_alerted() -> None:
    by_name = {r["alert"]: r for r in alerting_rules()}
    # A target that is gone has no `up`: only absent() of a series lstm-serve exports sees it.
    absent = [r for r in by_name.values() if re.search(r"\babsent(_over_time)?\(", r["expr"])]
    assert absent and all("lstm_serve_build_info" in r["expr"] for r in absent), absent
    assert "lstm_serve_build_info" in metric_names(by_name["LstmServeTargetDown"]["expr"])
    read = {n for r in by_name.values() for n in metric_names(r["expr"])}
    assert {"lstm_serve_store_errors_total", "lstm_serve_store_fenced_writes_total"} <= read


def github_anchors(markdown: str) -> dict[str, str]:
    """anchor -> heading, as GitHub makes them: lower case, punctuation dropped, spaces to -."""
    out = {}
    in_code = False
    for line in markdown.splitlines():
        if line.startswith("```"):
            in_code = not in_code
        m = re.match(r"(#{1,6})\s+(.*?)\s*$", line)
        if m and not in_code:
            slug = re.sub(r"[^\w\- ]", "", m.group(2).lower()).replace(" ", "-")
            out[slug] = m.group(2)
    return out


@pytest.mark.parametrize("alert", [r["alert"] for r in alerting_rules()])
def test_every_alert_has_a_runbook(alert: str) -> None:
    """runbook_url leads to this alert's own section under "Runbooks" in docs/operations.md."""
    (rule,) = [r for r in alerting_rules() if r["alert"] == alert]
    url = rule["annotations"].get("runbook_url", "")
    m = re.fullmatch(r"(?:.*/)?docs/operations\.md#([\w-]+)", url)
    assert m, f"{alert}: runbook_url {url!r} is not docs/operations.md#<anchor>"
    text = OPERATIONS_DOC.read_text()
    anchors = github_anchors(text)
    assert anchors.get(m.group(1)) == alert, f"{alert}: no heading for #{m.group(1)}"
    runbooks = text[text.index("\n## Runbooks\n") :]
    section = runbooks[runbooks.index(f"\n### {alert}\n") :].split("\n### ", 2)[1]
    section = section.split("\n## ", 1)[0]
    for part in ("**Means.**", "**Check.**", "**Do.**"):
        assert part in section, f"{alert}'s runbook has no {part}"
