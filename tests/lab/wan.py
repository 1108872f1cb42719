"""A WAN for network-namespace labs: real packets between namespaces, with latency.

The kernel here has no ``sch_netem`` (``tc qdisc add ... netem`` answers
"Specified qdisc kind is unknown"), so latency is added in user space: this
process creates a TUN device ``wan0`` inside every lab namespace and moves
each IPv4 packet from the TUN of its source host to the TUN of its
destination host after ``delay[src] + delay[dst]`` milliseconds (plus
optional Gaussian jitter), keeping packet order per (src, dst) pair as netem
does without reordering. Everything else (the kernels' TCP/UDP stacks,
sockets, iptables in the namespaces) is real.

Run as root: ``python -m tests.lab.wan SPEC_JSON``. SPEC: {"hosts": {name:
{"netns": path, "ip": "10.77.0.2"}}, "delay_ms": {name: ms}, "jitter_ms":
{name: ms}}. It prints ``ready`` once every TUN exists, then reads JSON
lines on stdin: {"delay_ms": {...}} and/or {"jitter_ms": {...}} update the
settings; end of input stops it.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import heapq
import json
import os
import random
import struct
import sys
import threading
import time

CLONE_NEWNET = 0x40000000
TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000

_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def open_tun_in(netns_path: str, name: str = "wan0") -> int:
    """A TUN device created inside the namespace at ``netns_path``; returns its fd."""
    own = os.open("/proc/self/ns/net", os.O_RDONLY)
    target = os.open(netns_path, os.O_RDONLY)
    try:
        _setns(target)
        try:
            fd = os.open("/dev/net/tun", os.O_RDWR)
            fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
        finally:
            _setns(own)
    finally:
        os.close(own)
        os.close(target)
    return fd


class Wan:
    def __init__(self, spec: dict[str, object]) -> None:
        hosts = spec["hosts"]
        assert isinstance(hosts, dict)
        self.delay: dict[str, float] = dict(spec.get("delay_ms", {}))  # type: ignore[arg-type]
        self.jitter: dict[str, float] = dict(spec.get("jitter_ms", {}))  # type: ignore[arg-type]
        self.fds: dict[str, int] = {}
        self.by_ip: dict[bytes, str] = {}
        for name, h in hosts.items():
            self.fds[name] = open_tun_in(h["netns"])
            self.by_ip[bytes(int(x) for x in h["ip"].split("."))] = name
        self._heap: list[tuple[float, int, int, bytes]] = []
        self._seq = 0
        self._cond = threading.Condition()
        self._last_due: dict[tuple[str, str], float] = {}
        self._rng = random.Random(0)

    def start(self) -> None:
        for name, fd in self.fds.items():
            threading.Thread(target=self._reader, args=(name, fd), daemon=True).start()
        threading.Thread(target=self._writer, daemon=True).start()

    def _one_way_s(self, src: str, dst: str) -> float:
        ms = self.delay.get(src, 0.0) + self.delay.get(dst, 0.0)
        jitter = (self.jitter.get(src, 0.0) ** 2 + self.jitter.get(dst, 0.0) ** 2) ** 0.5
        if jitter:
            ms = max(0.0, ms + self._rng.gauss(0, jitter))
        return ms / 1000

    def _reader(self, src: str, fd: int) -> None:
        while True:
            try:
                pkt = os.read(fd, 65536)
            except OSError:
                return
            if len(pkt) < 20 or pkt[0] >> 4 != 4:
                continue
            dst = self.by_ip.get(pkt[16:20])
            if dst is None:
                continue
            now = time.monotonic()
            with self._cond:
                due = max(now + self._one_way_s(src, dst), self._last_due.get((src, dst), 0.0))
                self._last_due[(src, dst)] = due
                self._seq += 1
                heapq.heappush(self._heap, (due, self._seq, self.fds[dst], pkt))
                self._cond.notify()

    def _writer(self) -> None:
        while True:
            with self._cond:
                while not self._heap:
                    self._cond.wait()
                due, _, fd, pkt = self._heap[0]
                wait = due - time.monotonic()
                if wait > 0:
                    self._cond.wait(timeout=wait)
                    continue
                heapq.heappop(self._heap)
            with contextlib.suppress(OSError):
                os.write(fd, pkt)


def main() -> None:
    spec = json.loads(sys.argv[1])
    wan = Wan(spec)
    wan.start()
    print("ready", flush=True)
    for line in sys.stdin:
        update = json.loads(line)
        with wan._cond:
            wan.delay.update(update.get("delay_ms", {}))
            wan.jitter.update(update.get("jitter_ms", {}))
        print("ok", flush=True)


if __name__ == "__main__":
    main()
