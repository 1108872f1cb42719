"""``relaymesh bench``: runs a scenario and prints its figures (a table, or JSON)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..errors import UserError
from .load import describe as describe_load
from .load import run_load
from .mesh import run_scenario
from .relay import run_bench

__all__ = ["cmd_bench"]


def cmd_bench(args: argparse.Namespace) -> int:
    if args.scenario == "load":
        try:
            load = run_load(runs=args.runs)
        except (ValueError, RuntimeError) as exc:
            raise UserError(str(exc)) from None
        print(json.dumps(load) if args.json else describe_load(load))
        return 0
    if args.scenario != "relay":
        try:
            result = run_scenario(args.scenario, size=args.size, seconds=args.seconds)
        except (ValueError, RuntimeError) as exc:
            raise UserError(str(exc)) from None
        print(json.dumps(result) if args.json else _describe_scenario(result))
        return 0
    try:
        result = run_bench(
            size=args.size, seconds=args.seconds, pairs=args.pairs, baseline=not args.no_baseline
        )
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if args.json:
        print(json.dumps(result))
        return 0
    print(
        f"relaymesh bench: {args.size}-byte packets, {args.seconds:g} s, {args.pairs} pair(s),"
        f" {result['cpus']} cpus"
    )
    print(
        f"{'target':<22}{'packets/s':>12}{'MB/s':>9}{'loss %':>8}{'cpu %':>7}"
        f"{'p50 ms':>9}{'p99 ms':>9}  (latency at pps)"
    )
    rows = [("relaymesh relay", result["relay"])]
    if "baseline" in result:
        rows.append((result["baseline"]["name"], result["baseline"]))
    for name, r in rows:
        print(
            f"{name:<22}{r['pps']:>12,}{r['mbps']:>9.1f}{r['loss_pct']:>8.2f}"
            f"{r['server_cpu_pct']:>7.0f}{r['p50_ms']:>9.3f}{r['p99_ms']:>9.3f}"
            f"  ({r['latency_load_pps']:,})"
        )
    if "relay_vs_baseline_pct" in result:
        print(f"relay reaches {result['relay_vs_baseline_pct']}% of the byte-copy baseline")
    return 0


def _describe_scenario(r: dict[str, Any]) -> str:
    if r["scenario"] == "mesh":
        w, a = r["within_one_relay"], r["across_mesh_hop"]
        return "\n".join(
            [
                f"relaymesh bench --scenario mesh: {r['size']}-byte packets, {r['seconds']:g} s",
                f"{'path':<22}{'packets/s':>12}{'MB/s':>9}{'loss %':>8}{'p50 ms':>9}{'p99 ms':>9}",
                *(
                    f"{name:<22}{x['pps']:>12,}{x['mbps']:>9.1f}{x['loss_pct']:>8.2f}"
                    f"{x['p50_ms']:>9.3f}{x['p99_ms']:>9.3f}"
                    for name, x in (("within one relay", w), ("across one mesh hop", a))
                ),
                f"across a mesh hop: {r['mesh_vs_within_pct']}% of within one relay",
            ]
        )
    key = "visible_everywhere_ms" if r["scenario"] == "registration" else "reachable_again_ms"
    p = r[key]
    return (
        f"relaymesh bench --scenario {r['scenario']}: {r['clients']} clients;"
        f" {key}: p50 {p['p50']:.1f} ms, p99 {p['p99']:.1f} ms, max {p['max']:.1f} ms"
        f"\n({r['note']})"
    )
