"""The dashboard in a real headless browser, and ``relaymesh status``, on a real mesh.

One relay process per relay sharing a real etcd, as operators run them. The
browser is Playwright driving the system's chromium (Debian package
``chromium``; tests/run.sh installs it): no browser is downloaded.
Screenshots of every state go to test-artifacts/dashboard/ (printed).
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from relay.app import api_token
from tests.etcd_cluster import EtcdCluster
from tests.relay_procs import MESH_TEST_CONFIG, TEST_MESH_KEY, RelayProc, start_relay_proc

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
    mesh_config(tmp_path)
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


def test_a_relay_stopped_as_planned_is_left_not_down(
    etcd: EtcdCluster, tmp_path: Path, browser: Any, artifacts: Path
) -> None:
    mesh_config(tmp_path)
    relays: list[RelayProc] = []

    def problems() -> set[tuple[str, str]]:
        return {
            (p["code"], p["subject"]) for p in get_json(eu.http_url + "/api/v1/mesh")["problems"]
        }

    try:
        eu = start_relay_proc(tmp_path, etcd.endpoints, "eu", "eu-1")
        relays.append(eu)
        us1 = start_relay_proc(tmp_path, etcd.endpoints, "us", "us-1")
        relays.append(us1)
        us2 = start_relay_proc(tmp_path, etcd.endpoints, "us", "us-2")
        relays.append(us2)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(eu.http_url + "/dashboard")
        for name in ("eu-1", "us-1", "us-2"):
            page.wait_for_selector(
                f'[data-relay="{name}"][data-state="up"]', timeout=SHOWN_WITHIN_MS
            )
        page.wait_for_selector('td[data-link="eu-1>us-1"]', timeout=SHOWN_WITHIN_MS)

        # A rolling deploy's stop: SIGTERM, the relay drains and deregisters.
        us1.proc.send_signal(signal.SIGTERM)
        assert us1.proc.wait(timeout=30) == 0
        page.wait_for_selector('[data-relay="us-1"][data-state="left"]', timeout=SHOWN_WITHIN_MS)
        left = page.locator('#events li[data-kind="relay_left"][data-level="info"]')
        left.first.wait_for(timeout=SHOWN_WITHIN_MS)
        assert "us-1: relay left (planned)" in left.first.inner_text()
        page.wait_for_selector('body[data-healthy="true"]', timeout=SHOWN_WITHIN_MS)
        assert page.locator('td[data-link="eu-1>us-1"]').count() == 0  # no paths any more
        assert page.locator('#problems li[data-code="relay_down"]').count() == 0
        page.screenshot(path=str(artifacts / "7-relay-left-as-planned.png"), full_page=True)

        doc = get_json(eu.http_url + "/api/v1/mesh")
        us1_doc = next(r for r in doc["relays"] if r["relay_id"] == "us-1")
        assert us1_doc["state"] == "left", us1_doc
        assert doc["problems"] == [] and doc["healthy"] is True, doc["problems"]
        # It was never shown down on its way out.
        assert ("relay_down", "us-1") not in {(e["kind"], e["subject"]) for e in doc["events"]}
        shown = status_cli(eu.http_url)
        assert shown.returncode == 0, shown.stdout + shown.stderr
        row = next(line for line in shown.stdout.splitlines() if line.strip().startswith("us-1 "))
        assert row.split()[2] == "left", shown.stdout
        assert "us-1: relay left (planned)" in shown.stdout

        # The other one of the region ends without a word: down, and the region has none.
        us2.kill9()
        until(lambda: {("relay_down", "us-2"), ("region_without_relay", "us")} <= problems(), 30)
        assert ("relay_down", "us-1") not in problems()
        page.wait_for_selector(
            '#problems li[data-code="region_without_relay"][data-subject="us"]',
            timeout=SHOWN_WITHIN_MS,
        )
        page.screenshot(path=str(artifacts / "8-region-without-relay.png"), full_page=True)
        assert status_cli(eu.http_url).returncode == 1
    finally:
        for r in relays:
            r.stop()


def mesh_config(tmp_path: Path, extra_relay: str = "") -> None:
    """The test mesh's config with the monitor on, every second, under a fresh prefix."""
    (tmp_path / "relay-test.toml").write_text(
        (f"[relay]\n{extra_relay}\n" if extra_relay else "")
        + MESH_TEST_CONFIG.replace("enabled = false", "enabled = true").replace(
            "lost_grace_s = 30", f'lost_grace_s = 30\nprefix = "/dash-{uuid.uuid4().hex}/"'
        )
        + "interval_s = 1.0\nprobe_timeout_s = 1.0\n"
    )


def get_json(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=5) as resp:
        doc: dict[str, Any] = json.loads(resp.read())
    return doc


class Clients:
    """Two clients of us-1 in a thread of their own, until stop():

    - ``stays``: knows only us-1, so it waits out a planned restart there (and keeps
      us-1 draining until its deadline);
    - ``moves``: knows us-1 and us-2, so on Restarting it moves to us-2 at once.
    """

    def __init__(self, us1: str, us2: str) -> None:
        from relay.protocol.keys import PrivateKey

        self.urls = (us1, us2)
        self.stays, self.moves = PrivateKey.generate(), PrivateKey.generate()
        self.ready = threading.Event()
        self._stop = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import trio

        from relay.client import open_relay_client

        async def main() -> None:
            us1, us2 = self.urls
            async with (
                open_relay_client(us1, self.stays),
                open_relay_client([us1, us2], self.moves),
            ):
                self.ready.set()
                await trio.to_thread.run_sync(self._stop.wait)

        try:
            trio.run(main)
        except BaseException as exc:  # reported by stop()
            self.error = exc
            self.ready.set()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)
        assert self.error is None, self.error


def test_a_draining_relay_shows_draining_and_its_clients_failover(
    etcd: EtcdCluster, tmp_path: Path, browser: Any, artifacts: Path
) -> None:
    # Long enough that a client that stays keeps us-1 draining while we look.
    mesh_config(tmp_path, "shutdown_deadline_s = 60")
    relays: list[RelayProc] = []
    clients: Clients | None = None
    try:
        eu = start_relay_proc(tmp_path, etcd.endpoints, "eu", "eu-1")
        relays.append(eu)
        us1 = start_relay_proc(tmp_path, etcd.endpoints, "us", "us-1")
        relays.append(us1)
        us2 = start_relay_proc(tmp_path, etcd.endpoints, "us", "us-2")
        relays.append(us2)
        clients = Clients(us1.ws_url, us2.ws_url)
        assert clients.ready.wait(30) and clients.error is None, clients.error

        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(eu.http_url + "/dashboard")
        for name in ("eu-1", "us-1", "us-2"):
            page.wait_for_selector(
                f'[data-relay="{name}"][data-state="up"]', timeout=SHOWN_WITHIN_MS
            )
        # eu-1's monitor has seen the moving client at home on us-1: a round after its
        # peer map had it there.
        token = api_token(TEST_MESH_KEY.encode())
        peer_url = f"{eu.http_url}/api/v1/peers/{clients.moves.public}"

        def at_home() -> bool:
            req = urllib.request.Request(peer_url, headers={"Authorization": f"Bearer {token}"})
            try:
                with urllib.request.urlopen(req, timeout=5) as resp:
                    return bool(json.loads(resp.read())["record"]["relay_id"] == "us-1")
            except urllib.error.HTTPError:
                return False

        until(at_home)
        seen_at = time.time()
        until(lambda: get_json(eu.http_url + "/api/v1/mesh")["generated_at"] > seen_at + 0.1)
        # Every relay has probe clients (four on us-1); only the test's two are clients.
        counted = {
            r["relay_id"]: r["clients"] for r in get_json(eu.http_url + "/api/v1/mesh")["relays"]
        }
        assert counted == {"eu-1": 0, "us-1": 2, "us-2": 0}, counted
        until(lambda: us1.status()["stats"]["probe_clients"] == 4)

        us1.proc.send_signal(signal.SIGTERM)
        page.wait_for_selector(
            '[data-relay="us-1"][data-state="draining"]', timeout=SHOWN_WITHIN_MS
        )
        page.wait_for_selector(
            '#problems li[data-code="relay_draining"][data-subject="us-1"]',
            timeout=SHOWN_WITHIN_MS,
        )
        page.wait_for_selector('#events li[data-kind="failover"]', timeout=SHOWN_WITHIN_MS)
        failover = page.locator('#events li[data-kind="failover"]').first.inner_text()
        assert "1 client moved from us-1 to us-2" in failover, failover
        assert page.locator('[data-relay="us-1"][data-state="down"]').count() == 0
        page.screenshot(path=str(artifacts / "6-relay-draining.png"), full_page=True)

        doc = get_json(eu.http_url + "/api/v1/mesh")
        us1_doc = next(r for r in doc["relays"] if r["relay_id"] == "us-1")
        assert us1_doc["state"] == "draining", us1_doc
        assert ("relay_draining", "us-1", "warning") in {
            (p["code"], p["subject"], p["severity"]) for p in doc["problems"]
        }
        assert "relay_down" not in {p["code"] for p in doc["problems"]}
        shown = status_cli(eu.http_url)
        assert shown.returncode == 0, shown.stdout + shown.stderr  # a warning, not an error
        row = next(line for line in shown.stdout.splitlines() if line.strip().startswith("us-1 "))
        assert row.split()[2] == "draining", shown.stdout
        assert "moved from us-1 to us-2" in shown.stdout
        assert us1.proc.poll() is None  # still draining: the staying client holds it
    finally:
        if clients is not None:
            clients.stop()
        for r in relays:
            if r.proc.poll() is None:
                r.proc.kill()
                r.proc.wait()


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
