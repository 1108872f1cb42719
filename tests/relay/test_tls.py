"""TLS on a relay's two ports, with a throwaway CA (trustme): wss:// and https://,
certificate verification by clients and mesh links, rotation without a restart,
and what a plain or garbage connection to the TLS port costs (one counted close).
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import ssl
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trustme
from cryptography import x509
from prometheus_client.parser import text_string_to_metric_families

from coordinator.store import open_memory_store
from relay.client import ConnectError, open_relay_client
from relay.config import RelayConfig, load_config
from relay.node import NodeInfo, serve_relay_node
from relay.protocol.keys import PrivateKey
from relay.tls import client_context
from relaymesh.home import RegionMapSource
from relaymesh.procs import RELAYMESH, free_port
from relaymesh.urls import relay_urls
from tests.conftest import wait_until

MESH_KEY = b"0123456789abcdef0123456789abcdef"


class Certs:
    """A CA and the relay's certificate files in ``tmp``; issue() replaces them."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.ca = trustme.CA()
        self.ca_file = tmp / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        self.cert_file = tmp / "relay.pem"
        self.key_file = tmp / "relay-key.pem"
        self.serial = self.issue()

    def issue(self, **options: Any) -> str:
        """A new certificate for 127.0.0.1, swapped in file by file; its serial (hex).

        ``options`` go to trustme's ``issue_cert`` (``not_after``...)."""
        leaf = self.ca.issue_cert("127.0.0.1", "localhost", **options)
        for blob, path in (
            (leaf.private_key_pem, self.key_file),
            (leaf.cert_chain_pems[0], self.cert_file),
        ):
            part = path.with_suffix(".new")
            blob.write_to_path(str(part))
            os.replace(part, path)
        return _serial(leaf.cert_chain_pems[0].bytes())


def _serial(pem: bytes) -> str:
    return format(x509.load_pem_x509_certificate(pem).serial_number, "x")


@pytest.fixture
def certs(tmp_path: Path) -> Certs:
    return Certs(tmp_path)


def _config(certs: Certs, name: str = "relay-1", **tls: Any) -> RelayConfig:
    return load_config(
        overrides={
            "relay": {"port": 0, "http_port": 0, "stun": False, "name": name, "region": "eu"},
            "tls": {"cert_file": str(certs.cert_file), "key_file": str(certs.key_file), **tls},
            "mesh": {"ca_file": str(certs.ca_file), "lease_ttl_s": 2, "keepalive_interval_s": 0.5},
            "health": {"enabled": False},
        }
    )


async def _node(nursery: trio.Nursery, cfg: RelayConfig, **options: Any) -> NodeInfo:
    info: NodeInfo = await nursery.start(
        lambda task_status: serve_relay_node(cfg, task_status=task_status, **options)
    )
    return info


async def _served_serial(port: int, trust: ssl.SSLContext) -> str:
    """The serial of the certificate a new connection to ``port`` is given."""
    stream = await trio.open_ssl_over_tcp_stream("127.0.0.1", port, ssl_context=trust)
    try:
        await stream.do_handshake()
        der = stream.getpeercert(binary_form=True)
    finally:
        await trio.aclose_forcefully(stream)
    assert der is not None
    return format(x509.load_der_x509_certificate(der).serial_number, "x")


async def _exchange(a: Any, b: Any, b_key: PrivateKey, payload: bytes) -> None:
    await a.send(b_key.public, payload)
    with trio.fail_after(5):
        assert (await b.receive()).payload == payload


@pytest.fixture
async def node(nursery: trio.Nursery, certs: Certs) -> AsyncIterator[NodeInfo]:
    yield await _node(nursery, _config(certs, reload_check_interval_s=0.02))


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1].split("/")[0])


async def test_a_pair_exchanges_a_packet_over_wss(node: NodeInfo, certs: Certs) -> None:
    assert node.ws_url.startswith("wss://127.0.0.1:")
    assert node.http_url.startswith("https://127.0.0.1:")
    trust = client_context(certs.ca_file)
    a, b = PrivateKey.generate(), PrivateKey.generate()
    async with (
        open_relay_client(node.ws_url, a, ssl_context=trust) as ca,
        open_relay_client(node.ws_url, b, ssl_context=trust) as cb,
    ):
        await _exchange(ca, cb, b, b"over tls")
    # The region map (over https) gives clients the wss:// URL.
    region_map = await RegionMapSource(node.http_url, ssl_context=trust).fetch()
    (only,) = [n for r in region_map.regions for n in r.nodes]
    assert only.tls and only.ws_url == node.ws_url and only.http_url == node.http_url


async def test_a_client_without_the_ca_fails_naming_the_certificate(
    node: NodeInfo, certs: Certs
) -> None:
    with pytest.raises(ConnectError, match="certificate verify failed") as caught:
        async with open_relay_client(node.ws_url, PrivateKey.generate()):
            pass
    assert "\n" not in str(caught.value)
    stats = node.server.statistics()
    with trio.fail_after(5):
        await wait_until(lambda: stats.closes.get("tls_handshake_failed", 0) >= 1)


async def test_plain_or_garbage_on_the_tls_port_is_counted_and_harmless(
    node: NodeInfo, certs: Certs
) -> None:
    port = _port(node.ws_url)
    for junk in (b"GET /derp HTTP/1.1\r\nHost: x\r\n\r\n", b"\x16\x03\x01\xff\xff" + b"\0" * 64):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(junk)
        with trio.fail_after(5):
            while await stream.receive_some():  # until the relay closes it
                pass
        await stream.aclose()
    with trio.fail_after(5):
        await wait_until(lambda: node.server.statistics().closes.get("tls_handshake_failed") == 2)
    stats = node.server.statistics()
    assert stats.accepts == 2 and "internal_error" not in stats.closes
    trust = client_context(certs.ca_file)
    a, b = PrivateKey.generate(), PrivateKey.generate()
    async with (
        open_relay_client(node.ws_url, a, ssl_context=trust) as ca,
        open_relay_client(node.ws_url, b, ssl_context=trust) as cb,
    ):
        await _exchange(ca, cb, b, b"still fine")


async def test_rotated_files_reach_new_connections_old_ones_keep_working(
    node: NodeInfo, certs: Certs
) -> None:
    trust = client_context(certs.ca_file)
    ws_port, http_port = _port(node.ws_url), _port(node.http_url)
    assert await _served_serial(ws_port, trust) == certs.serial
    a, b = PrivateKey.generate(), PrivateKey.generate()
    async with (
        open_relay_client(node.ws_url, a, ssl_context=trust) as ca,
        open_relay_client(node.ws_url, b, ssl_context=trust) as cb,
    ):
        old = certs.serial
        new = certs.issue()
        assert node.tls is not None
        with trio.fail_after(5):
            await wait_until(lambda: node.tls is not None and node.tls.statistics().serial == new)
        assert new != old
        assert await _served_serial(ws_port, trust) == new
        assert await _served_serial(http_port, trust) == new
        # The connections made before the rotation are the same ones, still working.
        await _exchange(ca, cb, b, b"after rotation")
        assert ca.statistics().connects == 1 and cb.statistics().connects == 1
    assert node.tls.statistics().reload_failures == 0


async def test_metrics_show_the_certificate_expiry_and_each_reload(
    node: NodeInfo, certs: Certs
) -> None:
    async with httpx.AsyncClient(verify=client_context(certs.ca_file)) as http:

        async def metrics() -> dict[tuple[str, ...], float]:
            text = (await http.get(node.http_url + "/metrics")).text
            return {
                (
                    s.name,
                    *(v for k, v in sorted(s.labels.items()) if k not in ("region", "relay")),
                ): s.value
                for f in text_string_to_metric_families(text)
                if f.name.startswith("relaymesh_tls_")
                for s in f.samples
            }

        served = x509.load_pem_x509_certificate(certs.cert_file.read_bytes())
        assert await metrics() == {
            (
                "relaymesh_tls_cert_expiry_timestamp_seconds",
            ): served.not_valid_after_utc.timestamp(),
            ("relaymesh_tls_reloads_total", "ok"): 0,
            ("relaymesh_tls_reloads_total", "failed"): 0,
            ("relaymesh_tls_last_reload_successful",): 1,
        }

        # A half-written certificate: the reload fails, the old certificate stays.
        half = certs.cert_file.with_suffix(".new")
        half.write_text(certs.cert_file.read_text()[:200])
        os.replace(half, certs.cert_file)
        assert node.tls is not None
        with trio.fail_after(5):
            await wait_until(lambda: node.tls is not None and node.tls.statistics().reload_failures)
        shown = await metrics()
        assert shown[("relaymesh_tls_reloads_total", "failed")] == 1
        assert shown[("relaymesh_tls_last_reload_successful",)] == 0
        assert shown[("relaymesh_tls_cert_expiry_timestamp_seconds",)] == (
            served.not_valid_after_utc.timestamp()
        )

        # The rotation completes with a certificate that expires in ten days.
        expires = datetime.datetime.now(datetime.UTC).replace(microsecond=0) + datetime.timedelta(
            days=10
        )
        new = certs.issue(not_after=expires)
        with trio.fail_after(5):
            await wait_until(lambda: node.tls is not None and node.tls.statistics().serial == new)
        shown = await metrics()
        # The watcher may catch the new key beside the old certificate: one more failure.
        assert shown.pop(("relaymesh_tls_reloads_total", "failed")) in (1, 2)
        assert shown == {
            ("relaymesh_tls_cert_expiry_timestamp_seconds",): expires.timestamp(),
            ("relaymesh_tls_reloads_total", "ok"): 1,
            ("relaymesh_tls_last_reload_successful",): 1,
        }


async def test_two_tls_relays_forward_across_their_mesh_link(
    nursery: trio.Nursery, certs: Certs
) -> None:
    trust = client_context(certs.ca_file)
    async with open_memory_store() as store:
        eu = await _node(nursery, _config(certs, "eu-1"), store=store, mesh_key=MESH_KEY)
        us_cfg = _config(certs, "us-1").model_copy(
            update={"relay": _config(certs, "us-1").relay.model_copy(update={"region": "us"})}
        )
        us = await _node(nursery, us_cfg, store=store, mesh_key=MESH_KEY)
        assert eu.state is not None and us.state is not None
        a, b = PrivateKey.generate(), PrivateKey.generate()
        async with (
            open_relay_client(eu.ws_url, a, ssl_context=trust) as ca,
            open_relay_client(us.ws_url, b, ssl_context=trust) as cb,
        ):
            with trio.fail_after(5):
                await wait_until(lambda: eu.state is not None and eu.state.route(b.public.raw))
            await _exchange(ca, cb, b, b"across the mesh")
        assert us.server.statistics().forwarded_in == 1
        assert eu.mesh is not None
        (link,) = eu.mesh.statistics()
        assert link.url == us.ws_url and link.url.startswith("wss://")


def test_sighup_reloads_the_certificate(certs: Certs, tmp_path: Path) -> None:
    """A real `relaymesh relay` process: new files + SIGHUP → new connections get them."""
    config = tmp_path / "relay.toml"
    config.write_text(
        "[tls]\n"
        'cert_file = "relay.pem"\n'  # relative: resolved against the config's directory
        'key_file = "relay-key.pem"\n'
        "reload_check_interval_s = 0\n"
        "[health]\nenabled = false\n"
    )
    ws_port = free_port()
    argv = [*RELAYMESH, "relay", "--json", "--config", str(config), "--port", str(ws_port)]
    argv += ["--http-port", str(free_port()), "--stun-port", "0"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert '"wss://' in proc.stdout.readline()
        trust = client_context(certs.ca_file)

        async def check() -> None:
            a, b = PrivateKey.generate(), PrivateKey.generate()
            url = f"wss://127.0.0.1:{ws_port}/derp"
            async with (
                open_relay_client(url, a, ssl_context=trust) as ca,
                open_relay_client(url, b, ssl_context=trust) as cb,
            ):
                assert await _served_serial(ws_port, trust) == certs.serial
                new = certs.issue()
                proc.send_signal(signal.SIGHUP)
                # Only polling can see another process's reload.
                with trio.fail_after(10):
                    while await _served_serial(ws_port, trust) != new:  # noqa: ASYNC110
                        await trio.sleep(0.05)
                await _exchange(ca, cb, b, b"after SIGHUP")

        trio.run(check)
        assert proc.poll() is None  # SIGHUP did not stop it
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=20)
    assert "TLS certificate reloaded" in err
    assert "Traceback" not in err


def test_cli_without_the_ca_fails_in_one_line(certs: Certs, tmp_path: Path) -> None:
    config = tmp_path / "relay.toml"
    config.write_text(
        f'[tls]\ncert_file = "{certs.cert_file}"\nkey_file = "{certs.key_file}"\n'
        "[health]\nenabled = false\n"
    )
    ws_port = free_port()
    argv = [*RELAYMESH, "relay", "--json", "--config", str(config), "--port", str(ws_port)]
    argv += ["--http-port", str(free_port()), "--stun-port", "0"]
    relay = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert relay.stdout is not None
        relay.stdout.readline()
        key = tmp_path / "a.key"
        subprocess.run([*RELAYMESH, "keygen", "--out", str(key)], check=True, capture_output=True)
        send = [*RELAYMESH, "send", "--url", f"wss://127.0.0.1:{ws_port}/derp"]
        send += ["--key-file", str(key), "--to", str(PrivateKey.generate().public), "hi"]
        env = {k: v for k, v in os.environ.items() if k not in ("SSL_CERT_FILE", "SSL_CERT_DIR")}
        bad = subprocess.run(send, capture_output=True, text=True, env=env, timeout=30)
        assert bad.returncode == 1
        lines = bad.stderr.strip().splitlines()
        assert len(lines) == 1, bad.stderr
        assert "certificate verify failed" in lines[0] and "Traceback" not in bad.stderr
        # With the CA (as an option, or through SSL_CERT_FILE) the same command works.
        ok = subprocess.run(
            [*send, "--ca-file", str(certs.ca_file)], capture_output=True, text=True, timeout=30
        )
        assert ok.returncode == 0, ok.stderr
        ok = subprocess.run(
            send,
            capture_output=True,
            text=True,
            timeout=30,
            env={**env, "SSL_CERT_FILE": str(certs.ca_file)},
        )
        assert ok.returncode == 0, ok.stderr
    finally:
        relay.terminate()
        relay.communicate(timeout=20)


def test_up_tls_serves_wss_with_a_ca_it_prints(tmp_path: Path) -> None:
    """`relaymesh up --tls`: every URL is wss/https, and a client given the CA file gets through
    the region map of one relay to a listener on another."""
    argv = [*RELAYMESH, "up", "--tls", "--json", "--regions", "eu,us"]
    argv += ["--relays-per-region", "1", "--base-port", "0"]
    up = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert up.stdout is not None
        doc = json.loads(up.stdout.readline())
        ca_file = doc["ca_file"]
        assert Path(ca_file).is_file()
        urls = [u for r in doc["relays"] for u in (r["ws_url"], r["http_url"])]
        assert all(u.startswith(("wss://", "https://")) for u in urls), urls
        trust = client_context(Path(ca_file))
        eu, us = doc["relays"]

        async def check() -> None:
            a, b = PrivateKey.generate(), PrivateKey.generate()
            async with (
                open_relay_client(
                    await relay_urls(eu["http_url"], ssl_context=trust), a, ssl_context=trust
                ) as ca,
                open_relay_client(us["ws_url"], b, ssl_context=trust) as cb,
            ):
                # The peer map reaches eu's relay through the shared state: retry until routed.
                with trio.fail_after(10):
                    while True:
                        await ca.send(b.public, b"through up --tls")
                        with trio.move_on_after(0.2):
                            assert (await cb.receive()).payload == b"through up --tls"
                            return

        trio.run(check)
        # SIGHUP reloads every relay's certificate (counted), and stops nothing.
        up.send_signal(signal.SIGHUP)

        def reloads() -> int:
            text = httpx.get(f"{eu['http_url']}/metrics", verify=trust, timeout=5).text
            return sum(
                int(float(line.rsplit(" ", 1)[1]))
                for line in text.splitlines()
                if line.startswith("relaymesh_tls_reloads_total{") and 'result="ok"' in line
            )

        deadline = time.monotonic() + 20
        while reloads() < 1:
            assert time.monotonic() < deadline, "no reload counted after SIGHUP"
            time.sleep(0.1)
        assert up.poll() is None
    finally:
        up.send_signal(signal.SIGINT)
        _, err = up.communicate(timeout=30)
    assert "Traceback" not in err
    assert not Path(ca_file).exists()  # the run's CA goes with it
