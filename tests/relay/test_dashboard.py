"""The dashboard in a real headless browser, and ``relaymesh status``, on a real mesh.

One relay process per relay sharing a real etcd, as operators run them. The
browser is Playwright driving the system's chromium (Debian package
``chromium``; tests/run.sh installs it): no browser is downloaded.
Screenshots of every state go to test-artifacts/dashboard/ (printed).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.etcd_cluster import EtcdCluster
from tests.relay_procs import MESH_TEST_CONFIG, RelayProc, start_relay_proc

pytestmark = pytest.mark.slow

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "dashboard"
#: Generous caps: what the page must show, it shows within this.
SHOWN_WITHIN_MS = 15_000


def chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        pytest.skip("chromium is not installed (Debian package chromium; tests/run.sh installs it)")
    return path


@pytest.fixture
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    exe = chromium()
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, args=["--no-sandbox", "--disable-gpu"])
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def artifacts() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    print(f"\ndashboard screenshots: {ARTIFACTS}")
    return ARTIFACTS


def status_cli(url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "relaymesh.cli", "status", "--url", url],
        capture_output=True,
        text=True,
        timeout=30,
    )


def until(predicate: Callable[[], bool], within_s: float = 15) -> None:
    deadline = time.monotonic() + within_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.2)


def test_dashboard_and_status_follow_a_relay_killed_and_restarted(
    etcd: EtcdCluster, tmp_path: Path, browser: Any, artifacts: Path
) -> None:
    (tmp_path / "relay-test.toml").write_text(
        MESH_TEST_CONFIG.replace("enabled = false", "enabled = true").replace(
            "lost_grace_s = 30", f'lost_grace_s = 30\nprefix = "/dash-{uuid.uuid4().hex}/"'
        )
        + "interval_s = 1.0\nprobe_timeout_s = 1.0\n"
    )
    relays: list[RelayProc] = []
    try:
        eu = start_relay_proc(tmp_path, etcd.endpoints, "eu", "eu-1")
        relays.append(eu)
        us = start_relay_proc(tmp_path, etcd.endpoints, "us", "us-1")
        relays.append(us)

        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(eu.http_url + "/dashboard")
        healthy = '[data-relay="{}"][data-state="up"]'
        for name in ("eu-1", "us-1"):
            page.wait_for_selector(healthy.format(name), timeout=SHOWN_WITHIN_MS)
        for pair in ("eu-1>us-1", "us-1>eu-1", "eu-1>eu-1", "us-1>us-1"):
            page.wait_for_selector(
                f'td[data-link="{pair}"][data-state="up"]', timeout=SHOWN_WITHIN_MS
            )
        page.wait_for_selector('body[data-healthy="true"]', timeout=SHOWN_WITHIN_MS)
        assert page.locator("#problems li.none").count() == 1
        page.screenshot(path=str(artifacts / "1-healthy.png"), full_page=True)

        doc = json.loads(page.evaluate("JSON.stringify(last)"))
        assert doc["problems"] == []
        ok = status_cli(eu.http_url)
        assert ok.returncode == 0, ok.stdout + ok.stderr
        assert "PROBLEMS  none" in ok.stdout

        us.kill9()
        page.wait_for_selector('[data-relay="us-1"][data-state="down"]', timeout=SHOWN_WITHIN_MS)
        for pair in ("eu-1>us-1", "us-1>eu-1"):
            page.wait_for_selector(
                f'td[data-link="{pair}"][data-state="down"]', timeout=SHOWN_WITHIN_MS
            )
        page.wait_for_selector(
            '#problems li[data-code="relay_down"][data-subject="us-1"]', timeout=SHOWN_WITHIN_MS
        )
        assert page.locator('[data-relay="eu-1"][data-state="up"]').count() == 1
        page.screenshot(path=str(artifacts / "2-relay-killed.png"), full_page=True)
        bad = status_cli(eu.http_url)
        assert bad.returncode == 1, bad.stdout + bad.stderr
        assert bad.stdout.index("relay_down") < bad.stdout.index("RELAY ")

        relays.append(start_relay_proc(tmp_path, etcd.endpoints, "us", "us-1"))
        page.wait_for_selector(healthy.format("us-1"), timeout=SHOWN_WITHIN_MS)
        for pair in ("eu-1>us-1", "us-1>eu-1"):
            page.wait_for_selector(
                f'td[data-link="{pair}"][data-state="up"]', timeout=SHOWN_WITHIN_MS
            )
        page.wait_for_selector('body[data-healthy="true"]', timeout=SHOWN_WITHIN_MS)
        events = page.locator("#events li").all_inner_texts()
        assert any("us-1 is down" in e for e in events), events
        page.screenshot(path=str(artifacts / "3-relay-restarted.png"), full_page=True)

        # The relay serving the page goes away: the page says so, and keeps what it had.
        eu.kill9()
        page.wait_for_selector('body[data-conn="lost"]', timeout=SHOWN_WITHIN_MS)
        assert "Lost contact with eu-1" in page.inner_text("#banner")
        page.screenshot(path=str(artifacts / "4-serving-relay-gone.png"), full_page=True)
        gone = status_cli(eu.http_url)
        assert gone.returncode == 2
        assert gone.stderr.count("\n") == 1 and "Traceback" not in gone.stderr
    finally:
        for r in relays:
            r.stop()


def test_status_exit_2_when_nothing_answers() -> None:
    from tests.etcd_cluster import free_port

    result = status_cli(f"http://127.0.0.1:{free_port()}")
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith("relaymesh: error: ") and result.stderr.count("\n") == 1


def test_page_stays_responsive_at_20_regions_of_5_relays(browser: Any, artifacts: Path) -> None:
    from tests.relay.test_health import big_mesh_document

    doc = big_mesh_document(regions=20, per_region=5)
    body = json.dumps({**doc, "served_at": doc["generated_at"]})
    assets = Path(__file__).resolve().parents[2] / "relay" / "dashboard"

    def serve(route: Any) -> None:
        url = route.request.url
        if url.endswith("/api/v1/mesh"):
            route.fulfill(status=200, content_type="application/json", body=body)
        elif url.endswith("/dashboard"):
            route.fulfill(status=200, content_type="text/html", path=str(assets / "index.html"))
        else:
            name = url.rsplit("/", 1)[1]
            kind = "text/css" if name.endswith(".css") else "text/javascript"
            route.fulfill(status=200, content_type=kind, path=str(assets / name))

    for name, viewport in (("laptop", (1366, 800)), ("phone", (390, 844))):
        page = browser.new_page(viewport={"width": viewport[0], "height": viewport[1]})
        page.route("http://mesh.test/**", serve)
        start = time.monotonic()
        page.goto("http://mesh.test/dashboard")
        page.wait_for_selector('[data-relay="r20-5"]', timeout=SHOWN_WITHIN_MS)
        page.wait_for_selector('td[data-link="r20-5>r01-1"]', timeout=SHOWN_WITHIN_MS)
        shown_s = time.monotonic() - start
        assert page.locator("[data-relay]").count() == 100
        assert page.locator("td[data-link]").count() == 100 * 100
        # One redraw of everything, as each poll does.
        render_ms = page.evaluate(
            "() => { const t = performance.now(); render(last); return performance.now() - t; }"
        )
        print(f"{name}: first render {shown_s:.2f} s, redraw {render_ms:.0f} ms")
        assert render_ms < 2000
        page.screenshot(path=str(artifacts / f"5-100-relays-{name}.png"))
        page.close()
