"""The relay URL forms every command accepts, and the relays each resolves to.

Two forms, as ``relaymesh relay`` and ``relaymesh up`` print them:

- ``ws://host:port/derp`` (or ``wss://``): one relay's WebSocket endpoint,
  used as it is;
- ``http://host:port`` (or ``https://``): a relay's HTTP base. Its
  ``/regionmap`` lists every relay of the mesh, so a client given it can move
  to a sibling when that relay restarts: the relay itself first, then the
  others of its region, then the other regions.

Several URLs may be given, comma-separated; the client tries them in order and
moves down the list when a relay restarts.
"""

from __future__ import annotations

import ssl
from typing import Any, Literal
from urllib.parse import urlsplit

__all__ = ["UrlError", "relay_urls", "split_urls", "url_kind"]


class UrlError(ValueError):
    """A URL in none of the accepted forms; the message says which forms are."""


_FORMS = "a relay's ws://host:port/derp or its http://host:port base"


def url_kind(url: str) -> Literal["ws", "http"]:
    parts = urlsplit(url)
    if parts.scheme in ("ws", "wss") and parts.hostname:
        return "ws"
    if parts.scheme in ("http", "https") and parts.hostname:
        return "http"
    raise UrlError(f"{url!r} is not {_FORMS}")


def split_urls(text: str) -> list[str]:
    urls = [u.strip() for u in text.split(",") if u.strip()]
    if not urls:
        raise UrlError(f"--url needs {_FORMS}")
    for url in urls:
        url_kind(url)
    return urls


async def relay_urls(
    text: str, *, verify_key: Any = None, ssl_context: ssl.SSLContext | None = None
) -> list[str]:
    """WebSocket URLs for ``text``: ws URLs as given, http bases through their region map.

    ``ssl_context`` verifies an https:// base (None: the system's trust store).
    """
    from .home import RegionMapSource

    out: list[str] = []
    for url in split_urls(text):
        if url_kind(url) == "ws":
            candidates = [url]
        else:
            region_map = await RegionMapSource(
                url, verify_key=verify_key, ssl_context=ssl_context
            ).fetch()
            base = url.rstrip("/").removesuffix("/regionmap")
            nodes = [(r, n) for r in region_map.regions for n in r.nodes if n.up]
            home = next((r for r, n in nodes if n.http_url == base), None)
            nodes.sort(
                key=lambda rn: (
                    rn[1].http_url != base,
                    home is None or rn[0].code != home.code,
                    rn[0].id,
                    rn[1].name,
                )
            )
            candidates = [n.ws_url for _, n in nodes]
        out.extend(u for u in candidates if u not in out)
    if not out:
        raise UrlError(f"{text}: the region map lists no relay that is up")
    return out
