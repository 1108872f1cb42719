"""relaymesh relay: the node that carries end-to-end-encrypted packets between clients."""

__version__ = "0.1.0"

from . import _wsmask

_wsmask.install()

from .client import ConnectError, Packet, RelayClient, open_relay_client  # noqa: E402
from .config import ConfigError, RelayConfig, load_config  # noqa: E402
from .keys import NodeKey, PrivateKey, Sealer  # noqa: E402
from .server import RelayServer, serve_relay  # noqa: E402

__all__ = [
    "ConfigError",
    "ConnectError",
    "NodeKey",
    "Packet",
    "PrivateKey",
    "RelayClient",
    "RelayConfig",
    "RelayServer",
    "Sealer",
    "__version__",
    "load_config",
    "open_relay_client",
    "serve_relay",
]
