"""The profile summary charges each sample to its innermost frame and to one area."""

from __future__ import annotations

from relaymesh.bench.profile import area, profile, read_raw

# Three stacks as `py-spy record --format raw` writes them (trimmed at the root).
RAW = """\
run (trio/_core/_run.py:2532);RelayServer._read_loop (relay/server.py:700) 6
run (trio/_core/_run.py:2532);RelayServer._read_loop (relay/server.py:702);\
FrameDecoder.split (relay/protocol/wire.py:310) 3
run (trio/_core/_run.py:2532);SocketStream.send_all (trio/_highlevel_socket.py:120);\
_SocketType._nonblocking_helper (trio/_socket.py:1050) 1
"""


def test_samples_go_to_the_innermost_frame() -> None:
    leaves = read_raw(RAW.splitlines())
    assert leaves == {
        ("RelayServer._read_loop", "relay/server.py"): 6,
        ("FrameDecoder.split", "relay/protocol/wire.py"): 3,
        ("_SocketType._nonblocking_helper", "trio/_socket.py"): 1,
    }


def test_areas_and_shares() -> None:
    assert area("_SocketType._nonblocking_helper", "trio/_socket.py").startswith("socket")
    assert area("SocketStream.send_all", "trio/_highlevel_socket.py").startswith("trio sched")
    assert area("CancelScope.__exit__", "trio/_core/_run.py").startswith("cancel scopes")
    table = profile(read_raw(RAW.splitlines()), top=2)
    # Shares of all samples, and of those outside the socket calls.
    assert "| routing and writer (relay/server.py) | 60.0% | 66.7% |" in table
    assert "| `FrameDecoder.split` | relay/protocol/wire.py | 30.0% | 33.3% |" in table
    assert "_nonblocking_helper" not in table.split("top 2")[1]
