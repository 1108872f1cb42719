"""The handshake, sans-IO: success, and each way it must fail."""

from __future__ import annotations

import json

import nacl.public
import pytest

from relay.protocol import wire
from relay.protocol.handshake import (
    mesh_proof,
    new_challenge,
    open_client_info,
    open_server_info,
    seal_client_info,
    seal_server_info,
)
from relay.protocol.keys import PrivateKey
from relay.protocol.wire import CloseReason, RemoteProtocolError

RELAY = PrivateKey.generate()
CLIENT = PrivateKey.generate()


def hello(challenge: bytes | None = None) -> wire.ServerKey:
    return wire.ServerKey(public_key=RELAY.public.raw, challenge=challenge or new_challenge())


def test_success_carries_token_and_preference() -> None:
    sk = hello()
    info = seal_client_info(CLIENT, sk, token="t0k", preferred=True)
    got = open_client_info(RELAY, sk.challenge, info)
    assert got.client_key == CLIENT.public
    assert got.token == "t0k" and got.preferred and got.mesh_proof is None
    reply = seal_server_info(RELAY, CLIENT.public, {"keepalive_s": 30})
    assert open_server_info(CLIENT, RELAY.public, reply)["keepalive_s"] == 30


def test_replayed_client_info_fails_the_new_challenge() -> None:
    recorded = seal_client_info(CLIENT, hello())
    with pytest.raises(RemoteProtocolError) as info:
        open_client_info(RELAY, new_challenge(), recorded)
    assert info.value.reason is CloseReason.BAD_CHALLENGE


def test_box_for_another_key_does_not_open() -> None:
    sk = hello()
    info = seal_client_info(CLIENT, sk)
    # Claim to be someone else: the box was made by CLIENT's key, so it does not open.
    forged = wire.ClientInfo(
        client_key=PrivateKey.generate().public.raw, nonce=info.nonce, sealed=info.sealed
    )
    with pytest.raises(RemoteProtocolError) as exc:
        open_client_info(RELAY, sk.challenge, forged)
    assert exc.value.reason is CloseReason.BAD_HANDSHAKE


def _sealed(obj: object) -> wire.ClientInfo:
    box = nacl.public.Box(
        nacl.public.PrivateKey(bytes.fromhex(CLIENT.to_text()[8:])),
        nacl.public.PublicKey(RELAY.public.raw),
    )
    data = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
    s = box.encrypt(data)
    return wire.ClientInfo(client_key=CLIENT.public.raw, nonce=s.nonce, sealed=s.ciphertext)


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"\xff not json", CloseReason.BAD_HANDSHAKE),
        ([1, 2], CloseReason.BAD_HANDSHAKE),
        ({"version": 2}, CloseReason.BAD_CHALLENGE),
        ({"version": 1, "challenge": "CH"}, CloseReason.BAD_HANDSHAKE),
        ({"version": "2", "challenge": "CH"}, CloseReason.BAD_HANDSHAKE),
        ({"version": 2, "challenge": "CH", "mesh_proof": "zz"}, CloseReason.BAD_HANDSHAKE),
    ],
)
def test_bad_client_info_contents(payload: object, reason: CloseReason) -> None:
    challenge = new_challenge()
    if isinstance(payload, dict) and payload.get("challenge") == "CH":
        payload["challenge"] = challenge.hex()
    with pytest.raises(RemoteProtocolError) as info:
        open_client_info(RELAY, challenge, _sealed(payload))
    assert info.value.reason is reason


def test_mesh_proof_is_an_hmac_not_the_key() -> None:
    sk = hello()
    mesh_key = b"m" * 32
    info = seal_client_info(CLIENT, sk, mesh_key=mesh_key)
    got = open_client_info(RELAY, sk.challenge, info)
    assert got.mesh_proof == mesh_proof(mesh_key, sk.challenge, CLIENT.public)
    assert got.mesh_proof != mesh_key
    # Bound to the challenge: another connection's proof differs.
    assert mesh_proof(mesh_key, new_challenge(), CLIENT.public) != got.mesh_proof


def test_server_info_from_another_relay_does_not_open() -> None:
    reply = seal_server_info(PrivateKey.generate(), CLIENT.public, {})
    with pytest.raises(RemoteProtocolError):
        open_server_info(CLIENT, RELAY.public, reply)
