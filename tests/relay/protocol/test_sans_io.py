"""The protocol package is sans-IO, checked the way it is used: imported in a fresh interpreter.

Reading each file's own imports misses what a package ``__init__`` drags in;
importing for real and looking at ``sys.modules`` does not.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

FORBIDDEN = (
    "trio",
    "trio_websocket",
    "wsproto",
    "httpx",
    "httpcore",
    "pydantic",
    "hypercorn",
    "quart",
    "quart_trio",
    "etcd3",
    "grpc",
    "asyncio",
    "selectors",
    # our own packages, other than relay.protocol itself
    "coordinator",
    "region",
    "relaymesh",
)
OWN_ALLOWED = {"relay", "relay.protocol"}

PROTOCOL_MODULES = [
    "relay.protocol",
    "relay.protocol.wire",
    "relay.protocol.handshake",
    "relay.protocol.keys",
    "relay.protocol.stun",
    "relay.protocol.disco",
    "relay.protocol.backoff",
]


@pytest.mark.parametrize("module", PROTOCOL_MODULES)
def test_protocol_imports_no_io_and_nothing_of_ours(module: str) -> None:
    code = f"import json, sys; import {module}; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    loaded = set(json.loads(out))
    bad = sorted(m for m in loaded if m.split(".")[0] in FORBIDDEN)
    assert not bad, f"importing {module} loads {bad}"
    ours = sorted(
        m
        for m in loaded
        if m.split(".")[0] == "relay"
        and m not in OWN_ALLOWED
        and not m.startswith("relay.protocol")
    )
    assert not ours, f"importing {module} loads {ours}"
