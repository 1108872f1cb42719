"""Who may see a client's endpoints over HTTP: only the operator token's holder.

``/api/v1/peers/<nodekey>`` on real relays (two regions, one MemoryStore): an
unauthenticated caller, or one with a wrong token, gets the same 401 for a
connected client (local, or known from the peer map) as for a key nobody
uses, so it learns neither endpoints nor who is connected.
"""

from __future__ import annotations

import httpx
import trio

from coordinator.store import open_memory_store
from relay.app import api_token
from relay.client import open_relay_client
from relay.protocol.keys import PrivateKey
from tests.conftest import wait_until
from tests.region.test_live import MESH_KEY, mesh

ENDPOINTS = ("192.0.2.7:41641", "10.1.2.3:41641")
TOKEN = api_token(MESH_KEY)


async def test_unauthenticated_callers_learn_nothing_operators_see_endpoints(
    nursery: trio.Nursery,
) -> None:
    async with open_memory_store() as store:
        eu, us = await mesh(nursery, store, [("eu", "eu-1"), ("us", "us-1")])
        key = PrivateKey.generate()
        disco = PrivateKey.generate().public
        async with (
            open_relay_client(eu.ws_url, key, disco_key=disco, endpoints=ENDPOINTS),
            httpx.AsyncClient(timeout=5) as http,
        ):
            assert us.state is not None
            with trio.fail_after(5):
                await wait_until(lambda: key.public.raw in us.state.peers)  # type: ignore[union-attr]
            unknown = str(PrivateKey.generate().public)
            refusals: list[dict[str, str] | dict[bytes, bytes]] = [
                {},
                {"Authorization": "Bearer wrong"},
                {"Authorization": f"Basic {TOKEN}"},
                {"Authorization": f"Bearer {TOKEN[:-1]}"},
                {"Authorization": f"Bearer {MESH_KEY.decode()}"},  # the key itself is no token
                {b"Authorization": "Bearer \u00e9t\u00e9".encode("latin-1")},
            ]
            answers = set()
            for relay in (eu, us):
                for node in (str(key.public), unknown, "not-a-key"):
                    for headers in refusals:
                        resp = await http.get(
                            f"{relay.http_url}/api/v1/peers/{node}", headers=headers
                        )
                        challenge = resp.headers.get("WWW-Authenticate")
                        answers.add((resp.status_code, resp.content, challenge))
            # One answer for all: no endpoint, no disco key, no "known", for any key.
            assert len(answers) == 1
            status, body, challenge = answers.pop()
            assert status == 401 and challenge == 'Bearer realm="relaymesh"'
            for secret in (*ENDPOINTS, "192.0.2.7", str(disco), str(key.public)):
                assert secret.encode() not in body

            auth = {"Authorization": f"Bearer {TOKEN}"}
            local = (
                await http.get(f"{eu.http_url}/api/v1/peers/{key.public}", headers=auth)
            ).json()
            assert local["local"] is True and local["endpoints"] == list(ENDPOINTS)
            assert local["disco_key"] == str(disco)
            remote = (
                await http.get(f"{us.http_url}/api/v1/peers/{key.public}", headers=auth)
            ).json()
            assert remote["local"] is False and remote["state"] == "present"
            assert remote["endpoints"] == list(ENDPOINTS)
            missing = await http.get(f"{us.http_url}/api/v1/peers/{unknown}", headers=auth)
            assert missing.status_code == 404
