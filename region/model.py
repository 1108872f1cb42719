"""The region map: regions, their relay nodes, and how to reach each.

``config/regions.toml`` is the operator's source; every relay serves it as
JSON at ``/regionmap``, joined live with the registry (nodes that are down
are marked ``up: false`` and carry no key). docs/regionmap.schema.json is the
JSON schema, generated from these models (a test keeps it in step).

Validation errors name the region and the node, then the field::

    regions.toml: region "eu" (regions[0]): node "eu-2" (nodes[1]): ws_port: ...
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Callable
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

__all__ = [
    "Region",
    "RegionMap",
    "RegionMapError",
    "RelayNode",
    "format_validation_error",
    "load_region_map",
    "parse_region_map",
]


def _where(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(p) for p in loc) or "(top level)"


def format_validation_error(
    source: str,
    exc: ValidationError,
    where: Callable[[tuple[int | str, ...]], str] = _where,
) -> str:
    """One line per problem: ``source: where: problem``, worded for an operator.

    Shared with relay/config.py (the relay's own TOML), which sits a layer above.
    """
    lines = []
    for err in exc.errors():
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"{source}: {where(tuple(err['loc']))}: {msg}")
    return "\n".join(lines)


class RegionMapError(Exception):
    """A region map that cannot be used, with where and why."""


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class RelayNode(_Frozen):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    #: Hostname or address clients connect to.
    host: str = Field(min_length=1)
    ws_port: int = Field(ge=1, le=65535)
    http_port: int = Field(ge=1, le=65535)
    #: 0: this node runs no STUN.
    stun_port: int = Field(3478, ge=0, le=65535)
    ipv4: IPv4Address | None = None
    ipv6: IPv6Address | None = None
    #: nodekey:<hex>; filled in from the registry in served maps.
    public_key: str | None = None
    #: Whether the registry has this node now (served maps only; configs leave it true).
    up: bool = True
    #: The node serves TLS: clients use wss:// and https:// (and verify its certificate).
    tls: bool = False

    @field_validator("public_key")
    @classmethod
    def _nodekey(cls, v: str | None) -> str | None:
        if v is not None:
            from relay.protocol.keys import NodeKey

            NodeKey.parse(v)
        return v

    @property
    def ws_url(self) -> str:
        return f"ws{'s' if self.tls else ''}://{self._url_host()}:{self.ws_port}/derp"

    @property
    def http_url(self) -> str:
        return f"http{'s' if self.tls else ''}://{self._url_host()}:{self.http_port}"

    def stun_address(self) -> tuple[str, int] | None:
        if not self.stun_port:
            return None
        return (str(self.ipv4) if self.ipv4 else self.host), self.stun_port

    def _url_host(self) -> str:
        return f"[{self.host}]" if ":" in self.host else self.host

    def with_public_host(self, ws_url: str, http_url: str | None, stun: str | None) -> RelayNode:
        """This node at the address a relay registered for clients.

        ``ws_url`` and ``http_url`` as the relay advertises them, ``stun`` as
        ``host:port`` (None: no STUN). The host comes from ``ws_url``; a changed
        host drops the ``ipv4``/``ipv6`` hints, which described the old one.
        """
        ws = urlsplit(ws_url)
        http = urlsplit(http_url) if http_url else ws
        host = ws.hostname or self.host
        tls = ws.scheme == "wss"
        update: dict[str, Any] = {
            "host": host,
            "ws_port": ws.port or (443 if tls else 80),
            "http_port": http.port or (443 if tls else 80),
            "stun_port": int(stun.rsplit(":", 1)[1]) if stun else 0,
            # A relay that serves TLS says so in its URLs; a map that says TLS keeps it.
            "tls": self.tls or tls,
        }
        if host != self.host:
            update.update(ipv4=None, ipv6=None)
        return self.model_copy(update=update)


class Region(_Frozen):
    id: int = Field(ge=1)
    code: str = Field(min_length=1, pattern=r"^[a-z0-9][a-z0-9-]*$")
    name: str = Field(min_length=1)
    nodes: list[RelayNode] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_nodes(self) -> Region:
        names = [n.name for n in self.nodes]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"node names repeat: {', '.join(dup)}")
        return self


class RegionMap(_Frozen):
    version: int = 1
    regions: list[Region] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique(self) -> RegionMap:
        checks: list[tuple[str, list[str]]] = [
            ("region ids", [str(r.id) for r in self.regions]),
            ("region codes", [r.code for r in self.regions]),
            ("node names", [n.name for r in self.regions for n in r.nodes]),
        ]
        for what, values in checks:
            dup = sorted({v for v in values if values.count(v) > 1})
            if dup:
                raise ValueError(f"{what} repeat across the map: {', '.join(dup)}")
        return self

    def region(self, code: str) -> Region | None:
        return next((r for r in self.regions if r.code == code), None)

    def node(self, name: str) -> tuple[Region, RelayNode] | None:
        for r in self.regions:
            for n in r.nodes:
                if n.name == name:
                    return r, n
        return None

    def to_json(self) -> bytes:
        return json.dumps(
            self.model_dump(mode="json"), sort_keys=True, separators=(",", ":")
        ).encode()


def _describe(loc: tuple[int | str, ...], raw: Any) -> str:
    """regions.0.nodes.1.ws_port → region "eu" (regions[0]): node "eu-2" (nodes[1]): ws_port."""
    parts: list[str] = []
    node: Any = raw
    i = 0
    while i < len(loc):
        key = loc[i]
        if key in ("regions", "nodes") and i + 1 < len(loc) and isinstance(loc[i + 1], int):
            idx = int(loc[i + 1])
            try:
                node = node[key][idx]
                label = node.get("code" if key == "regions" else "name")
            except (KeyError, IndexError, TypeError, AttributeError):
                label = None
            kind = "region" if key == "regions" else "node"
            parts.append(f'{kind} "{label}" ({key}[{idx}])' if label else f"{kind} {key}[{idx}]")
            i += 2
            continue
        parts.append(str(key))
        i += 1
    return ": ".join(parts) if parts else "(top level)"


def parse_region_map(raw: Any, *, source: str = "region map") -> RegionMap:
    try:
        return RegionMap.model_validate(raw)
    except ValidationError as exc:
        message = format_validation_error(source, exc, lambda loc: _describe(loc, raw))
        raise RegionMapError(message) from None


def load_region_map(path: Path) -> RegionMap:
    try:
        raw = tomllib.loads(path.read_text())
    except OSError as exc:
        raise RegionMapError(f"{path}: cannot read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise RegionMapError(f"{path}: not valid TOML: {exc}") from None
    return parse_region_map(raw, source=str(path))
