"""Sticky assignment and conversation pins (no database, no engine)."""

from __future__ import annotations

import pytest

from rollout.experiment_spec import CONTROL, assign, bucket, stage_weights
from serving.router import ABRouter, ExperimentRoute, Route, RoutingTable

VARIANTS = [
    {"name": CONTROL, "version": "base", "weight": 75.0},
    {"name": "v2", "version": "adapter-v2", "weight": 25.0},
]


def table(variants=VARIANTS, servable=("base", "adapter-v2")) -> RoutingTable:
    return RoutingTable(
        active="base", experiment=ExperimentRoute("exp", "salt", variants), servable=frozenset(servable)
    )


def test_assignment_is_a_pure_function_of_salt_and_key() -> None:
    first = [assign("salt", f"user-{i}", VARIANTS)["name"] for i in range(500)]
    again = [assign("salt", f"user-{i}", VARIANTS)["name"] for i in range(500)]
    assert first == again
    other_salt = [assign("other", f"user-{i}", VARIANTS)["name"] for i in range(500)]
    assert first != other_salt
    assert 0 <= bucket("salt", "x") < 1


def test_weights_split_the_users() -> None:
    users = 20_000
    share = sum(assign("salt", f"user-{i}", VARIANTS)["name"] == "v2" for i in range(users)) / users
    assert share == pytest.approx(0.25, abs=0.015)


def test_ramping_up_only_moves_users_from_control_to_the_candidate() -> None:
    users = [f"user-{i}" for i in range(5000)]
    stages = [stage_weights(VARIANTS, percent) for percent in (5, 25, 50, 100)]
    assert [s[0]["weight"] for s in stages] == [95, 75, 50, 0]
    previous: set[str] = set()
    for variants in stages:
        on_candidate = {u for u in users if assign("salt", u, variants)["name"] == "v2"}
        assert previous <= on_candidate
        previous = on_candidate
    assert len(previous) == len(users)


def test_disabled_or_unloaded_variant_sends_traffic_to_control() -> None:
    disabled = [VARIANTS[0], {**VARIANTS[1], "weight": 100.0, "disabled": True}]
    assert ABRouter.assign("user-1", table(disabled)).version == "base"
    everyone = [VARIANTS[0] | {"weight": 0.0}, VARIANTS[1] | {"weight": 100.0}]
    assert ABRouter.assign("user-1", table(everyone)) == Route("adapter-v2", "exp", "v2")
    # The candidate failed to load on this process: control answers, not an error.
    assert ABRouter.assign("user-1", table(everyone, servable=("base",))).version == "base"


async def test_a_conversation_keeps_its_version_when_weights_change() -> None:
    router = ABRouter("base")
    everyone = [VARIANTS[0] | {"weight": 0.0}, VARIANTS[1] | {"weight": 100.0}]
    router.update(table(everyone))
    first = await router.route("alice", "conv-1", existing=False)
    assert first == Route("adapter-v2", "exp", "v2")
    nobody = [VARIANTS[0] | {"weight": 100.0}, VARIANTS[1] | {"weight": 0.0}]
    router.update(table(nobody))
    assert await router.route("alice", "conv-1", existing=True) == first
    # A new conversation of the same user follows the new weights.
    assert (await router.route("alice", "conv-2", existing=False)).version == "base"
    # A rolled-back variant's conversations move to control.
    router.update(table([nobody[0], {**nobody[1], "disabled": True}], servable=("base",)))
    assert (await router.route("alice", "conv-1", existing=True)).version == "base"


async def test_pins_come_from_the_log_when_this_process_has_not_seen_the_conversation() -> None:
    lookups: list[str] = []

    def lookup(conversation_id: str):
        lookups.append(conversation_id)
        return ("adapter-v2", "exp", "v2") if conversation_id == "conv-known" else None

    router = ABRouter("base", lookup=lookup)
    router.update(table([VARIANTS[0] | {"weight": 100.0}, VARIANTS[1] | {"weight": 0.0}]))
    assert await router.route(None, "conv-known", existing=True) == Route("adapter-v2", "exp", "v2")
    assert (await router.route(None, "conv-new", existing=True)).version == "base"
    assert lookups == ["conv-known", "conv-new"]
    # After the experiment ends the conversation keeps its version, no longer tagged with it.
    router.update(RoutingTable(active="base", servable=frozenset({"base", "adapter-v2"})))
    assert await router.route(None, "conv-known", existing=True) == Route("adapter-v2")


def test_a_side_by_side_pair_is_the_control_and_the_users_candidate() -> None:
    router = ABRouter("base")
    assert router.pair("user-1") is None  # no experiment
    router.update(table())
    pairs = [router.pair(f"user-{i}") for i in range(200)]
    # Every pair puts the control next to the candidate, both counted in the experiment, and a
    # user on the candidate keeps it.
    assert all(p == (Route("base", "exp", CONTROL), Route("adapter-v2", "exp", "v2")) for p in pairs)
    three = [*VARIANTS, {"name": "v3", "version": "adapter-v3", "weight": 25.0}]
    router.update(table(three, servable=("base", "adapter-v2", "adapter-v3")))
    for i in range(300):
        assigned = ABRouter.assign(f"user-{i}", router.table)
        control, candidate = router.pair(f"user-{i}")
        assert control.variant == CONTROL and candidate.variant in ("v2", "v3")
        if assigned.variant != CONTROL:
            assert candidate == assigned
    picked = {router.pair(f"user-{i}")[1].variant for i in range(300)}
    assert picked == {"v2", "v3"}
    # Without a candidate served here there is no pair.
    router.update(table(servable=("base",)))
    assert router.pair("user-1") is None
