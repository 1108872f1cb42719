"""``relaymesh bench``: runs a scenario and prints its figures (a table, or JSON).

Scenarios are registered in :data:`SCENARIOS`, one line each: a function that
runs it from the parsed arguments and returns a JSON-able dict, and one that
describes that dict as text. Progress goes to stderr while a scenario runs.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any, NamedTuple

from ..errors import UserError

__all__ = ["SCENARIOS", "cmd_bench"]


class Scenario(NamedTuple):
    run: Callable[[argparse.Namespace], dict[str, Any]]
    describe: Callable[[dict[str, Any]], str]
    help: str


def cmd_bench(args: argparse.Namespace) -> int:
    scenario = SCENARIOS[args.scenario]
    try:
        result = scenario.run(args)
    except (ValueError, RuntimeError) as exc:
        raise UserError(str(exc)) from None
    print(json.dumps(result) if args.json else scenario.describe(result))
    return 0


# ---- relay: one relay against two byte-copy ceilings ------------------------


def _run_relay(args: argparse.Namespace) -> dict[str, Any]:
    from .relay import run_bench

    return run_bench(
        sizes=args.size or [1200, 64 * 1024],
        seconds=args.seconds,
        runs=args.runs,
        pairs=args.pairs,
        ceilings=not args.no_baseline,
    )


def _mmm(s: dict[str, float], fmt: str) -> str:
    return f"{s['min']:{fmt}} / {s['median']:{fmt}} / {s['max']:{fmt}}"


def _per_run(values: list[float], fmt: str) -> str:
    return " ".join(f"{v:{fmt}}" for v in values)


def _header(r: dict[str, Any], what: str) -> str:
    load = " ".join(f"{x:g}" for x in r["load_average"])
    return (
        f"relaymesh bench{what}: {r['runs']} run(s) of {r['seconds']:g} s,"
        f" {r['cpus']} cpus, load average at start {load} ({r['date']})"
    )


def _target_rows(rows: list[tuple[str, dict[str, Any]]]) -> list[str]:
    """One line per target (min / median / max over the runs), then per-run loss and CPU."""
    out = [
        f"{'':<22}{'packets/s (min / median / max)':>34}{'MB/s median':>13}"
        f"{'p50 ms':>8}{'p99 ms':>8}  (median; latency at ~10% load)"
    ]
    for name, t in rows:
        s = t["summary"]
        out.append(
            f"{name:<22}{_mmm(s['pps'], ',.0f'):>34}{s['mbps']['median']:>13.1f}"
            f"{s['p50_ms']['median']:>8.3f}{s['p99_ms']['median']:>8.3f}"
        )
    out.append("per run: loss % (sent → received); server CPU % of one core, steady window")
    for name, t in rows:
        runs = t["runs"]
        loss = " ".join(f"{r['loss_pct']:g} ({r['sent']:,}→{r['received']:,})" for r in runs)
        out.append(f"  {name:<20} loss {loss}")
        cpu = " ".join("+".join(f"{c:.0f}" for c in r["server_cpu_pct_each"]) for r in runs)
        out.append(f"  {'':<20} cpu  {cpu}")
        if "drops" in runs[0]:
            per = [", ".join(f"{k} {v:,}" for k, v in r["drops"].items()) or "0" for r in runs]
            out.append(f"  {'':<20} drops counted by the relay(s): " + " | ".join(per))
    return out


def _ratio_line(what: str, x: dict[str, Any]) -> str:
    return (
        f"{what}: {x['of_medians']}% of the medians;"
        f" same-run ratios min / median / max {_mmm(x, '.1f')}%"
        f" ({_per_run(x['per_run'], '.1f')})"
    )


def _describe_relay(r: dict[str, Any]) -> str:
    lines = [_header(r, "")]
    for entry in r["sizes"]:
        lines += ["", f"{entry['size']:,}-byte packets, {r['pairs']} pair(s)"]
        lines += _target_rows([(t["name"], t) for t in entry["targets"].values()])
        for c, x in entry.get("relay_vs", {}).items():
            lines.append(_ratio_line(f"relay / {entry['targets'][c]['name']}", x))
    return "\n".join(lines)


# ---- the mesh scenarios ------------------------------------------------------


def _run_mesh(args: argparse.Namespace) -> dict[str, Any]:
    from .mesh import run_mesh

    if args.size and len(args.size) > 1:
        raise ValueError("--scenario mesh takes one --size")
    return run_mesh(args.size[0] if args.size else 1200, args.seconds, args.runs)


def _describe_mesh(r: dict[str, Any]) -> str:
    lines = [_header(r, " --scenario mesh"), f"{r['size']:,}-byte packets"]
    lines += _target_rows(
        [("within one relay", r["within_one_relay"]), ("across one mesh hop", r["across_mesh_hop"])]
    )
    lines.append(_ratio_line("across a mesh hop / within one relay", r["mesh_vs_within"]))
    return "\n".join(lines)


def _run_registration(args: argparse.Namespace) -> dict[str, Any]:
    from .mesh import run_registration

    return run_registration(200)


def _run_failover(args: argparse.Namespace) -> dict[str, Any]:
    from .mesh import run_failover

    return run_failover(20)


def _describe_timing(r: dict[str, Any]) -> str:
    key = "visible_everywhere_ms" if r["scenario"] == "registration" else "reachable_again_ms"
    p = r[key]
    return (
        f"relaymesh bench --scenario {r['scenario']}: {r['clients']} clients;"
        f" {key}: p50 {p['p50']:.1f} ms, p99 {p['p99']:.1f} ms, max {p['max']:.1f} ms"
        f"\n({r['note']})"
    )


def _run_fairness(args: argparse.Namespace) -> dict[str, Any]:
    from .fairness import run_fairness

    if args.size and len(args.size) > 1:
        raise ValueError("--scenario fairness takes one --size")
    size = args.size[0] if args.size else 1200
    return run_fairness(size=size, seconds=args.seconds, runs=args.runs)


def _describe_fairness(r: dict[str, Any]) -> str:
    from .fairness import describe

    return describe(r)


# ---- load: idle clients and pre-auth floods -----------------------------------


def _run_load(args: argparse.Namespace) -> dict[str, Any]:
    from .load import run_load

    return run_load(runs=args.runs)


def _describe_load(r: dict[str, Any]) -> str:
    from .load import describe

    return describe(r)


#: name → Scenario; the CLI offers these names, the first is the default.
SCENARIOS: dict[str, Scenario] = {
    "relay": Scenario(_run_relay, _describe_relay, "one relay vs two byte-copy relays"),
    "mesh": Scenario(_run_mesh, _describe_mesh, "across a mesh hop vs within one relay"),
    "registration": Scenario(_run_registration, _describe_timing, "peer in every relay's cache"),
    "failover": Scenario(_run_failover, _describe_timing, "relay killed → clients reachable"),
    "fairness": Scenario(
        _run_fairness, _describe_fairness, "a client pair alone and while one connection floods"
    ),
    "load": Scenario(
        _run_load,
        _describe_load,
        "memory per idle client, handshakes/s, connect time while pre-auth connections are held",
    ),
}
