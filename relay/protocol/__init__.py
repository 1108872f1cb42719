"""The relaymesh protocol, sans-IO: frames, handshake, keys and sealing, STUN, disco.

Bytes in, events out, events to bytes: nothing here touches a socket, a clock
it was not handed, or an event loop. It imports no trio, no WebSocket or HTTP
library and nothing else of ours, so a client in any framework (or language,
with docs/PROTOCOL.md) can reuse it; tests/relay/protocol/test_sans_io.py checks
that in a fresh interpreter.

- :mod:`.wire`: DERP-style frames, the streaming decoder and its fast path
- :mod:`.handshake`: ServerKey challenge, sealed ClientInfo/ServerInfo, mesh proof
- :mod:`.keys`: Curve25519 node keys, key files, end-to-end sealing
- :mod:`.stun`: STUN binding requests and responses (RFC 5389)
- :mod:`.disco`: disco Ping/Pong/CallMeMaybe sealed between disco keys
- :mod:`.backoff`: the jittered retry schedule every reconnecting loop follows
"""

from . import disco, handshake, keys, stun, wire
from .keys import NodeKey, PrivateKey, Sealer

__all__ = ["NodeKey", "PrivateKey", "Sealer", "disco", "handshake", "keys", "stun", "wire"]
