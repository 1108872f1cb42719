"""A relay's two addresses: where other relays reach it, and where clients do.

The mesh address is ``[mesh] advertise_host`` (default: the listen host, or
127.0.0.1 for a wildcard) with the ports the relay listens on. Relays link
to it, the mesh monitor probes it, Prometheus scrapes it: inside the network.

The public address is ``[public]`` (relay/config.py): a host name or IP and
the ports published to clients (a container runtime's port mapping, a NAT, a
load balancer); each unset part falls back to the mesh address. Both go into
the relay's registry record; region maps list the public one (region/live.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import RelayConfig

__all__ = ["RelayAddresses", "relay_addresses"]


@dataclass(frozen=True, slots=True, kw_only=True)
class RelayAddresses:
    #: The mesh address: relays, the monitor and Prometheus inside the network.
    ws_url: str
    http_url: str
    #: ``host:port`` of the STUN server (UDP); None when it is off.
    stun: str | None
    #: What clients use, as they should be told (the public address if configured).
    client_ws_url: str
    client_http_url: str
    client_stun: str | None
    #: Whether ``[public]`` set any of it (then the registry record carries it).
    public: bool


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def relay_addresses(
    cfg: RelayConfig, *, ws_port: int, http_port: int, stun_port: int, tls: bool = False
) -> RelayAddresses:
    """Both addresses, from the config and the ports actually bound (``stun_port`` 0: off).

    ``tls``: the ports serve TLS ([tls]), so both addresses are wss:// and https://.
    """
    s = "s" if tls else ""
    mesh_host = _url_host(cfg.mesh.advertise_host or cfg.relay.listen_host)
    pub = cfg.public
    host = _url_host(pub.host) if pub.host is not None else mesh_host
    public_ws = pub.ws_port or ws_port
    public_http = pub.http_port or http_port
    public_stun = pub.stun_port or stun_port
    return RelayAddresses(
        ws_url=f"ws{s}://{mesh_host}:{ws_port}/derp",
        http_url=f"http{s}://{mesh_host}:{http_port}",
        stun=f"{mesh_host}:{stun_port}" if stun_port else None,
        client_ws_url=f"ws{s}://{host}:{public_ws}/derp",
        client_http_url=f"http{s}://{host}:{public_http}",
        client_stun=f"{host}:{public_stun}" if stun_port else None,
        public=pub.configured,
    )
