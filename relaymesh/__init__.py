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

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from relay import __version__
    from relay.client import ConnectError, Packet, RelayClient, open_relay_client
    from relay.protocol.keys import NodeKey, PrivateKey, Sealer, SealError

    from .home import HomeRelay, MapFetchError, open_home_relay
    from .peer import Peer, PeerNotFound, open_peer

# The SDK's names are loaded on first use, so that ``import relaymesh`` (and with it
# the ``relaymesh`` command's entry point, relaymesh.launch) costs almost nothing
# until a name is asked for.
_HOMES = {
    "__version__": "relay",
    "ConnectError": "relay.client",
    "Packet": "relay.client",
    "RelayClient": "relay.client",
    "open_relay_client": "relay.client",
    "NodeKey": "relay.protocol.keys",
    "PrivateKey": "relay.protocol.keys",
    "Sealer": "relay.protocol.keys",
    "SealError": "relay.protocol.keys",
    "HomeRelay": "relaymesh.home",
    "MapFetchError": "relaymesh.home",
    "open_home_relay": "relaymesh.home",
    "Peer": "relaymesh.peer",
    "PeerNotFound": "relaymesh.peer",
    "open_peer": "relaymesh.peer",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'relaymesh' has no attribute {name!r}")
    value = getattr(import_module(home), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_HOMES])


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
