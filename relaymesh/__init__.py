"""relaymesh: what users import and run.

The SDK::

    from relaymesh import PrivateKey, open_peer

    async with open_peer("http://relay.example:3341", PrivateKey.generate()) as peer:
        await peer.send(other_key, b"hello")

:func:`open_peer` picks the closest relay from the region map, connects,
upgrades each conversation to a direct UDP path when NAT allows and seals
everything end to end. Lower down, :func:`open_home_relay` (closest relay,
no direct paths) and :func:`open_relay_client` (one relay URL, raw packets).
The ``relaymesh`` command (:mod:`relaymesh.cli`) and the benchmarks live here too.
"""

from relay import __version__
from relay.client import ConnectError, Packet, RelayClient, open_relay_client
from relay.protocol.keys import NodeKey, PrivateKey, Sealer, SealError

from .home import HomeRelay, MapFetchError, open_home_relay
from .peer import Peer, PeerNotFound, open_peer

__all__ = [
    "ConnectError",
    "HomeRelay",
    "MapFetchError",
    "NodeKey",
    "Packet",
    "Peer",
    "PeerNotFound",
    "PrivateKey",
    "RelayClient",
    "SealError",
    "Sealer",
    "__version__",
    "open_home_relay",
    "open_peer",
    "open_relay_client",
]
