"""The benchmarks' worker processes: each is ``python -m <module> <role> ...``, answers
with one JSON line per request on stdout, and ends when its stdin closes."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any


def spawn(module: str, *argv: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", module, *argv],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def read_json(proc: subprocess.Popen[str]) -> dict[str, Any]:
    """The worker's next JSON line; RuntimeError if it exited instead."""
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"bench worker {proc.args!r} exited ({proc.wait()})")
    result: dict[str, Any] = json.loads(line)
    return result


def finish(proc: subprocess.Popen[str], timeout_s: float = 10.0) -> None:
    """Close the worker's stdin (it exits at EOF) and wait; kill it past ``timeout_s``."""
    if proc.stdin is not None and not proc.stdin.closed:
        proc.stdin.close()
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
