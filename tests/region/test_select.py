"""Home-relay choice as a table: latency histories in, choices out."""

from __future__ import annotations

import pytest

from region.select import HomeSelector

RELAYS = {"eu-1": "eu", "us-1": "us", "ap-1": "ap"}


def run(history: list[tuple[float, dict[str, float]]], *, alive: bool = True) -> list[str]:
    sel = HomeSelector()
    homes = []
    for t, regions in history:
        relays = {f"{code}-1": ms for code, ms in regions.items()}
        sel.observe(t, regions, relays, RELAYS)
        choice = sel.choose(t, home_alive=alive, relays_up=set(RELAYS))
        assert choice is not None
        homes.append(choice.region)
    return homes


CASES = [
    ("first choice is the fastest", [(0, {"eu": 30, "us": 10, "ap": 80})], ["us"]),
    (
        "better by 9 ms (and 30%): no move",
        [(0, {"eu": 30, "us": 50}), (30, {"eu": 30, "us": 21})],
        ["eu", "eu"],
    ),
    (
        "better by 12 ms but only 20%: no move",
        [(0, {"eu": 60, "us": 80}), (30, {"eu": 60, "us": 48})],
        ["eu", "eu"],
    ),
    (
        "better by 20 ms and 50%: move",
        [(0, {"eu": 40, "us": 50}), (30, {"eu": 40, "us": 20})],
        ["eu", "us"],
    ),
    (
        "one slow sample of home changes nothing (best of the window)",
        [(0, {"eu": 20, "us": 40}), (30, {"eu": 200, "us": 40}), (60, {"eu": 20, "us": 40})],
        ["eu", "eu", "eu"],
    ),
    (
        "one lost probe of home changes nothing",
        [(0, {"eu": 20, "us": 40}), (30, {"us": 35}), (60, {"eu": 21, "us": 40})],
        ["eu", "eu", "eu"],
    ),
    (
        "jitter around equal latencies never flaps",
        [
            (t, {"eu": 30 + (7 if i % 2 else -7), "us": 30 + (-7 if i % 2 else 7)})
            for i, t in enumerate(range(0, 600, 30))
        ],
        ["eu"] * 20,
    ),
    (
        "home got slower for good: move once its old best leaves the 5-minute window",
        [(0, {"eu": 20, "us": 40}), *[(t, {"eu": 90, "us": 40}) for t in range(30, 331, 30)]],
        ["eu"] * 11 + ["us"],
    ),
]


@pytest.mark.parametrize(("name", "history", "expected"), CASES, ids=[c[0] for c in CASES])
def test_hysteresis_table(
    name: str, history: list[tuple[float, dict[str, float]]], expected: list[str]
) -> None:
    assert run(history) == expected


def test_home_silent_but_relay_alive_stays() -> None:
    sel = HomeSelector(window_s=60)
    sel.observe(0, {"eu": 20, "us": 40}, {"eu-1": 20, "us-1": 40}, RELAYS)
    assert sel.choose(0) is not None
    sel.observe(100, {"us": 40}, {"us-1": 40}, RELAYS)  # eu's samples have aged out
    kept = sel.choose(100, home_alive=True)
    assert kept is not None and kept.region == "eu" and not kept.changed
    moved = sel.choose(100, home_alive=False)
    assert moved is not None and moved.region == "us" and moved.changed


def test_relay_down_moves_within_the_region() -> None:
    relays = {"eu-1": "eu", "eu-2": "eu", "us-1": "us"}
    sel = HomeSelector()
    sel.observe(0, {"eu": 10, "us": 50}, {"eu-1": 10, "eu-2": 12, "us-1": 50}, relays)
    first = sel.choose(0, relays_up=set(relays))
    assert first is not None and first.relay == "eu-1"
    sel.observe(30, {"eu": 12, "us": 50}, {"eu-2": 12, "us-1": 50}, relays)
    second = sel.choose(30, relays_up={"eu-2", "us-1"})
    assert second is not None and (second.region, second.relay) == ("eu", "eu-2")
    assert second.changed


def test_no_samples_no_choice() -> None:
    assert HomeSelector().choose(0) is None


def naive_changes(history: list[dict[str, float]]) -> int:
    last, changes = None, 0
    for regions in history:
        best = min(regions, key=regions.__getitem__)
        changes += last is not None and best != last
        last = best
    return changes


def test_jitter_hysteresis_vs_naive_rule() -> None:
    """The measurement behind docs/performance.md, as a property: far fewer changes."""
    import random

    rng = random.Random(1)
    history = [{"eu": 30 + rng.gauss(0, 8), "us": 33 + rng.gauss(0, 8)} for _ in range(200)]
    sel = HomeSelector()
    changes = 0
    for i, regions in enumerate(history):
        sel.observe(i * 30.0, regions, {f"{k}-1": v for k, v in regions.items()}, RELAYS)
        choice = sel.choose(i * 30.0)
        changes += bool(choice and choice.changed and i > 0)
    naive = naive_changes(history)
    assert naive > 20
    assert changes * 5 <= naive
