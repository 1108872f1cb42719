"""Direct-path figures for docs/performance.md, from the NAT lab (run as root):

    python -m tests.lab.figures_direct

Two clients behind separate MASQUERADE NATs, relays eu-1/eu-2, ~6 ms between
hosts (the lab WAN's delays). Reports: time from first packet to a confirmed
direct path; throughput and round trip direct vs relayed, same lab; packets
lost across a relay move (planned) and in an unannounced cut.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from tests.lab.test_nat_lab import ask, build, lines, map_url, start_receiver, start_stream, udp_cut


def stream(
    lab: Any, key: str, rate: int, seconds: float, relay_only: bool = False
) -> dict[str, Any]:
    env = {**os.environ, **({"RELAYMESH_PROBE_RELAY_ONLY": "1"} if relay_only else {})}
    proc = lab.spawn(
        "a",
        sys.executable,
        "-m",
        "tests.lab.peer_probe",
        "stream",
        map_url(lab),
        key,
        str(rate),
        str(seconds),
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    docs = list(lines(proc))
    return docs[-1]


def pings(lab: Any, key: str, relay_only: bool) -> list[float]:
    env = {**os.environ, **({"RELAYMESH_PROBE_RELAY_ONLY": "1"} if relay_only else {})}
    out = subprocess.run(
        lab.cmd(
            "a", sys.executable, "-m", "tests.lab.peer_probe", "pingstats", map_url(lab), key, "25"
        ),
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        cwd=Path(__file__).resolve().parents[2],
    )
    doc = json.loads(out.stdout)
    return [r for r, d in zip(doc["rtts_ms"], doc["direct"], strict=True) if d != relay_only]


def main() -> None:
    result: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        lab = build(Path(tmp))
        try:
            receiver, key = start_receiver(lab)
            ttd = [stream(lab, key, 100, 1.5)["time_to_direct_s"] for _ in range(5)]
            result["time_to_direct_s"] = {"runs": ttd, "max": max(ttd)}
            for name, relay_only in (("direct", False), ("relayed", True)):
                ask(receiver, "reset")
                summary = stream(lab, key, 0, 3, relay_only)
                rep = ask(receiver, "report")
                rtts = pings(lab, key, relay_only)
                result[name] = {
                    "pps": round(rep["unique"] / rep["span_s"]) if rep["span_s"] else 0,
                    "mbps": round(rep["unique"] * 1208 / rep["span_s"] / 1e6, 1)
                    if rep["span_s"]
                    else 0,
                    "loss_pct": round(100 * (1 - rep["unique"] / max(1, summary["sent"])), 2),
                    "rtt_p50_ms": statistics.median(rtts) if rtts else None,
                }
            ask(receiver, "reset")
            sender = start_stream(lab, key, 100, 10)
            cut = restored = False
            for doc in lines(sender):
                if doc.get("done"):
                    summary = doc
                    break
                if not cut and doc["t"] >= 3:
                    udp_cut(lab, True)
                    cut = True
                if not restored and doc["t"] >= 6:
                    udp_cut(lab, False)
                    restored = True
            rep = ask(receiver, "report")
            missing = summary["sent"] - rep["unique"]
            result["unannounced_cut_at_100pps"] = {
                "lost": missing,
                "lost_ms_of_traffic": missing * 10,
                "counted_by_sender": summary["lost_in_cuts"],
                "duplicates": rep["duplicates"],
            }
            ask(receiver, "reset")
            sender = start_stream(lab, key, 100, 6)
            moved = False
            for doc in lines(sender):
                if doc.get("done"):
                    summary = doc
                    break
                if not moved and doc["t"] >= 2:
                    ask(receiver, "move")
                    moved = True
            rep = ask(receiver, "report")
            result["planned_relay_move_at_100pps"] = {
                "lost": summary["sent"] - rep["unique"],
                "duplicates": rep["duplicates"],
            }
        finally:
            lab.close()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
