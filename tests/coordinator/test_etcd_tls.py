"""etcd over TLS with client certificates and user/password auth, on a real etcd.

etcd is started with --cert-file/--key-file/--trusted-ca-file/--client-cert-auth
and its own auth enabled; the store (and `relaymesh relay`, through [etcd]) must
present the CA, a client certificate and the password, and a wrong password
ends the relay's start with one line.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from coordinator.etcd import open_etcd_store
from coordinator.store import StoreUnavailable
from relaymesh.procs import RELAYMESH, EtcdCluster, EtcdTLS, free_port, start_etcd
from tests.etcd_cluster import need_etcd

pytestmark = pytest.mark.slow

PASSWORD = "s3cret-etcd-pass"


@pytest.fixture(scope="module")
def secure_etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[EtcdCluster, Path]]:
    need_etcd()
    tmp = tmp_path_factory.mktemp("etcd-tls")
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp / "ca.pem"))
    server = ca.issue_cert("127.0.0.1", "localhost")
    server.cert_chain_pems[0].write_to_path(str(tmp / "server.pem"))
    server.private_key_pem.write_to_path(str(tmp / "server-key.pem"))
    client = ca.issue_cert("relay.example")
    client.cert_chain_pems[0].write_to_path(str(tmp / "client.pem"))
    client.private_key_pem.write_to_path(str(tmp / "client-key.pem"))
    tls = EtcdTLS(tmp / "ca.pem", tmp / "server.pem", tmp / "server-key.pem")
    cluster = start_etcd(tmp / "data", tls=tls)
    try:
        cluster.etcdctl("user", "add", f"root:{PASSWORD}")
        cluster.etcdctl("user", "grant-role", "root", "root")
        cluster.etcdctl("auth", "enable")
        cluster.etcdctl_user = f"root:{PASSWORD}"
        yield cluster, tmp
    finally:
        cluster.stop_all()


def _options(tmp: Path, password: str = PASSWORD) -> dict[str, str]:
    return {
        "ca_file": str(tmp / "ca.pem"),
        "cert_file": str(tmp / "client.pem"),
        "key_file": str(tmp / "client-key.pem"),
        "user": "root",
        "password": password,
    }


async def test_store_with_client_cert_and_password(secure_etcd: tuple[EtcdCluster, Path]) -> None:
    cluster, tmp = secure_etcd
    assert cluster.endpoints[0].startswith("https://")
    async with open_etcd_store(cluster.endpoints, **_options(tmp)) as store:
        await store.put("/tls-test/a", b"1")
        snap = await store.get_prefix("/tls-test/")
    assert [(kv.key, kv.value) for kv in snap.items] == [("/tls-test/a", b"1")]
    # etcdctl, with its own certificate and the same user, reads what the store wrote.
    assert "/tls-test/a" in cluster.etcdctl("get", "/tls-test/a")


async def test_wrong_password_is_refused(secure_etcd: tuple[EtcdCluster, Path]) -> None:
    cluster, tmp = secure_etcd
    with pytest.raises(StoreUnavailable, match="cannot authenticate as 'root'"):
        async with open_etcd_store(cluster.endpoints, **_options(tmp, "wrong")):
            pass


async def test_no_client_certificate_is_refused(secure_etcd: tuple[EtcdCluster, Path]) -> None:
    cluster, tmp = secure_etcd
    options = _options(tmp)
    del options["cert_file"], options["key_file"]
    with pytest.raises(StoreUnavailable):
        async with open_etcd_store(cluster.endpoints, timeout_s=2.0, **options) as store:
            await store.put("/tls-test/b", b"1")


async def test_token_forgotten_by_a_restarted_etcd(secure_etcd: tuple[EtcdCluster, Path]) -> None:
    """etcd keeps auth tokens in memory: after a restart the store authenticates again."""
    cluster, tmp = secure_etcd
    async with open_etcd_store(cluster.endpoints, **_options(tmp)) as store:
        await store.put("/tls-test/c", b"1")
        member = cluster.members[0]
        cluster.stop(member)
        cluster.start(member)
        cluster.wait_healthy(member)
        await store.put("/tls-test/c", b"2")
        snap = await store.get_prefix("/tls-test/c")
    assert [kv.value for kv in snap.items] == [b"2"]


def _relay(tmp: Path, cluster: EtcdCluster, password: str) -> subprocess.CompletedProcess[str]:
    (tmp / "password.txt").write_text(password + "\n")
    (tmp / "mesh.key").write_text("k" * 32)
    config = tmp / f"relay-{password}.toml"
    config.write_text(
        "[mesh]\n"
        f"etcd_endpoints = {json.dumps(cluster.endpoints)}\n"
        'mesh_key_file = "mesh.key"\n'
        "start_timeout_s = 8\n"
        "[etcd]\n"
        'ca_file = "ca.pem"\n'
        'cert_file = "client.pem"\n'
        'key_file = "client-key.pem"\n'
        'user = "root"\n'
        'password_file = "password.txt"\n'
    )
    argv = [*RELAYMESH, "relay", "--json", "--config", str(config), "--stun-port", "0"]
    argv += ["--port", str(free_port()), "--http-port", str(free_port())]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    proc.terminate()
    out, err = proc.communicate(timeout=20)
    return subprocess.CompletedProcess(argv, proc.returncode, line + out, err)


def test_relay_starts_with_etcd_tls_and_auth(secure_etcd: tuple[EtcdCluster, Path]) -> None:
    cluster, tmp = secure_etcd
    result = _relay(tmp, cluster, PASSWORD)
    assert "ws_url" in json.loads(result.stdout.splitlines()[0]), result.stderr
    # (What etcd3's watch thread logs while the relay stops is not this test's subject.)
    started = result.stderr.split("shutting down")[0]
    assert "registered relay-1" in started
    assert "Traceback" not in started


def test_relay_with_a_wrong_etcd_password_fails_in_one_line(
    secure_etcd: tuple[EtcdCluster, Path],
) -> None:
    cluster, tmp = secure_etcd
    result = _relay(tmp, cluster, "not-the-password")
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "cannot authenticate as 'root'" in lines[0]
    assert "Traceback" not in result.stderr
