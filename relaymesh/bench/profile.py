"""Where a relay's CPU goes, from a py-spy profile: ``python -m relaymesh.bench.profile RAW``.

``RAW`` is what ``py-spy record --format raw`` writes (one collapsed stack per
line, then its sample count). Each sample is charged to the innermost Python
frame (time in C code, a ``bytes.join`` or a ``send`` syscall, is charged to
the Python function that called it) and printed two ways: by area of the code
(the first rule in :data:`AREAS` that matches the frame) and the top functions.
docs/performance.md has the recipe and a baseline.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from collections.abc import Iterable

__all__ = ["AREAS", "area", "profile", "read_raw"]

_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^():]*)(?::\d+)?\)$")

SOCKET = "socket send/recv calls"
#: (area, file part, function part): the first whose parts are both in the frame wins.
AREAS: list[tuple[str, str, str]] = [
    (SOCKET, "trio/_socket.py", "_nonblocking_helper"),
    ("epoll wait and registration", "trio/_core/_io_epoll.py", ""),
    ("cancel scopes, fail_after", "trio/_core/_run.py", "CancelScope"),
    ("cancel scopes, fail_after", "trio/_timeouts.py", ""),
    ("memory channels, locks", "trio/_channel.py", ""),
    ("memory channels, locks", "trio/_sync.py", ""),
    ("trio scheduling, checkpoints, streams", "trio/", ""),
    ("trio-websocket", "trio_websocket/", ""),
    ("wsproto parsing and framing", "wsproto/", ""),
    (
        "WebSocket frames (relay/protocol/websocket.py, relay/wsstream.py)",
        "relay/protocol/websocket.py",
        "",
    ),
    ("WebSocket frames (relay/protocol/websocket.py, relay/wsstream.py)", "relay/wsstream.py", ""),
    ("queues and outbox (relay/queue.py)", "relay/queue.py", ""),
    ("frame codec (relay/protocol/wire.py)", "relay/protocol/wire.py", ""),
    ("routing and writer (relay/server.py)", "relay/server.py", ""),
]


def read_raw(lines: Iterable[str]) -> Counter[tuple[str, str]]:
    """Samples per innermost frame, as (function, file)."""
    leaves: Counter[tuple[str, str]] = Counter()
    for line in lines:
        stack, _, count = line.rstrip("\n").rpartition(" ")
        if not stack or not count.isdigit():
            continue
        m = _FRAME.match(stack.rsplit(";", 1)[-1])
        leaf = (m["func"], m["file"]) if m else (stack.rsplit(";", 1)[-1], "?")
        leaves[leaf] += int(count)
    return leaves


def area(func: str, file: str) -> str:
    for name, file_part, func_part in AREAS:
        if file_part in file and func_part in func:
            return name
    return "other Python (contextlib, outcome, attrs, enum, ...)"


def profile(leaves: Counter[tuple[str, str]], top: int = 10) -> str:
    """Two tables: by area and the top functions, as shares of all samples and of Python's.

    py-spy samples a thread that is not waiting in epoll, whether it is on a
    core or waiting for one; on a loaded machine a thread that wakes its peer
    in ``send`` is often preempted there, so the socket calls' share of samples
    is larger than the kernel's share of CPU (read that from /proc utime and
    stime). The second column leaves the socket calls out.
    """
    total = sum(leaves.values()) or 1
    python = sum(n for (f, p), n in leaves.items() if area(f, p) != SOCKET) or 1
    areas: Counter[str] = Counter()
    for (func, file), n in leaves.items():
        areas[area(func, file)] += n

    def shares(n: int, name: str) -> str:
        other = "" if name == SOCKET else f"{100 * n / python:.1f}%"
        return f"{100 * n / total:.1f}% | {other}"

    head = "% of samples | % of samples outside the socket calls |"
    out = [f"{total:,} samples", "", f"| where | {head}", "|---|---|---|"]
    out += [f"| {name} | {shares(n, name)} |" for name, n in areas.most_common()]
    out += ["", f"| top {top} functions (self) | file | {head}", "|---|---|---|---|"]
    out += [
        f"| `{func}` | {file} | {shares(n, area(func, file))} |"
        for (func, file), n in leaves.most_common(top)
    ]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m relaymesh.bench.profile", description=__doc__)
    p.add_argument("raw", help="a py-spy --format raw file")
    p.add_argument("--top", type=int, default=10)
    args = p.parse_args(argv)
    with open(args.raw) as f:
        print(profile(read_raw(f), args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
