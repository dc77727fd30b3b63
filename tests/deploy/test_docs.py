"""docs/operations.md: the generated settings table is current, and every metric, alert and
recording rule is documented. Also lstm_serve.server.settings_doc's own behaviour."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client.metrics_core import Metric

from lstm_serve.server import settings_doc
from lstm_serve.server.metrics import Metrics
from lstm_serve.server.settings import Settings
from tests.deploy.promql import OPERATIONS_DOC, ROOT, alerting_rules, recording_rules


def test_settings_table_is_current() -> None:
    """Fails when service/lstm_serve/server/settings.py changed and the table was not regenerated."""
    assert settings_doc.current_block(OPERATIONS_DOC) == settings_doc.render_block(), (
        "docs/operations.md's settings table is stale: run "
        "`python -m lstm_serve.server.settings_doc --write docs/operations.md`"
    )


def test_settings_table_has_a_row_per_setting() -> None:
    rows = [line for line in settings_doc.render_table().splitlines()[2:] if line]
    assert len(rows) == len(Settings.model_fields)
    for row, (name, field) in zip(rows, Settings.model_fields.items(), strict=True):
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", row)[1:-1]]
        assert len(cells) == 6, row
        assert cells[0] == f"`LSTM_SERVE_{name.upper()}`"
        assert cells[1] == f"`--{name.replace('_', '-')}`"
        assert field.description and cells[5], f"{name} has no description"
    text = settings_doc.render_table()
    assert str(ROOT) not in text, "a machine-specific path leaked into the table"
    assert "`refuse` \\| `evict_lru`" in text  # enum choices
    assert "| path (optional) | unset |" in text  # optional paths


def test_settings_doc_cli_check_and_write(tmp_path: Path) -> None:
    doc = tmp_path / "ops.md"
    doc.write_text(f"intro\n\n{settings_doc.BEGIN}\n| stale |\n{settings_doc.END}\n\noutro\n")
    cmd = [sys.executable, "-m", "lstm_serve.server.settings_doc"]
    check = subprocess.run([*cmd, "--check", str(doc)], capture_output=True, text=True, cwd=ROOT)
    assert check.returncode == 1 and "out of date" in check.stderr
    write = subprocess.run([*cmd, "--write", str(doc)], capture_output=True, text=True, cwd=ROOT)
    assert write.returncode == 0, write.stderr
    text = doc.read_text()
    assert text.startswith("intro\n\n") and text.endswith("\n\noutro\n")
    assert "| stale |" not in text and "`LSTM_SERVE_MAX_SESSIONS`" in text
    again = subprocess.run([*cmd, "--check", str(doc)], capture_output=True, text=True, cwd=ROOT)
    assert again.returncode == 0, again.stderr
    (tmp_path / "none.md").write_text("no markers\n")
    missing = subprocess.run(
        [*cmd, "--check", str(tmp_path / "none.md")], capture_output=True, text=True, cwd=ROOT
    )
    assert missing.returncode == 2 and "markers" in missing.stderr


def _documented_names() -> set[str]:
    return set(re.findall(r"`([a-zA-Z_:][a-zA-Z0-9_:]*)`", OPERATIONS_DOC.read_text()))


@pytest.mark.parametrize("family", list(Metrics.create().registry.collect()), ids=lambda f: f.name)
def test_every_metric_is_documented(family: Metric) -> None:
    exposed = family.name + "_total" if family.type == "counter" else family.name
    assert exposed in _documented_names(), f"{exposed} is not in docs/operations.md"


def test_every_alert_and_recording_rule_is_documented() -> None:
    text = OPERATIONS_DOC.read_text()
    for rule in alerting_rules():
        assert f"`{rule['alert']}`" in text, rule["alert"]
    for rule in recording_rules():
        name = rule["record"]
        short = "..." + name[name.rindex(":") :]
        assert f"`{name}`" in text or f"`{short}`" in text, name
