"""deploy/alerts.yml passes promtool and covers every problem code; the Grafana JSON is sound."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from relay.health import PROBLEM_CODES

ROOT = Path(__file__).resolve().parents[1]


def test_alert_rules_pass_promtool() -> None:
    out = subprocess.run(
        [promtool(), "check", "rules", str(ROOT / "deploy" / "alerts.yml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip(
            "promtool is not installed (Debian package prometheus; tests/run.sh installs it)"
        )
    return path


def test_alert_rules_fire_as_their_unit_tests_say() -> None:
    # Rule unit tests: series in, which alerts fire when (tests/alerts_test.yml).
    out = subprocess.run(
        [promtool(), "test", "rules", str(ROOT / "tests" / "alerts_test.yml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


#: Alerts on a relay's own figures rather than on a problem of the mesh's health.
ALERT_ONLY_CODES = {"tls_cert_expiring", "tls_reload_failed"}


def test_every_problem_code_has_an_alert_keyed_on_it() -> None:
    text = (ROOT / "deploy" / "alerts.yml").read_text()
    keyed = set(re.findall(r"^\s+code: (\w+)$", text, re.MULTILINE))
    assert keyed == set(PROBLEM_CODES) | ALERT_ONLY_CODES
    for code in PROBLEM_CODES:
        assert f'relaymesh_health_problem{{code="{code}"}}' in text
    # The codes of their own are documented beside the problem codes.
    doc = (ROOT / "docs" / "health.md").read_text()
    for code in ALERT_ONLY_CODES:
        assert f"| `{code}` |" in doc, code


def test_grafana_dashboard_uses_only_exported_metrics() -> None:
    dash = json.loads((ROOT / "deploy" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    names = {n for e in exprs for n in re.findall(r"\b(relaymesh_[a-z_]+)", e)}
    source = (ROOT / "relay" / "metrics.py").read_text()
    for name in names:
        base = name.removesuffix("_total")
        assert f'"{base}"' in source, f"{name} is not exported by relay/metrics.py"
    assert len(dash["panels"]) >= 10
