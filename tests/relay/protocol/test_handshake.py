"""The handshake, sans-IO: success, and each way it must fail."""

from __future__ import annotations

import json

import nacl.public
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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
        ({"version": 2}, CloseReason.BAD_HANDSHAKE),
        ({"version": 2, "challenge": "00" * 32}, CloseReason.BAD_CHALLENGE),
        ({"version": 1, "challenge": "CH"}, CloseReason.BAD_HANDSHAKE),
        ({"version": "2", "challenge": "CH"}, CloseReason.BAD_HANDSHAKE),
        ({"version": True, "challenge": "CH"}, CloseReason.BAD_HANDSHAKE),
        ({"version": 10**4000, "challenge": "CH"}, CloseReason.BAD_HANDSHAKE),
        ({"version": 2, "challenge": "CH", "mesh_proof": "zz"}, CloseReason.BAD_HANDSHAKE),
        ({"version": 2, "challenge": "CH", "mesh_proof": "AB" * 32}, CloseReason.BAD_HANDSHAKE),
        ({"version": 2, "challenge": "CH", "mesh_proof": "ab" * 31}, CloseReason.BAD_HANDSHAKE),
        ({"version": 2, "challenge": "CH", "token": 7}, CloseReason.BAD_HANDSHAKE),
        ({"version": 2, "challenge": "CH", "token": "t" * 257}, CloseReason.BAD_HANDSHAKE),
        ({"version": 2, "challenge": "CH", "preferred": "yes"}, CloseReason.BAD_HANDSHAKE),
        ({"version": 2, "challenge": "CH", "probe": 1}, CloseReason.BAD_HANDSHAKE),
        # A probe client is one only with the mesh's proof.
        ({"version": 2, "challenge": "CH", "probe": True}, CloseReason.BAD_HANDSHAKE),
        ({"version": 2, "challenge": "CH", "disco_key": "nodekey:" + "AB" * 32}, 4005),
        ({"version": 2, "challenge": "CH", "endpoints": ["1.2.3.4:5"] * 33}, 4005),
        ({"version": 2, "challenge": "CH", "endpoints": [["1.2.3.4:5"]]}, 4005),
        # The two reproductions: a non-ASCII challenge (TypeError from compare_digest)
        # and 2,000 nested arrays (RecursionError from the JSON parser).
        ({"version": 2, "challenge": "é" * 64}, CloseReason.BAD_HANDSHAKE),
        ({"version": 2, "challenge": "\u0660" * 64}, CloseReason.BAD_HANDSHAKE),
        (b"[" * 2000, CloseReason.BAD_HANDSHAKE),
        (b'{"version": 2, "x": ' + b"[" * 5 + b"]" * 5 + b"}", CloseReason.BAD_HANDSHAKE),
        (b"\xff\xfe" + '{"version": 2}'.encode("utf-16-le"), CloseReason.BAD_HANDSHAKE),
    ],
)
def test_bad_client_info_contents(payload: object, reason: CloseReason) -> None:
    challenge = new_challenge()
    if isinstance(payload, dict) and payload.get("challenge") == "CH":
        payload["challenge"] = challenge.hex()
    with pytest.raises(RemoteProtocolError) as info:
        open_client_info(RELAY, challenge, _sealed(payload))
    assert info.value.reason == reason


def test_mesh_proof_is_an_hmac_not_the_key() -> None:
    sk = hello()
    mesh_key = b"m" * 32
    info = seal_client_info(CLIENT, sk, mesh_key=mesh_key)
    got = open_client_info(RELAY, sk.challenge, info)
    assert got.mesh_proof == mesh_proof(mesh_key, sk.challenge, CLIENT.public)
    assert got.mesh_proof != mesh_key
    # Bound to the challenge: another connection's proof differs.
    assert mesh_proof(mesh_key, new_challenge(), CLIENT.public) != got.mesh_proof


def test_probe_flag_rides_on_the_mesh_proof() -> None:
    sk = hello()
    mesh_key = b"m" * 32
    got = open_client_info(RELAY, sk.challenge, seal_client_info(CLIENT, sk, mesh_key=mesh_key))
    assert got.probe is False
    info = seal_client_info(CLIENT, sk, mesh_key=mesh_key, probe=True)
    got = open_client_info(RELAY, sk.challenge, info)
    assert got.probe is True
    assert got.mesh_proof == mesh_proof(mesh_key, sk.challenge, CLIENT.public)
    with pytest.raises(ValueError, match="mesh key"):
        seal_client_info(CLIENT, sk, probe=True)


def test_server_info_from_another_relay_does_not_open() -> None:
    reply = seal_server_info(PrivateKey.generate(), CLIENT.public, {})
    with pytest.raises(RemoteProtocolError):
        open_server_info(CLIENT, RELAY.public, reply)


def test_challenge_hex_must_be_lower_case() -> None:
    sk = hello()
    payload = {"version": 2, "challenge": sk.challenge.hex().upper()}
    with pytest.raises(RemoteProtocolError, match="lower-case"):
        open_client_info(RELAY, sk.challenge, _sealed(payload))


def test_json_nesting_within_the_limit_is_fine() -> None:
    sk = hello()
    payload = {"version": 2, "challenge": sk.challenge.hex(), "x": [[["[{not a bracket"]]]}
    assert open_client_info(RELAY, sk.challenge, _sealed(payload)).version == 2


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)
_FIELDS = [
    "version",
    "challenge",
    "token",
    "mesh_proof",
    "probe",
    "preferred",
    "disco_key",
    "endpoints",
]


@settings(max_examples=300, derandomize=True, deadline=None)
@given(
    fields=st.dictionaries(st.sampled_from(_FIELDS), _json, max_size=len(_FIELDS)),
    raw=st.binary(max_size=64) | st.none(),
)
def test_hostile_client_info_only_ever_raises_remote_protocol_error(
    fields: dict[str, object], raw: bytes | None
) -> None:
    sk = hello()
    payload: object = raw if raw is not None else {"version": 2, **fields}
    try:
        got = open_client_info(RELAY, sk.challenge, _sealed(payload))
    except RemoteProtocolError as exc:
        assert exc.reason in (CloseReason.BAD_HANDSHAKE, CloseReason.BAD_CHALLENGE)
    else:  # pragma: no cover - random fields almost never make a valid challenge
        assert got.client_key == CLIENT.public
